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


def fuse_rows(
    ws: list[torch.Tensor | DenseWeight],
) -> tuple[torch.Tensor | DenseWeight, list[torch.Tensor | DenseWeight]] | None:
    """Stack matrices that share their input (q, k and v) into one ``[sum N, K]`` weight, so one
    GEMV reads them all: ``(fused, parts)``, where ``parts[j]`` views rows of ``fused`` and
    replaces ``ws[j]`` (no second copy is kept). ``None`` when the kinds differ or the format
    has no row stacking. q4 parts come out as ``Q4Blocked`` where each is whole row blocks.
    Every output row depends only on its own weight row, so ``linear(x, fused)`` sliced equals
    the separate products.
    """
    from . import native
    from .dense_quant import Q4Blocked, Q4Dense, Q8Dense

    if all(isinstance(w, torch.Tensor) for w in ws):
        if len({(w.dtype, w.dim(), w.shape[-1]) for w in ws}) != 1 or ws[0].dim() != 2:
            return None
        fused = torch.cat(ws)  # [sum N, K]
    elif all(type(w) is Q8Dense for w in ws) and len({w.shape[1] for w in ws}) == 1:
        fused = Q8Dense(torch.cat([w.q for w in ws]), torch.cat([w.s for w in ws]))
    elif all(type(w) is Q4Dense for w in ws) and len({w.shape[1] for w in ws}) == 1:
        fused = Q4Dense(torch.cat([w.packed for w in ws]), torch.cat([w.sz for w in ws]))
        # the decode GEMV's layout, where every part is whole row blocks (blocked() consumes)
        bn = native.q4_block_rows()
        if bn is not None and all(w.shape[0] % bn == 0 for w in ws):
            fused = fused.blocked() or fused
    elif all(type(w) is Q4Blocked for w in ws) and len({(w.shape[1], w.layout) for w in ws}) < 2:
        # whole row blocks each, so their blocks and their blocks' (s, z) pairs stack
        fused = Q4Blocked(torch.cat([w.packed for w in ws]), torch.cat([w.sz for w in ws]),
                          ws[0].layout)  # fmt: skip
    else:
        return None
    parts: list[torch.Tensor | DenseWeight] = []
    r0 = 0
    for w in ws:
        r1 = r0 + (w.shape[0])
        if isinstance(fused, torch.Tensor):
            parts.append(fused[r0:r1])
        elif isinstance(fused, Q8Dense):
            parts.append(Q8Dense(fused.q[r0:r1], fused.s[r0:r1]))
        elif isinstance(fused, Q4Blocked):
            parts.append(fused.row_slice(r0, r1))
        else:
            parts.append(Q4Dense(fused.packed[r0:r1], fused.sz[r0:r1]))
        r0 = r1
    return fused, parts


def block_q4(ws: dict[str, torch.Tensor | DenseWeight], skip: tuple[str, ...] = ()) -> None:
    """Repack every q4 matrix of ``ws`` whose name does not end with one of ``skip`` for the
    expert kernel's decode GEMV (``dense_quant.Q4Blocked``), in place, one matrix at a time.
    Where the kernel cannot run a matrix it stays as it is."""
    from .dense_quant import Q4Dense

    for name, w in ws.items():
        if not name.endswith(skip) and type(w) is Q4Dense and (b := w.blocked()) is not None:
            ws[name] = b
