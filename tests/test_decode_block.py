"""The native decode block (``kernels/decode_block.py``): a decode token's attention half and
router in one call give the bits of the op-by-op forward, for every weight kind (plain float32,
q8, q4 dense; q4 experts with the native router) and attention variant (GQA, q/k norms over the
projection and per head, clip, sliding window, attention sinks and biases), and the blocks fall
back per layer where they cannot run. With the chosen experts in RAM, the whole layer (the
experts' weighted sum too) is one call, with the same bits."""

from __future__ import annotations

import pytest
import torch
from hf_models import save_hf_model
from test_gpt_oss import build as build_gpt_oss

import micro_expert_router as mer
import micro_expert_router.model as model
from micro_expert_router.kernels import attention
from micro_expert_router.kernels.decode_block import DecodeBlock
from micro_expert_router.store import convert

pytestmark = pytest.mark.skipif(not attention.available(), reason="no native attention library")


def decode_both(path, steps: int = 6, **opts):
    """Logits of a prompt then ``steps`` single-token steps, fused and op by op; the blocks;
    whether the model routes in its fast mode."""
    outs = []
    with mer.load(path, **opts) as eng:
        m = eng.model
        gen = torch.Generator().manual_seed(3)
        ids = torch.randint(0, eng.args.vocab_size, (5 + steps,), generator=gen)
        for fused in (True, False):
            m.fused_decode = fused
            kv = m.new_cache(32)
            got = [m.forward(ids[:5], kv, last_only=True)]
            got += [m.forward(ids[5 + j : 6 + j], kv) for j in range(steps)]
            outs.append((torch.cat(got), kv))
        blocks = m.decode_blocks()
        fast = m.fast_router
    return outs, blocks, fast


def assert_same(outs):
    (a, kva), (b, kvb) = outs
    assert torch.equal(a, b)  # bit for bit
    for i in range(len(kva.k)):
        assert torch.equal(kva.k[i], kvb.k[i]) and torch.equal(kva.v[i], kvb.v[i])


@pytest.mark.parametrize("name", ["olmoe", "olmoe-gqa-norm", "qwen3moe", "mixtral-swa-tied",
                                  "qwen2moe"])  # fmt: skip
@pytest.mark.parametrize("dense", ["f32", "q4", "q8"])
def test_fused_block_gives_the_op_by_op_bits(tmp_path, name, dense):
    save_hf_model(name, tmp_path / "ckpt")
    # quantized experts need D and the FFN width in whole 32-blocks: the others keep f32
    # experts beside their quantized dense weights
    dtype = dense if name in ("olmoe-gqa-norm", "qwen2moe") else "f32"
    store = convert(tmp_path / "ckpt", tmp_path / "s", dtype=dtype, dense=dense, progress=False,
                    log=None)  # fmt: skip
    outs, blocks, fast = decode_both(store.path)
    assert all(b is not None for b in blocks)  # every layer of these families runs natively
    assert fast == (dense != "f32") or name != "qwen2moe"  # where the router runs natively
    if dense == "q4" and name == "qwen2moe":  # o_proj in the expert kernel's row blocks
        assert all(b.ints[1] in (3, 4) for b in blocks)
    # the fast mode routes in the block; the exact mode keeps torch's router
    assert [b.routes for b in blocks] == [fast and moe for moe in store.args.moe_layers]
    assert_same(outs)


def test_fused_block_with_sinks_window_and_biases(tmp_path):
    build_gpt_oss().save_pretrained(tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "s", dtype="q4", dense="q4", progress=False,
                    log=None)  # fmt: skip
    outs, blocks, _ = decode_both(store.path)
    assert all(b is not None for b in blocks)
    assert any(b.ints[9] for b in blocks) and all(b.tensors[12].numel() for b in blocks)
    assert_same(outs)


def test_fused_block_with_bf16_kv_and_a_benchmark_router(tmp_path):
    save_hf_model("qwen2moe", tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "s", dtype="q4", dense="q4", progress=False,
                    log=None)  # fmt: skip
    assert_same(decode_both(store.path, kv_dtype="bfloat16")[0])


def test_layers_the_block_cannot_run_keep_the_op_by_op_path(tmp_path):
    save_hf_model("olmoe", tmp_path / "ckpt")
    with mer.load(tmp_path / "ckpt", dtype="bfloat16") as eng:  # bf16 activations
        assert eng.model.decode_blocks() == [None] * eng.args.n_layers
        steps = list(eng.generate([3, 4, 5], max_tokens=3, temperature=0, stop_at_eos=False))
        assert len(steps) == 3  # still decodes


def test_bad_block_arguments_are_named_errors():
    x, h = torch.zeros(1, 8), torch.zeros(1, 8)
    ids, wts = torch.zeros(1, 1, dtype=torch.int64), torch.zeros(1, 1)
    kc = torch.zeros(1, 4, 8)
    with pytest.raises(RuntimeError, match="needs 14 tensors"):
        torch.ops.mer_attn.attn_block_(x, h, ids, wts, kc, kc, [x], [0], [0.0], 0)
    ts = [torch.ones(8)] * 2 + [torch.zeros(24, 8)] + [torch.empty(0)] * 4
    ts += [torch.zeros(8, 8)] + [torch.empty(0)] * 2 + [torch.zeros(4, 8)] * 2
    ts += [torch.empty(0)] * 2
    iv = [0, 0, 8, 8, 8, 1, 1, 8, 0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="outside the RoPE tables"):
        torch.ops.mer_attn.attn_block_(x, h, ids, wts, kc, kc, ts, iv, [1e-6, 1.0, 0.0], 4)
    with pytest.raises(RuntimeError, match="widths disagree"):
        torch.ops.mer_attn.attn_block_(x, h, ids, wts, kc, kc, ts, [0, 0, 8, 8, 4, *iv[5:]],
                                       [1e-6, 1.0, 0.0], 0)  # fmt: skip


@pytest.mark.parametrize("dtype", ["q4", "q8"])
def test_a_resident_layer_runs_whole_in_one_call(tmp_path, dtype, monkeypatch):
    """``DecodeBlock.layer``: with the chosen experts in the cache, attention, router and the
    experts' sum run in one call and give the bits (logits, KV) and the hit counts of the
    attention block followed by ``mlp``; a layer with a chosen expert not resident falls back
    to ``mlp`` after the call's attention half (a budget of three quarters of the experts
    gives both)."""
    save_hf_model("olmoe-q", tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "s", dtype=dtype, dense=dtype, progress=False,
                    log=None)  # fmt: skip
    done: list[bool] = []
    layer = DecodeBlock.layer

    def spy(self, *args):
        out = layer(self, *args)
        done.append(out[3])
        return out

    monkeypatch.setattr(DecodeBlock, "layer", spy)
    heads: list[torch.Tensor] = []  # lm_head's inputs: the int8 activations of a quantized
    # lm_head round away most last-bit differences, so the logits alone would hide them
    head = model.linear

    def head_spy(x, w, *bias):
        if tuple(w.shape)[0] == store.args.vocab_size:
            heads.append(x.clone())
        return head(x, w, *bias)

    monkeypatch.setattr(model, "linear", head_spy)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, store.args.vocab_size, (12,), generator=gen)

    def run(one_call: bool, **opts):
        with mer.load(store.path, **opts) as eng:
            eng.preload()
            m = eng.model
            if not one_call:
                m._one_call = [False] * eng.args.n_layers
            kv = m.new_cache(32)
            got = [m.forward(ids[:4], kv, last_only=True)]
            got += [m.forward(ids[j : j + 1], kv) for j in range(4, len(ids))]
            s = m.provider.stats
            hidden = torch.cat(heads)
            heads.clear()
            return (torch.cat(got), kv), (s.experts_needed, s.hits), hidden

    whole, whole_stats, whole_h = run(True)
    assert done and all(done)  # every layer of every step in one call
    done.clear()
    split, split_stats, split_h = run(False)
    assert not done
    assert_same([whole, split])
    assert torch.equal(whole_h, split_h) and whole_stats == split_stats
    budget = store.expert_bytes * store.args.n_experts * store.args.n_layers * 3 // 4
    part, _, part_h = run(True, cache_bytes=budget)
    assert True in done and False in done
    assert_same([whole, part])
    assert torch.equal(whole_h, part_h)
