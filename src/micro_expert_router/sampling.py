"""Samplers: small pure functions over a logits vector ``[V]`` (float32), chained by ``sample``."""

from __future__ import annotations

import math
import numbers

import torch

from .errors import ConfigError


def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """``ConfigError`` unless temperature >= 0 (0 = greedy), 0 < top_p <= 1 and top_k >= 0
    (0 = off): the one check that ``Engine.generate``, ``sample`` and the CLI share."""
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature)
            and temperature >= 0):  # fmt: skip
        raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), not {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ConfigError(f"top_p must be in (0, 1] (1 = off), not {top_p!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ConfigError(f"top_k must be an integer >= 0 (0 = off), not {top_k!r}")


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the ``k`` largest logits (k == 0 keeps all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k).values[-1]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``p`` (p >= 1 keeps all)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop = cum - torch.softmax(sorted_logits, dim=-1) >= p  # mass before this token already >= p
    drop[0] = False
    return logits.masked_fill(drop.scatter(0, order, drop), float("-inf"))


def sample(
    logits: torch.Tensor,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
) -> int:
    """One token id: greedy (argmax) when ``temperature == 0``, otherwise filtered sampling.
    Bad settings are a ``ConfigError`` (``check_sampling``)."""
    check_sampling(temperature, top_p, top_k)
    logits = logits.float()
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    logits = top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
