"""Slow, obviously-correct NumPy references for the quantized expert formats (q8, q4).

This module is the executable specification of the bytes: how a weight matrix is quantized,
how the 4-bit codes are laid out in torch's private int4 packing, and where every section of a
group sits in the bundled expert buffer. It uses plain NumPy arithmetic only (no torch), so the
fast torch paths in ``quant.py`` can be tested against it.

Quantization rules (f32 arithmetic, bf16 parameters rounded to nearest even):
- q8, one scale per output row: ``s = bf16(max|w| / 127)``, ``q = clip(rint(w / s), -127, 127)``,
  ``w ~ q * s``.
- q4, asymmetric blocks of ``b`` weights along the reduction dimension K:
  ``s = bf16((max - min) / 15)``, ``z = bf16(min + 8 s)``,
  ``q = clip(rint((w - z) / s) + 8, 0, 15)``, ``w ~ (q - 8) * s + z`` (the decode rule of
  ``aten._weight_int4pack_mm_for_cpu``).
  A block whose weights are all equal gets ``s = 0``, ``q = 8``, ``z = bf16(w)``.

int4 layouts of ``aten._convert_weight_to_int4pack_for_cpu`` (read from torch's
``aten/src/ATen/native/cpu/int4mm_kernel.cpp`` and checked against torch 2.13 in the tests):
rows ``n`` are cut into blocks of ``block_n``; a block is stored as ``[K, block_n / 2]`` bytes.
In a full block with the "split" packing, byte ``j`` of column ``k`` holds row ``j`` in its low
nibble and row ``j + block_n / 2`` in its high nibble; in a partial last block (and in every
block of the scalar "pair" packing) byte ``j`` holds rows ``2j`` (low) and ``2j + 1`` (high).

int8 activations (the native decode kernels' default, ``native_int8.cpp``): ``quantize_acts``
is their bit-exact quantization of x (blocks of 32 along K, ``sx = max|x| / 127``,
``qx = clip(rint(x / sx), -127, 127)``), ``linear_int8_ref`` and ``swiglu_int8_ref`` the exact
products they approximate (only float32 roundings of the per-block scaling separate them).

Legend: N output rows, K reduction length, b quantization block, D hidden, I intermediate,
n groups, g neurons per group.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

# name -> (block_n, split): which torch CPU capability produces which packing.
INT4_LAYOUTS: dict[str, tuple[int, bool]] = {
    "n64": (64, True),  # AVX512
    "n32": (32, True),  # AVX2
    "pair32": (32, False),  # DEFAULT (no SIMD)
}


# ---- bf16 as raw bits ------------------------------------------------------------------------


def bf16_round(x: np.ndarray) -> np.ndarray:
    """Round float32 values to the nearest bfloat16 (ties to even); returned as float32."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def bf16_to_bits(x: np.ndarray) -> np.ndarray:
    """bfloat16-representable float32 values -> their uint16 bit patterns."""
    return (np.ascontiguousarray(x, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)


def bits_to_f32(u: np.ndarray) -> np.ndarray:
    """uint16 bfloat16 bit patterns -> float32 values."""
    return (np.asarray(u, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ---- quantization ----------------------------------------------------------------------------


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row: ``[N, K]`` -> (q int8 ``[N, K]``, s float32 ``[N]`` bf16 values)."""
    w = np.asarray(w, dtype=np.float32)
    s = bf16_round(np.abs(w).max(axis=1) / np.float32(127))  # [N]
    safe = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.rint(w / safe[:, None]), -127, 127)
    q = np.where(s[:, None] > 0, q, 0)
    return q.astype(np.int8), s


def dequantize_q8(q: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``q * s`` per row, in float32 (exact: an 8-bit integer times an 8-bit significand)."""
    return q.astype(np.float32) * s[:, None]


def quantize_q4(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric 4-bit in blocks of ``block`` along K.

    ``[N, K]`` -> (q uint8 ``[N, K]`` in 0..15, s ``[N, K/b]``, z ``[N, K/b]``; s, z bf16 values).
    """
    w = np.asarray(w, dtype=np.float32)
    n, k = w.shape
    wb = w.reshape(n, k // block, block)  # [N, K/b, b]
    lo = wb.min(axis=2)
    hi = wb.max(axis=2)
    s = bf16_round((hi - lo) / np.float32(15))  # [N, K/b]
    z = bf16_round(lo + np.float32(8) * s)
    safe = np.where(s > 0, s, np.float32(1))
    q = np.clip(np.rint((wb - z[..., None]) / safe[..., None]) + 8, 0, 15)
    q = np.where(s[..., None] > 0, q, 8)
    return q.reshape(n, k).astype(np.uint8), s, z


def dequantize_q4(q: np.ndarray, s: np.ndarray, z: np.ndarray, block: int) -> np.ndarray:
    """``(q - 8) * s + z`` per block, rounded once to float32 (the kernel's fused multiply-add)."""
    n, k = q.shape
    qb = q.reshape(n, k // block, block).astype(np.float64) - 8  # [N, K/b, b]
    w = qb * s[..., None].astype(np.float64) + z[..., None].astype(np.float64)
    return w.reshape(n, k).astype(np.float32)


# ---- torch's int4 nibble layouts -------------------------------------------------------------


def _row_blocks(n: int, block_n: int) -> list[tuple[int, int]]:
    return [(r, min(block_n, n - r)) for r in range(0, n, block_n)]


def encode_int4(q: np.ndarray, layout: str) -> np.ndarray:
    """4-bit codes ``[N, K]`` (0..15) -> bytes ``[N, K/2]`` in one of ``INT4_LAYOUTS``."""
    block_n, split = INT4_LAYOUTS[layout]
    n, k = q.shape
    q = q.astype(np.uint8)
    out = np.empty(n * k // 2, dtype=np.uint8)
    for r, size in _row_blocks(n, block_n):
        t = q[r : r + size].T  # [K, size]
        if split and size == block_n:
            lo, hi = t[:, : size // 2], t[:, size // 2 :]
        else:
            lo, hi = t[:, 0::2], t[:, 1::2]
        out[r * k // 2 : (r + size) * k // 2] = (lo | (hi << 4)).reshape(-1)
    return out.reshape(n, k // 2)


def decode_int4(p: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of ``encode_int4``: bytes ``[N, K/2]`` -> codes ``[N, K]``."""
    block_n, split = INT4_LAYOUTS[layout]
    n, k = p.shape[0], p.shape[1] * 2
    flat = p.reshape(-1)
    q = np.empty((n, k), dtype=np.uint8)
    for r, size in _row_blocks(n, block_n):
        t = flat[r * k // 2 : (r + size) * k // 2].reshape(k, size // 2)  # [K, size/2]
        lo, hi = (t & 15).T, (t >> 4).T  # [size/2, K]
        if split and size == block_n:
            q[r : r + size // 2], q[r + size // 2 : r + size] = lo, hi
        else:
            q[r : r + size : 2], q[r + 1 : r + size : 2] = lo, hi
    return q


# ---- group sections (the byte layout of one bundled group) -----------------------------------


class Section(NamedTuple):
    """One tensor inside a group: byte offset from the group start, and byte length."""

    offset: int
    nbytes: int


def _sections(sizes: list[int], align: int) -> tuple[list[Section], int]:
    out, at = [], 0
    for size in sizes:
        out.append(Section(at, size))
        at += size
    return out, -(-at // align) * align


def q8_sections(hidden: int, group: int) -> tuple[list[Section], int]:
    """q8 group: int8 gate+up ``[2g, D]``, int8 down ``[D, g]``, bf16 scales ``[2g]`` and
    ``[D]``, then zero padding to a multiple of 64 bytes. Returns (sections, group bytes)."""
    d, g = hidden, group
    return _sections([2 * g * d, d * g, 2 * 2 * g, 2 * d], 64)


def q4_sections(hidden: int, group: int, block: int) -> tuple[list[Section], int]:
    """q4 group: packed gate+up ``[2g, D/2]``, bf16 (scale, zero) ``[D/b, 2g, 2]``, packed down
    ``[D, g/2]``, bf16 (scale, zero) ``[g/b, D, 2]``. Returns (sections, group bytes)."""
    d, g, b = hidden, group, block
    return _sections([2 * g * d // 2, (d // b) * 2 * g * 4, d * g // 2, (g // b) * d * 4], 64)


# ---- whole expert buffers --------------------------------------------------------------------


def _groups(gate: np.ndarray, up: np.ndarray, down: np.ndarray, group: int):
    inter = gate.shape[0]
    for j in range(inter // group):
        rows = slice(j * group, (j + 1) * group)
        gu = np.concatenate([gate[rows], up[rows]])  # [2g, D]
        yield gu, down[:, rows]  # [2g, D], [D, g]


def pack_q8_ref(gate: np.ndarray, up: np.ndarray, down: np.ndarray, group: int) -> np.ndarray:
    """Bundled q8 expert buffer (uint8, 1-D) from dense float ``[I, D], [I, D], [D, I]``."""
    hidden = gate.shape[1]
    sec, per = q8_sections(hidden, group)
    parts = []
    for gu, dn in _groups(gate, up, down, group):
        buf = np.zeros(per, dtype=np.uint8)
        (qg, sg), (qd, sd) = quantize_q8(gu), quantize_q8(dn)
        for section, data in zip(sec, [qg, qd, bf16_to_bits(sg), bf16_to_bits(sd)], strict=True):
            buf[section.offset : section.offset + section.nbytes] = np.frombuffer(
                np.ascontiguousarray(data).tobytes(), dtype=np.uint8
            )
        parts.append(buf)
    return np.concatenate(parts)


def unpack_q8_ref(
    buf: np.ndarray, hidden: int, inter: int, group: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dequantized ``(gate [I, D], up [I, D], down [D, I])`` float32 from a q8 buffer."""
    d, g = hidden, group
    sec, per = q8_sections(d, g)
    gates, ups, downs = [], [], []
    for j in range(inter // g):
        grp = buf[j * per : (j + 1) * per]
        raw = [grp[s.offset : s.offset + s.nbytes] for s in sec]
        qg = raw[0].view(np.int8).reshape(2 * g, d)
        qd = raw[1].view(np.int8).reshape(d, g)
        gu = dequantize_q8(qg, bits_to_f32(raw[2].view(np.uint16)))
        gates.append(gu[:g])
        ups.append(gu[g:])
        downs.append(dequantize_q8(qd, bits_to_f32(raw[3].view(np.uint16))))
    return np.concatenate(gates), np.concatenate(ups), np.concatenate(downs, axis=1)


def _sz_bits(s: np.ndarray, z: np.ndarray) -> np.ndarray:
    """(scale, zero) ``[N, K/b]`` each -> the kernel's ``[K/b, N, 2]`` bf16 bits."""
    return bf16_to_bits(np.stack([s.T, z.T], axis=-1))


def pack_q4_ref(
    gate: np.ndarray, up: np.ndarray, down: np.ndarray, group: int, block: int, layout: str
) -> np.ndarray:
    """Bundled q4 expert buffer (uint8, 1-D) in the given int4 layout."""
    hidden = gate.shape[1]
    sec, per = q4_sections(hidden, group, block)
    parts = []
    for gu, dn in _groups(gate, up, down, group):
        buf = np.zeros(per, dtype=np.uint8)
        (qg, sg, zg), (qd, sd, zd) = quantize_q4(gu, block), quantize_q4(dn, block)
        datas = [
            encode_int4(qg, layout),
            _sz_bits(sg, zg),
            encode_int4(qd, layout),
            _sz_bits(sd, zd),
        ]
        for section, data in zip(sec, datas, strict=True):
            buf[section.offset : section.offset + section.nbytes] = np.frombuffer(
                np.ascontiguousarray(data).tobytes(), dtype=np.uint8
            )
        parts.append(buf)
    return np.concatenate(parts)


def unpack_q4_ref(
    buf: np.ndarray, hidden: int, inter: int, group: int, block: int, layout: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Dequantized ``(gate [I, D], up [I, D], down [D, I])`` float32 from a q4 buffer."""
    d, g, b = hidden, group, block
    sec, per = q4_sections(d, g, b)

    def matrix(packed: np.ndarray, sz: np.ndarray, rows: int, k: int) -> np.ndarray:
        q = decode_int4(packed.reshape(rows, k // 2), layout)  # [rows, k]
        sz = bits_to_f32(sz.view(np.uint16)).reshape(k // b, rows, 2)  # [k/b, rows, 2]
        return dequantize_q4(q, sz[..., 0].T, sz[..., 1].T, b)

    gates, ups, downs = [], [], []
    for j in range(inter // g):
        grp = buf[j * per : (j + 1) * per]
        raw = [grp[s.offset : s.offset + s.nbytes] for s in sec]
        gu = matrix(raw[0], raw[1], 2 * g, d)
        gates.append(gu[:g])
        ups.append(gu[g:])
        downs.append(matrix(raw[2], raw[3], d, g))
    return np.concatenate(gates), np.concatenate(ups), np.concatenate(downs, axis=1)


def swiglu_ref(x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray) -> np.ndarray:
    """``down @ (silu(gate @ x) * (up @ x))`` per token, in float64: ``[T, D]`` -> ``[T, D]``."""
    x = np.asarray(x, dtype=np.float64)
    h = x @ gate.T.astype(np.float64)  # [T, I]
    u = x @ up.T.astype(np.float64)  # [T, I]
    a = h / (1 + np.exp(-h)) * u  # [T, I]
    return a @ down.T.astype(np.float64)  # [T, D]


def swiglu_bf16_ref(
    x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray
) -> np.ndarray:
    """The SwiGLU rounded to bf16 at the points where the bf16 kernels round: the input, each
    matmul output, silu and the product. Each matmul is exact (float64) before its rounding, so
    only the kernels' f32 summation order separates them from this. ``[T, D]`` float64."""
    xb = bf16_round(x).astype(np.float64)
    h = bf16_round((xb @ gate.T.astype(np.float64)).astype(np.float32)).astype(np.float64)
    u = bf16_round((xb @ up.T.astype(np.float64)).astype(np.float32)).astype(np.float64)
    with np.errstate(over="ignore"):
        s = bf16_round((h / (1 + np.exp(-h))).astype(np.float32)).astype(np.float64)
    a = bf16_round((s * u).astype(np.float32)).astype(np.float64)
    return bf16_round((a @ down.T.astype(np.float64)).astype(np.float32)).astype(np.float64)


# ---- int8 activations (the native decode kernels' default, native_int8.cpp) -------------------

X_BLOCK = 32  # activations per int8 scale


def quantize_acts(x: np.ndarray, block: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x ``[T, K]`` -> (qx int8 ``[T, K]``, sx ``[T, K/32]``, c ``[T, K/b]``), bit-exact with
    native_int8.cpp: per block of 32, ``sx = max|x| / 127`` (NaN when the block holds a NaN or an
    infinity), ``qx = clip(rint(x / sx), -127, 127)`` (0 when sx is 0 or NaN); per q4 block of
    ``block`` (0: none, c is empty), ``c`` = the f32 sum, in order, of ``fl(sx_j * sum qx_j)``
    over its 32-blocks j."""
    x = np.asarray(x, dtype=np.float32)
    t, k = x.shape
    xb = x.reshape(t, k // X_BLOCK, X_BLOCK)  # [T, K/32, 32]
    with np.errstate(invalid="ignore"):
        m = np.abs(xb).max(axis=2)
        sx = np.where(np.isfinite(xb).all(axis=2), m / np.float32(127), np.float32(np.nan))
        sx = sx.astype(np.float32)  # [T, K/32]
        use = sx > 0
        q = np.rint(xb / np.where(use, sx, np.float32(1))[..., None])
    qx = np.where(use[..., None], np.clip(q, -127, 127), 0).astype(np.int8)
    if not block:
        return qx.reshape(t, k), sx, np.zeros((t, 0), dtype=np.float32)
    p = (sx * qx.astype(np.int32).sum(axis=2).astype(np.float32)).astype(np.float32)
    p = p.reshape(t, k // block, block // X_BLOCK)  # [T, K/b, b/32]
    c = p[..., 0].copy()
    for j in range(1, block // X_BLOCK):
        c = (c + p[..., j]).astype(np.float32)
    return qx.reshape(t, k), sx, c


def dequantize_acts(qx: np.ndarray, sx: np.ndarray) -> np.ndarray:
    """``qx * sx`` per block of 32, in float64 (exact): ``[T, K]``."""
    t, k = qx.shape
    xq = qx.astype(np.float64).reshape(t, k // X_BLOCK, X_BLOCK) * sx[..., None]
    return xq.reshape(t, k)


def linear_int8_ref(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the native int8-activation kernels compute, exactly: ``x~ @ W.T`` in float64 with
    ``x~`` = x quantized and dequantized (``quantize_acts``) and W the dequantized weights,
    ``[T, K] -> [T, N]``; and ``|x~| @ |W|.T``, the magnitude their rounding errors scale with
    (for q4 pass ``|W|`` as ``q |s| + |z - 8 s|`` per weight)."""
    qx, sx, _ = quantize_acts(x)
    xq = dequantize_acts(qx, sx)
    w64 = np.asarray(w, dtype=np.float64)
    return xq @ w64.T, np.abs(xq) @ np.abs(w64).T


def swiglu_int8_ref(
    x: np.ndarray, gate: np.ndarray, up: np.ndarray, down: np.ndarray, group: int
) -> tuple[np.ndarray, np.ndarray]:
    """The expert SwiGLU of the int8-activation kernels, in float64 on the dequantized weights:
    x quantized once; per group j, ``a_j = silu(h_j) u_j`` rounded to f32 and quantized, then
    ``y = sum_j a~_j @ down_j.T``: ``[T, D]`` -> (y ``[T, D]``, a ``[T, I]`` f32, the
    intermediate activations before their quantization)."""
    qx, sx, _ = quantize_acts(x)
    xq = dequantize_acts(qx, sx)  # [T, D]
    h = xq @ gate.T.astype(np.float64)  # [T, I]
    u = xq @ up.T.astype(np.float64)
    with np.errstate(over="ignore"):
        a = (h / (1 + np.exp(-h)) * u).astype(np.float32)  # [T, I]
    y = np.zeros((x.shape[0], down.shape[0]))
    for j in range(gate.shape[0] // group):
        sl = slice(j * group, (j + 1) * group)
        y += dequantize_acts(*quantize_acts(a[:, sl])[:2]) @ down[:, sl].T.astype(np.float64)
    return y, a
