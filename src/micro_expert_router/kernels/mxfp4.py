"""The ``mxfp4`` expert format: GPT-OSS experts kept as the checkpoint's MXFP4 blocks, losslessly.

The official GPT-OSS checkpoints store each layer's experts as ``gate_up_proj_blocks``
``[E, 2I, D/32, 16]`` (uint8, two e2m1 codes per byte: element 2k in the low nibble, 2k + 1 in
the high one), ``gate_up_proj_scales`` ``[E, 2I, D/32]`` (uint8 e8m0 exponents: ``2^(e-127)``),
the same for ``down_proj`` over ``[E, D, I/32]``, and bf16 biases ``gate_up_proj_bias``
``[E, 2I]`` and ``down_proj_bias`` ``[E, D]``. Rows 2i and 2i + 1 of ``gate_up`` are the gate and
up rows of neuron i (interleaved).

A group of g neurons (g a multiple of 32) holds, each section starting on 64 bytes:

    gate/up blocks  [2g, D/32, 16]   rows [2jg, 2(j+1)g) of the checkpoint: a contiguous slice
    gate/up scales  [2g, D/32]
    down blocks     [D, g/32, 16]    every down row's blocks of neurons [jg, (j+1)g): unchanged
    down scales     [D, g/32]
    gate/up bias    [2g] float32     interleaved as in the checkpoint
    down bias slot  [D] float32      the expert's down bias in group 0, zeros in the others

so the blocks and scales are the checkpoint's bytes, only regrouped, and dequantizing a store
gives bit for bit what transformers' ``convert_moe_packed_tensors`` gives. The down bias is
added once per expert: every group's partial adds its slot after its down product, and only
group 0's slot is not zero (adding +0.0 changes no value). It costs ``4 D`` bytes a group
(0.7 % of a GPT-OSS group) and keeps every group the same size, so splits, the cache and the
planner see an ordinary bundled format.

Compute: ``partials`` (any batch; the reference path) dequantizes a group with
``ggml.dequantize`` (the same bits as gguf-py's ``gguf.quants.MXFP4``, after a nibble
reordering) and runs the clamped SwiGLU (``clamped_swiglu``) in the activations' dtype.
``accumulate`` (decode, T < ``native_below``) runs ``mxfp4.cpp`` on the bytes in place: with
float32 activations it computes in float32; with bfloat16 activations it rounds them to int8 per
block of 32 and multiplies with integer dot products (``isa_for``), which is what keeps up with
DRAM. Error bounds: ``docs/design.md``.

Legend: T tokens, D hidden, I intermediate, g neurons per group, n groups, R rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import native
from .formats import FORMATS, PARAMETRIC
from .ggml import TYPES, dequantize

SOURCE = Path(__file__).with_name("mxfp4.cpp")
# the ops; the float32 and the int8 dots (shared declarations: mxfp4.h)
SOURCES = (SOURCE, *(SOURCE.with_name(f"mxfp4_{m}.cpp") for m in ("f32", "i8")))
DEFAULT_ALPHA, DEFAULT_LIMIT = 1.702, 7.0  # GPT-OSS's clamped SwiGLU
BLOCK = 32


@functools.cache
def available() -> bool:
    """Whether the native MXFP4 kernel is loaded (built on first use) on an AVX2 + FMA CPU."""
    info = native.load_library(SOURCES, "MXFP4 kernel", "dequantize + torch matmul")
    return info is not None and bool(torch.ops.mer_mxfp4.has_avx2())


def isa_for(dtype: torch.dtype) -> int:
    """The kernel variant: 1 (float32 activations) or 2 (int8 activations, the bfloat16 mode);
    the native code takes AVX-512 (VBMI + VNNI) where the CPU has it, else AVX2 (same bits)."""
    return 2 if dtype == torch.bfloat16 else 1


# ---- blocks ----------------------------------------------------------------------------------


def to_ggml(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Checkpoint MXFP4 ``[..., B, 16]`` + ``[..., B]`` -> GGUF's MXFP4 blocks ``[..., B, 17]``
    (exponent byte, then byte i = element i | element i + 16 << 4). Same codes and exponents."""
    if blocks.shape[-1] != 16 or blocks.shape[:-1] != scales.shape:
        raise ConfigError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                          "disagree (expected [..., B, 16] and [..., B])")  # fmt: skip
    codes = torch.stack([blocks & 15, blocks >> 4], dim=-1).flatten(-2)  # [..., B, 32] in order
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # [..., B, 16]
    return torch.cat([scales.unsqueeze(-1), qs], dim=-1)


def dequantize_rows(blocks: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """MXFP4 rows ``[R, B, 16]`` + ``[R, B]`` -> float32 ``[R, 32 B]`` (exact: every value is a
    small integer times a power of two)."""
    r, b = scales.shape
    return dequantize(TYPES["MXFP4"], to_ggml(blocks, scales).reshape(r, b * 17), b * BLOCK)


def clamped_swiglu(h: torch.Tensor, u: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    """GPT-OSS's activation: ``(clamp(u, -L, L) + 1) * g * sigmoid(alpha g)``, ``g = min(h, L)``."""
    g = h.clamp(max=limit)
    return (u.clamp(-limit, limit) + 1) * (g * torch.sigmoid(g * alpha))


# ---- the format ------------------------------------------------------------------------------


class RawExpert(NamedTuple):
    """One GPT-OSS expert as the checkpoint holds it (the ``mxfp4`` format packs these)."""

    gu_blocks: torch.Tensor  # [2I, D/32, 16] uint8, rows interleaved gate/up
    gu_scales: torch.Tensor  # [2I, D/32] uint8
    dn_blocks: torch.Tensor  # [D, I/32, 16] uint8
    dn_scales: torch.Tensor  # [D, I/32] uint8
    gu_bias: torch.Tensor  # [2I] float, interleaved
    dn_bias: torch.Tensor  # [D] float


class MXFP4View(NamedTuple):
    gu_blocks: torch.Tensor  # [n, 2g, D/32, 16] uint8
    gu_scales: torch.Tensor  # [n, 2g, D/32] uint8
    dn_blocks: torch.Tensor  # [n, D, g/32, 16] uint8
    dn_scales: torch.Tensor  # [n, D, g/32] uint8
    gu_bias: torch.Tensor  # [n, 2g] float32
    dn_bias: torch.Tensor  # [n, D] float32
    hidden: int
    group: int
    per: int
    offsets: tuple[int, ...]
    buf: torch.Tensor  # the whole segment (what the native kernel reads)


def _up64(n: int) -> int:
    return -(-n // 64) * 64


class MXFP4:
    """GPT-OSS experts in MXFP4 blocks, with biases and the clamped SwiGLU (alpha, limit)."""

    group_multiple: ClassVar[int] = BLOCK  # a down row's blocks run over a group's neurons
    native_below: ClassVar[int] = 16  # decode: the native kernel; batches: dequantize + matmul

    def __init__(self, alpha: float = DEFAULT_ALPHA, limit: float = DEFAULT_LIMIT) -> None:
        self.alpha, self.limit = float(alpha), float(limit)
        default = (self.alpha, self.limit) == (DEFAULT_ALPHA, DEFAULT_LIMIT)
        self.name = "mxfp4" if default else f"mxfp4:{self.alpha!r}:{self.limit!r}"

    @classmethod
    def parse(cls, name: str) -> MXFP4:
        parts = name.split(":")
        try:
            if parts[0] != "mxfp4" or len(parts) != 3:
                raise ValueError
            return cls(float(parts[1]), float(parts[2]))
        except ValueError:
            raise ConfigError(
                f"expert format {name!r}: expected mxfp4 or mxfp4:ALPHA:LIMIT"
            ) from None

    # -- arithmetic ------------------------------------------------------------------------
    def _sizes(self, hidden: int, group: int) -> tuple[int, ...]:
        d, g = hidden, group
        return (2 * g * d // 2, 2 * g * d // BLOCK, d * g // 2, d * g // BLOCK, 2 * g * 4, d * 4)

    def offsets(self, hidden: int, group: int) -> tuple[int, ...]:
        out, at = [], 0
        for s in self._sizes(hidden, group):
            out.append(at)
            at += _up64(s)
        return tuple(out)

    def group_nbytes(self, hidden: int, group: int) -> int:
        return sum(_up64(s) for s in self._sizes(hidden, group))

    def _check_dims(self, hidden: int, group: int) -> None:
        if hidden % BLOCK or group % BLOCK or group <= 0:
            raise ConfigError(f"{self.name} needs D and the group size to be multiples of "
                              f"{BLOCK}, got D={hidden}, g={group}")  # fmt: skip

    # -- bytes -----------------------------------------------------------------------------
    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int):
        raise ConfigError(f"{self.name} holds a checkpoint's MXFP4 blocks as they are (lossless); "
                          "convert a GPT-OSS checkpoint with MXFP4 experts, or choose bf16, q8 "
                          "or q4 for float weights")  # fmt: skip

    def pack_expert(self, w: object, group: int) -> torch.Tensor:
        """The converter's entry point: only a checkpoint's MXFP4 blocks (``RawExpert``)."""
        if not isinstance(w, RawExpert):
            return self.pack(torch.empty(0), torch.empty(0), torch.empty(0), group)  # raises
        return self.pack_raw(w, group)

    def pack_raw(self, w: RawExpert, group: int) -> torch.Tensor:
        """One expert's checkpoint blocks, scales and biases into n groups, 1-D uint8."""
        two_i, nbd = w.gu_scales.shape
        d, inter = nbd * BLOCK, two_i // 2
        self._check_dims(d, group)
        shapes = {"gate_up blocks": (w.gu_blocks, (two_i, nbd, 16)),
                  "down blocks": (w.dn_blocks, (d, inter // BLOCK, 16)),
                  "down scales": (w.dn_scales, (d, inter // BLOCK)),
                  "gate_up bias": (w.gu_bias, (two_i,)),
                  "down bias": (w.dn_bias, (d,))}  # fmt: skip
        for what, (t, shape) in shapes.items():
            if tuple(t.shape) != shape:
                raise ConfigError(f"{self.name}: {what} have shape {tuple(t.shape)}, expected "
                                  f"{shape} for D={d}, I={inter}")  # fmt: skip
        if inter % group:
            raise ConfigError(f"{self.name}: group size {group} does not divide I = {inter}")
        for what, s in (("gate_up", w.gu_scales), ("down", w.dn_scales)):
            if s.dtype != torch.uint8 or bool((s == 255).any()):
                raise ConfigError(f"{self.name}: {what} scales must be uint8 e8m0 exponents "
                                  "below 255 (255 is NaN in OCP MX)")  # fmt: skip
        for what, b in (("gate_up", w.gu_bias), ("down", w.dn_bias)):
            if not bool(torch.isfinite(b.float()).all()):
                raise ConfigError(f"{self.name}: the {what} bias holds NaN or Inf")
        n, g, per = inter // group, group, self.group_nbytes(d, group)
        o = self.offsets(d, group)
        out = torch.zeros((n, per), dtype=torch.uint8)
        parts = (
            w.gu_blocks.reshape(n, -1), w.gu_scales.reshape(n, -1),
            w.dn_blocks.view(d, n, -1).transpose(0, 1).reshape(n, -1),
            w.dn_scales.view(d, n, -1).transpose(0, 1).reshape(n, -1),
            w.gu_bias.float().reshape(n, 2 * g).contiguous().view(torch.uint8),
        )  # fmt: skip
        for off, p in zip(o, parts, strict=False):
            out[:, off : off + p.shape[1]] = p
        out[0, o[5] : o[5] + 4 * d] = w.dn_bias.float().contiguous().view(torch.uint8)
        return out.view(-1)

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> MXFP4View:
        self._check_dims(hidden, group)
        per = self.group_nbytes(hidden, group)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() % per or not buf.numel():
            raise ConfigError(f"{self.name} expert buffer of {buf.numel()} bytes is not a whole "
                              f"number of {per}-byte groups (D={hidden}, g={group})")  # fmt: skip
        rows = buf.view(-1, per)  # [n, per]
        n, g, d = rows.shape[0], group, hidden
        o, s = self.offsets(hidden, group), self._sizes(hidden, group)

        def sec(i: int) -> torch.Tensor:
            return rows[:, o[i] : o[i] + s[i]]

        return MXFP4View(
            sec(0).view(n, 2 * g, d // BLOCK, 16), sec(1).view(n, 2 * g, d // BLOCK),
            sec(2).view(n, d, g // BLOCK, 16), sec(3).view(n, d, g // BLOCK),
            sec(4).view(torch.float32), sec(5).view(torch.float32),
            hidden, group, per, o, buf,
        )  # fmt: skip

    def dequantize_group(self, w: MXFP4View, j: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Group j as float32 gate/up rows ``[2g, D]`` (interleaved) and down ``[D, g]``."""
        return (dequantize_rows(w.gu_blocks[j], w.gu_scales[j]),
                dequantize_rows(w.dn_blocks[j], w.dn_scales[j]))  # fmt: skip

    def unpack_raw(self, buf: torch.Tensor, hidden: int, inter: int, group: int) -> RawExpert:
        """The inverse of ``pack_raw``: the checkpoint's bytes and the biases (float32)."""
        w = self.view(buf, hidden, group)
        n = w.gu_blocks.shape[0]
        if n * group != inter:
            raise ConfigError(f"{self.name} buffer of {buf.numel()} bytes does not hold I={inter}")
        return RawExpert(
            w.gu_blocks.reshape(2 * inter, -1, 16), w.gu_scales.reshape(2 * inter, -1),
            w.dn_blocks.transpose(0, 1).reshape(hidden, -1, 16),
            w.dn_scales.transpose(0, 1).reshape(hidden, -1),
            w.gu_bias.reshape(-1).clone(), w.dn_bias.sum(0),
        )  # fmt: skip

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Dequantized float32 gate ``[I, D]``, up ``[I, D]``, down ``[D, I]`` (no biases)."""
        r = self.unpack_raw(buf, hidden, inter, group)
        gu = dequantize_rows(r.gu_blocks, r.gu_scales)  # [2I, D]
        return (
            gu[0::2].contiguous(),
            gu[1::2].contiguous(),
            dequantize_rows(r.dn_blocks, r.dn_scales),
        )

    # -- compute ---------------------------------------------------------------------------
    def partials(self, x: torch.Tensor, w: MXFP4View) -> Iterator[torch.Tensor]:
        for j in range(w.gu_blocks.shape[0]):
            gu, dn = (t.to(x.dtype) for t in self.dequantize_group(w, j))  # exact in bf16 too
            h = F.linear(x, gu, w.gu_bias[j].to(x.dtype))  # [T, 2g]
            a = clamped_swiglu(h[:, 0::2], h[:, 1::2], self.alpha, self.limit)  # [T, g]
            yield F.linear(a, dn, w.dn_bias[j].to(x.dtype))  # [T, D]

    def accumulate(
        self, x: torch.Tensor, w: MXFP4View, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The whole segment added to y by the native kernel, or ``None`` (use partials)."""
        out = self.accumulate_many(x, [w], [y])
        return None if out is None else out[0]

    def accumulate_many(
        self, x: torch.Tensor, views: list[MXFP4View], ys: list[torch.Tensor | None]
    ) -> list[torch.Tensor] | None:
        """Segments of several experts on the same x, each added to its y (new when ``None``),
        in one native call (``kernels/experts.py``, decode); ``None``: use partials. Each
        expert's result has the same bits as ``accumulate`` on it alone."""
        if x.dim() != 2 or x.shape[0] >= self.native_below or not views:
            return None
        if x.dtype not in (torch.float32, torch.bfloat16) or not available():
            return None
        w = views[0]
        if any((v.hidden, v.group) != (w.hidden, w.group) for v in views) or x.shape[1] != w.hidden:
            return None
        ys = [torch.zeros((x.shape[0], w.hidden), dtype=x.dtype) if y is None else y for y in ys]
        yf = [y if y.dtype == torch.float32 else y.float() for y in ys]
        torch.ops.mer_mxfp4.swiglu_many_(yf, x.float().contiguous(), [v.buf for v in views],
                                         w.hidden, w.group, w.per, list(w.offsets), self.alpha,
                                         self.limit, isa_for(x.dtype),
                                         x.dtype == torch.bfloat16)  # fmt: skip
        for y, f in zip(ys, yf, strict=True):
            if f is not y:
                y.copy_(f)
        return ys


FORMATS["mxfp4"] = MXFP4()
PARAMETRIC["mxfp4"] = functools.cache(MXFP4.parse)
