"""Dense weights in the store (store/dense.py): each dense format round trips, routers and norms
stay exact, old manifests still open, quantized stores stream bit-identically to resident, and a
bad ``--dense`` is a named error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hf_models import run_cli, save_hf_model

import micro_expert_router as mer
from micro_expert_router.checkpoint import Checkpoint, dense_tensor_shapes
from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels.dense import DenseWeight
from micro_expert_router.kernels.dense_quant import DENSE_FORMATS
from micro_expert_router.store import Store, convert
from micro_expert_router.store.dense import stays_exact


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_hf_model("qwen2moe", folder)  # routers, a shared expert and its gate, biases
    return folder


@pytest.mark.parametrize("dense", ["f32", "bf16", "q8", "q4"])
def test_dense_format_round_trip(ckpt, tmp_path, dense):
    store = convert(ckpt, tmp_path / "s", dtype="q8", dense=dense, progress=False, log=None)
    assert store.dense_format == dense == store.manifest["dense"]["format"]
    float_dtype = torch.float32 if dense == "f32" else torch.bfloat16
    got = store.load_dense(torch.float32)
    src = Checkpoint(ckpt)
    try:
        quantized = set(store.manifest["dense"]["quantized"])
        for name, shape in dense_tensor_shapes(store.args):
            w = src.get(name, shape)
            if name in quantized:
                assert dense in DENSE_FORMATS and not stays_exact(store.args, name, shape)
                assert isinstance(got[name], DenseWeight) and got[name].shape == tuple(shape)
                want = DENSE_FORMATS[dense].quantize(w.float()).dequantize()
                assert torch.equal(got[name].dequantize(), want)
            else:
                assert isinstance(got[name], torch.Tensor)
                assert torch.equal(got[name], w.to(float_dtype).float())
        if dense in DENSE_FORMATS:
            names = {n for n, _ in dense_tensor_shapes(store.args)}
            assert "model.embed_tokens.weight" in quantized
            assert store.args.tie_word_embeddings or "lm_head.weight" in quantized
            assert "model.layers.0.self_attn.q_proj.weight" in quantized
            assert not any(n.endswith(("gate.weight", "norm.weight", "bias")) and
                           "proj" not in n for n in quantized)  # fmt: skip
            assert quantized <= names
    finally:
        src.close()
    report = json.loads((store.path / "conversion_report.json").read_text())
    assert set(report["dense"]) == quantized and report["dense_format"] == dense


def test_default_dense_follows_the_expert_format(ckpt, tmp_path):
    for dtype, want in (("f32", "f32"), ("q4", "q4")):
        store = convert(ckpt, tmp_path / dtype, dtype=dtype, progress=False, log=None)
        assert store.dense_format == want
    dense = Store.open(tmp_path / "f32").load_dense(torch.float32)
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.float32 for t in dense.values())


def test_old_manifest_without_dense_format_opens(ckpt, tmp_path):
    store = convert(ckpt, tmp_path / "s", dtype="bf16", progress=False, log=None)
    m = json.loads((store.path / "manifest.json").read_text())
    del m["dense"]["format"], m["dense"]["quantized"]
    (store.path / "manifest.json").write_text(json.dumps(m))
    old = Store.open(store.path)
    assert old.dense_format == "bf16"
    assert all(isinstance(t, torch.Tensor) for t in old.load_dense(torch.float32).values())


def test_bad_dense_value_is_a_named_error(ckpt, tmp_path):
    with pytest.raises(ConfigError, match="--dense 'q3'.*f32, bf16, q8, q4"):
        convert(ckpt, tmp_path / "s", dtype="q4", dense="q3", progress=False, log=None)
    assert not (tmp_path / "s").exists()
    p = run_cli("convert", ckpt, tmp_path / "s", "--dtype", "q4", "--dense", "int3")
    assert p.returncode != 0 and "--dense 'int3'" in p.stderr


@pytest.mark.parametrize("dense", ["q8", "q4"])
def test_q4_store_with_quantized_dense_streams_bit_identically(tmp_path, dense):
    import transformers

    cfg = transformers.MixtralConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.model.embed_tokens.weight.data.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "store", dtype="q4", dense=dense,
                    progress=False, log=None)  # fmt: skip
    assert len(store.manifest["dense"]["quantized"]) == 2 + 2 * 4  # embed, lm_head, q/k/v/o
    ids = list(range(3, 40, 2))
    with (
        mer.load(tmp_path / "store", cache_bytes=0) as streamed,
        mer.load(tmp_path / "store") as resident,
    ):
        assert isinstance(resident.model.lm_head, DenseWeight)
        assert np.array_equal(streamed.logits(ids), resident.logits(ids))
        a = [s.token for s in streamed.generate(ids, 12, temperature=0, stop_at_eos=False)]
        b = [s.token for s in resident.generate(ids, 12, temperature=0, stop_at_eos=False)]
        assert a == b
        assert streamed.provider.stats.hits == 0 and streamed.provider.stats.bytes_read > 0
