"""Expert weight formats: how one expert's SwiGLU weights are laid out as bytes, and computed.

Every expert, in RAM or on disk, is one flat byte buffer in the **bundled** layout: the
intermediate dimension I is cut into ``n = I / g`` groups of ``g`` neurons, and group ``j`` holds,
back to back, the gate rows, the up rows and the down columns (stored as rows) of neurons
``[j*g, (j+1)*g)``. Any prefix of whole groups is therefore a prefix of the bytes, which is what
lets a split expert (MoEpic) read its top and bottom segments as two plain reads.

A format is a small class in ``FORMATS``: it says how many bytes one group takes (arithmetic, not
a guess), how to pack dense weights into groups, a slow obviously-correct ``unpack`` used as the
reference in tests, a zero-copy ``view`` over a buffer, and ``partials``: the SwiGLU output of
each group, one ``[T, D]`` tensor per group. ``expert_forward`` adds the group partials in group
order, one at a time, so that computing an expert in one piece or as top + bottom segments gives
bit-identical float results. A format may also offer ``accumulate(x, view, y)``: a whole segment
added to ``y`` in one call (q4 and q8 decode run the native kernel of ``native.cpp`` this way),
under the same rule: each group's partial is independent of the other groups of the call and is
added in group order.

Legend: T tokens, D hidden, I intermediate, n groups, g neurons per group.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F

from ..errors import ConfigError


class ExpertFormat(Protocol):
    """What every expert format provides. Implementations are stateless."""

    name: ClassVar[str]
    group_multiple: ClassVar[int]  # g must be a multiple of this (quantization block)

    def group_nbytes(self, hidden: int, group: int) -> int: ...

    def pack(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int
    ) -> torch.Tensor: ...

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]: ...

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> object: ...

    def partials(self, x: torch.Tensor, w: object) -> Iterator[torch.Tensor]: ...


def check_dense(
    fmt_name: str, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int
) -> tuple[int, int]:
    """Validate one expert's dense weights for packing; returns (hidden, inter)."""
    if gate.dim() != 2:
        raise ConfigError(f"{fmt_name}: gate must be 2-D [I, D], got shape {tuple(gate.shape)}")
    inter, hidden = gate.shape
    if up.shape != (inter, hidden) or down.shape != (hidden, inter):
        raise ConfigError(
            f"{fmt_name}: expert weight shapes disagree: gate {tuple(gate.shape)}, "
            f"up {tuple(up.shape)}, down {tuple(down.shape)} (expected [I, D], [I, D], [D, I])"
        )
    if group <= 0 or inter % group:
        raise ConfigError(f"{fmt_name}: group size {group} does not divide I = {inter}")
    for name, t in (("gate", gate), ("up", up), ("down", down)):
        if not t.is_floating_point() or t.itemsize < 2:
            raise ConfigError(
                f"{fmt_name}: {name} weights must be float32, bfloat16 or float16, got "
                f"{t.dtype} (FP8 checkpoints are dequantized by the checkpoint reader)"
            )
        # NaN and Inf propagate through min and max: one fast pass instead of isfinite's
        # several (which cost as much as quantizing the expert)
        if t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t)):
            raise ConfigError(
                f"{fmt_name}: {name} weights contain NaN or Inf; fix the checkpoint before "
                "quantizing"
            )
    return hidden, inter


class _FloatFormat:
    """Plain floating-point weights: a group is ``[3, g, D]`` of ``dtype`` (gate, up, down^T)."""

    name: ClassVar[str]
    dtype: ClassVar[torch.dtype]
    group_multiple: ClassVar[int] = 1

    def group_nbytes(self, hidden: int, group: int) -> int:
        return 3 * group * hidden * self.dtype.itemsize

    def pack(
        self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int
    ) -> torch.Tensor:
        check_dense(self.name, gate, up, down, group)
        inter, hidden = gate.shape
        n = inter // group
        w = torch.empty((n, 3, group, hidden), dtype=self.dtype)  # [n, 3, g, D]
        w[:, 0] = gate.reshape(n, group, hidden)
        w[:, 1] = up.reshape(n, group, hidden)
        w[:, 2] = down.t().reshape(n, group, hidden)
        return w.reshape(-1).view(torch.uint8)

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.view(buf, hidden, group).float()  # [n, 3, g, D]
        gate = w[:, 0].reshape(inter, hidden)
        up = w[:, 1].reshape(inter, hidden)
        down = w[:, 2].reshape(inter, hidden).t().contiguous()
        return gate, up, down

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> torch.Tensor:
        per = self.group_nbytes(hidden, group)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() % per:
            raise ConfigError(
                f"{self.name} expert buffer of {buf.numel()} bytes is not a whole number of "
                f"{per}-byte groups (D={hidden}, g={group})"
            )
        return buf.view(self.dtype).view(-1, 3, group, hidden)  # [n, 3, g, D]

    def partials(self, x: torch.Tensor, w: torch.Tensor) -> Iterator[torch.Tensor]:
        # One 2-D matmul pair per group, always the same op on the same shapes: a batched
        # matmul would dispatch differently for one group than for several and break the
        # bit-exactness of split experts.
        n, _, g, d = w.shape
        xw = x.to(self.dtype)
        for j in range(n):
            gu = F.linear(xw, w[j, :2].reshape(2 * g, d))  # [T, 2g]
            a = F.silu(gu[:, :g]) * gu[:, g:]  # [T, g]
            yield torch.matmul(a, w[j, 2]).to(x.dtype)  # [T, D]


class F32(_FloatFormat):
    name = "f32"
    dtype = torch.float32


class BF16(_FloatFormat):
    name = "bf16"
    dtype = torch.bfloat16


FORMATS: dict[str, ExpertFormat] = {"f32": F32(), "bf16": BF16()}
# Families of formats named "prefix:parameters" (e.g. "gguf:q4_k/q4_k/q6_k"): prefix -> factory.
PARAMETRIC: dict[str, Callable[[str], ExpertFormat]] = {}


def get_format(name: str) -> ExpertFormat:
    prefix = name.split(":", 1)[0]
    if ":" in name and prefix in PARAMETRIC:
        return PARAMETRIC[prefix](name)
    try:
        return FORMATS[name]
    except KeyError:
        raise ConfigError(
            f"unknown expert format {name!r}; known formats: {', '.join(sorted(FORMATS))}"
        ) from None


def choose_group(fmt: ExpertFormat, inter: int, preferred_groups: int = 8) -> int:
    """Neurons per group: ``I / n`` for the largest ``n <= preferred_groups`` that divides I
    into groups that are whole multiples of the format's quantization block.

    Eight groups give split ratios in steps of 1/8 (0.25, 0.5, 0.75 included) while keeping
    each group's matmuls large enough to run at memory speed.
    """
    for n in range(preferred_groups, 0, -1):
        if inter % n == 0 and (inter // n) % fmt.group_multiple == 0:
            return inter // n
    raise ConfigError(
        f"intermediate size {inter} cannot be cut into groups of a multiple of "
        f"{fmt.group_multiple} neurons, as format {fmt.name} requires"
    )


def expert_forward(
    fmt: ExpertFormat,
    x: torch.Tensor,
    segments: Iterable[object],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """SwiGLU output of one expert ``[T, D]`` from its segments' views, in group order.

    Partials are added one group at a time in a fixed order, so the result does not depend on
    where the expert was cut into segments. ``out`` continues an expert begun by an earlier call
    (its top segment): the bottom's partials are added to it in place, which is bit-identical to
    one call over both segments, so the caller may compute other experts in between.
    """
    y: torch.Tensor | None = out
    fast = getattr(fmt, "accumulate", None)  # a whole segment in one native call (q4, q8)
    for w in segments:
        if fast is not None and (z := fast(x, w, y)) is not None:
            y = z
            continue
        for p in fmt.partials(x, w):  # [T, D] per group
            y = p if y is None else y.add_(p)
    if y is None:
        raise ValueError("expert_forward needs at least one segment")
    return y
