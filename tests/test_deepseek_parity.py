"""DeepSeek-V2/V3 against transformers on tiny random models (``hf_families.py``): float32 logits
within 1e-4 relative, 32 greedy tokens identical, KV-cached decode (MLA's absorbed path) against
a full recompute; a store streams bit-identically to the resident checkpoint at budget 0, 25%
and all; q8 and q4 stores load and generate; MLA's cache costs
``(kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes`` per token.

``test_glm_parity.py`` runs the same checks on GLM-4.5's cases.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from hf_families import save_family_model  # noqa: E402

import micro_expert_router as mer  # noqa: E402
from micro_expert_router.memory import kv_bytes  # noqa: E402
from micro_expert_router.store import Store, convert  # noqa: E402

CASES = ["dsv2", "dsv2-lora-greedy", "dsv3", "dsv3-plain"]
RESIDENT: dict = {}  # case folder -> (logits, greedy tokens) of the resident checkpoint
QUANTIZED = {"dsv2", "dsv3", "glm"}  # one case per family: q8 and q4 stores (conversion is slow)


def make_case(name: str, root):
    hf = save_family_model(name, root / "ckpt")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, hf.config.vocab_size, (24,), generator=g).tolist()
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        greedy = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)
    return name, root, ids, ref, greedy[0, len(ids) :].tolist()


@pytest.fixture(scope="module", params=CASES)
def family_case(request, tmp_path_factory):
    return make_case(request.param, tmp_path_factory.mktemp(request.param))


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_logits_and_greedy_tokens_match_transformers(family_case):
    name, root, ids, ref, greedy = family_case
    with mer.load(root / "ckpt") as engine:
        out = engine.logits(ids)
        assert rel_err(out, ref) <= 1e-4, name
        ours = [s.token for s in engine.generate(ids, 32, temperature=0, stop_at_eos=False)]
    assert len(greedy) == 32 and ours == greedy, name


def test_kv_cached_decode_matches_full_recompute(family_case):
    name, root, ids, _, _ = family_case
    with mer.load(root / "ckpt") as engine:
        model = engine.model
        kv = model.new_cache()
        steps = [model.forward(torch.tensor(ids), kv)[-1]]
        seq = list(ids)
        for _ in range(12):
            seq.append(int(torch.argmax(steps[-1])))
            steps.append(model.forward(torch.tensor(seq[-1:]), kv)[-1])
        full = engine.logits(seq)
    assert rel_err(torch.stack(steps).numpy(), full[len(ids) - 1 :]) <= 1e-4, name


def test_batched_decode_matches_one_sequence_at_a_time(family_case):
    name, root, ids, _, _ = family_case
    with mer.load(root / "ckpt") as engine:
        model = engine.model
        caches, last = [], []
        for n in (9, 14):
            kv = model.new_cache(64)
            last.append(int(torch.argmax(model.forward(torch.tensor(ids[:n]), kv)[-1])))
            caches.append(kv)
        singles = []
        for tok, kv in zip(last, caches, strict=True):
            copy = model.new_cache(64)
            copy.k = [t.clone() for t in kv.k]
            copy.v = [t.clone() for t in kv.v]
            copy.length = kv.length
            singles.append(model.forward(torch.tensor([tok]), copy)[-1])
        batch = model.forward_batch(last, caches)
    assert rel_err(batch.numpy(), torch.stack(singles).numpy()) <= 1e-5, name


@pytest.mark.parametrize("fraction", [0.0, 0.25, None])
def test_store_streams_bit_identically_to_resident(family_case, fraction, tmp_path_factory):
    name, root, ids, _, _ = family_case
    store_dir = root / "store"
    if not store_dir.exists():  # once per case: the store and the resident run's output
        convert(root / "ckpt", store_dir, progress=False, log=None)
        with mer.load(root / "ckpt") as ref:
            RESIDENT[root] = (ref.logits(ids), [s.token for s in ref.generate(
                ids, 12, temperature=0, stop_at_eos=False)])  # fmt: skip
    logits, tokens = RESIDENT[root]
    store = Store.open(store_dir)
    budget = None if fraction is None else int(fraction * store.total_expert_bytes)
    with mer.load(store_dir, cache_bytes=budget) as engine:
        assert np.array_equal(engine.logits(ids), logits), name
        steps = list(engine.generate(ids, 12, temperature=0, stop_at_eos=False))
        assert [s.token for s in steps] == tokens, name
        if fraction == 0.0:
            assert sum(s.hits for s in steps) == 0 and sum(s.bytes_read for s in steps) > 0


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_quantized_stores_load_and_generate(family_case, dtype, tmp_path):
    name, root, ids, ref, _ = family_case
    if name not in QUANTIZED:
        pytest.skip("q8/q4 run on one case per family")
    convert(root / "ckpt", tmp_path / "store", dtype=dtype, progress=False, log=None)
    with mer.load(tmp_path / "store", cache_bytes=0) as engine:
        out = engine.logits(ids)
        steps = list(engine.generate(ids, 8, temperature=0, stop_at_eos=False))
    assert len(steps) == 8 and np.isfinite(out).all()
    # quantized experts and dense weights (and a bf16 KV cache): close to float32, not equal
    assert rel_err(out, ref) <= (0.05 if dtype == "q8" else 0.25), name


def test_kv_bytes_per_token(family_case):
    name, root, _, _, _ = family_case
    with mer.load(root / "ckpt") as engine:
        a = engine.model.args
        kv = engine.model.new_cache(100)
    if a.attention == "mla":
        per_token = (a.kv_lora_rank + a.qk_rope_head_dim) * a.n_layers * 4
    else:
        per_token = 2 * a.n_kv_heads * a.head_dim * a.n_layers * 4
    nbytes = sum(t.numel() * t.element_size() for t in (*kv.k, *kv.v))
    assert nbytes == 100 * per_token == kv_bytes(a, 100, 4), name


def test_traces_split_and_prefetch_see_routed_experts_only(family_case, tmp_path):
    """Traces hold the MoE layers' routed experts (not the dense first layers, not the shared
    experts); the simulator replays them to the engine's counts; split experts and prefetching
    keep the output bit-identical."""
    import json
    import subprocess
    import sys

    from micro_expert_router.trace import read_trace

    name, root, ids, _, _ = family_case
    store_dir = root / "store"
    if not store_dir.exists():
        pytest.skip("needs the store of test_store_streams_bit_identically_to_resident")
    logits, tokens = RESIDENT[root]
    store = Store.open(store_dir)
    a = store.args
    trace = tmp_path / "run.jsonl"
    with mer.load(store_dir, cache_bytes=0) as probe:
        slot = probe.provider.slot_bytes
    with mer.load(store_dir, cache_bytes=3 * slot, policy="lru") as engine:
        steps = list(engine.generate(ids, 12, temperature=0, stop_at_eos=False, trace=trace,
                                     trace_hidden=True))  # fmt: skip
    assert [s.token for s in steps] == tokens
    tr = read_trace(trace)
    assert tr.layers == tuple(i for i in range(a.n_layers) if a.moe_layers[i])
    assert tr.top_k == a.top_k and tr.num_experts == a.n_experts
    assert int(tr.experts.max()) < a.n_experts
    p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", "sim", str(trace),
                        "--policy", "lru", "--cache-experts", "3", "--json"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    sim = json.loads(p.stdout.strip().splitlines()[-1])
    assert (sim["hits"], sim["misses"]) == (sum(s.hits for s in steps),
                                            sum(s.misses for s in steps))  # fmt: skip
    budget = store.total_expert_bytes // 4
    with mer.load(store_dir, cache_bytes=budget, split=0.5, prefetch="s,l,m") as engine:
        assert np.array_equal(engine.logits(ids), logits), name
        got = [s.token for s in engine.generate(ids, 12, temperature=0, stop_at_eos=False)]
    assert got == tokens, name
