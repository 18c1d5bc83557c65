"""Decode attention: one new query per head against the KV cache of one layer.

Prefill (many queries) uses torch's ``scaled_dot_product_attention``; a decode step has one
query per head, for which SDPA's general path (mask building, GQA expansion, a batched matmul
shaped for many queries) costs far more than the arithmetic. ``decode_attention`` reads each
key and value row of the layer once, so its cost is the layer's KV bytes at memory speed and
grows linearly with the context. The native kernel (``attention.cpp``, built on first use like
the q4/q8 kernels, see ``native.py``) does it in one call for all heads; without a compiler, or
with ``MER_NATIVE=0``, the same math runs as three torch ops (``decode_attention_torch``).

Legend: H query heads, Hk kv heads, G = H / Hk, Dh head dim, C cache capacity, S positions.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import native

SOURCE = Path(__file__).with_name("attention.cpp")
# one library: the attention kernel, the fused per-layer ops of layer_ops.cpp that call it, and
# decode_block.cpp's attention block built from those
SOURCES = (SOURCE, SOURCE.with_name("layer_ops.cpp"), SOURCE.with_name("decode_block.cpp"))


@functools.cache
def available() -> bool:
    """Whether the native decode attention kernel is loaded (built on first use)."""
    info = native.load_library(SOURCES, "decode attention kernel", "torch's batched matmuls")
    return info is not None


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
    use_native: bool | None = None,
) -> torch.Tensor:
    """Attention of one query per head over cache rows ``[0, length)``: ``[H, Dh]`` float32.

    ``q`` is ``[H, Dh]``; ``k`` and ``v`` are the layer's whole cache ``[Hk, C, Dh]`` (float32 or
    bfloat16, contiguous). ``window`` keeps only the last ``window`` positions; ``sinks`` ``[H]``
    are per-head logits that join the softmax's denominator (no value).
    """
    if use_native is None:
        use_native = available()
    qf = q.float().contiguous()
    if not use_native:
        return decode_attention_torch(qf, k, v, length, scale, window, sinks)
    out = torch.empty_like(qf)
    sk = sinks.float().contiguous() if sinks is not None else torch.empty(0)
    torch.ops.mer_attn.decode_(out, qf, k, v, length, scale, window or 0, sk, 1)
    return out


def decode_attention_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    length: int,
    scale: float,
    window: int | None = None,
    sinks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The same math as the native kernel with torch ops (the fallback), ``[H, Dh]`` float32."""
    h, dh = q.shape
    hk = k.shape[0]
    s0 = max(0, length - window) if window else 0
    keys = k[:, s0:length].float()  # [Hk, S, Dh]
    vals = v[:, s0:length].float()
    scores = torch.matmul(q.float().view(hk, h // hk, dh), keys.transpose(1, 2)) * scale
    if sinks is not None:  # [Hk, G, S + 1]: the sink is a column with no value
        sink = sinks.float().view(hk, h // hk, 1)
        p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        p = torch.softmax(scores, dim=-1)  # [Hk, G, S]
    return torch.matmul(p, vals).reshape(h, dh)
