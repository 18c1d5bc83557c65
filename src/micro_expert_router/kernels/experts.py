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

A batched decode step (B sequences, one token each) routes each token to its own experts:
``experts_rows`` runs each expert of the layer's union on the token rows routed to it, in one
native call (``native_batch.cpp``: each token's x quantized once, phase 1 and 2 over every
expert), and ``moe_combine`` sums each token's expert outputs with its gate weights in expert-id
order. A token's rows have the bits of the one-token ops (``experts_forward`` on that token
alone), and ``moe_combine`` on one token is the single-request path's sum, so a sequence decoded
in a batch gets the bits it gets alone.

Legend: T tokens, D hidden, g neurons per group, K experts (views) in the call, P (token, expert)
pairs.
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


def combine_args(fmt: ExpertFormat, x: torch.Tensor, view: object) -> list[int] | None:
    """``experts_combine_``'s constant arguments for experts shaped like ``view`` on x ``[1, D]``
    (fmt 4 or 8, D, g, block, the four section offsets, group bytes, bn, isa, int8), or ``None``
    where that path does not apply (not q4/q8, not float32, no native kernel). The decode layer
    op (``decode_block.py`` ``DecodeBlock.layer``) takes them once per model."""
    name = getattr(fmt, "name", None)
    if name not in ("q8", "q4") or x.dtype != torch.float32:
        return None
    d_g = _dims(view)
    bn = native.q4_block_rows() if name == "q4" else 0
    if d_g is None or bn is None or x.shape[0] != 1 or _native_x(fmt, x, d_g[0]) is None:
        return None
    d, g = d_g
    offs, per = _offsets(name, d, g)
    block = view.block if name == "q4" else 0  # type: ignore[attr-defined]
    return [4 if name == "q4" else 8, d, g, block, *offs, per, bn, 1, int(fmt.int8_activations)]


def experts_combine(
    fmt: ExpertFormat,
    x: torch.Tensor,
    views: Sequence[object],
    weights: torch.Tensor,
    order: list[int],
) -> torch.Tensor | None:
    """One decode token's experts and their gate-weighted sum, ``[1, D]``: view ``k`` weighted
    by ``weights[0, order[k]]``, in view order (the caller's expert-id order). The bits of
    ``moe_combine(experts_stack(fmt, x, views)[:, 0], ..., weights[:, order])`` in one native
    call (``native.cpp`` ``experts_combine_``); ``None`` where that path does not apply (not
    q4/q8, not float32, no native kernel), and the caller takes the two-step path."""
    if weights.dtype != torch.float32 or (ev := combine_args(fmt, x, views[0])) is None:
        return None
    out = torch.empty((1, ev[1]))
    torch.ops.mer.experts_combine_(out, x.contiguous(), [v.buf for v in views],  # type: ignore[attr-defined]
                                   weights.contiguous(), order, ev[0], ev[1], ev[2], ev[3],
                                   ev[4:8], ev[8], ev[9], ev[10], bool(ev[11]))  # fmt: skip
    return out


def _rows_native(fmt: ExpertFormat, x: torch.Tensor, views: Sequence[object]) -> tuple | None:
    """(D, g) when ``native_batch.cpp`` runs these views on x: q4/q8 views of one shape, int8
    activations with D, g (and the q4 block) multiples of 32, T below ``native_below``, the
    native library loaded (and, for q4, torch's "n64" or "n32" packing); else None."""
    if getattr(fmt, "name", None) not in ("q8", "q4") or not fmt.int8_activations:
        return None
    dims = {_dims(v) for v in views}
    if len(dims) != 1 or None in dims:
        return None
    d, g = next(iter(dims))  # type: ignore[misc]
    if d % 32 or g % 32:
        return None
    if fmt.name == "q4" and (native.q4_block_rows() is None or views[0].block % 32):  # type: ignore[attr-defined]
        return None
    if _native_x(fmt, x, d) is None:
        return None
    return d, g


def experts_rows(
    fmt: ExpertFormat,
    x: torch.Tensor,
    views: Sequence[object],
    tokens: torch.Tensor,
    offsets: Sequence[int],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Expert ``i`` (``views[i]``) on the tokens ``tokens[offsets[i]:offsets[i + 1]]`` of x
    ``[T, D]``: row p of the result ``[P, D]`` is the SwiGLU of its expert on ``x[tokens[p]]``
    (added to ``out``'s row when given, as ``expert_forward``'s ``out``). One native call when
    the format allows (same bits per row as ``experts_forward`` on that token alone), else one
    ``expert_forward`` per view on its gathered rows."""
    offs = [int(o) for o in offsets]
    if len(offs) != len(views) + 1 or offs[0] != 0 or offs[-1] != tokens.shape[0]:
        raise ConfigError(f"experts_rows: {len(views)} views need {len(views) + 1} offsets from 0 "
                          f"to {tokens.shape[0]}, got {offs}")  # fmt: skip
    if out is None:
        out = torch.zeros((tokens.shape[0], x.shape[1]), dtype=x.dtype)  # [P, D]
    elif out.dtype != x.dtype or tuple(out.shape) != (tokens.shape[0], x.shape[1]) or \
            not out.is_contiguous():  # fmt: skip
        raise ConfigError(f"experts_rows: out must be a contiguous {x.dtype} "
                          f"[{tokens.shape[0]}, {x.shape[1]}] tensor")  # fmt: skip
    if not views:
        return out
    dg = _rows_native(fmt, x, views)
    if dg is None:
        for v, a, b in zip(views, offs, offs[1:], strict=False):
            if b > a:
                expert_forward(fmt, x[tokens[a:b]], [v], out=out[a:b])  # [T_i, D] in place
        return out
    d, g = dg
    xf = x.float().contiguous()  # [T, D]
    tok = tokens.to(torch.int64).contiguous()  # [P]
    sec, per = _offsets(fmt.name, d, g)
    bufs = [v.buf for v in views]  # type: ignore[attr-defined]
    if fmt.name == "q8":
        torch.ops.mer.q8_experts_rows_(out, xf, bufs, tok, offs, d, g, sec, per, 1)
    else:
        block = views[0].block  # type: ignore[attr-defined]
        bn = native.q4_block_rows()
        torch.ops.mer.q4_experts_rows_(out, xf, bufs, tok, offs, d, g, block, sec, per, bn,
                                       True, 1)  # fmt: skip
    return out


def moe_combine(y: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_k weights[t, k] y[idx[t, k]]`` ``[T, D]`` from expert outputs ``y [P, D]``,
    summed in k order (callers pass each token's experts in id order): ``acc = w_0 y_0``, then
    ``acc = acc + w_k y_k``, each product and sum rounded once, in float32 (then y's dtype), with
    ``weights`` first rounded to y's dtype (the single-request rule). A token's sum reads only its
    own rows, so a token alone and in a batch give the same bits. Natively when the library
    loads, else the same operations as torch element-wise ops (the same bits)."""
    t, k = idx.shape
    w = weights if weights.dtype == y.dtype else weights.to(y.dtype)
    w = w.float().contiguous()  # [T, K]
    if idx.dtype != torch.int64:
        idx = idx.to(torch.int64)
    idx = idx.contiguous()
    if native.load():
        out = torch.empty((t, y.shape[1]), dtype=y.dtype)  # [T, D]
        torch.ops.mer.moe_combine_(out, y if y.is_contiguous() else y.contiguous(), idx, w)
        return out
    ys = y.float()
    acc = w[:, 0, None] * ys[idx[:, 0]]  # [T, D]
    for j in range(1, k):
        acc = acc + w[:, j, None] * ys[idx[:, j]]
    return acc.to(y.dtype)
