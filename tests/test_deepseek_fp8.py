"""A DeepSeek-V3 checkpoint with block-wise FP8 weights, as in the official release: every linear
weight of the layers (MLA projections, routed and shared experts, the dense MLP) in e4m3 with
128 x 128 ``weight_scale_inv`` blocks and the release's ``quantization_config``; embeddings,
lm_head, router gates, ``e_score_correction_bias`` and norms unquantized. ``mer convert``
dequantizes it (one note), and the store matches transformers run on the same weights
dequantized blockwise into a float32 folder (transformers' own FP8 path needs a GPU): within
the float32 parity bound (1e-4 relative), and bit for bit against MER on that float32 folder.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_families import save_family_model
from hf_models import run_cli
from test_fp8 import fp8_folders

import micro_expert_router as mer

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    base = tmp_path_factory.mktemp("dsv3-fp8")
    save_family_model("dsv3-fp8", base / "orig")
    fp8 = fp8_folders(base)
    assert any("kv_b_proj.weight_scale_inv" in n for n in fp8)
    assert any("shared_experts.down_proj.weight_scale_inv" in n for n in fp8)
    assert "model.layers.1.mlp.gate.weight_scale_inv" not in fp8
    hf = transformers.AutoModelForCausalLM.from_pretrained(base / "ref").eval()
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return base / "fp8", base / "ref", hf


def test_fp8_deepseek_v3_converts_and_matches_transformers(folders, tmp_path):
    fp8, ref, hf = folders
    p = run_cli("convert", fp8, tmp_path / "store", "--quiet")
    assert p.returncode == 0, p.stderr
    assert (p.stdout + p.stderr).count("FP8") == 1  # one note, not one per tensor
    ids = torch.randint(0, 128, (20,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids[None]).logits[0].numpy()
        want = hf.generate(ids[None], do_sample=False, max_new_tokens=32)[0, 20:].tolist()
    with mer.load(tmp_path / "store") as engine:
        streamed = engine.logits(ids.tolist())
        tokens = [s.token for s in engine.generate(ids.tolist(), 32, temperature=0,
                                                   stop_at_eos=False)]  # fmt: skip
    with mer.load(ref) as engine:
        reference = engine.logits(ids.tolist())
    assert np.array_equal(streamed, reference)  # dequantized on read: the same float32 weights
    err = float(np.abs(streamed - expected).max() / np.abs(expected).max())
    assert err <= 1e-4
    assert tokens == want
