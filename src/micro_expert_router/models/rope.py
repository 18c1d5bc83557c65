"""Rotary position embeddings: the config keys (``parse_rope``), the cos/sin tables
(``rope_tables``: default, linear and YaRN frequencies, YaRN's attention factor) and their
application (``apply_rope``: rotate-half or interleaved pairs, over all or the first
``rotary_dim`` dims of a head).

The math follows transformers' ``modeling_rope_utils`` (YaRN: ``_compute_yarn_parameters``) and
the models' ``apply_rotary_pos_emb`` / ``apply_rotary_pos_emb_interleave``. The tables hold
``cat(freqs, freqs)`` like transformers', so the default and linear cases keep the bits the
original four families always had.

Legend: S positions, T tokens, R rotated dims per head, Dh head dim.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import ConfigError

ROPE_TYPES = ("default", "linear", "yarn")


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def parse_rope(cfg: dict[str, Any], where: str, head_dim: int) -> dict[str, Any]:
    """ModelArgs fields of the rotary embedding from a config.json dict (``rope_parameters``
    of transformers 5, or the older ``rope_scaling`` + ``rope_theta``)."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{where}: rope_parameters must be an object, not {rope!r}")
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise ConfigError(f"{where}: RoPE type {kind!r} is not supported yet "
                          f"(supported: {', '.join(ROPE_TYPES)})")  # fmt: skip
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_scaling": 1.0, "rope_type": kind}
    partial = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
    if not 0 < float(partial) <= 1:
        raise ConfigError(f"{where}: partial_rotary_factor {partial} must be in (0, 1]")
    if float(partial) < 1:
        out["rope_dim"] = int(head_dim * float(partial))
    if kind == "linear":
        out["rope_scaling"] = float(rope["factor"])
    elif kind == "yarn":
        max_pos = int(cfg.get("max_position_embeddings") or 4096)
        orig = int(rope.get("original_max_position_embeddings") or max_pos)
        factor = rope.get("factor")
        factor = float(factor) if factor is not None else max_pos / orig
        if factor <= 0:
            raise ConfigError(f"{where}: YaRN factor {factor} must be > 0")
        att = rope.get("attention_factor")
        mscale, mscale_all = rope.get("mscale"), rope.get("mscale_all_dim")
        if att is None:
            if mscale and mscale_all:
                att = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
            else:
                att = _yarn_mscale(factor)
        out.update(yarn_factor=factor, yarn_original_max=orig,
                   yarn_beta_fast=float(rope.get("beta_fast") or 32),
                   yarn_beta_slow=float(rope.get("beta_slow") or 1),
                   yarn_truncate=bool(rope.get("truncate", True)),
                   rope_attention_factor=float(att))  # fmt: skip
    return out


def yarn_softmax_mscale(cfg: dict[str, Any]) -> float:
    """DeepSeek's extra factor on the attention logits' scale: ``mscale(factor,
    mscale_all_dim) ** 2`` for a non-default RoPE with ``mscale_all_dim``, else 1."""
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind == "default" or not rope.get("mscale_all_dim"):
        return 1.0
    m = _yarn_mscale(float(rope["factor"]), float(rope["mscale_all_dim"]))
    return m * m


def _yarn_inv_freq(a: Any, dim: int) -> torch.Tensor:
    base, factor = a.rope_theta, a.yarn_factor

    def corr(rot: float) -> float:
        return (dim * math.log(a.yarn_original_max / (rot * 2 * math.pi))) / (2 * math.log(base))

    low, high = corr(a.yarn_beta_fast), corr(a.yarn_beta_slow)
    if a.yarn_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)  # [R/2]
    extra = 1.0 / pos_freqs
    inter = 1.0 / (factor * pos_freqs)
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp  # [R/2] share of the extrapolated (unscaled) frequency
    return inter * (1 - keep) + extra * keep


def rope_tables(a: Any, n_pos: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin ``[S, R]`` for positions ``0 .. n_pos - 1`` (``a``: ModelArgs)."""
    dh = a.rotary_dim
    if a.rope_type == "yarn":
        inv_freq = _yarn_inv_freq(a, dh)
    else:
        inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, dh, 2, dtype=torch.int64).float() / dh))
        inv_freq = inv_freq / a.rope_scaling
    freqs = torch.arange(n_pos).float()[:, None] * inv_freq[None, :]  # [S, R/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [S, R]
    cos, sin = emb.cos(), emb.sin()
    if a.rope_attention_factor != 1.0:
        cos, sin = cos * a.rope_attention_factor, sin * a.rope_attention_factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def apply_rope(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool = False
) -> torch.Tensor:
    """``x [..., T, Dh]`` rotated over its first ``R`` dims by ``cos``/``sin`` ``[T, R]``.

    ``interleave`` rotates the pairs ``(x0, x1), (x2, x3), ..`` and returns them
    de-interleaved (``[evens', odds']``), as transformers' DeepSeek-V3 does: queries and keys
    get the same permutation, so their dot products are DeepSeek-V2's complex rotation's.
    """
    r = cos.shape[-1]
    if interleave:
        c, s = cos[..., : r // 2], sin[..., : r // 2]  # [T, R/2]
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * cos + rotate_half(rot) * sin, rest], dim=-1)
