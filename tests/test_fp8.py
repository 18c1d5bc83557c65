"""Block-wise FP8 checkpoints (DeepSeek-V3 style e4m3 + weight_scale_inv): dequantized on read.

A tiny random Qwen3-MoE is written twice: once with every linear weight of its layers as e4m3 in
128 x 128 blocks with ``weight_scale_inv`` and the official ``quantization_config`` (the FP8
folder), once with those same weights dequantized blockwise by this file's own loop into float32
(the reference folder). Its dimensions (192 and 160) are not multiples of 128, so every matrix has
short edge blocks. Dequantization is one float32 multiply per weight, so the FP8 folder must give
the very same stores and logits as the reference folder (exact), and transformers on the
reference folder is matched within the float32 parity bound of test_model_parity (1e-4 relative).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_models import run_cli
from safetensors.torch import load_file, save_file

import micro_expert_router as mer
from micro_expert_router.checkpoint import Checkpoint
from micro_expert_router.errors import CheckpointError
from micro_expert_router.fp8 import dequantize_blockwise
from micro_expert_router.store import convert

transformers = pytest.importorskip("transformers")

BLOCK = 128
QCONFIG = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [BLOCK, BLOCK],
           "activation_scheme": "dynamic"}  # fmt: skip
CONFIG = dict(hidden_size=192, intermediate_size=256, moe_intermediate_size=160,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=48,
              num_experts=4, num_experts_per_tok=2, vocab_size=128, norm_topk_prob=True,
              rope_theta=1e6, tie_word_embeddings=False)  # fmt: skip


def quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``[N, K]`` -> (e4m3 ``[N, K]``, float32 factors ``[ceil(N/128), ceil(K/128)]``)."""
    n, k = w.shape
    s = torch.empty((-(-n // BLOCK), -(-k // BLOCK)))
    q = torch.empty((n, k), dtype=torch.float8_e4m3fn)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            blk = w[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK]
            s[i, j] = blk.abs().amax() / 448.0
            q[i * BLOCK : (i + 1) * BLOCK, j * BLOCK : (j + 1) * BLOCK] = (blk / s[i, j]).to(
                torch.float8_e4m3fn
            )
    return q, s


def dequantize_loop(q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The reference: one block at a time."""
    w = torch.empty(q.shape)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * BLOCK, (i + 1) * BLOCK), slice(j * BLOCK, (j + 1) * BLOCK)
            w[rows, cols] = q[rows, cols].float() * s[i, j]
    return w


def is_quantized(name: str, t: torch.Tensor) -> bool:
    # as in DeepSeek-V3: the layers' linear weights; not embeddings, lm_head, routers or norms
    router = name.endswith("mlp.gate.weight")
    return t.dim() == 2 and name.startswith("model.layers.") and not router


def fp8_folders(base: Path) -> dict[str, torch.Tensor]:
    """From the HF folder ``base/orig``: ``base/fp8`` with its layer linears as block-wise e4m3
    plus ``weight_scale_inv`` (the official release's layout and ``quantization_config``), and
    ``base/ref``, the same weights dequantized block by block into a float folder. Returns the
    fp8 folder's tensors."""
    tensors = load_file(str(base / "orig" / "model.safetensors"))
    fp8, ref = {}, {}
    for name, t in tensors.items():
        if is_quantized(name, t):
            q, s = quantize_blocks(t)
            fp8[name], fp8[name + "_scale_inv"] = q, s
            ref[name] = dequantize_loop(q, s)
        else:
            fp8[name] = ref[name] = t
    config = json.loads((base / "orig" / "config.json").read_text())
    for sub, weights, extra in (("fp8", fp8, {"quantization_config": QCONFIG}), ("ref", ref, {})):
        (base / sub).mkdir()
        save_file(weights, str(base / sub / "model.safetensors"), metadata={"format": "pt"})
        (base / sub / "config.json").write_text(json.dumps({**config, **extra}))
    return fp8


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(FP8 folder, float32 reference folder, transformers model loaded from the reference)."""
    base = tmp_path_factory.mktemp("fp8")
    cfg = transformers.Qwen3MoeConfig(**CONFIG)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        hf.get_input_embeddings().weight.normal_(0.0, 1.0)
        hf.get_output_embeddings().weight.normal_(0.0, 0.1)
    hf.save_pretrained(base / "orig")
    fp8_folders(base)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(base / "ref").eval()
    ref_model.generation_config.eos_token_id = None
    ref_model.generation_config.pad_token_id = 0
    return base / "fp8", base / "ref", ref_model


def rel_err(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def test_dequantize_blockwise_edge_blocks_match_the_loop():
    torch.manual_seed(3)
    for shape in ((200, 300), (128, 256), (5, 130), (300, 7)):
        w = torch.randn(shape) * 0.05
        q, s = quantize_blocks(w)
        got = dequantize_blockwise(q, s, (BLOCK, BLOCK), "w")
        assert got.dtype == torch.float32
        assert torch.equal(got, dequantize_loop(q, s)), shape
        assert float((got - w).norm() / w.norm()) < 0.05  # e4m3 keeps 3 mantissa bits
    with pytest.raises(CheckpointError, match=r"needs a w_scale_inv of shape \[2, 3\]"):
        dequantize_blockwise(q.new_zeros((200, 300)), torch.ones(2, 2), (BLOCK, BLOCK), "w")


def test_fp8_folder_converts_to_the_same_store_as_its_dequantized_copy(folders, tmp_path):
    fp8, ref, _ = folders
    notes: list[str] = []
    for dtype in ("f32", "q4"):
        a = convert(fp8, tmp_path / f"fp8-{dtype}", dtype=dtype, progress=False, log=notes.append)
        b = convert(ref, tmp_path / f"ref-{dtype}", dtype=dtype, progress=False, log=None)
        for name in ("experts-00000.bin", "dense.safetensors"):
            assert (a.path / name).read_bytes() == (b.path / name).read_bytes(), (dtype, name)
    fp8_notes = [n for n in notes if "FP8" in n]
    assert len(fp8_notes) == 2 and "dequantizes them to float32" in fp8_notes[0]  # one per run
    assert "e4m3, 128x128 blocks" in fp8_notes[0]
    p = run_cli("convert", fp8, tmp_path / "cli", "--quiet", "--dtype", "bf16")
    assert p.returncode == 0, p.stderr
    assert (p.stdout + p.stderr).count("FP8") == 1  # one note, not one per tensor


def test_fp8_store_and_resident_folder_match_transformers(folders, tmp_path):
    fp8, ref, hf = folders
    ids = torch.randint(0, CONFIG["vocab_size"], (24,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0].numpy()
    store = convert(fp8, tmp_path / "store", progress=False, log=None).path

    def logits(path):
        with mer.load(path) as engine:
            return engine.logits(ids.tolist())

    resident, streamed, reference = logits(fp8), logits(store), logits(ref)  # FP8 runs resident
    assert np.array_equal(resident, reference)  # the same dequantized weights, the same math
    assert np.array_equal(streamed, reference)
    assert rel_err(streamed, expected) <= 1e-4
    with mer.load(fp8) as engine:
        tokens = [s.token for s in engine.generate(ids.tolist(), max_tokens=16, temperature=0,
                                                   stop_at_eos=False)]  # fmt: skip
    with torch.no_grad():
        want = hf.generate(ids[None], do_sample=False, max_new_tokens=16)[0, 24:].tolist()
    assert tokens == want


def test_fp8_mistakes_are_named_errors(folders, tmp_path):
    fp8, _, _ = folders
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(fp8 / "model.safetensors"))
    config = json.loads((fp8 / "config.json").read_text())
    name = "model.layers.0.self_attn.q_proj.weight"

    def write(weights, cfg):
        save_file(weights, str(bad / "model.safetensors"), metadata={"format": "pt"})
        (bad / "config.json").write_text(json.dumps(cfg))

    no_scale = {k: v for k, v in tensors.items() if k != name + "_scale_inv"}
    write(no_scale, config)
    with pytest.raises(CheckpointError, match="has no model.layers.0.self_attn.q_proj.weight_sc"):
        Checkpoint(bad, note=None).get(name)
    write(tensors, {k: v for k, v in config.items() if k != "quantization_config"})
    with pytest.raises(CheckpointError, match="no quantization_config"):
        Checkpoint(bad, note=None).get(name)
    write(tensors, {**config, "quantization_config": {**QCONFIG, "weight_block_size": [128]}})
    with pytest.raises(CheckpointError, match="weight_block_size"):
        Checkpoint(bad, note=None)
    write(tensors, {**config, "quantization_config": {**QCONFIG, "weight_block_size": [64, 64]}})
    with pytest.raises(CheckpointError, match=r"needs a .*_scale_inv of shape \[3, 3\]"):
        Checkpoint(bad, note=None).get(name)
    p = run_cli("convert", bad, tmp_path / "out", "--quiet")
    assert p.returncode != 0 and "_scale_inv of shape" in p.stderr
