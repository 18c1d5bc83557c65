"""Tiny random-weight HuggingFace MoE checkpoints for tests, built and saved with transformers.

transformers is a test-only dependency: this module is imported by tests, never by the runtime.
Embeddings are drawn with std 1 (not transformers' 0.02) so the residual stream does not collapse
and routers spread tokens over many experts (see DESIGN.md, measurement rules).
"""

from __future__ import annotations

from pathlib import Path

import torch

ARCH_CONFIGS = {
    # name: (config class name, kwargs)
    "mixtral": ("MixtralConfig", dict(
        hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=6, num_experts_per_tok=2, vocab_size=128,
        rope_theta=1e6, tie_word_embeddings=False)),
    "mixtral-swa-tied": ("MixtralConfig", dict(
        hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=6,
        num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=1, vocab_size=96,
        rope_theta=500.0, sliding_window=24, tie_word_embeddings=True)),
    "qwen2moe": ("Qwen2MoeConfig", dict(
        hidden_size=64, intermediate_size=80, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, num_experts=8, num_experts_per_tok=2, vocab_size=128,
        norm_topk_prob=False, mlp_only_layers=[1], rope_theta=10000.0,
        tie_word_embeddings=True)),
    "qwen2moe-normtopk": ("Qwen2MoeConfig", dict(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=3, vocab_size=64,
        norm_topk_prob=True, rope_theta=1e5, tie_word_embeddings=False)),
    "qwen3moe": ("Qwen3MoeConfig", dict(
        hidden_size=64, intermediate_size=128, moe_intermediate_size=40, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=6,
        num_experts_per_tok=3, vocab_size=128, norm_topk_prob=True, rope_theta=1e6,
        tie_word_embeddings=False)),
    "qwen3moe-plain": ("Qwen3MoeConfig", dict(
        hidden_size=48, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=3, num_key_value_heads=3, num_experts=8, num_experts_per_tok=2,
        vocab_size=80, norm_topk_prob=False, rope_theta=10000.0, tie_word_embeddings=True)),
    "olmoe": ("OlmoeConfig", dict(
        hidden_size=64, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, num_experts=8, num_experts_per_tok=2, vocab_size=128,
        norm_topk_prob=False, rope_theta=10000.0, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False)),
    "olmoe-gqa-norm": ("OlmoeConfig", dict(
        hidden_size=32, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, vocab_size=64,
        norm_topk_prob=True, clip_qkv=3.0, rope_theta=2000.0, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False)),
    # widths in whole 64-blocks: q4/q8 dense weights (so the native router) and q4/q8 experts
    "olmoe-q": ("OlmoeConfig", dict(
        hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=8, num_experts_per_tok=3, vocab_size=96,
        norm_topk_prob=False, rope_theta=10000.0, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False)),
}  # fmt: skip

ARCHS = {"mixtral": "mixtral", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe"}


def build_hf_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model of config ``name`` with random weights (eval mode)."""
    import transformers

    cls_name, kwargs = ARCH_CONFIGS[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        if not cfg.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype)


def save_hf_model(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    model = build_hf_model(name, seed, dtype)
    model.save_pretrained(folder)
    return model


def run_cli(*args, env=None):
    """``mer ARGS`` in a subprocess; asserts it never shows a Python traceback."""
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", *map(str, args)],
                       capture_output=True, text=True, timeout=300, env=env)  # fmt: skip
    assert "Traceback" not in p.stderr, p.stderr
    return p
