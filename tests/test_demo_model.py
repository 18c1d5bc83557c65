"""The bundled demo checkpoint: present, within size, and loadable by transformers as shipped.

Engine-side tests (conversion, golden greedy decode) live with the engine; these only pin the
folder's contract: a Mixtral with at least 8 experts per layer and top-2 routing, a fast
tokenizer that begins every text with ``<|endoftext|>`` (id 0), and weights that run.
"""

from __future__ import annotations

import json

import pytest
import torch

from micro_expert_router.demo import demo_model_path
from micro_expert_router.errors import CheckpointError

transformers = pytest.importorskip("transformers")


def test_path_has_checkpoint_files():
    path = demo_model_path()
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "README.md",
        "CORPUS_COPYRIGHT",
    ):
        assert (path / name).is_file(), name
    total = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    assert total < 30 * 2**20, f"demo folder grew to {total / 2**20:.1f} MiB"


def test_missing_files_raise_checkpoint_error(monkeypatch, tmp_path):
    import micro_expert_router.demo as demo

    monkeypatch.setattr(demo, "_MODEL_DIR", tmp_path)
    with pytest.raises(CheckpointError, match="config.json"):
        demo.demo_model_path()


def test_config_is_mixtral_top2_with_many_experts():
    cfg = json.loads((demo_model_path() / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"]
    assert cfg["model_type"] == "mixtral"
    assert cfg["num_local_experts"] >= 8
    assert cfg["num_experts_per_tok"] == 2
    assert 4 <= cfg["num_hidden_layers"] <= 6


def test_safetensors_keeps_per_expert_tensors_in_bf16():
    from safetensors import safe_open

    cfg = json.loads((demo_model_path() / "config.json").read_text())
    D, I = cfg["hidden_size"], cfg["intermediate_size"]
    with safe_open(str(demo_model_path() / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        last = cfg["num_local_experts"] - 1
        w1 = f"model.layers.0.block_sparse_moe.experts.{last}.w1.weight"
        w2 = f"model.layers.0.block_sparse_moe.experts.{last}.w2.weight"
        assert w1 in keys and w2 in keys
        assert tuple(f.get_slice(w1).get_shape()) == (I, D)
        assert tuple(f.get_slice(w2).get_shape()) == (D, I)
        assert f.get_tensor(w1).dtype == torch.bfloat16
        expert_elems = sum(
            f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1]
            for k in keys
            if ".experts." in k
        )
        all_elems = sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in keys)
    assert expert_elems / all_elems > 0.8  # the streamed part is the bulk of the model


def test_transformers_loads_and_runs_the_folder():
    path = demo_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok.is_fast
    ids = tok("Love is").input_ids
    assert ids[0] == tok.bos_token_id == tok.eos_token_id == 0
    assert tok.decode(ids, skip_special_tokens=True) == "Love is"
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), output_router_logits=True)
    assert out.logits.shape == (1, len(ids), model.config.vocab_size)
    assert torch.isfinite(out.logits).all()
    assert len(out.router_logits) == model.config.num_hidden_layers
