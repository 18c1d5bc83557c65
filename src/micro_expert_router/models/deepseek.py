"""DeepSeek-V2 and V3 (and Kimi-K2, a V3): config keys and tensor names.

Blocks: MLA attention (``mla.py``) with DeepSeek's interleaved RoPE on the ``qk_rope_head_dim``
part and YaRN (the logits' scale times ``mscale(factor, mscale_all_dim)^2``); DeepSeek routing
(``routing.py``): V2 softmax scores with ``greedy`` or ``group_limited_greedy``, V3 sigmoid
scores with ``noaux_tc`` and ``e_score_correction_bias``; ``routed_scaling_factor``; shared
experts ``mlp.shared_experts.*`` (``n_shared_experts x moe_intermediate_size`` wide, no gate),
always resident; the first ``first_k_dense_replace`` layers (and, as DeepSeek's own code has it,
layers not a multiple of ``moe_layer_freq``) are dense SwiGLU MLPs of ``intermediate_size``.

V2 with ``norm_topk_prob`` renormalizes the chosen weights and does not scale them, as DeepSeek's
own V2 code does (transformers' V2 ignores the key; released V2 checkpoints have it false).
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .rope import yarn_softmax_mscale

V2 = "DeepseekV2ForCausalLM"


def _int(cfg: dict[str, Any], key: str, where: str, default: Any = None) -> int:
    v = cfg.get(key, default)
    if v is None or isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ConfigError(f"{where}: {key} must be a non-negative integer, not {v!r}")
    return v


def config(cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> dict[str, Any]:
    n_layers, n_experts = kw["n_layers"], kw["n_experts"]
    q_lora = cfg.get("q_lora_rank")
    if q_lora is not None:
        q_lora = _int(cfg, "q_lora_rank", where)
    r = _int(cfg, "kv_lora_rank", where)
    dn, dr = _int(cfg, "qk_nope_head_dim", where), _int(cfg, "qk_rope_head_dim", where)
    dv = _int(cfg, "v_head_dim", where)
    if not (r and dr and dv) or dr % 2:
        raise ConfigError(f"{where}: kv_lora_rank, qk_rope_head_dim (even) and v_head_dim must "
                          "be positive")  # fmt: skip
    first_dense = _int(cfg, "first_k_dense_replace", where, 0)
    freq = _int(cfg, "moe_layer_freq", where, 1) or 1
    moe_layers = tuple(i >= first_dense and i % freq == 0 and n_experts > 0
                       for i in range(n_layers))  # fmt: skip
    v2 = kw["arch"] == V2
    scoring = cfg.get("scoring_func", "softmax" if v2 else "sigmoid")
    method = cfg.get("topk_method", "greedy" if v2 else "noaux_tc")
    if scoring not in ("softmax", "sigmoid"):
        raise ConfigError(f"{where}: scoring_func {scoring!r} is not softmax or sigmoid")
    if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ConfigError(f"{where}: topk_method {method!r} is not greedy, "
                          "group_limited_greedy or noaux_tc")  # fmt: skip
    scaling = float(cfg.get("routed_scaling_factor") or 1.0)
    norm = bool(cfg.get("norm_topk_prob", not v2))
    if v2 and norm:
        scaling = 1.0
    out = grouping(cfg, where, n_experts, kw["top_k"], method)
    bias = bool(cfg.get("attention_bias", False))
    head_dim = dn + dr
    return dict(
        out,
        n_kv_heads=kw["n_heads"], head_dim=head_dim, attention="mla", q_lora_rank=q_lora,
        kv_lora_rank=r, qk_nope_head_dim=dn, qk_rope_head_dim=dr, v_head_dim=dv,
        rope_dim=dr, rope_interleave=True if v2 else bool(cfg.get("rope_interleave", True)),
        softmax_scale=head_dim**-0.5 * yarn_softmax_mscale(cfg),
        qkv_bias=bias, o_bias=bias, qk_norm="none",
        moe_layers=moe_layers, dense_inter=int(cfg.get("intermediate_size") or 0),
        shared_expert_inter=kw["expert_inter"] * _int(cfg, "n_shared_experts", where, 0),
        topk_method=method, scoring=scoring, routed_scaling=scaling, norm_topk_prob=norm,
    )  # fmt: skip


def grouping(
    cfg: dict[str, Any], where: str, n_experts: int, top_k: int, method: str
) -> dict[str, int]:
    """``n_group`` and ``topk_group``, checked against the experts and top-k."""
    if method == "greedy":
        return {"n_group": 1, "topk_group": 1}
    g = _int(cfg, "n_group", where, 1) or 1
    tg = _int(cfg, "topk_group", where, 1) or 1
    if n_experts % g or tg > g:
        raise ConfigError(f"{where}: {n_experts} experts do not split into n_group {g} groups "
                          f"of which topk_group {tg} are kept")  # fmt: skip
    if method == "noaux_tc" and n_experts // g < 2:
        raise ConfigError(f"{where}: noaux_tc ranks groups by their two best experts; "
                          f"{n_experts // g} per group is too few")  # fmt: skip
    if top_k > tg * (n_experts // g):
        raise ConfigError(f"{where}: num_experts_per_tok {top_k} exceeds the "
                          f"{tg * (n_experts // g)} experts of the kept groups")  # fmt: skip
    return {"n_group": g, "topk_group": tg}
