"""Several experts on the same activations in one native call (decode): ``experts_forward``.

In a decode step every routed expert of a layer sees the same token, so the K experts can share
the two parallel regions of the native kernel (``native.cpp``, ``q4_experts_swiglu_`` /
``q8_experts_swiglu_``): phase 1 spreads the gate/up row blocks of every group of every expert
over the threads, phase 2 the (expert, output row block) pairs. That balances the load better
than K separate calls (each with its own two fork/joins) and pays the fork/join once per phase.

Bit-exactness: each (expert, row block) adds its groups' partials in group order, with the same
kernels as one call per expert, so ``experts_forward(fmt, x, views)[i]`` has the same bits as
``expert_forward(fmt, x, [views[i]])``; and ``out`` continues experts begun by an earlier call
(a split expert's top segments, then its bottom segments), as ``expert_forward``'s ``out`` does.

With the format's ``int8_activations`` (the default), x and the intermediate activations are
quantized to int8 (``native_int8.cpp``); the choice is the format's, so every segment agrees.

When the native path does not apply (no AVX-512 or AVX2 on the CPU, an int4 packing other than
torch's "n64" and "n32", T at or above ``native_below``, float formats), it falls back to one
``expert_forward`` per view, which gives the same bits as calling that directly.

Legend: T tokens, D hidden, g neurons per group, K experts (views) in the call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import ConfigError
from . import native
from .formats import ExpertFormat, expert_forward
from .quant import Q4View, Q8View, _native_out, _native_x, _offsets


def _dims(view: object) -> tuple[int, int] | None:
    """(D, g) of a q8/q4 view, or None for other formats."""
    if isinstance(view, Q8View):
        d, g = view.dn[0].shape
        return int(d), int(g)
    if isinstance(view, Q4View):
        return int(view.dn[0].shape[0]), int(view.dn[0].shape[1] * 2)
    return None


def experts_forward(
    fmt: ExpertFormat,
    x: torch.Tensor,
    views: Sequence[object],
    out: Sequence[torch.Tensor | None] | None = None,
) -> list[torch.Tensor]:
    """SwiGLU output ``[T, D]`` of each expert segment ``views[i]`` on the same x ``[T, D]``,
    one list entry per view (added to ``out[i]`` when given)."""
    if not views:
        return []
    outs = list(out) if out is not None else [None] * len(views)
    if len(outs) != len(views):
        raise ConfigError(f"experts_forward: {len(views)} views but {len(outs)} outputs")
    many = getattr(fmt, "accumulate_many", None)  # formats with their own fused op (mxfp4)
    if many is not None and (ys := many(x, list(views), outs)) is not None:
        return ys
    dims = {_dims(v) for v in views}
    fused = getattr(fmt, "name", None) in ("q8", "q4") and len(dims) == 1 and None not in dims
    bn = native.q4_block_rows()
    if fused and fmt.name == "q4" and bn is None:
        fused = False  # the native q4 kernel decodes torch's AVX-512 and AVX2 packings only
    xf = None
    if fused:
        d, g = next(iter(dims))  # type: ignore[misc]
        xf = _native_x(fmt, x, d)  # None: the torch-op path applies
    if xf is None:
        return [expert_forward(fmt, x, [v], out=o) for v, o in zip(views, outs, strict=True)]
    ys = [_native_out(o, x, d) for o in outs]
    offs, per = _offsets(fmt.name, d, g)
    bufs = [v.buf for v in views]  # type: ignore[attr-defined]
    if fmt.name == "q8":
        torch.ops.mer.q8_experts_swiglu_(ys, xf, bufs, d, g, offs, per, 1, fmt.int8_activations)
    else:
        block = views[0].block  # type: ignore[attr-defined]
        torch.ops.mer.q4_experts_swiglu_(
            ys, xf, bufs, d, g, block, offs, per, bn, True, 1, fmt.int8_activations
        )
    return ys


def experts_stack(fmt: ExpertFormat, x: torch.Tensor, views: Sequence[object]) -> torch.Tensor:
    """``experts_forward`` with the outputs in one tensor ``[N, T, D]`` (N = len(views)): on the
    native path the kernel writes straight into rows of it (one allocation, no gather), so the
    caller's weighted sum is one op over it. Same bits as ``experts_forward``."""
    if not views:
        raise ConfigError("experts_stack needs at least one view")
    d = _dims(views[0])
    if d is not None and getattr(fmt, "name", None) in ("q8", "q4"):
        y = torch.zeros((len(views), x.shape[0], d[0]), dtype=x.dtype)  # [N, T, D]
        experts_forward(fmt, x, views, out=list(y.unbind(0)))
        return y
    return torch.stack(experts_forward(fmt, x, views))  # [N, T, D]
