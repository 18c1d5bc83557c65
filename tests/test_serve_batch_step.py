"""The batched decode step the server runs (issue 16): ``experts_rows`` and ``moe_combine``
(kernels/experts.py, native_batch.cpp), ``Transformer.routed_batch``, and the streaming cache's
rule against thrashing when a batch's union outgrows the cache.

- ``experts_rows``: each (expert, token) row has the bits of ``experts_forward`` on that token
  alone (q4 and q8, float32 and bfloat16, the scalar code and the best ISA); the per-expert
  fallback (float formats) gives ``expert_forward``'s rows; bad offsets are a ``ConfigError``.
- ``moe_combine``: the native op and its torch twin give the same bits.
- ``forward_batch`` on q4 and q8 stores, resident and streamed under a small cache: each sequence's
  logits are bit-identical to the same sequence decoded alone (float32), and the native batch op
  ran.
- The rule against thrashing: off while a step's experts fit, on when a batch's union outgrows
  the cache; with it a repeated batch gets more hits than plain LRU.
"""

from __future__ import annotations

import pytest
import torch

import micro_expert_router as mer
from micro_expert_router.cache import ExpertCache
from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import experts as kx
from micro_expert_router.kernels import native
from micro_expert_router.kernels.formats import FORMATS, expert_forward

transformers = pytest.importorskip("transformers")


def _views(name: str, d: int = 256, inter: int = 384, group: int = 128, n: int = 6):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(0)
    views = []
    for _ in range(n):
        w = (torch.randn(inter, d, generator=g) * d**-0.5,
             torch.randn(inter, d, generator=g) * d**-0.5,
             torch.randn(d, inter, generator=g) * inter**-0.5)  # fmt: skip
        views.append(fmt.view(fmt.pack(*w, group), d, group))
    return fmt, views


def _pairs(n_experts: int, t: int):
    """(expert, token) pairs grouped by expert; tokens, offsets."""
    pairs = [(e, s) for e in range(n_experts) for s in range(t) if (e * 7 + s * 3) % 5 < 3]
    offs = [0]
    for e in range(n_experts):
        offs.append(offs[-1] + sum(1 for ee, _ in pairs if ee == e))
    return pairs, torch.tensor([s for _, s in pairs]), offs


@pytest.mark.parametrize("name", ["q4", "q8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_rows_have_the_bits_of_each_token_alone(name, dtype):
    fmt, views = _views(name)
    x = torch.randn(5, 256).to(dtype)
    pairs, tokens, offs = _pairs(len(views), 5)
    assert kx._rows_native(fmt, x, views) is not None or not native.available()
    y = kx.experts_rows(fmt, x, views, tokens, offs)  # [P, D]
    for p, (e, s) in enumerate(pairs):
        assert torch.equal(y[p], kx.experts_forward(fmt, x[s : s + 1], [views[e]])[0][0])
    # adding into out continues an expert, as expert_forward's out does
    again = kx.experts_rows(fmt, x, views, tokens, offs, out=y.clone())
    for p, (e, s) in enumerate(pairs):
        cont = kx.experts_forward(fmt, x[s : s + 1], [views[e]], out=[y[p : p + 1].clone()])
        assert torch.equal(again[p], cont[0][0])


@pytest.mark.skipif(not native.available(), reason="native kernels unavailable")
@pytest.mark.parametrize("name", ["q4", "q8"])
def test_experts_rows_scalar_and_simd_agree(name):
    fmt, views = _views(name)
    x = torch.randn(4, 256)
    _, tokens, offs = _pairs(len(views), 4)
    d, g = 256, 128
    sec, per = kx._offsets(name, d, g)
    bufs = [v.buf for v in views]
    ys = []
    for isa in (0, 1):
        y = torch.zeros(tokens.shape[0], d)
        if name == "q8":
            torch.ops.mer.q8_experts_rows_(y, x, bufs, tokens, offs, d, g, sec, per, isa)
        else:
            torch.ops.mer.q4_experts_rows_(y, x, bufs, tokens, offs, d, g, views[0].block, sec,
                                           per, native.q4_block_rows(), True, isa)  # fmt: skip
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


def test_experts_rows_fallback_and_errors():
    fmt, views = _views("f32", d=64, inter=96, group=32, n=3)
    x = torch.randn(4, 64)
    pairs, tokens, offs = _pairs(3, 4)
    y = kx.experts_rows(fmt, x, views, tokens, offs)
    for e in range(3):
        a, b = offs[e], offs[e + 1]
        assert torch.equal(y[a:b], expert_forward(fmt, x[tokens[a:b]], [views[e]]))
    with pytest.raises(ConfigError, match="offsets"):
        kx.experts_rows(fmt, x, views, tokens, offs[:-1])
    with pytest.raises(ConfigError, match="out must be"):
        kx.experts_rows(fmt, x, views, tokens, offs, out=torch.zeros(1, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_combine_native_and_torch_agree(monkeypatch, dtype):
    y = torch.randn(10, 96).to(dtype)
    idx = torch.tensor([[0, 3, 7], [1, 2, 9], [4, 5, 6]])
    w = torch.rand(3, 3)
    a = kx.moe_combine(y, idx, w)
    one = kx.moe_combine(y, idx[1:2], w[1:2])  # a token alone: its bits in the batch
    monkeypatch.setattr(native, "load", lambda: False)
    b = kx.moe_combine(y, idx, w)
    assert torch.equal(a, b) and torch.equal(one[0], a[1])
    yf, wf = y.float(), w.to(dtype).float()
    ref = (wf[:, 0, None] * yf[idx[:, 0]] + wf[:, 1, None] * yf[idx[:, 1]]) + wf[:, 2, None] * \
        yf[idx[:, 2]]  # fmt: skip
    assert torch.equal(a, ref.to(dtype))


@pytest.mark.skipif(not native.available(), reason="no native kernels")
@pytest.mark.parametrize("name", ["q4", "q8"])
def test_experts_combine_has_the_bits_of_stack_and_combine(name):
    """The single-token decode's one-call experts + weighted sum (``experts_combine``) against
    ``experts_stack`` + ``moe_combine`` (what a streamed token runs), bit for bit."""
    fmt, views = _views(name)
    x = torch.randn(1, 256)
    w = torch.rand(1, 5)
    order = [3, 0, 4, 1, 2]
    got = kx.experts_combine(fmt, x, views[:5], w, order)
    ys = kx.experts_stack(fmt, x, views[:5])[:, 0]  # [5, D]
    want = kx.moe_combine(ys, torch.arange(5)[None, :], w[:, order])
    assert got is not None and torch.equal(got, want)
    assert kx.experts_combine(fmt, x.bfloat16(), views[:5], w, order) is None  # two-step path
    with pytest.raises(RuntimeError, match="order"):
        kx.experts_combine(fmt, x, views[:5], w, [0, 1, 2, 3, 9])


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny OLMoE whose sizes the native batch op takes (D, g multiples of 32)."""
    root = tmp_path_factory.mktemp("olmoe-batch")
    cfg = transformers.OlmoeConfig(
        hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=16, num_experts_per_tok=4, vocab_size=128,
        norm_topk_prob=False, pad_token_id=0, eos_token_id=1, bos_token_id=None,
        tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        model.get_output_embeddings().weight.normal_(0.0, 0.1)
    model.save_pretrained(root / "ckpt")
    return root / "ckpt"


def _store(ckpt, tmp_path, name):
    from micro_expert_router.store.convert import convert

    return convert(ckpt, tmp_path / name, dtype=name, progress=False, log=None)


@pytest.mark.parametrize("name", ["q4", "q8"])
@pytest.mark.parametrize("cached", [None, 6])
def test_batch_step_is_bit_identical_to_each_sequence_alone(ckpt, tmp_path, monkeypatch, name,
                                                            cached):  # fmt: skip
    store = _store(ckpt, tmp_path, name)
    budget = None if cached is None else cached * store.expert_bytes
    calls = []
    rows = kx.experts_rows
    monkeypatch.setattr("micro_expert_router.model.experts_rows",
                        lambda fmt, x, views, *a, **k: calls.append(
                            kx._rows_native(fmt, x, views) is not None) or rows(fmt, x, views, *a,
                                                                                **k))  # fmt: skip
    with mer.load(store.path, cache_bytes=budget, dtype="float32") as engine:
        m = engine.model
        g = torch.Generator().manual_seed(1)
        prompts = [torch.randint(0, 128, (n,), generator=g) for n in (5, 9, 3, 7)]
        feeds = [torch.randint(0, 128, (4,), generator=g) for _ in prompts]
        alone = []
        for p, f in zip(prompts, feeds, strict=True):
            kv = m.new_cache(16)
            m.forward(p, kv)
            alone.append([m.forward(f[j : j + 1], kv)[0] for j in range(4)])
        caches = [m.new_cache(16) for _ in prompts]
        for p, kv in zip(prompts, caches, strict=True):
            m.forward(p, kv)
        calls.clear()
        for j in range(4):
            out = m.forward_batch([int(f[j]) for f in feeds], caches)  # [B, V]
            for b in range(len(prompts)):
                assert torch.equal(out[b], alone[b][j]), (j, b)
        assert calls and (all(calls) or not native.available())
        if cached is not None:
            assert m.provider.stats.misses > 0


def test_cache_admit_keep_refuses_recent_victims():
    c = ExpertCache(2, policy="lru")
    c.begin_token()
    for k in ((0, 0), (0, 1)):
        c.lookup(k)
        assert c.admit(k, "v", 1)
    c.lookup((0, 2))
    assert not c.admit((0, 2), "v", 1, keep=lambda key: True)
    assert (0, 0) in c and (0, 1) in c and c.refused == 1
    assert c.admit((0, 2), "v", 1, keep=lambda key: key != (0, 0))
    assert (0, 0) not in c


def test_thrash_rule_is_off_for_one_sequence_and_pays_for_a_batch(ckpt, tmp_path, monkeypatch):
    store = _store(ckpt, tmp_path, "q4")
    budget = 10 * store.expert_bytes  # 10 of 32 experts; a step of 6 sequences uses ~ 25

    def hits(rule: bool) -> tuple[int, int]:
        with mer.load(store.path, cache_bytes=budget, dtype="float32") as engine:
            m, p = engine.model, engine.model.provider
            if not rule:
                monkeypatch.setattr(p, "keep_rule", lambda: None)
            kv = m.new_cache(64)
            m.forward(torch.tensor([3, 4, 5]), kv)
            m.forward(torch.tensor([6]), kv)
            m.forward(torch.tensor([7]), kv)  # the step before used 8 experts too
            assert p.keep_rule() is None  # one sequence: 2 layers x 4 experts fit
            g = torch.Generator().manual_seed(2)
            caches = [m.new_cache(64) for _ in range(6)]
            for kv in caches:
                m.forward(torch.randint(0, 128, (4,), generator=g), kv)
            before = p.stats.snapshot()
            for _ in range(12):
                m.forward_batch(torch.randint(0, 128, (6,), generator=g).tolist(), caches)
            if rule:
                assert p.keep_rule() is not None
            d = p.stats.minus(before)
            return d.hits, d.experts_needed

    (with_rule, n1), (lru, n2) = hits(True), hits(False)
    assert n1 == n2  # the same routing: the rule changes residency, never results
    assert with_rule > lru
