"""config.json keys of DeepSeek-V2/V3 and GLM-4.5 into ModelArgs: layer layout
(first_k_dense_replace, moe_layer_freq), MLA sizes, YaRN's two scales, routing; and the named
errors for configs MER cannot run."""

from __future__ import annotations

import math

import pytest

from micro_expert_router.config import ModelArgs
from micro_expert_router.errors import ConfigError

V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": 7168, "num_attention_heads": 128,
    "num_key_value_heads": 128, "num_hidden_layers": 61, "vocab_size": 129280,
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_routed_experts": 256,
    "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "n_shared_experts": 1,
    "first_k_dense_replace": 3, "moe_layer_freq": 1, "q_lora_rank": 1536, "kv_lora_rank": 512,
    "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
    "routed_scaling_factor": 2.5, "norm_topk_prob": True, "scoring_func": "sigmoid",
    "topk_method": "noaux_tc", "max_position_embeddings": 163840, "rope_theta": 10000,
    "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                     "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096},
}  # fmt: skip


def test_deepseek_v3_release_config():
    a = ModelArgs.from_hf(V3)
    assert a.attention == "mla" and a.n_kv_heads == a.n_heads and a.head_dim == 192
    assert a.moe_layers == (False,) * 3 + (True,) * 58 and a.dense_inter == 18432
    assert a.shared_expert_inter == 2048 and a.topk_method == "noaux_tc" and a.scoring == "sigmoid"
    assert (a.n_group, a.topk_group, a.routed_scaling) == (8, 4, 2.5)
    assert a.rope_type == "yarn" and a.rotary_dim == 64 and a.rope_interleave
    assert a.rope_attention_factor == 1.0  # mscale == mscale_all_dim
    m = 0.1 * math.log(40) + 1.0
    assert a.attn_scale == pytest.approx(192**-0.5 * m * m)
    assert a.kv_bytes_per_token(2) == (512 + 64) * 61 * 2
    assert ModelArgs.from_dict(a.to_dict()) == a


def test_moe_layer_freq_and_v2_defaults():
    cfg = dict(V3, architectures=["DeepseekV2ForCausalLM"], moe_layer_freq=2,
               first_k_dense_replace=1, q_lora_rank=None, num_hidden_layers=6)  # fmt: skip
    for k in ("scoring_func", "topk_method", "norm_topk_prob", "rope_scaling"):
        cfg.pop(k)
    a = ModelArgs.from_hf(cfg)
    assert a.moe_layers == (False, False, True, False, True, False)
    assert a.q_lora_rank is None and a.scoring == "softmax" and a.topk_method == "greedy"
    assert not a.norm_topk_prob and a.routed_scaling == 2.5 and a.n_group == 1
    assert a.attn_scale == 192**-0.5 and a.rope_type == "default"


def test_glm45_config():
    cfg = {
        "architectures": ["Glm4MoeForCausalLM"], "hidden_size": 4096, "head_dim": 128,
        "num_attention_heads": 96, "num_key_value_heads": 8, "num_hidden_layers": 46,
        "vocab_size": 151552, "intermediate_size": 12288, "moe_intermediate_size": 1536,
        "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
        "first_k_dense_replace": 3, "partial_rotary_factor": 0.5, "attention_bias": True,
        "use_qk_norm": True, "routed_scaling_factor": 2.5, "n_group": 1, "topk_group": 1,
        "norm_topk_prob": True, "rope_theta": 1000000,
    }  # fmt: skip
    a = ModelArgs.from_hf(cfg)
    assert a.attention == "gqa" and a.rotary_dim == 64 and a.qk_norm == "head"
    assert a.qkv_bias and not a.o_bias and a.moe_layers[:4] == (False, False, False, True)
    assert a.topk_method == "noaux_tc" and a.scoring == "sigmoid" and a.routed_scaling == 2.5
    assert a.kv_bytes_per_token(2) == 2 * 46 * 8 * 128 * 2


@pytest.mark.parametrize("edit, message", [
    ({"n_group": 3}, "do not split into n_group 3"),
    ({"topk_group": 9}, "topk_group 9"),
    ({"num_experts_per_tok": 200, "topk_group": 1}, "exceeds the 32 experts"),
    ({"scoring_func": "relu"}, "scoring_func 'relu'"),
    ({"topk_method": "best"}, "topk_method 'best'"),
    ({"kv_lora_rank": None}, "kv_lora_rank must be a non-negative integer"),
    ({"qk_rope_head_dim": 63}, "qk_rope_head_dim (even)"),
    ({"rope_scaling": {"type": "longrope", "factor": 2}}, "RoPE type 'longrope'"),
])  # fmt: skip
def test_bad_configs_are_named_errors(edit, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelArgs.from_hf({**V3, **edit})
