"""GLM-4.5 and 4.5-Air (``Glm4MoeForCausalLM``): config keys.

Blocks: grouped-query attention (``model.py``) with biases on q/k/v (``attention_bias``; none on
o_proj), optional per-head q/k RMSNorm (``use_qk_norm``) and RoPE on the first
``partial_rotary_factor`` of each head (rotate-half layout); DeepSeek-V3's routing
(``routing.py``: sigmoid scores, ``noaux_tc`` with ``e_score_correction_bias``, ``n_group``,
``topk_group``, ``norm_topk_prob``, ``routed_scaling_factor``); shared experts
``mlp.shared_experts.*`` (no gate), always resident; the first ``first_k_dense_replace`` layers
dense.
"""

from __future__ import annotations

from typing import Any

from .deepseek import _int, grouping


def config(cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> dict[str, Any]:
    first_dense = _int(cfg, "first_k_dense_replace", where, 1)
    moe_layers = tuple(i >= first_dense and kw["n_experts"] > 0 for i in range(kw["n_layers"]))
    bias = bool(cfg.get("attention_bias", False))
    return dict(
        grouping(cfg, where, kw["n_experts"], kw["top_k"], "noaux_tc"),
        qkv_bias=bias, o_bias=False, qk_norm="head" if cfg.get("use_qk_norm") else "none",
        moe_layers=moe_layers, dense_inter=int(cfg.get("intermediate_size") or 0),
        shared_expert_inter=kw["expert_inter"] * _int(cfg, "n_shared_experts", where, 1),
        topk_method="noaux_tc", scoring="sigmoid",
        routed_scaling=float(cfg.get("routed_scaling_factor") or 1.0),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
    )  # fmt: skip
