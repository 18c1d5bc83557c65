"""Multi-head latent attention (MLA, DeepSeek-V2/V3 and Kimi-K2) with a compressed KV cache.

Per token the cache holds what MLA compresses the keys and values into: the normalized latent
``c = kv_a_layernorm(kv_a_proj(x)[:r])`` (``kv_lora_rank`` values) and the rope key
``k_pe = rope(kv_a_proj(x)[r:])`` (``qk_rope_head_dim`` values, shared by all heads), side by
side in one row ``[c | k_pe]``. So a layer's cache is ``[1, C, r + dr]`` and a token costs
``(kv_lora_rank + qk_rope_head_dim) x layers x dtype bytes``, against ``2 x H x Dh`` per layer
for expanded keys and values.

Two ways to attend over it, the same math in a different order:

- expanded (prefill, and decode with ``absorbed=False``): ``kv_b_proj`` turns every cached
  latent into per-head ``k_nope [H, S, dn]`` and ``v [H, S, dv]`` and attention runs on
  ``[k_nope | k_pe]``, as transformers does. A decode step costs ``S x r x H (dn + dv)``
  multiply-adds for the expansion alone.
- absorbed (decode): ``kv_b_proj``'s key half is folded into the query and its value half
  applied after the weighted sum, so each head attends directly over the cached rows:
  ``q_lat = q_nope @ Wk [H, r]``, scores ``[q_lat | q_pe] . [c | k_pe]``, ``o_lat = p @ c``,
  ``o = o_lat @ Wv^T [H, dv]``. That is one-query-per-head attention with a single shared
  "kv head" of width ``r + dr`` whose values are its own first ``r`` columns, which is what
  ``kernels.attention.decode_attention`` computes when given the cache as both keys and values.
  A step reads each cached row once: ``S x H x (2r + dr)`` multiply-adds, no expansion.

The absorbed weights are ``kv_b_proj`` split per head (``Wk [H, dn, r]``, ``Wv [H, dv, r]``):
views of the weight, or, when a q8/q4 dense store quantized it, one dequantized copy per layer
made on the layer's first decode step.

Legend: T tokens, S cached positions, C capacity, D hidden, H heads, r kv_lora_rank,
dr qk_rope_head_dim, dn qk_nope_head_dim, dv v_head_dim, qr q_lora_rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from ..kernels.attention import decode_attention
from ..kernels.dense import linear
from .norms import rms_norm
from .rope import apply_rope

LORA_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm: transformers builds them with the default


@dataclass
class LatentCache:
    """Per-layer compressed KV ``[1, C, r + dr]`` (latent, then rope key), filled up to
    ``length``. ``v`` is empty: the values are read from the latent."""

    k: list[torch.Tensor]
    v: list[torch.Tensor] = field(default_factory=list)
    length: int = 0

    @classmethod
    def empty(cls, a: Any, capacity: int, dtype: torch.dtype) -> LatentCache:
        width = a.kv_lora_rank + a.qk_rope_head_dim
        return cls([torch.zeros((1, capacity, width), dtype=dtype) for _ in range(a.n_layers)])

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k)


def mla_tensor_shapes(a: Any, i: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """The attention tensors of layer ``i``: checkpoint name and shape."""
    p, d, h = f"model.layers.{i}.self_attn", a.hidden_size, a.n_heads
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    if a.q_lora_rank is None:
        yield f"{p}.q_proj.weight", (h * qk, d)
    else:
        yield f"{p}.q_a_proj.weight", (a.q_lora_rank, d)
        if a.qkv_bias:
            yield f"{p}.q_a_proj.bias", (a.q_lora_rank,)
        yield f"{p}.q_a_layernorm.weight", (a.q_lora_rank,)
        yield f"{p}.q_b_proj.weight", (h * qk, a.q_lora_rank)
    yield f"{p}.kv_a_proj_with_mqa.weight", (a.kv_lora_rank + a.qk_rope_head_dim, d)
    if a.qkv_bias:
        yield f"{p}.kv_a_proj_with_mqa.bias", (a.kv_lora_rank + a.qk_rope_head_dim,)
    yield f"{p}.kv_a_layernorm.weight", (a.kv_lora_rank,)
    yield f"{p}.kv_b_proj.weight", (h * (a.qk_nope_head_dim + a.v_head_dim), a.kv_lora_rank)
    yield f"{p}.o_proj.weight", (d, h * a.v_head_dim)
    if a.o_bias:
        yield f"{p}.o_proj.bias", (d,)


class MLA:
    """MLA for every layer of a model: ``mla(i, x, kv, pos)`` is layer ``i``'s attention
    output ``[T, D]`` for ``x [T, D]`` appended to ``kv`` at ``pos``."""

    def __init__(
        self, a: Any, w: dict[str, Any], cos: torch.Tensor, sin: torch.Tensor,
        absorbed: bool = True,
    ) -> None:  # fmt: skip
        self.a, self.w, self.cos, self.sin = a, w, cos, sin
        self.absorbed = absorbed  # decode path: absorbed (True) or expanded
        self._absorbed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_cache(self, capacity: int, dtype: torch.dtype) -> LatentCache:
        return LatentCache.empty(self.a, capacity, dtype)

    def __call__(self, i: int, x: torch.Tensor, kv: LatentCache, pos: int) -> torch.Tensor:
        a, w, p = self.a, self.w, f"model.layers.{i}.self_attn"
        t, h, dn, r = x.shape[0], a.n_heads, a.qk_nope_head_dim, a.kv_lora_rank
        if a.q_lora_rank is None:
            q = linear(x, w[f"{p}.q_proj.weight"])  # [T, H*(dn+dr)]
        else:
            qa = linear(x, w[f"{p}.q_a_proj.weight"], w.get(f"{p}.q_a_proj.bias"))  # [T, qr]
            qa = rms_norm(qa, w[f"{p}.q_a_layernorm.weight"], LORA_NORM_EPS)
            q = linear(qa, w[f"{p}.q_b_proj.weight"])  # [T, H*(dn+dr)]
        q = q.view(t, h, -1).transpose(0, 1)  # [H, T, dn+dr]
        q_nope = q[..., :dn]  # [H, T, dn]
        ckv = linear(x, w[f"{p}.kv_a_proj_with_mqa.weight"],
                     w.get(f"{p}.kv_a_proj_with_mqa.bias"))  # [T, r+dr]  # fmt: skip
        c = rms_norm(ckv[:, :r], w[f"{p}.kv_a_layernorm.weight"], LORA_NORM_EPS)  # [T, r]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]  # [T, dr]
        q_pe = apply_rope(q[..., dn:], cos, sin, a.rope_interleave)  # [H, T, dr]
        k_pe = apply_rope(ckv[:, r:], cos, sin, a.rope_interleave)  # [T, dr]
        cache = kv.k[i]  # [1, C, r+dr]
        cache[0, pos : pos + t, :r] = c
        cache[0, pos : pos + t, r:] = k_pe
        if t == 1 and self.absorbed:
            o = self.attend_absorbed(i, q_nope[:, 0], q_pe[:, 0], cache, pos + 1)[None]
        else:
            o = self.attend_expanded(i, q_nope, q_pe, cache, pos)  # [T, H, dv]
        o = o.reshape(t, h * a.v_head_dim)
        return linear(o, w[f"{p}.o_proj.weight"], w.get(f"{p}.o_proj.bias"))  # [T, D]

    def attend_expanded(
        self, i: int, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, pos: int
    ) -> torch.Tensor:
        """Attention of queries ``[H, T, dn|dr]`` at ``pos..`` over expanded keys and values
        of the cached positions: ``[T, H, dv]``."""
        a = self.a
        h, t, dn, dr, r = q_nope.shape[0], q_nope.shape[1], a.qk_nope_head_dim, \
            a.qk_rope_head_dim, a.kv_lora_rank  # fmt: skip
        s = pos + t
        lat = cache[0, :s].to(q_nope.dtype)  # [S, r+dr]
        kvb = linear(lat[:, :r], self.w[f"model.layers.{i}.self_attn.kv_b_proj.weight"])
        kvb = kvb.view(s, h, dn + a.v_head_dim).transpose(0, 1)  # [H, S, dn+dv]
        keys = torch.cat([kvb[..., :dn], lat[None, :, r:].expand(h, s, dr)], dim=-1)
        vals = kvb[..., dn:]  # [H, S, dv]
        query = torch.cat([q_nope, q_pe], dim=-1)  # [H, T, dn+dr]
        mask = None
        if pos:
            mask = torch.arange(s)[None, :] <= torch.arange(pos, s)[:, None]  # [T, S]
        out = F.scaled_dot_product_attention(query[None], keys[None], vals[None], attn_mask=mask,
                                             is_causal=mask is None and t > 1,
                                             scale=a.attn_scale)[0]  # [H, T, dv]  # fmt: skip
        # (4-D: CPU SDPA's flash kernel; 3-D inputs take its slow math path, model.py)
        return out.transpose(0, 1)

    def absorbed_weights(self, i: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``i``'s ``kv_b_proj`` split per head: ``Wk [H, dn, r]`` and ``Wv [H, dv, r]``.
        Views of the weight when it is a float tensor of ``dtype`` (each head's block is
        contiguous); a quantized one (q8/q4 dense stores) is dequantized once, which holds
        its float bytes in RAM beside it."""
        got = self._absorbed.get(i)
        if got is None:
            a = self.a
            wb = self.w[f"model.layers.{i}.self_attn.kv_b_proj.weight"]
            wb = wb if isinstance(wb, torch.Tensor) else wb.dequantize()
            wb = wb.to(dtype).view(a.n_heads, a.qk_nope_head_dim + a.v_head_dim, a.kv_lora_rank)
            dn = a.qk_nope_head_dim
            got = (wb[:, :dn], wb[:, dn:])
            self._absorbed[i] = got
        return got

    def attend_absorbed(
        self, i: int, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, s: int
    ) -> torch.Tensor:
        """One query per head (``[H, dn]``, ``[H, dr]``) over the ``s`` cached latents,
        without expanding them: ``[H, dv]``."""
        wk, wv = self.absorbed_weights(i, q_nope.dtype)
        h, r = q_nope.shape[0], self.a.kv_lora_rank
        # one mm per head: a batched matmul with one row per batch is several times slower
        # on CPU (MKL's bmm), and the heads' weights are read once either way
        query = torch.empty((h, r + q_pe.shape[1]), dtype=q_nope.dtype)  # [H, r+dr]
        for j in range(h):
            torch.mm(q_nope[j : j + 1], wk[j], out=query[j : j + 1, :r])  # [1, r]
        query[:, r:] = q_pe
        o = decode_attention(query, cache, cache, s, self.a.attn_scale)  # [H, r+dr] float32
        o_lat = o[:, :r].to(q_nope.dtype)  # [H, r]
        out = torch.empty((h, wv.shape[1]), dtype=q_nope.dtype)  # [H, dv]
        for j in range(h):
            torch.mm(o_lat[j : j + 1], wv[j].t(), out=out[j : j + 1])
        return out
