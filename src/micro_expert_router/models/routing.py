"""Routers: which routed experts each token uses, and with what weights.

- ``softmax_topk`` (Mixtral, Qwen2/3-MoE, OLMoE): softmax over the experts, the top-k, optionally
  renormalized to sum to one.
- ``deepseek`` (DeepSeek-V2/V3, Kimi-K2, GLM-4.5): softmax or sigmoid scores; then ``greedy``
  top-k, ``group_limited_greedy`` (V2: the experts of the ``topk_group`` groups with the best
  single score) or ``noaux_tc`` (V3: groups ranked by the sum of their two best scores after
  adding ``e_score_correction_bias``, which steers the choice but not the weights); the chosen
  scores optionally renormalized (``norm_topk_prob``, with DeepSeek's 1e-20), then times
  ``routed_scaling_factor``.
- ``topk_softmax`` (GPT-OSS): a router with a bias (``mlp.router.weight``/``.bias``); the top-k
  of the logits, then a softmax over those k.

Follows transformers' ``*TopkRouter`` modules operation for operation (float32 scores). The top-k
is taken sorted, so ``experts`` are in rank order (traces record that order); the MoE block sums
experts in id order, so the output does not depend on it.

Legend: T tokens, D hidden, E routed experts, G groups, K top-k.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.dense import linear

TOPK_METHODS = ("softmax_topk", "greedy", "group_limited_greedy", "noaux_tc", "topk_softmax")


def gate_name(a: Any, i: int) -> str:
    """The router weight ``[E, D]`` of layer ``i``."""
    return f"model.layers.{i}.{a.spec.moe_prefix}.gate.weight"


def bias_name(a: Any, i: int) -> str:
    """noaux_tc's ``e_score_correction_bias`` ``[E]`` of layer ``i``."""
    return f"model.layers.{i}.{a.spec.moe_prefix}.gate.e_score_correction_bias"


def route(
    a: Any, w: Mapping[str, Any], i: int, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Experts ``[T, K]`` int64 in rank order and their weights ``[T, K]`` in ``x``'s dtype
    for the tokens ``x [T, D]`` of layer ``i`` (``a``: ModelArgs, ``w``: dense weights)."""
    if a.topk_method == "topk_softmax":
        p = f"model.layers.{i}.mlp.router"
        logits = linear(x, w[f"{p}.weight"], w[f"{p}.bias"])  # [T, E]
        top, experts = torch.topk(logits, a.top_k, dim=-1)  # [T, K]
        return experts, F.softmax(top, dim=1, dtype=top.dtype).to(x.dtype)
    if a.topk_method == "softmax_topk":
        logits = linear(x, w[gate_name(a, i)])  # [T, E]
        probs = F.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, a.top_k, dim=-1)  # [T, K]
        if a.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return experts, weights.to(x.dtype)
    gate = w[gate_name(a, i)]
    logits = linear(x.float(), gate if gate.dtype == torch.float32 else gate.float())  # [T, E]
    bias = w.get(bias_name(a, i)) if a.topk_method == "noaux_tc" else None
    experts, weights = deepseek_topk(a, logits, bias)
    return experts, weights.to(x.dtype)


def _group_mask(a: Any, group_scores: torch.Tensor) -> torch.Tensor:
    """``[T, E]`` True for the experts of each token's ``topk_group`` best groups."""
    t, e = group_scores.shape[0], a.n_experts
    idx = torch.topk(group_scores, k=a.topk_group, dim=-1, sorted=False)[1]  # [T, topk_group]
    mask = torch.zeros_like(group_scores).scatter_(1, idx, 1)  # [T, G]
    return mask.bool()[:, :, None].expand(t, a.n_group, e // a.n_group).reshape(t, e)


def deepseek_topk(
    a: Any, logits: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek's routing from float32 router logits ``[T, E]``: experts and weights
    ``[T, K]`` (float32)."""
    t, e = logits.shape
    scores = logits.softmax(dim=-1) if a.scoring == "softmax" else logits.sigmoid()  # [T, E]
    if a.topk_method == "noaux_tc":
        choice = scores + bias.float() if bias is not None else scores
        group_scores = choice.view(t, a.n_group, e // a.n_group).topk(2, dim=-1)[0].sum(-1)
        choice = choice.masked_fill(~_group_mask(a, group_scores), float("-inf"))
        experts = torch.topk(choice, k=a.top_k, dim=-1)[1]  # [T, K]
        weights = scores.gather(1, experts)
    else:
        if a.topk_method == "group_limited_greedy":
            group_scores = scores.view(t, a.n_group, e // a.n_group).max(dim=-1).values
            scores = scores.masked_fill(~_group_mask(a, group_scores), 0.0)
        weights, experts = torch.topk(scores, k=a.top_k, dim=-1)  # [T, K]
    if a.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return experts, weights * a.routed_scaling
