"""Dense (RAM-resident) weights: the one entry point the forward pass uses for every matrix that
is not a routed expert (attention projections, shared experts, dense MLPs, lm_head, embeddings).

A dense weight is either a plain ``torch.Tensor`` ``[N, K]`` (float32 or bfloat16; exact mode
and the f32/bf16 stores) or an object of a quantized dense format that implements
``DenseWeight``. The model never branches on which: it calls ``linear(x, w, bias)`` and
``embedding(ids, w)``.

Legend: T tokens, N output features, K input features, V vocabulary rows.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F


@runtime_checkable
class DenseWeight(Protocol):
    """A quantized ``[N, K]`` matrix held in RAM in some compact format."""

    shape: tuple[int, int]  # [N, K]

    @property
    def nbytes(self) -> int: ...

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, K] -> x @ W.T [T, N]``, returned in ``x.dtype``."""
        ...

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``ids`` of W, dequantized to ``dtype``: ``[T, K]`` (embedding gather)."""
        ...

    def dequantize(self) -> torch.Tensor:
        """The whole matrix as float32 ``[N, K]`` (tests and tied lm_head fallbacks)."""
        ...


def linear(
    x: torch.Tensor, w: torch.Tensor | DenseWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ w.T + bias`` for a plain or quantized dense weight; ``[T, K] -> [T, N]``."""
    if isinstance(w, torch.Tensor):
        return F.linear(x, w, bias)
    y = w.linear(x)
    return y if bias is None else y + bias


def embedding(ids: torch.Tensor, w: torch.Tensor | DenseWeight, dtype: torch.dtype) -> torch.Tensor:
    """Rows of the embedding table for token ids ``[T] -> [T, K]`` in ``dtype``."""
    if isinstance(w, torch.Tensor):
        return F.embedding(ids, w).to(dtype)
    return w.rows(ids, dtype)


def nbytes(w: torch.Tensor | DenseWeight) -> int:
    """Bytes a dense weight holds in RAM."""
    if isinstance(w, torch.Tensor):
        return w.numel() * w.element_size()
    return w.nbytes
