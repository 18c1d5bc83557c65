"""GPT-OSS end to end on tiny random models: parity with transformers (float32 logits, 32 greedy
tokens past the sliding window), streaming bit-identical to resident at budgets 0, 25% and all,
q8/q4 stores, and an MXFP4 checkpoint kept lossless in an ``mxfp4`` store."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import micro_expert_router as mer
from micro_expert_router.errors import ConfigError
from micro_expert_router.store import Store, convert

transformers = pytest.importorskip("transformers")

WINDOW = 8
CONFIG = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
    num_key_value_heads=2, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
    sliding_window=WINDOW, max_position_embeddings=256, swiglu_limit=1.5,
    layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
    rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0, "beta_slow": 1.0,
                     "truncate": False, "original_max_position_embeddings": 32,
                     "rope_theta": 10000.0},
)  # fmt: skip


def build(seed: int = 0):
    cfg = transformers.GptOssConfig(**CONFIG)
    torch.manual_seed(seed)
    model = transformers.GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.2)
            elif name.endswith("embed_tokens.weight") or name.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif "router" in name:
                p.normal_(0.0, 0.5)
            elif "experts" in name:
                p.normal_(0.0, 0.3 if "gate_up_proj" == name.rsplit(".", 1)[1] else 0.1)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptoss")
    hf = build()
    hf.save_pretrained(root / "ckpt")
    ids = torch.randint(0, 96, (32,), generator=torch.Generator().manual_seed(1)).tolist()
    return root, hf, ids


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_config_reads_gpt_oss_keys(case):
    root, hf, _ = case
    a = mer.load(root / "ckpt").args
    assert a.sliding_layers == (True, False, True, False) and a.sliding_window == WINDOW
    assert a.attn_sinks and a.expert_act == "clamped_swiglu" and a.swiglu_limit == 1.5
    assert a.rope_type == "yarn" and a.qkv_bias and a.o_bias and a.topk_method == "topk_softmax"
    cfg = json.loads((root / "ckpt" / "config.json").read_text())
    bad = dict(cfg, layer_types=["sliding_attention"] * 3)
    with pytest.raises(ConfigError, match="layer_types"):
        mer.config.ModelArgs.from_hf(bad)


def test_logits_and_greedy_match_transformers(case):
    root, hf, ids = case
    engine = mer.load(root / "ckpt")
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)[0, 32:]
    assert rel_err(engine.logits(ids), ref) <= 1e-4
    ours = [s.token for s in engine.generate(ids, max_tokens=32, temperature=0, stop_at_eos=False)]
    assert ours == gen.tolist()  # 64 positions, 8 times the sliding window
    # decode past the window, token by token, against one forward over the whole sequence
    seq = ids + ours
    with torch.no_grad():
        full = hf(torch.tensor([seq])).logits[0].numpy()
    assert rel_err(engine.logits(seq), full) <= 1e-4


@pytest.mark.parametrize(("fraction", "split"), [(0.0, 1.0), (0.25, 1.0), (None, 1.0),
                                                 (0.25, 0.5)])  # fmt: skip
def test_store_streams_bit_identically(case, fraction, split):
    root, _, ids = case
    if not (root / "store").exists():
        convert(root / "ckpt", root / "store", progress=False, log=None)
    ref = mer.load(root / "ckpt")
    logits = ref.logits(ids)
    tokens = [s.token for s in ref.generate(ids, 16, temperature=0, stop_at_eos=False)]
    total = Store.open(root / "store").total_expert_bytes
    budget = None if fraction is None else int(fraction * total)
    with mer.load(root / "store", cache_bytes=budget, split=split) as engine:
        assert engine.provider.format.name == "gptoss:f32:1.702:1.5"  # limit 1.5: named
        assert np.array_equal(engine.logits(ids), logits)
        steps = list(engine.generate(ids, 16, temperature=0, stop_at_eos=False))
        assert [s.token for s in steps] == tokens
        if fraction == 0.0:
            assert sum(s.hits for s in steps) == 0 and sum(s.bytes_read for s in steps) > 0


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_quantized_stores_load_and_generate(case, dtype):
    root, _, ids = case
    convert(root / "ckpt", root / dtype, dtype=dtype, progress=False, log=None, force=True)
    ref = mer.load(root / "ckpt").logits(ids)
    with mer.load(root / dtype, cache_bytes=0) as streamed, mer.load(root / dtype) as resident:
        assert streamed.provider.format.name.startswith(f"gptoss:{dtype}")
        out = streamed.logits(ids)
        assert np.array_equal(out, resident.logits(ids))
        if dtype == "q8":
            assert rel_err(out, ref) < 0.1
        else:  # 4-bit weights everywhere on a tiny sharp random model: a rough copy
            assert np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.7
        steps = list(streamed.generate(ids, 8, temperature=0, stop_at_eos=False))
        assert len(steps) == 8


# ---- MXFP4 -----------------------------------------------------------------------------------


def write_mxfp4_checkpoint(hf, folder: Path, float_folder: Path, seed: int = 2) -> None:
    """The official release's layout: experts as ``*_blocks`` + ``*_scales`` (uint8, rows are
    output features), bf16 biases, ``quantization_config`` mxfp4. ``float_folder`` gets the same
    model with the experts dequantized (transformers' own MXFP4 path needs a GPU)."""
    from safetensors.torch import save_file

    from micro_expert_router.kernels.mxfp4 import dequantize_rows

    c = hf.config
    e, d, inter = c.num_local_experts, c.hidden_size, c.intermediate_size
    g = torch.Generator().manual_seed(seed)
    state = {k: v.contiguous() for k, v in hf.state_dict().items()}
    tensors = {}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts"
        for proj, rows, k in (("gate_up_proj", 2 * inter, d), ("down_proj", d, inter)):
            blocks = torch.randint(0, 256, (e, rows, k // 32, 16), generator=g, dtype=torch.uint8)
            scales = torch.randint(121, 126, (e, rows, k // 32), generator=g, dtype=torch.uint8)
            w = dequantize_rows(blocks.view(-1, k // 32, 16), scales.view(-1, k // 32))
            state[f"{p}.{proj}"] = w.view(e, rows, k).transpose(1, 2).contiguous()  # [E, in, out]
            bias = state[f"{p}.{proj}_bias"].to(torch.bfloat16)
            state[f"{p}.{proj}_bias"] = bias.float()
            tensors.update({f"{p}.{proj}_blocks": blocks, f"{p}.{proj}_scales": scales,
                            f"{p}.{proj}_bias": bias})  # fmt: skip
    hf.load_state_dict(state)
    hf.save_pretrained(float_folder)
    folder.mkdir()
    for k, v in state.items():
        if ".mlp.experts." not in k:
            tensors[k] = v
    save_file(tensors, str(folder / "model.safetensors"))
    cfg = json.loads((float_folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(cfg))


def test_mxfp4_checkpoint_kept_lossless(case, tmp_path):
    root, _, ids = case
    hf = build(seed=4)
    write_mxfp4_checkpoint(hf, tmp_path / "mx", tmp_path / "float")
    notes: list[str] = []
    # dense="f32": this test's attention weights are random float32 (the release's are bf16,
    # the default dense format of an mxfp4 store)
    convert(tmp_path / "mx", tmp_path / "store", dtype="mxfp4", dense="f32", progress=False,
            log=notes.append)  # fmt: skip
    assert any("lossless" in n for n in notes)
    store = Store.open(tmp_path / "store")
    assert store.format.name == "mxfp4:1.702:1.5"
    # the store's bytes are the checkpoint's blocks and scales, regrouped
    from micro_expert_router.checkpoint import Checkpoint
    from micro_expert_router.models.gpt_oss import read_expert

    entry, data = next(store.iter_extents())
    got = store.format.unpack_raw(torch.frombuffer(bytearray(data), dtype=torch.uint8),
                                  64, 128, store.group)  # fmt: skip
    with Checkpoint(tmp_path / "mx") as ckpt:
        want = read_expert(ckpt, entry.layer, entry.expert)
    assert all(torch.equal(a, b.to(a.dtype)) for a, b in zip(got, want, strict=True))
    report = json.loads((tmp_path / "store" / "conversion_report.json").read_text())
    assert report["summary"]["gate"]["max"] == 0.0  # the checkpoint's own values
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
        gen = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)[0, 32:]
    # float32 activations: the kernel is the dequantized math to float32 rounding
    with mer.load(tmp_path / "store", cache_bytes=0) as engine:
        assert rel_err(engine.logits(ids), ref) <= 1e-4
        ours = [s.token for s in engine.generate(ids, 32, temperature=0, stop_at_eos=False)]
        assert ours == gen.tolist()
    with mer.load(tmp_path / "store", dtype="bfloat16") as engine:  # int8 activations
        assert len(list(engine.generate(ids, 4, temperature=0, stop_at_eos=False))) == 4
    # the resident checkpoint runs MXFP4 too; a bf16 store is the exact dequantization
    assert mer.load(tmp_path / "mx").provider.format.name.startswith("mxfp4")
    notes.clear()
    convert(tmp_path / "mx", tmp_path / "bf16", dtype="bf16", progress=False, log=notes.append)
    assert any("exact" in n for n in notes)
    with pytest.raises(ConfigError, match="floats"):
        convert(root / "ckpt", tmp_path / "bad", dtype="mxfp4", progress=False, log=None)
    shutil.rmtree(tmp_path / "float")
