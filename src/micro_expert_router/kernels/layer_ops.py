"""Fused per-layer ops of the forward pass: RMSNorm, RoPE + KV append + decode attention, and
the softmax-top-k router.

A decode step of an olmoe-sized model does a few thousand floats of arithmetic in each of these,
and as torch expressions they cost a dozen dispatches each (RMSNorm: cast, pow, mean, add,
rsqrt, mul, cast, mul; RoPE on q and k: slices, negation, cat, three products and sums, then
two cache copies): at 16 layers that is most of the per-token overhead. The native versions
(``layer_ops.cpp``, built with the decode attention kernel into one library) do each in one call.
Without a compiler, with ``MER_NATIVE=0``, or for activations other than float32, the same math
runs as torch ops.

``rms_norm`` is used for every row count (prompt and decode), so a token's hidden state does not
depend on which path computed it; its sum of squares has its own fixed order, so it agrees with
the HuggingFace expression to rounding (1e-7 relative), not bit for bit. ``rope_attend`` writes
the same cache bits as the torch RoPE expression (see the .cpp). ``router_topk`` (logits,
softmax, top-k and the optional renormalization in one call, instead of five dispatches and an
oneDNN GEMV per layer) sums its logits in its own order, so it agrees with the torch expression
to rounding; the model uses it in the fast mode only (quantized dense weights), and the exact
mode keeps the torch ops.

Legend: R rows, D row length, H query heads, Hk kv heads, Dh head dim, C cache capacity.
"""

from __future__ import annotations

import torch

from . import attention


def rms_norm_torch(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The HuggingFace expression: ``w * (x * rsqrt(mean(x^2) + eps))`` with the sum in f32."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension of ``x`` (any leading shape) with weight ``w [D]``."""
    if (x.dtype != torch.float32 or w.dtype not in (torch.float32, torch.bfloat16)
            or not attention.available()):  # fmt: skip
        return rms_norm_torch(x, w, eps)
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    out = torch.empty_like(x2)  # [R, D]
    torch.ops.mer_attn.rms_norm_(out, x2, w, eps)
    return out.view(x.shape)


def rope_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    kc: torch.Tensor,
    vc: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """One token: rotate ``q [H, Dh]`` and ``k [Hk, Dh]`` at ``pos`` (``cos``/``sin`` ``[Dh]``),
    write k and ``v [Hk, Dh]`` into row ``pos`` of the caches ``[Hk, C, Dh]``, and attend over
    rows ``[0, pos]``: ``[H, Dh]`` float32. ``q`` and ``k`` are rotated in place. ``None`` when
    the native op cannot run (the caller uses the torch path).
    """
    if not (q.dtype == k.dtype == v.dtype == cos.dtype == torch.float32 and attention.available()):
        return None
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    sk = sinks.float().contiguous() if sinks is not None else _EMPTY
    torch.ops.mer_attn.rope_attend_(out, q, k, v, kc, vc, cos, sin, pos, scale, window or 0,
                                    sk, 1)  # fmt: skip
    return out


_EMPTY = torch.empty(0)


def router_topk(
    x: torch.Tensor, w: torch.Tensor, k: int, norm: bool
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Experts ``[T, K]`` int64 (by descending probability, ties to the lower id) and their
    softmax probabilities ``[T, K]`` float32 (renormalized over the K when ``norm``) for the
    router logits ``x [T, D] @ w.T``, ``w [E, D]`` float32 or bf16; ``None`` when the native op
    cannot run (the caller uses the torch path)."""
    if (x.dtype != torch.float32 or w.dtype not in (torch.float32, torch.bfloat16)
            or not attention.available()):  # fmt: skip
        return None
    ids = torch.empty((x.shape[0], k), dtype=torch.int64)  # [T, K]
    wts = torch.empty((x.shape[0], k), dtype=torch.float32)
    torch.ops.mer_attn.router_topk_(ids, wts, x.contiguous(), w.contiguous(), norm)
    return ids, wts
