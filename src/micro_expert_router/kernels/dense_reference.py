"""Slow, obviously-correct NumPy references for the quantized dense formats (``dense_quant.py``).

The executable specification of the bytes and of the arithmetic of ``native_dense.cpp``:

- **q8**: int8 ``[N, K]`` row-major, one bf16 scale per row; the rule of ``reference.quantize_q8``
  (``s = bf16(max|w| / 127)``, ``q = clip(rint(w / s), -127, 127)``, ``w ~ q s``).
- **q4**: per row, blocks of 64 weights along K, asymmetric, the rule of
  ``reference.quantize_q4`` (``w ~ (q - 8) s + z``, bf16 s and z). A block is 32 bytes: byte i
  holds code k = i in its low nibble and k = i + 32 in its high nibble. Scale and zero are
  stored ``[N, K/64, 2]`` bf16 (s, z).
- **activations** (what the native GEMV multiplies): each token's x in blocks of 32 along K,
  ``sx = max|x| / 127`` (f32), ``qx = clip(rint(x / sx), -127, 127)`` (int8; 0 when sx = 0);
  for q4 also ``c = sx_a * sum(qx_a) + sx_b * sum(qx_b)`` per 64-block (its two 32-blocks,
  f32 products and sum).

Legend: N output rows, K reduction length, T tokens.
"""

from __future__ import annotations

import numpy as np

from . import reference as ref

Q4_BLOCK = 64  # weights per q4 (s, z) block
X_BLOCK = 32  # activations per int8 scale


def pack_nibbles(q: np.ndarray) -> np.ndarray:
    """Codes ``[N, K]`` (0..15) -> bytes ``[N, K/2]``; per 64-block byte i = q_i | q_{i+32} << 4."""
    n, k = q.shape
    qb = q.astype(np.uint8).reshape(n, k // Q4_BLOCK, Q4_BLOCK)
    return (qb[..., :32] | (qb[..., 32:] << 4)).reshape(n, k // 2)


def unpack_nibbles(p: np.ndarray) -> np.ndarray:
    """Inverse of ``pack_nibbles``: bytes ``[N, K/2]`` -> codes ``[N, K]``."""
    n, k = p.shape[0], p.shape[1] * 2
    pb = p.reshape(n, k // Q4_BLOCK, 32)
    return np.concatenate([pb & 15, pb >> 4], axis=-1).reshape(n, k)


def quantize_q8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` -> (int8 ``[N, K]``, bf16 bits ``[N]``)."""
    q, s = ref.quantize_q8(w)
    return q, ref.bf16_to_bits(s)


def quantize_q4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``[N, K]`` -> (packed uint8 ``[N, K/2]``, bf16 bits ``[N, K/64, 2]`` (s, z))."""
    q, s, z = ref.quantize_q4(w, Q4_BLOCK)
    return pack_nibbles(q), ref.bf16_to_bits(np.stack([s, z], axis=-1))


def dequantize_q8(q: np.ndarray, s_bits: np.ndarray) -> np.ndarray:
    return ref.dequantize_q8(q, ref.bits_to_f32(s_bits))


def dequantize_q4(packed: np.ndarray, sz_bits: np.ndarray) -> np.ndarray:
    sz = ref.bits_to_f32(sz_bits)  # [N, K/64, 2]
    return ref.dequantize_q4(unpack_nibbles(packed), sz[..., 0], sz[..., 1], Q4_BLOCK)


def quantize_x(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x ``[T, K]`` -> (qx int8 ``[T, K]``, sx ``[T, K/32]``, c ``[T, K/64]``), bit-exact with
    the native op (f32 arithmetic, round half to even)."""
    x = np.asarray(x, dtype=np.float32)
    t, k = x.shape
    xb = x.reshape(t, k // X_BLOCK, X_BLOCK)
    sx = (np.abs(xb).max(axis=2) / np.float32(127)).astype(np.float32)  # [T, K/32]
    safe = np.where(sx > 0, sx, np.float32(1))
    qx = np.clip(np.rint(xb / safe[..., None]), -127, 127)
    qx = np.where(sx[..., None] > 0, qx, 0).astype(np.int8)
    sums = qx.astype(np.int32).sum(axis=2).astype(np.float32)  # [T, K/32], exact
    prod = (sx * sums).astype(np.float32)
    c = (prod[:, 0::2] + prod[:, 1::2]).astype(np.float32)  # [T, K/64]
    return qx.reshape(t, k), sx, c


def linear_ref(x: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """What the native op computes, exactly: ``(qx sx) @ W.T`` in float64 on the dequantized
    weights W, ``[T, K] -> [T, N]``; and ``M = |qx sx| @ |W|.T``, the magnitude that scales its
    rounding-error bound."""
    qx, sx, _ = quantize_x(x)
    t, k = qx.shape
    xq = qx.astype(np.float64).reshape(t, k // X_BLOCK, X_BLOCK) * sx[..., None]
    xq = xq.reshape(t, k)
    w64 = np.asarray(w, dtype=np.float64)
    return xq @ w64.T, np.abs(xq) @ np.abs(w64).T
