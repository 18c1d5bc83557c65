"""Quantized expert formats ``q8`` and ``q4``: packing, zero-copy views and fused CPU kernels.

Both keep the bundled layout of ``formats.py`` (group j = gate, up and down of neurons
``[j*g, (j+1)*g)``, so a prefix of groups is a prefix of the bytes). Inside a group the bytes are
laid out the way torch's CPU kernels want them; ``reference.py`` is the byte-level specification
and the slow NumPy reference, and ``docs/quantization.md`` has the tables and measurements.

- ``q8``: int8 weights, one bf16 scale per output row (rows of gate/up over D, rows of the
  group's down slice over g). Kernel: ``aten._weight_int8pack_mm`` (plain layout, stable).
- ``q4``: 4-bit asymmetric blocks of 64 (or 32, when D or g is not a multiple of 64) along the
  reduction dimension, bf16 (scale, zero) per block. Kernel: ``aten._weight_int4pack_mm_for_cpu``
  over torch's private packed layout, which depends on the CPU capability torch dispatches to
  (AVX512, AVX2, scalar) and may change between torch versions. ``Q4.layout_tag()`` names the
  layout (found by probing torch against the NumPy encoders), the store records it, and
  ``Q4.repack`` converts a buffer written in another known layout. Packing costs ~50 ms per
  expert, so it happens in the converter only.

Both kernels are fast only with bfloat16 activations (float32 activations take a scalar path
about 30x slower), so ``partials`` casts x to bf16 once and returns x's dtype. For batches of
``prefill_min_tokens`` tokens or more, a group is instead dequantized once and multiplied with
oneDNN's GEMM, in bf16 where the CPU has AVX512_BF16 and in float32 elsewhere (``gemm_dtype``:
bf16 GEMM is emulated on AVX2 and ~30x slower); thresholds come from ``bench/kernels.py``.

Below ``native_below`` tokens, when ``native.available()``, ``accumulate`` runs instead: the
native kernel of ``native.cpp`` adds a whole segment (all its groups) to y in one call, reading
the same bytes in place (``docs/quantization.md``). With ``int8_activations`` (the default) it
quantizes x and the intermediate activations to int8 in blocks of 32 and multiplies in integer
arithmetic (``native_int8.cpp``, specified by ``reference.linear_int8_ref``); without, it
computes in float32. ``expert_forward`` tries it
first; the choice depends only on x and the format, so all segments of an expert agree.

Importing this module registers ``FORMATS["q8"]`` and ``FORMATS["q4"]``.

Legend: T tokens, D hidden, I intermediate, n groups, g neurons per group, b q4 block,
N output rows, K reduction length.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import ClassVar, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError, StoreError
from . import native
from . import reference as ref
from .formats import FORMATS, check_dense

_int8_mm = torch.ops.aten._weight_int8pack_mm
_int4_mm = torch.ops.aten._weight_int4pack_mm_for_cpu
_int4_pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu


# ---- shared checks and helpers ---------------------------------------------------------------


def _group_rows(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int):
    """Per group: gate+up rows ``[2g, D]`` and the down slice ``[D, g]``, as float32."""
    inter, hidden = gate.shape
    for j in range(inter // group):
        rows = slice(j * group, (j + 1) * group)
        gu = torch.empty((2 * group, hidden))  # [2g, D], filled and converted in one pass each
        gu[:group], gu[group:] = gate[rows], up[rows]
        yield gu, torch.empty((hidden, group)).copy_(down[:, rows])  # [D, g]


@functools.cache
def gemm_dtype() -> torch.dtype:
    """The dtype of the prefill path's dequantize + GEMM: bf16 where the CPU multiplies bf16
    natively (AVX512_BF16), else float32: on AVX2 oneDNN's bf16 GEMM is emulated and about 30x
    slower than float32 (a 512-token olmoe-like prompt, `bench/vs_llamacpp.py --prompt-tokens
    512`: 4.1 tok/s in bf16, 28.6 in float32)."""
    return torch.bfloat16 if native.has_avx512_bf16() else torch.float32


def _gemm_rows(x: torch.Tensor, hidden: int) -> torch.Tensor:
    """x ``[T, D]`` in ``gemm_dtype()`` for the dense prefill path."""
    if gemm_dtype() == torch.bfloat16:
        return _bf16_rows(x, hidden)
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ConfigError(f"activations must be [T, {hidden}], got shape {tuple(x.shape)}")
    return x.float().contiguous()


def _bf16_rows(x: torch.Tensor, hidden: int) -> torch.Tensor:
    """x ``[T, D]`` as contiguous, 64-byte aligned bf16 (the int8 kernel uses aligned loads)."""
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ConfigError(f"activations must be [T, {hidden}], got shape {tuple(x.shape)}")
    xb = x.to(torch.bfloat16).contiguous()
    if xb.data_ptr() % 64:
        xb = xb.clone()
    return xb


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(-1).view(torch.uint8)


def _assemble(
    sections: list[ref.Section], per: int, parts: list[list[torch.Tensor]]
) -> torch.Tensor:
    """Lay each group's tensors into its sections: ``n`` groups of ``per`` bytes, 1-D uint8."""
    buf = torch.zeros((len(parts), per), dtype=torch.uint8)
    for j, tensors in enumerate(parts):
        for s, t in zip(sections, tensors, strict=True):
            buf[j, s.offset : s.offset + s.nbytes] = _bytes_of(t)
    return buf.view(-1)


def _split(
    buf: torch.Tensor, fmt_name: str, sections: list[ref.Section], per: int
) -> list[torch.Tensor]:
    """Zero-copy ``[n, nbytes]`` uint8 views, one per section, over an expert buffer."""
    if buf.dtype != torch.uint8 or buf.dim() != 1 or not buf.is_contiguous():
        raise ConfigError(
            f"{fmt_name} expert buffer must be a contiguous 1-D uint8 tensor, got {buf.dtype} "
            f"with shape {tuple(buf.shape)} and strides {buf.stride()}"
        )
    if buf.numel() % per or buf.numel() == 0:
        raise ConfigError(
            f"{fmt_name} expert buffer of {buf.numel()} bytes is not a whole number of "
            f"{per}-byte groups; was it written with another format or group size?"
        )
    if buf.data_ptr() % 16:
        raise ConfigError(
            f"{fmt_name} expert buffer at address {buf.data_ptr():#x} is not 16-byte aligned; "
            "pool slots and group boundaries are 64-byte aligned, slice on group boundaries"
        )
    rows = buf.view(-1, per)  # [n, per]
    return [rows[:, s.offset : s.offset + s.nbytes] for s in sections]


def _native_x(fmt: Q8 | Q4, x: torch.Tensor, hidden: int) -> torch.Tensor | None:
    """x ``[T, D]`` as contiguous float32 for the native kernel, or ``None`` when the torch-op
    path applies: native off for this instance, ``T >= native_below``, another dtype, or no
    native library. Depends only on x and the format, so every segment of an expert takes one
    path."""
    if not fmt.native or x.dtype not in (torch.float32, torch.bfloat16):
        return None
    if x.dim() != 2 or x.shape[1] != hidden:
        raise ConfigError(f"activations must be [T, {hidden}], got shape {tuple(x.shape)}")
    if x.shape[0] >= fmt.native_below or not native.available():
        return None
    return x.float().contiguous()


def _native_out(y: torch.Tensor | None, x: torch.Tensor, hidden: int) -> torch.Tensor:
    if y is None:
        return torch.zeros((x.shape[0], hidden), dtype=x.dtype)
    if y.dtype != x.dtype or tuple(y.shape) != (x.shape[0], hidden) or not y.is_contiguous():
        raise ConfigError(
            f"out must be a contiguous {x.dtype} [{x.shape[0]}, {hidden}] tensor from an "
            f"earlier expert_forward, got {y.dtype} {tuple(y.shape)}"
        )
    return y


@functools.cache
def _offsets(fmt_name: str, hidden: int, group: int) -> tuple[list[int], int]:
    """Section offsets and group bytes, from the reference arithmetic."""
    if fmt_name == "q8":
        sections, per = ref.q8_sections(hidden, group)
    else:
        sections, per = ref.q4_sections(hidden, group, Q4.block_size(hidden, group))
    return [s.offset for s in sections], per


def _silu_mul(gu: torch.Tensor) -> torch.Tensor:
    h, u = gu.chunk(2, dim=1)  # [T, g] each
    return F.silu(h).mul_(u)  # [T, g], contiguous


# ---- q8 --------------------------------------------------------------------------------------


class Q8View(NamedTuple):
    """Zero-copy tensors over a q8 expert buffer, one per group (split once, here, so that the
    decode loop does no indexing)."""

    gu: tuple[torch.Tensor, ...]  # n x [2g, D] int8
    gu_scale: tuple[torch.Tensor, ...]  # n x [2g] bf16
    dn: tuple[torch.Tensor, ...]  # n x [D, g] int8
    dn_scale: tuple[torch.Tensor, ...]  # n x [D] bf16
    buf: torch.Tensor  # the whole segment, uint8 (what the native kernel reads)


class Q8:
    """int8 weights with one bf16 scale per output row; ``aten._weight_int8pack_mm``."""

    name: ClassVar[str] = "q8"
    group_multiple: ClassVar[int] = 16  # the kernel reads rows in 16-byte vectors
    prefill_min_tokens: ClassVar[int | None] = 48  # torch path: dense from here
    native: ClassVar[bool] = True  # T < native_below: kernels/native.cpp, when available
    native_below: ClassVar[int] = 256  # see docs/quantization.md
    int8_activations: ClassVar[bool] = True  # native: int8 x and a (native_int8.cpp)

    def layout_tag(self) -> str:
        """A plain layout that no torch version or CPU changes; the store records it anyway."""
        return "q8:rowwise-int8-bf16scale:v1"

    def check_tag(self, tag: str) -> bool:
        """``True`` if a store written under ``tag`` can be read as is; raises StoreError
        otherwise (q8 never needs a repack)."""
        if tag != self.layout_tag():
            raise StoreError(
                f"q8 store tag {tag!r} is not {self.layout_tag()!r}; "
                "re-run `mer convert --dtype q8`"
            )
        return True

    def group_nbytes(self, hidden: int, group: int) -> int:
        return ref.q8_sections(hidden, group)[1]

    def _check_dims(self, hidden: int, group: int) -> None:
        if hidden % 16 or group % 16:
            raise ConfigError(
                f"q8 needs D and the group size to be multiples of 16, got D={hidden}, g={group}"
            )

    def quantize(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, K]`` float -> (int8 ``[N, K]``, bf16 scales ``[N]``); see reference.quantize_q8."""
        w = w.float()
        s = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).float()  # [N]
        safe = torch.where(s > 0, s, torch.ones_like(s))
        q = torch.round(w / safe[:, None]).clamp_(-127, 127)
        q = torch.where(s[:, None] > 0, q, torch.zeros_like(q))
        return q.to(torch.int8), s.to(torch.bfloat16)

    def pack(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int
    ) -> torch.Tensor:
        hidden, _ = check_dense(self.name, gate, up, down, group)
        self._check_dims(hidden, group)
        sections, per = ref.q8_sections(hidden, group)
        parts = []
        for gu, dn in _group_rows(gate, up, down, group):
            (qg, sg), (qd, sd) = self.quantize(gu), self.quantize(dn)
            parts.append([qg, qd, sg, sd])
        return _assemble(sections, per, parts)

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.view(buf, hidden, group)  # validates size and alignment
        if buf.numel() != inter // group * self.group_nbytes(hidden, group):
            raise ConfigError(f"q8 buffer of {buf.numel()} bytes does not hold I={inter}")
        out = ref.unpack_q8_ref(buf.numpy(), hidden, inter, group)
        return tuple(torch.from_numpy(np.ascontiguousarray(t)) for t in out)  # type: ignore[return-value]

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> Q8View:
        self._check_dims(hidden, group)
        sections, per = ref.q8_sections(hidden, group)
        gu, dn, gs, ds = _split(buf, self.name, sections, per)
        n, g, d = gu.shape[0], group, hidden
        return Q8View(
            gu.view(torch.int8).view(n, 2 * g, d).unbind(0),
            gs.view(torch.bfloat16).unbind(0),
            dn.view(torch.int8).view(n, d, g).unbind(0),
            ds.view(torch.bfloat16).unbind(0),
            buf,
        )

    def dequantize_group(self, w: Q8View, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group j as bf16 ``([2g, D], [D, g])`` (one rounding of ``q * s``)."""
        # int8 -> bf16 is exact and the bf16 product is computed in f32, rounded once
        gu = torch.mul(w.gu[j], w.gu_scale[j][:, None])  # int8 * bf16 -> bf16
        dn = torch.mul(w.dn[j], w.dn_scale[j][:, None])
        return gu, dn

    def accumulate(self, x: torch.Tensor, w: Q8View, y: torch.Tensor | None) -> torch.Tensor | None:
        """Add the segment's SwiGLU ``[T, D]`` to y (new when ``None``) with the native decode
        kernel and return it; ``None`` when the torch-op path (``partials``) applies."""
        d, g = w.dn[0].shape
        xf = _native_x(self, x, d)
        if xf is None:
            return None
        y = _native_out(y, x, d)
        offs, per = _offsets(self.name, d, g)
        torch.ops.mer.q8_swiglu_(y, xf, w.buf, d, g, offs, per, 1, self.int8_activations)
        return y

    def partials(self, x: torch.Tensor, w: Q8View) -> Iterator[torch.Tensor]:
        if self.prefill_min_tokens is not None and x.shape[0] >= self.prefill_min_tokens:
            xg, dt = _gemm_rows(x, w.dn[0].shape[0]), gemm_dtype()  # [T, D]
            for j in range(len(w.gu)):
                gw, dw = self.dequantize_group(w, j)  # [2g, D], [D, g] bf16
                yield F.linear(_silu_mul(F.linear(xg, gw.to(dt))), dw.to(dt)).to(x.dtype)
            return
        xb = _bf16_rows(x, w.dn[0].shape[0])  # [T, D]
        for gu, gs, dn, ds in zip(w.gu, w.gu_scale, w.dn, w.dn_scale, strict=True):
            a = _silu_mul(_int8_mm(xb, gu, gs))  # [T, g]
            yield _int8_mm(a, dn, ds).to(x.dtype)  # [T, D]


# ---- q4 --------------------------------------------------------------------------------------


@functools.cache
def int4_layout() -> str:
    """Name of the int4 packing this torch build produces on this CPU (one of
    ``reference.INT4_LAYOUTS``), found by packing a probe and comparing with the NumPy encoders;
    ``opaque-...`` when none matches (then only this exact torch + CPU can read the bytes)."""
    n, k = 112, 64  # one full block of 64 rows and a partial one (48 = 32 + 16 for n32)
    q = (np.arange(n * k, dtype=np.int64).reshape(n, k) * 7 + np.arange(n)[:, None] // 5) % 16
    packed = _int4_pack(torch.from_numpy(q.astype(np.int32)), 2).numpy().reshape(n, k // 2)
    for name in ref.INT4_LAYOUTS:
        if np.array_equal(packed, ref.encode_int4(q.astype(np.uint8), name)):
            return name
    cap = torch.backends.cpu.get_cpu_capability()
    return f"opaque-torch{torch.__version__}-{cap}"


class Q4View(NamedTuple):
    """Zero-copy tensors over a q4 expert buffer, one per group."""

    gu: tuple[torch.Tensor, ...]  # n x [2g, D/2] uint8, packed
    gu_sz: tuple[torch.Tensor, ...]  # n x [D/b, 2g, 2] bf16 (scale, zero)
    dn: tuple[torch.Tensor, ...]  # n x [D, g/2] uint8, packed
    dn_sz: tuple[torch.Tensor, ...]  # n x [g/b, D, 2] bf16 (scale, zero)
    block: int  # b
    buf: torch.Tensor  # the whole segment, uint8 (what the native kernel reads)


class Q4:
    """4-bit asymmetric blocks with bf16 scale and zero; ``_weight_int4pack_mm_for_cpu``.

    The block is 64 weights when D and g are both multiples of 64, else 32 (the kernel takes
    either at the same speed; 64 costs 4.5 bits per weight, 32 costs 5). It follows from the
    shapes, so the store need not record it.
    """

    name: ClassVar[str] = "q4"
    group_multiple: ClassVar[int] = 32  # down's blocks run over a group's neurons
    prefill_min_tokens: ClassVar[int | None] = 96  # torch path: dense from here
    native: ClassVar[bool] = True  # T < native_below: kernels/native.cpp, when available
    native_below: ClassVar[int] = 256  # see docs/quantization.md
    int8_activations: ClassVar[bool] = True  # native: int8 x and a (native_int8.cpp)
    TAG_PREFIX: ClassVar[str] = "q4:v1:int4pack-cpu:"

    @staticmethod
    def block_size(hidden: int, group: int) -> int:
        return 64 if hidden % 64 == 0 and group % 64 == 0 else 32

    def layout_tag(self) -> str:
        """What the bytes depend on; the store writes it to its manifest and compares on open."""
        return self.TAG_PREFIX + int4_layout()

    def group_nbytes(self, hidden: int, group: int) -> int:
        return ref.q4_sections(hidden, group, self.block_size(hidden, group))[1]

    def _check_dims(self, hidden: int, group: int) -> None:
        if hidden % 32 or group % 32:
            raise ConfigError(
                f"q4 needs D and the group size to be multiples of 32, got D={hidden}, g={group}"
            )

    def quantize(self, w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[N, K]`` float -> (codes int32 ``[N, K]`` in 0..15, bf16 ``[K/b, N, 2]`` scale and
        zero); the same arithmetic as reference.quantize_q4."""
        n, k = w.shape
        wb = w.float().reshape(n, k // block, block)  # [N, K/b, b]
        lo, hi = wb.amin(dim=2), wb.amax(dim=2)  # [N, K/b] each (faster than aminmax here)
        s = ((hi - lo) / 15).to(torch.bfloat16).float()  # [N, K/b]
        z = (lo + s * 8).to(torch.bfloat16).float()
        constant = not bool((s > 0).all())  # a block of equal weights: code 8 (then q = z)
        safe = torch.where(s > 0, s, torch.ones_like(s)) if constant else s
        # in place, the same operations in the same order as reference.quantize_q4
        q = (wb - z[..., None]).div_(safe[..., None]).round_().add_(8).clamp_(0, 15)
        if constant:
            q = torch.where(s[..., None] > 0, q, torch.full_like(q, 8))
        sz = torch.stack([s.t(), z.t()], dim=-1).to(torch.bfloat16)  # [K/b, N, 2]
        return q.reshape(n, k).to(torch.int32), sz.contiguous()

    def pack(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int
    ) -> torch.Tensor:
        hidden, _ = check_dense(self.name, gate, up, down, group)
        self._check_dims(hidden, group)
        b = self.block_size(hidden, group)
        sections, per = ref.q4_sections(hidden, group, b)
        parts = []
        for gu, dn in _group_rows(gate, up, down, group):
            (qg, szg), (qd, szd) = self.quantize(gu, b), self.quantize(dn, b)
            parts.append([_int4_pack(qg, 2), szg, _int4_pack(qd, 2), szd])
        return _assemble(sections, per, parts)

    def _known_layout(self, layout: str, what: str) -> str:
        if layout not in ref.INT4_LAYOUTS:
            raise StoreError(
                f"q4 {what}: int4 layout {layout!r} is not one this version can decode "
                f"(known: {', '.join(ref.INT4_LAYOUTS)}); re-run `mer convert --dtype q4` "
                "with this torch on this machine"
            )
        return layout

    def _tag_layout(self, tag: str, what: str) -> str:
        if not tag.startswith(self.TAG_PREFIX):
            raise StoreError(
                f"q4 {what}: store tag {tag!r} is not a {self.TAG_PREFIX}* tag; "
                "re-run `mer convert --dtype q4`"
            )
        return self._known_layout(tag[len(self.TAG_PREFIX) :], what)

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.view(buf, hidden, group)  # validates size and alignment
        if buf.numel() != inter // group * self.group_nbytes(hidden, group):
            raise ConfigError(f"q4 buffer of {buf.numel()} bytes does not hold I={inter}")
        layout = self._known_layout(int4_layout(), "unpack")
        out = ref.unpack_q4_ref(buf.numpy(), hidden, inter, group, w.block, layout)
        return tuple(torch.from_numpy(np.ascontiguousarray(t)) for t in out)  # type: ignore[return-value]

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> Q4View:
        self._check_dims(hidden, group)
        b = self.block_size(hidden, group)
        sections, per = ref.q4_sections(hidden, group, b)
        gu, gsz, dn, dsz = _split(buf, self.name, sections, per)
        n, g, d = gu.shape[0], group, hidden
        return Q4View(
            gu.view(n, 2 * g, d // 2).unbind(0),
            gsz.view(torch.bfloat16).view(n, d // b, 2 * g, 2).unbind(0),
            dn.view(n, d, g // 2).unbind(0),
            dsz.view(torch.bfloat16).view(n, g // b, d, 2).unbind(0),
            b,
            buf,
        )

    def repack(self, buf: torch.Tensor, hidden: int, group: int, from_tag: str) -> torch.Tensor:
        """A copy of ``buf`` (written under ``from_tag``) in this machine's int4 layout.

        Scales and codes are unchanged, so the dequantized weights are bit-identical. Costs about
        as much as packing (tens of ms per expert): do it once per store, not per read.
        """
        src = self._tag_layout(from_tag, "repack")
        w = self.view(buf, hidden, group)
        out = buf.clone()
        ov = self.view(out, hidden, group)
        for j in range(len(w.gu)):
            for packed, dst in ((w.gu[j], ov.gu[j]), (w.dn[j], ov.dn[j])):
                q = ref.decode_int4(packed.numpy(), src).astype(np.int32)
                dst.copy_(_int4_pack(torch.from_numpy(q), 2).view(dst.shape))
        return out

    def check_tag(self, tag: str) -> bool:
        """Whether a store written under ``tag`` can be read here: ``True`` if as-is, ``False``
        if it needs ``repack`` first; raises StoreError if it cannot be used at all."""
        if tag == self.layout_tag():
            return True
        self._tag_layout(tag, "open")
        self._known_layout(int4_layout(), "open")
        return False

    def dequantize_group(self, w: Q4View, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group j as bf16 ``([2g, D], [D, g])``, decoding torch's packing with torch ops."""
        layout = self._known_layout(int4_layout(), "dequantize")
        out = []
        for packed, sz in ((w.gu[j], w.gu_sz[j]), (w.dn[j], w.dn_sz[j])):
            wt = _dequant4_t(packed, sz, w.block, layout)  # [N/bn, K, bn]
            out.append(wt.transpose(1, 2).reshape(packed.shape[0], -1))  # [N, K]
        return out[0], out[1]

    def accumulate(self, x: torch.Tensor, w: Q4View, y: torch.Tensor | None) -> torch.Tensor | None:
        """Add the segment's SwiGLU ``[T, D]`` to y (new when ``None``) with the native decode
        kernel and return it; ``None`` when the torch-op path (``partials``) applies. Native
        only in torch's AVX-512 ("n64") and AVX2 ("n32") packings, the ones its SIMD code
        decodes."""
        d, g = w.dn[0].shape[0], w.dn[0].shape[1] * 2
        bn = native.q4_block_rows()
        if bn is None:
            return None
        xf = _native_x(self, x, d)
        if xf is None:
            return None
        y = _native_out(y, x, d)
        offs, per = _offsets(self.name, d, g)
        torch.ops.mer.q4_swiglu_(
            y, xf, w.buf, d, g, w.block, offs, per, bn, True, 1, self.int8_activations
        )
        return y

    def partials(self, x: torch.Tensor, w: Q4View) -> Iterator[torch.Tensor]:
        d, b, layout = w.dn[0].shape[0], w.block, int4_layout()
        groups = zip(w.gu, w.gu_sz, w.dn, w.dn_sz, strict=True)
        dense = self.prefill_min_tokens is not None and x.shape[0] >= self.prefill_min_tokens
        # the dense path decodes whole row blocks: 2g always is, D must be too
        if dense and layout in ref.INT4_LAYOUTS and d % ref.INT4_LAYOUTS[layout][0] == 0:
            # dequantize in torch's row-block order and multiply block by block: no transpose
            xg, dt = _gemm_rows(x, d), gemm_dtype()  # [T, D]
            if native.available() and ref.INT4_LAYOUTS[layout][1]:
                for gu, gsz, dn, dsz in groups:  # one native pass per matrix, plain GEMMs
                    a = _silu_mul(xg @ dequant4_wt(gu, gsz, b, layout, dtype=dt))  # [T, g]
                    yield (a @ dequant4_wt(dn, dsz, b, layout, dtype=dt)).to(x.dtype)  # [T, D]
                return
            for gu, gsz, dn, dsz in groups:
                a = _silu_mul(_blocked_linear(xg, _dequant4_t(gu, gsz, b, layout, dt)))  # [T, g]
                yield _blocked_linear(a, _dequant4_t(dn, dsz, b, layout, dt)).to(x.dtype)
            return
        xb = _bf16_rows(x, d)  # [T, D]
        for gu, gsz, dn, dsz in groups:
            a = _silu_mul(_int4_mm(xb, gu, b, gsz))  # [T, g]
            yield _int4_mm(a, dn, b, dsz).to(x.dtype)  # [T, D]


def _dequant4_t(
    packed: torch.Tensor,
    sz: torch.Tensor,
    block: int,
    layout: str,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Packed ``[N, K/2]`` + (scale, zero) ``[K/b, N, 2]`` -> the transposed weight in torch's
    row blocks, bf16 ``[N/bn, K, bn]`` (``bn`` = the layout's block of rows; element
    ``[i, k, r]`` is ``W[i * bn + r, k]``). N must be a whole number of row blocks, which the q4
    dimension checks guarantee (N = 2g or D, multiples of 64)."""
    bn, split = ref.INT4_LAYOUTS[layout]
    n, k, h = packed.shape[0], packed.shape[1] * 2, bn // 2
    nb = n // bn
    t = packed.view(nb, k, h)  # [NB, K, h] bytes
    q = torch.empty((nb, k, bn), dtype=torch.uint8)
    if split:  # byte r holds rows r (low nibble) and r + h (high)
        torch.bitwise_and(t, 15, out=q[..., :h])
        torch.bitwise_right_shift(t, 4, out=q[..., h:])
    else:  # byte r holds rows 2r (low) and 2r + 1 (high)
        pairs = q.view(nb, k, h, 2)
        torch.bitwise_and(t, 15, out=pairs[..., 0])
        torch.bitwise_right_shift(t, 4, out=pairs[..., 1])
    s = sz[..., 0].reshape(k // block, nb, 1, bn).transpose(0, 1).float()  # [NB, K/b, 1, bn]
    z = sz[..., 1].reshape(k // block, nb, 1, bn).transpose(0, 1).float()
    w = q.view(nb, k // block, block, bn).float()  # [NB, K/b, b, bn]
    w.mul_(s).add_(z - 8 * s)  # (q - 8) s + z
    return w.view(nb, k, bn).to(dtype)


def dequant4_wt(
    packed: torch.Tensor,
    sz: torch.Tensor,
    block: int,
    layout: str,
    isa: int = 1,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed ``[N, K/2]`` + (scale, zero) ``[K/b, N, 2]`` -> ``W.T`` as ``[K, N]`` float32 or
    bf16, by the native op in one pass (native_dequant.cpp; the bits of ``_dequant4_t``'s
    float32 arithmetic, and for bf16 those rounded as ``Tensor.to(torch.bfloat16)`` does)."""
    bn, split = ref.INT4_LAYOUTS[layout]
    n, k = packed.shape[0], packed.shape[1] * 2
    wt = torch.empty((k, n), dtype=dtype)  # [K, N]
    torch.ops.mer.q4_dequant_t_(wt, packed.contiguous(), sz.contiguous(), block, bn, split, isa)
    return wt


def _blocked_linear(x: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """``x @ W.T`` for W given as row blocks ``[N/bn, K, bn]``: ``[T, K]`` -> ``[T, N]``."""
    y = torch.matmul(x, wt)  # [NB, T, bn]
    return y.transpose(0, 1).reshape(x.shape[0], -1)  # [T, N]


FORMATS["q8"] = Q8()
FORMATS["q4"] = Q4()
