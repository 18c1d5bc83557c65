"""GGML block types (the tensor encodings of GGUF files): their byte arithmetic and a torch
dequantization that gives the same float32 bits as gguf-py's NumPy ``gguf.quants``.

A GGML tensor ``[N, K]`` is stored row by row; each row is ``K / b`` blocks of ``b`` weights
along K, each block ``nbytes`` bytes (``b = 1`` for the plain float types). Block layouts
(ggml's ``ggml-common.h``; little-endian):

- ``Q4_0``  32 weights, 18 B: f16 d, 16 B of nibbles (low = weights 0-15, high = 16-31);
  ``w = d (q - 8)``.
- ``Q4_1``  32 weights, 20 B: f16 d, f16 m, nibbles as Q4_0; ``w = d q + m``.
- ``Q5_0``  32 weights, 22 B: f16 d, 32 high bits (u32, bit i = weight i), nibbles as Q4_0;
  ``w = d (q - 16)``.  ``Q5_1`` 24 B: f16 d, f16 m, then as Q5_0; ``w = d q + m``.
- ``Q8_0``  32 weights, 34 B: f16 d, 32 int8 q; ``w = d q``.
- ``Q4_K`` 256 weights, 144 B: f16 d, f16 dmin, 12 B of 6-bit (scale, min) for 8 sub-blocks of
  32, 128 B of nibbles (32-byte chunk c: low = sub-block 2c, high = 2c+1);
  ``w = d sc q - dmin m``.
- ``Q5_K`` 256 weights, 176 B: as Q4_K plus 32 B of high bits (bit i of byte j = sub-block i,
  weight j) before the nibbles.
- ``Q6_K`` 256 weights, 210 B: 128 B low nibbles, 64 B 2-bit highs, 16 int8 scales (one per
  16 weights), f16 d; ``w = d sc (q - 32)``.
- ``MXFP4``  32 weights, 17 B: e8m0 exponent, 16 B of fp4 (e2m1) codes looked up in a table;
  ``w = 2^(e-128) kvalue[q]`` (the table holds doubled values).
- ``F32``, ``F16``, ``BF16``: plain.

``dequantize`` is vectorized over whole rows; every product is rounded in the same order as
gguf.quants', which the tests check bit for bit.

Legend: R rows, K reduction length, B blocks per row, b block size.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ..errors import ConfigError


class BlockType(NamedTuple):
    name: str  # ggml's name, e.g. "Q4_K"
    id: int  # GGMLQuantizationType value
    block: int  # b: weights per block
    nbytes: int  # bytes per block

    def row_bytes(self, k: int) -> int:
        """Bytes of one row of ``k`` weights (``k`` must be a multiple of the block)."""
        return k // self.block * self.nbytes


TYPES: dict[str, BlockType] = {t.name: t for t in (
    BlockType("F32", 0, 1, 4), BlockType("F16", 1, 1, 2), BlockType("Q4_0", 2, 32, 18),
    BlockType("Q4_1", 3, 32, 20), BlockType("Q5_0", 6, 32, 22), BlockType("Q5_1", 7, 32, 24),
    BlockType("Q8_0", 8, 32, 34), BlockType("Q4_K", 12, 256, 144),
    BlockType("Q5_K", 13, 256, 176), BlockType("Q6_K", 14, 256, 210),
    BlockType("BF16", 30, 1, 2), BlockType("MXFP4", 39, 32, 17),
)}  # fmt: skip
BY_ID: dict[int, BlockType] = {t.id: t for t in TYPES.values()}
MXFP4_VALUES = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # doubled e2m1


def block_type(name_or_id: str | int) -> BlockType:
    t = BY_ID.get(name_or_id) if isinstance(name_or_id, int) else TYPES.get(name_or_id.upper())
    if t is None:
        raise ConfigError(f"GGML type {name_or_id!r} is not supported; supported: "
                          f"{', '.join(TYPES)}")  # fmt: skip
    return t


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian f16 from a trailing byte pair ``[..., 2]`` -> float32 ``[...]``."""
    return b.contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """Bytes ``[..., m]`` -> ``[..., 2, m]``: low nibbles, then high nibbles."""
    return torch.stack([qs & 15, qs >> 4], dim=-2)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 packed bytes of a Q4_K/Q5_K block ``[R, B, 12]`` -> 6-bit scales and mins
    ``[R, B, 8]`` each."""
    d, m, md = s[..., 0:4], s[..., 4:8], s[..., 8:12]
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def dequantize(t: BlockType, raw: torch.Tensor, k: int) -> torch.Tensor:
    """Rows of a GGML tensor ``[R, row_bytes]`` uint8 -> float32 ``[R, K]``."""
    if raw.dtype != torch.uint8 or raw.dim() != 2 or raw.shape[1] != t.row_bytes(k):
        raise ConfigError(f"{t.name}: expected uint8 rows of {t.row_bytes(k)} bytes for K={k}, "
                          f"got {raw.dtype} {tuple(raw.shape)}")  # fmt: skip
    r = raw.shape[0]
    if t.name == "F32":
        return raw.contiguous().view(torch.float32).clone()
    if t.name == "F16":
        return raw.contiguous().view(torch.float16).float()
    if t.name == "BF16":
        return raw.contiguous().view(torch.bfloat16).float()
    blk = raw.reshape(r, k // t.block, t.nbytes)  # [R, B, nbytes]
    if t.name == "Q8_0":
        d = _f16(blk[..., 0:2].unsqueeze(-2))  # [R, B, 1]
        q = blk[..., 2:].contiguous().view(torch.int8).float()  # [R, B, 32]
        return (q * d).reshape(r, k)
    if t.name == "Q4_0":
        d = _f16(blk[..., 0:2].unsqueeze(-2))  # [R, B, 1]
        q = _nibbles(blk[..., 2:]).reshape(r, -1, 32).to(torch.int8) - 8
        return (d * q.float()).reshape(r, k)
    if t.name in ("Q4_1", "Q5_0", "Q5_1"):
        d = _f16(blk[..., 0:2].unsqueeze(-2))  # [R, B, 1]
        m = _f16(blk[..., 2:4].unsqueeze(-2)) if t.name != "Q5_0" else None
        qs = blk[..., -16:]
        q = _nibbles(qs).reshape(r, -1, 32)  # [R, B, 32] low nibbles
        if t.name != "Q4_1":
            at = 2 if t.name == "Q5_0" else 4
            hb = blk[..., at : at + 4].to(torch.int64)  # little-endian u32 of high bits
            qh = hb[..., 0] | hb[..., 1] << 8 | hb[..., 2] << 16 | hb[..., 3] << 24  # [R, B]
            bits = (qh[..., None] >> torch.arange(32)) & 1  # [R, B, 32]
            q = q | (bits.to(torch.uint8) << 4)
        if t.name == "Q5_0":
            return (d * (q.to(torch.int8) - 16).float()).reshape(r, k)
        return (d * q.float() + m).reshape(r, k)
    if t.name == "MXFP4":
        e = blk[..., 0:1].to(torch.int32)  # [R, B, 1]
        bits = torch.where(e < 2, torch.full_like(e, 0x00200000) << e, (e - 1) << 23)
        d = bits.view(torch.float32)
        table = torch.tensor(MXFP4_VALUES, dtype=torch.int8)
        q = table[_nibbles(blk[..., 1:]).reshape(r, -1, 32).long()]
        return (d * q.float()).reshape(r, k)
    if t.name in ("Q4_K", "Q5_K"):
        d = _f16(blk[..., 0:2].unsqueeze(-2))  # [R, B, 1]
        dmin = _f16(blk[..., 2:4].unsqueeze(-2))
        sc, mn = _k_scale_min(blk[..., 4:16])  # [R, B, 8]
        ds = (d * sc.float())[..., None]  # [R, B, 8, 1]
        dm = (dmin * mn.float())[..., None]
        qs = blk[..., -128:].reshape(r, -1, 4, 32)
        q = _nibbles(qs).reshape(r, -1, 8, 32)  # [R, B, 8, 32]
        if t.name == "Q5_K":
            qh = blk[..., 16:48].reshape(r, -1, 1, 32)
            shifts = torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1)
            q = q | (((qh >> shifts) & 1) << 4)
        return (ds * q.float() - dm).reshape(r, k)
    if t.name == "Q6_K":
        ql, qh = blk[..., 0:128], blk[..., 128:192]
        sc = blk[..., 192:208].contiguous().view(torch.int8).float()  # [R, B, 16]
        d = _f16(blk[..., 208:210].unsqueeze(-2))  # [R, B, 1]
        ds = (d * sc).reshape(r, -1, 16, 1)
        lo = _nibbles(ql.reshape(r, -1, 2, 64)).reshape(r, -1, 8, 32)  # [R, B, 8, 32]
        shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
        hi = ((qh.reshape(r, -1, 2, 1, 32) >> shifts) & 3).reshape(r, -1, 8, 32)
        q = ((lo | (hi << 4)).to(torch.int8) - 32).reshape(r, -1, 16, 16).float()
        return (ds * q).reshape(r, k)
    raise ConfigError(f"{t.name}: no dequantization")  # unreachable: TYPES is closed
