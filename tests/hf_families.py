"""Tiny random-weight DeepSeek-V2/V3 and GLM-4.5 checkpoints for tests, built with transformers.

Like ``hf_models.py`` (test-only; embeddings drawn with std 1 so routers spread tokens), plus
random values for what transformers initializes to a constant and the tests must exercise: the
norms inside MLA, the router gates (std 0.5, so grouped routing has real groups to choose from)
and ``e_score_correction_bias``. The cases cover q_lora on and off, softmax and sigmoid scores,
greedy / group-limited / noaux_tc routing with more than one group, YaRN with mscale, V2's and
V3's interleaved RoPE and V3 without it, GLM's partial rotary, attention biases and q/k norms,
dense first layers and shared experts.
"""

from __future__ import annotations

from pathlib import Path

import torch

YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 0.707,
        "beta_fast": 32, "beta_slow": 1}  # fmt: skip
# mscale != mscale_all_dim: cos/sin get an attention factor != 1 as well
YARN_V2 = dict(YARN, factor=8.0, mscale=1.0, mscale_all_dim=0.8, beta_fast=16)

FAMILY_CONFIGS = {
    # DeepSeek-V2 without q_lora, softmax + group-limited greedy over 4 groups, YaRN
    "dsv2": ("DeepseekV2Config", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=1,
        q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, n_shared_experts=2, routed_scaling_factor=1.5, vocab_size=128,
        max_position_embeddings=256, rope_parameters=YARN_V2, tie_word_embeddings=False)),
    # DeepSeek-V2 with q_lora, plain greedy, default RoPE, attention bias
    "dsv2-lora-greedy": ("DeepseekV2Config", dict(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, n_routed_experts=6, num_experts_per_tok=2, topk_method="greedy",
        first_k_dense_replace=0, q_lora_rank=20, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=4, v_head_dim=8, n_shared_experts=1, attention_bias=True,
        vocab_size=96, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0})),
    # DeepSeek-V3 with q_lora, sigmoid + noaux_tc over 4 groups, YaRN, interleaved RoPE
    "dsv3": ("DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_group=4, topk_group=2, first_k_dense_replace=1,
        q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=16, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        vocab_size=128, max_position_embeddings=128, rope_parameters=YARN)),
    # DeepSeek-V3 without q_lora nor interleave, no renormalization, one group
    "dsv3-plain": ("DeepseekV3Config", dict(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, n_routed_experts=6,
        num_experts_per_tok=3, n_group=1, topk_group=1, first_k_dense_replace=0,
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        v_head_dim=8, n_shared_experts=2, routed_scaling_factor=1.0, norm_topk_prob=False,
        rope_interleave=False, vocab_size=96, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True)),
    # GLM-4.5: partial rotary 0.5, q/k/v biases, q/k norms, noaux_tc over 2 groups
    "glm": ("Glm4MoeConfig", dict(
        hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=24, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.0, norm_topk_prob=True, use_qk_norm=True,
        attention_bias=True, vocab_size=128, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5})),
    # GLM-4.5-Air-like: no biases nor q/k norms, all layers MoE, no renormalization
    "glm-plain": ("Glm4MoeConfig", dict(
        hidden_size=64, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, n_routed_experts=6,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=0,
        n_shared_experts=1, routed_scaling_factor=1.0, norm_topk_prob=False,
        use_qk_norm=False, attention_bias=False, vocab_size=96, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "partial_rotary_factor": 0.5}, tie_word_embeddings=True)),
    # DeepSeek-V3 for the FP8 test: sizes off the 128-blocks so edge blocks are short
    "dsv3-fp8": ("DeepseekV3Config", dict(
        hidden_size=192, intermediate_size=256, moe_intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32, n_shared_experts=1, routed_scaling_factor=2.5, vocab_size=128,
        max_position_embeddings=128, rope_parameters=YARN)),
}  # fmt: skip


def build_family_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    """A transformers model of config ``name`` with random weights (eval mode)."""
    import transformers

    cls_name, kwargs = FAMILY_CONFIGS[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        model.get_input_embeddings().weight.normal_(0.0, 1.0)
        if not cfg.tie_word_embeddings:
            model.get_output_embeddings().weight.normal_(0.0, 0.1)
        for name_, p in model.named_parameters():
            if "layernorm" in name_ or "norm." in name_:
                p.normal_(1.0, 0.2)
            elif name_.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
        for name_, b in model.named_buffers():
            if name_.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model.to(dtype)


def save_family_model(name: str, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32):
    model = build_family_model(name, seed, dtype)
    model.save_pretrained(folder)
    return model
