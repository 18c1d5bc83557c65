"""GPT-OSS experts in the float and q8/q4 formats: ``gptoss:<inner>`` (e.g. ``gptoss:q8``).

A GPT-OSS expert adds biases to its gate, up and down projections and replaces SwiGLU with a
clamped variant (``mxfp4.clamped_swiglu``: alpha, limit). This wrapper keeps an inner format's
bytes for the weights and appends the biases to every group, so a prefix of groups is still a
prefix of the bytes and splits, the cache and the planner see an ordinary bundled format:

    group j:  inner group (f32, bf16, q8 or q4; padded to 64 bytes)
              gate bias [g] float32 | up bias [g] float32 | down bias slot [D] float32
              (padded to 64 bytes)

The down bias belongs to the whole expert, not to a neuron: group 0's slot holds it and every
other group's slot holds zeros, and each group's partial adds its slot after its down product.
So the bias is added once per expert however the expert is cut into segments (adding +0.0
changes no value); ``docs/design.md`` has the trade-off (4 D bytes a group).

``partials`` runs one group at a time on the inner format's weights dequantized to the
activations' dtype (f32 and bf16 are read in place), always with the same ops, so that a split
expert gives the same bits as a whole one. There is no native kernel for these: GPT-OSS's own
format is ``mxfp4``; these exist for stores converted to f32, bf16, q8 or q4.

Legend: T tokens, D hidden, I intermediate, g neurons per group, n groups.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .formats import FORMATS, PARAMETRIC, ExpertFormat
from .mxfp4 import DEFAULT_ALPHA, DEFAULT_LIMIT, MXFP4, RawExpert, clamped_swiglu, dequantize_rows

INNER = ("f32", "bf16", "q8", "q4")


class BiasedExpert(NamedTuple):
    """One GPT-OSS expert as floats (gate/up de-interleaved)."""

    gate: torch.Tensor  # [I, D]
    up: torch.Tensor  # [I, D]
    down: torch.Tensor  # [D, I]
    gate_bias: torch.Tensor  # [I]
    up_bias: torch.Tensor  # [I]
    down_bias: torch.Tensor  # [D]


def dequantize_expert(w: RawExpert) -> BiasedExpert:
    """An MXFP4 expert as float32 (exact: every MXFP4 value is a float32, and a bfloat16)."""
    gu = dequantize_rows(w.gu_blocks, w.gu_scales)  # [2I, D] interleaved
    b = w.gu_bias.float()
    return BiasedExpert(gu[0::2], gu[1::2], dequantize_rows(w.dn_blocks, w.dn_scales),
                        b[0::2], b[1::2], w.dn_bias.float())  # fmt: skip


def float_weights(w: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(gate ``[I, D]``, up ``[I, D]``, down ``[D, I]``) floats of any expert record the
    converter reads: a plain (gate, up, down), a ``BiasedExpert`` or a ``RawExpert``."""
    if isinstance(w, RawExpert):
        w = dequantize_expert(w)
    gate, up, down = tuple(w)[:3]  # type: ignore[call-overload]
    return gate, up, down


class BiasedView(NamedTuple):
    inner: tuple[object, ...]  # n one-group views of the inner format
    bias: torch.Tensor  # [n, 2g] float32: gate biases, then up biases
    down_bias: torch.Tensor  # [n, D] float32 (zeros after group 0)
    hidden: int
    group: int


def _up64(n: int) -> int:
    return -(-n // 64) * 64


class Biased:
    """``gptoss:<inner>[:alpha:limit]``: an inner format plus per-group biases, clamped SwiGLU."""

    def __init__(
        self, inner: str, alpha: float = DEFAULT_ALPHA, limit: float = DEFAULT_LIMIT
    ) -> None:
        if inner not in INNER:
            raise ConfigError(f"gptoss:{inner}: the inner format must be one of {INNER}")
        self.inner: ExpertFormat = FORMATS[inner]
        self.alpha, self.limit = float(alpha), float(limit)
        self.group_multiple = self.inner.group_multiple
        default = (self.alpha, self.limit) == (DEFAULT_ALPHA, DEFAULT_LIMIT)
        self.name = f"gptoss:{inner}" + ("" if default else f":{self.alpha!r}:{self.limit!r}")

    @classmethod
    def parse(cls, name: str) -> Biased:
        parts = name.split(":")
        try:
            if parts[0] != "gptoss" or len(parts) not in (2, 4):
                raise ValueError
            return cls(parts[1], *(float(p) for p in parts[2:]))
        except ValueError:
            raise ConfigError(f"expert format {name!r}: expected gptoss:INNER or "
                              "gptoss:INNER:ALPHA:LIMIT") from None  # fmt: skip

    def layout_tag(self) -> str:
        inner = self.inner.layout_tag() if hasattr(self.inner, "layout_tag") else self.inner.name
        return f"gptoss:{inner}"

    # -- arithmetic ------------------------------------------------------------------------
    def _inner_nbytes(self, hidden: int, group: int) -> int:
        return _up64(self.inner.group_nbytes(hidden, group))

    def group_nbytes(self, hidden: int, group: int) -> int:
        return self._inner_nbytes(hidden, group) + _up64(4 * (2 * group + hidden))

    # -- bytes -----------------------------------------------------------------------------
    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int):
        raise ConfigError(f"{self.name} experts carry biases: pack them with pack_expert")

    def pack_expert(self, w: BiasedExpert | RawExpert, group: int) -> torch.Tensor:
        """One expert (floats, or MXFP4 blocks, dequantized first) into n groups, 1-D uint8."""
        if isinstance(w, RawExpert):
            w = dequantize_expert(w)
        inter, d = w.gate.shape
        for what, t, n in (("gate", w.gate_bias, inter), ("up", w.up_bias, inter),
                           ("down", w.down_bias, d)):  # fmt: skip
            if tuple(t.shape) != (n,):
                raise ConfigError(f"{self.name}: {what} bias has shape {tuple(t.shape)}, "
                                  f"expected ({n},)")  # fmt: skip
            if not bool(torch.isfinite(t.float()).all()):
                raise ConfigError(f"{self.name}: the {what} bias holds NaN or Inf")
        weights = self.inner.pack(w.gate, w.up, w.down, group)  # checks shapes and values
        n, g, inner = inter // group, group, self.inner.group_nbytes(d, group)
        out = torch.zeros((n, self.group_nbytes(d, group)), dtype=torch.uint8)
        out[:, :inner] = weights.view(n, inner)
        at = self._inner_nbytes(d, group)
        bias = torch.cat([w.gate_bias.float().view(n, g), w.up_bias.float().view(n, g)], dim=1)
        out[:, at : at + 8 * g] = bias.view(torch.uint8)
        out[0, at + 8 * g : at + 8 * g + 4 * d] = w.down_bias.float().view(torch.uint8)
        return out.view(-1)

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> BiasedView:
        per = self.group_nbytes(hidden, group)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() % per or not buf.numel():
            raise ConfigError(f"{self.name} expert buffer of {buf.numel()} bytes is not a whole "
                              f"number of {per}-byte groups (D={hidden}, g={group})")  # fmt: skip
        rows = buf.view(-1, per)  # [n, per]
        inner, at, g = (
            self.inner.group_nbytes(hidden, group),
            self._inner_nbytes(hidden, group),
            group,
        )
        views = tuple(self.inner.view(r[:inner], hidden, group) for r in rows)
        bias = rows[:, at : at + 8 * g].view(torch.float32)  # [n, 2g]
        down = rows[:, at + 8 * g : at + 8 * g + 4 * hidden].view(torch.float32)  # [n, D]
        return BiasedView(views, bias, down, hidden, group)

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The inner format's float32 gate ``[I, D]``, up ``[I, D]``, down ``[D, I]``."""
        per, inner = self.group_nbytes(hidden, group), self.inner.group_nbytes(hidden, group)
        if buf.numel() != inter // group * per:
            raise ConfigError(f"{self.name} buffer of {buf.numel()} bytes does not hold I={inter}")
        rows = buf.view(-1, per)
        parts = [self.inner.unpack(r[:inner].clone(), hidden, group, group) for r in rows]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts], dim=1))  # fmt: skip

    def biases(self, buf: torch.Tensor, hidden: int, group: int) -> tuple[torch.Tensor, ...]:
        """gate ``[I]``, up ``[I]`` and down ``[D]`` biases of a whole expert buffer."""
        w = self.view(buf, hidden, group)
        g = group
        return w.bias[:, :g].reshape(-1), w.bias[:, g:].reshape(-1), w.down_bias.sum(0)

    # -- compute ---------------------------------------------------------------------------
    def _weights(self, v: object, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """One group's gate+up rows ``[2g, D]`` and down transposed ``[g, D]`` in ``dtype``."""
        if isinstance(v, torch.Tensor):  # f32 / bf16: [1, 3, g, D], read in place
            _, _, g, d = v.shape
            return v[0, :2].reshape(2 * g, d).to(dtype), v[0, 2].to(dtype)
        gu, dn = self.inner.dequantize_group(v, 0)  # type: ignore[attr-defined]
        return gu.to(dtype), dn.t().to(dtype)

    def partials(self, x: torch.Tensor, w: BiasedView) -> Iterator[torch.Tensor]:
        g = w.group
        for j, v in enumerate(w.inner):
            gu, dn_t = self._weights(v, x.dtype)
            h = F.linear(x, gu, w.bias[j].to(x.dtype))  # [T, 2g]
            a = clamped_swiglu(h[:, :g], h[:, g:], self.alpha, self.limit)  # [T, g]
            yield torch.matmul(a, dn_t).add_(w.down_bias[j].to(x.dtype))  # [T, D]


def expert_format(dtype: str, alpha: float, limit: float) -> ExpertFormat:
    """The GPT-OSS expert format for a ``mer convert --dtype`` choice."""
    if dtype == "mxfp4":
        return MXFP4(alpha, limit)
    if dtype not in INNER:
        raise ConfigError(f"GPT-OSS experts convert to mxfp4 or one of {INNER}, not {dtype!r}")
    return Biased(dtype, alpha, limit)


PARAMETRIC["gptoss"] = functools.cache(Biased.parse)
