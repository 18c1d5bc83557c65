"""Quantized dense (RAM-resident) weights: ``q8`` and ``q4`` implementations of
``kernels.dense.DenseWeight``, for attention projections, shared experts, dense MLPs, lm_head and
the embedding table of quantized stores.

Formats (byte-level specification and NumPy reference: ``dense_reference.py``; tables and
measurements: ``docs/quantization.md``, "Dense weights"):

- ``q8``: int8 ``[N, K]`` row-major plus one bf16 scale per row, ``w = q s``: 8 + 16/K bits.
- ``q4``: per row, blocks of 64 along K, asymmetric: 32 bytes of nibbles (byte i = codes k = i
  and i + 32) and a bf16 (s, z) pair, ``w = (q - 8) s + z``: 4.5 bits per weight.

Compute, chosen per call from T (the rows of x) alone:

- ``T < native_below`` and ``native.dense_available()`` (AVX2 + FMA): the GEMV of
  ``native_dense.cpp``, which quantizes each token's x to int8 in blocks of 32 and multiplies
  in exact integer arithmetic, reading the weights in place (one parallel region over rows);
- otherwise: dequantize a chunk of rows at a time (natively where the GEMV runs, with the
  same bits as the torch expression) to x's dtype and multiply with torch's GEMM, so no
  full-precision copy of a large matrix (lm_head) is ever held.

``rows(ids)`` (the embedding gather) dequantizes only the gathered rows.

Legend: T tokens, N output rows, K reduction length.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import native

Q4_BLOCK = 64  # weights per (s, z) pair
CHUNK_ROWS = 4096  # at most this many rows dequantized at a time on the GEMM path
# and at most about this many bytes of float32 rows: a chunk freed and allocated again is then
# reused from the heap, where a fresh 32 MB block costs more in page faults (first touch) than
# its dequantization (4096 x 2048: 34 ms against 5 ms reused, 1 thread)
CHUNK_BYTES = 8 << 20


def _check_x(x: torch.Tensor, k: int, name: str) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ConfigError(f"dense {name}: activations must be [T, {k}], got {tuple(x.shape)}")


class _Quantized(ABC):
    """What both formats share: the choice of path per T and the chunked GEMM fallback. A format
    supplies its native op and its row dequantization."""

    name: ClassVar[str]
    k_multiple: ClassVar[int]
    native_below: ClassVar[int]  # native GEMV below this many tokens; see docs/quantization.md
    shape: tuple[int, int]

    @abstractmethod
    def _native(self, y: torch.Tensor, x: torch.Tensor, isa: int) -> None:
        """``y [T, N] = x [T, K] @ W.T`` with the format's native GEMV (isa 0 = scalar)."""

    @abstractmethod
    def _dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` as float32 ``[r1 - r0, K]``."""

    def use_native(self, t: int) -> bool:
        return t < self.native_below and native.dense_available()

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x [T, K] -> x @ W.T [T, N]`` in x's dtype."""
        _check_x(x, self.shape[1], self.name)
        t, n = x.shape[0], self.shape[0]
        if self.use_native(t):
            y = torch.empty((t, n), dtype=torch.float32)  # [T, N]
            self._native(y, x.float().contiguous(), 1)
            return y.to(x.dtype)
        return self.gemm(x)

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The large-T path: dequantize a chunk of rows at a time to x's dtype, GEMM."""
        t, n = x.shape[0], self.shape[0]
        y = torch.empty((t, n), dtype=x.dtype)  # [T, N]
        rows = min(CHUNK_ROWS, max(64, CHUNK_BYTES // (4 * self.shape[1])))
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            y[:, r0:r1] = F.linear(x, self._dequantize_rows(r0, r1).to(x.dtype))
        return y

    def native_linear(self, x: torch.Tensor, isa: int = 1) -> torch.Tensor:
        """The native op alone, float32 ``[T, N]`` (tests and benchmarks; isa 0 = scalar)."""
        _check_x(x, self.shape[1], self.name)
        if not native.load():
            raise ConfigError(f"dense {self.name}: the native kernels are unavailable "
                              f"({native.INFO.reason})")  # fmt: skip
        y = torch.empty((x.shape[0], self.shape[0]), dtype=torch.float32)
        self._native(y, x.float().contiguous(), isa)
        return y

    def dequantize(self) -> torch.Tensor:
        return self._dequantize_rows(0, self.shape[0])

    @classmethod
    def check_shape(cls, shape: tuple[int, ...]) -> bool:
        """Whether a matrix of this shape can be held in this format."""
        return len(shape) == 2 and shape[1] % cls.k_multiple == 0 and shape[0] > 0


class Q8Dense(_Quantized):
    """int8 ``[N, K]`` with one bf16 scale per row."""

    name = "q8"
    k_multiple = 32  # the activation block
    native_below = 1024  # measured: faster than dequantize + GEMM up to T = 512

    def __init__(self, q: torch.Tensor, s: torch.Tensor) -> None:
        if q.dtype != torch.int8 or q.dim() != 2 or s.dtype != torch.bfloat16:
            raise ConfigError(f"dense q8: need int8 [N, K] and bf16 [N], got {q.dtype} "
                              f"{tuple(q.shape)}, {s.dtype} {tuple(s.shape)}")  # fmt: skip
        if tuple(s.shape) != (q.shape[0],) or q.shape[1] % self.k_multiple:
            raise ConfigError(f"dense q8: scales {tuple(s.shape)} do not fit weights "
                              f"{tuple(q.shape)} (K must be a multiple of 32)")  # fmt: skip
        self.q, self.s = q.contiguous(), s.contiguous()
        self.shape = (int(q.shape[0]), int(q.shape[1]))

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q8Dense:
        """The rule of ``reference.quantize_q8`` (bit-exact)."""
        w = w.float()
        s = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()  # [N]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(w / safe[:, None]).clamp_(-127, 127)
        q = torch.where(s[:, None] > 0, q, torch.zeros_like(q))
        return cls(q.to(torch.int8), s.to(torch.bfloat16))

    def parts(self) -> dict[str, torch.Tensor]:
        return {"q8": self.q, "s": self.s}

    @property
    def nbytes(self) -> int:
        return self.q.numel() + 2 * self.s.numel()

    def _native(self, y: torch.Tensor, x: torch.Tensor, isa: int) -> None:
        torch.ops.mer.dense_q8_linear_(y, x, self.q, self.s, isa)

    def _dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        return self.q[r0:r1].float() * self.s[r0:r1].float()[:, None]  # exact

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return (self.q[ids].float() * self.s[ids].float()[:, None]).to(dtype)  # [T, K]


class Q4Dense(_Quantized):
    """4-bit codes in blocks of 64 along K with a bf16 (scale, zero) pair per block."""

    name = "q4"
    k_multiple = Q4_BLOCK
    native_below = 96  # measured crossover with dequantize + GEMM: T = 64..128

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor) -> None:
        n, h = packed.shape if packed.dim() == 2 else (0, 0)
        if packed.dtype != torch.uint8 or packed.dim() != 2 or sz.dtype != torch.bfloat16:
            raise ConfigError(f"dense q4: need uint8 [N, K/2] and bf16 [N, K/64, 2], got "
                              f"{packed.dtype} {tuple(packed.shape)}, {sz.dtype}")  # fmt: skip
        if (2 * h) % Q4_BLOCK or tuple(sz.shape) != (n, 2 * h // Q4_BLOCK, 2):
            raise ConfigError(f"dense q4: (scale, zero) {tuple(sz.shape)} do not fit packed "
                              f"weights {tuple(packed.shape)} (K: a multiple of 64)")  # fmt: skip
        self.packed, self.sz = packed.contiguous(), sz.contiguous()
        self.shape = (int(n), int(2 * h))

    @classmethod
    def quantize(cls, w: torch.Tensor) -> Q4Dense:
        """The rule of ``reference.quantize_q4`` with b = 64 (bit-exact), nibbles packed as
        ``dense_reference.pack_nibbles``."""
        n, k = w.shape
        wb = w.float().reshape(n, k // Q4_BLOCK, Q4_BLOCK)  # [N, K/64, 64]
        lo, hi = wb.amin(dim=2), wb.amax(dim=2)
        s = ((hi - lo) / 15).to(torch.bfloat16).float()  # [N, K/64]
        z = (lo + s * 8).to(torch.bfloat16).float()
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = (torch.round((wb - z[..., None]) / safe[..., None]) + 8).clamp_(0, 15)
        q = torch.where(s[..., None] > 0, q, torch.full_like(q, 8)).to(torch.uint8)
        packed = q[..., :32] | (q[..., 32:] << 4)  # [N, K/64, 32]
        sz = torch.stack([s, z], dim=-1).to(torch.bfloat16)  # [N, K/64, 2]
        return cls(packed.reshape(n, k // 2), sz)

    def parts(self) -> dict[str, torch.Tensor]:
        return {"q4": self.packed, "sz": self.sz}

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.sz.numel()

    def _native(self, y: torch.Tensor, x: torch.Tensor, isa: int) -> None:
        torch.ops.mer.dense_q4_linear_(y, x, self.packed, self.sz, isa)

    @staticmethod
    def _decode(packed: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
        """Packed rows ``[R, K/2]`` + (s, z) ``[R, K/64, 2]`` -> float32 ``[R, K]``."""
        r, h = packed.shape
        pb = packed.view(r, -1, 32)  # [R, K/64, 32]
        q = torch.cat([pb & 15, pb >> 4], dim=-1).float()  # [R, K/64, 64]
        s, z = sz[..., 0:1].float(), sz[..., 1:2].float()  # [R, K/64, 1]
        return torch.addcmul(z, q - 8, s).view(r, 2 * h)  # (q - 8) s + z, one rounding

    def _dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        if native.dense_available():  # the same bits, ~10x faster than the torch expression
            return self.native_dequantize(r0, r1)
        return self._decode(self.packed[r0:r1], self.sz[r0:r1])

    def native_dequantize(self, r0: int, r1: int, isa: int = 1) -> torch.Tensor:
        """Rows ``[r0, r1)`` as float32 ``[r1 - r0, K]`` by the native op (isa 0 = scalar)."""
        if not native.load():
            raise ConfigError(
                f"dense q4: the native kernels are unavailable ({native.INFO.reason})"
            )
        out = torch.empty((r1 - r0, self.shape[1]), dtype=torch.float32)  # [R, K]
        torch.ops.mer.dense_q4_dequant_(out, self.packed[r0:r1], self.sz[r0:r1], isa)
        return out

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self._decode(self.packed[ids], self.sz[ids]).to(dtype)  # [T, K]

    def blocked(self) -> Q4Blocked | None:
        """This matrix as ``Q4Blocked``, or ``None`` where the expert kernel cannot run it (no
        native library, a packing of this torch + CPU that is not split, see
        ``quant.int4_layout``, or rows that are not whole row blocks). **Consumes this
        object**: the codes are rearranged in place, in chunks of about 1 MB (no second copy
        of the matrix, so no transient at load), and only the (s, z) pairs are copied."""
        from .quant import int4_layout

        bn = native.q4_block_rows()  # None: a packing the kernel does not take
        n, k = self.shape
        if bn is None or not native.dense_available() or n % bn:
            return None
        h, p = bn // 2, self.packed  # [N, K/2]
        rows = max(bn, (1 << 20) // (k // 2) // bn * bn)
        for r0 in range(0, n, rows):
            c = (min(n, r0 + rows) - r0) // bn  # row blocks in this chunk
            pb = p[r0 : r0 + c * bn].view(c, bn, k // Q4_BLOCK, 32)
            q = torch.cat([pb & 15, pb >> 4], dim=-1).view(c, bn, k)  # [C, bn, K] codes
            # torch's split row blocks: byte (k, j) = rows j (low nibble) and j + bn/2 (high)
            lo, hi = q[:, :h].transpose(1, 2), q[:, h:].transpose(1, 2)  # [C, K, bn/2]
            pb.view(c, k, h).copy_(lo | (hi << 4))
        kb = k // Q4_BLOCK  # pairs [N, K/64, 2] -> each row block's together [N/bn, K/64, bn, 2]
        sz = self.sz.view(n // bn, bn, kb, 2).transpose(1, 2).contiguous()
        return Q4Blocked(p, sz, int4_layout())


class Q4Blocked(_Quantized):
    """A ``Q4Dense`` matrix repacked in RAM for the decode GEMV: the same codes and (s, z)
    pairs (lossless), the codes in torch's int4 row blocks (the q4 expert layout, ``bn`` rows
    interleaved per block, "split" nibbles) and the pairs as ``[N/bn, K/64, bn, 2]`` (each row
    block's together: the expert layout's ``[K/64, N, 2]`` puts a block's 32 lines of pairs
    N x 4 bytes apart, a page apart and more for attention and lm_head matrices), so the native
    q4 expert kernel (``mer::q4_linear_``, int8 activations, ``sz_blocked``) runs it. That
    kernel keeps each row in a SIMD lane and sums 32 products in int32 before one float
    multiply-add, where the row-major ``Q4Dense`` GEMV needs a convert, a scale permute and a
    multiply-add per 32 weights and row: ``bench/dense_kernels.py --formats q4,q4b`` compares them
    (docs/quantization.md has the figures).

    Its bits are the expert kernel's definition (``native_int8.cpp``), not ``Q4Dense``'s; a
    token gets them alone or inside a batch. Made by ``Q4Dense.blocked``."""

    name = "q4"
    k_multiple = Q4_BLOCK
    # measured (bench/dense_kernels.py --formats q4b, 6144 x 2048, AVX2 box): the native GEMV
    # ahead of dequantize + GEMM at T = 256 (7334 against 5545 tokens/s) and still at 512
    native_below = 256
    gemm_rows = 256  # rows decoded per GEMM chunk: W.T of 256 rows x K = 2048 (2 MB) stays in
    # L2 while its transposed writes land; 1024-row chunks were several times slower to decode

    def __init__(self, packed: torch.Tensor, sz: torch.Tensor, layout: str) -> None:
        from .reference import INT4_LAYOUTS

        bn, split = INT4_LAYOUTS[layout]
        n, k = packed.shape[0], 2 * packed.shape[1]
        if not split or n % bn or tuple(sz.shape) != (n // bn, k // Q4_BLOCK, bn, 2):
            raise ConfigError(f"dense q4 row blocks: {layout} packing of {tuple(packed.shape)} "
                              f"with (scale, zero) {tuple(sz.shape)} is not a split layout of "
                              f"whole {bn}-row blocks")  # fmt: skip
        self.packed, self.sz, self.layout, self.bn = packed, sz, layout, bn
        self.shape = (int(n), int(k))

    @property
    def nbytes(self) -> int:
        return self.packed.numel() + 2 * self.sz.numel()

    def row_slice(self, r0: int, r1: int) -> Q4Blocked:
        """Rows ``[r0, r1)`` as a view (whole row blocks only: the fused q/k/v's parts)."""
        if r0 % self.bn or r1 % self.bn:
            raise ConfigError(f"dense q4 row blocks: rows {r0}:{r1} cut a {self.bn}-row block")
        bn = self.bn
        return Q4Blocked(self.packed[r0:r1], self.sz[r0 // bn : r1 // bn], self.layout)

    def pairs(self, r0: int, r1: int) -> torch.Tensor:
        """The (s, z) pairs of rows ``[r0, r1)`` (whole row blocks) as ``[K/64, R, 2]``, the
        layout the dequantizing code takes."""
        s = self.sz[r0 // self.bn : r1 // self.bn]  # [C, K/64, bn, 2]
        return s.transpose(0, 1).reshape(s.shape[1], r1 - r0, 2)

    def _native(self, y: torch.Tensor, x: torch.Tensor, isa: int) -> None:
        torch.ops.mer.q4_linear_(y, x, self.packed, self.sz, Q4_BLOCK, self.bn, True, isa, True,
                                 True)  # fmt: skip

    def gemm(self, x: torch.Tensor) -> torch.Tensor:
        """The large-T path: ``W.T`` of a chunk of row blocks decoded natively, then GEMM."""
        from .quant import dequant4_wt

        t, n = x.shape[0], self.shape[0]
        y = torch.empty((t, n), dtype=x.dtype)  # [T, N]
        rows = max(self.bn, self.gemm_rows // self.bn * self.bn)
        for r0 in range(0, n, rows):
            r1 = min(n, r0 + rows)
            wt = dequant4_wt(self.packed[r0:r1], self.pairs(r0, r1), Q4_BLOCK, self.layout)
            y[:, r0:r1] = torch.matmul(x.float(), wt).to(x.dtype)  # [T, R]
        return y

    def _dequantize_rows(self, r0: int, r1: int) -> torch.Tensor:
        from .quant import dequant4_wt

        b0, b1 = r0 - r0 % self.bn, -(-r1 // self.bn) * self.bn
        wt = dequant4_wt(self.packed[b0:b1], self.pairs(b0, b1), Q4_BLOCK, self.layout)
        return wt.t()[r0 - b0 : r1 - b0].contiguous()  # [R, K]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return torch.cat([self._dequantize_rows(i, i + 1) for i in ids.tolist()]).to(dtype)


DENSE_FORMATS: dict[str, type[Q8Dense] | type[Q4Dense]] = {"q8": Q8Dense, "q4": Q4Dense}


def from_parts(fmt: str, parts: dict[str, torch.Tensor]) -> Q8Dense | Q4Dense:
    """A dense weight from its stored tensors (``parts()`` keys)."""
    if fmt == "q8":
        return Q8Dense(parts["q8"], parts["s"])
    if fmt == "q4":
        return Q4Dense(parts["q4"], parts["sz"])
    raise ConfigError(f"unknown dense format {fmt!r}; known: {', '.join(DENSE_FORMATS)}")
