"""Expert formats that hold GGUF blocks byte for byte: ``gguf:GATE/UP/DOWN``.

GGUF blocks run along the reduction dimension: a gate or up row is ``D / b`` blocks, a down
row (one of D) is ``I / b`` blocks. When the group size g is a multiple of the down type's
block, a group's slice of each down row is whole blocks, so the bundled layout of
``formats.py`` can hold the file's blocks unchanged, only rearranged into groups:

    group j:  header (64 B)  | gate rows [jg, (j+1)g)  | up rows [jg, (j+1)g)  | down: D rows
              "MERG" + type ids   g x row_bytes(D)        g x row_bytes(D)       x row_bytes(g)

each section zero-padded to 64 bytes. One file may use different types in different layers
(Q4_K_M files put Q6_K in the down tensors of some layers and Q4_K in others), and a store has one
expert size, so the format name lists, per role, every type the store uses (``"gguf:q4_k/q4_k/
q4_k+q6_k"``), each section is sized for the largest, and the header of every group names the
types its bytes are in. A store whose layers agree wastes nothing but the header.

``partials`` (the reference path, any batch) dequantizes a group with ``ggml.dequantize`` (the
same bits as gguf-py) and multiplies in the activations' dtype. ``accumulate`` (decode, T <
``native_below``) runs the native block kernels of ``ggml_native.cpp`` on the bytes in place
when every role's type has one (Q4_0, Q8_0, MXFP4, Q4_K, Q5_K, Q6_K): with float32 activations
in float32 mode; in bfloat16 mode with activations rounded to 8 bits per weight block
(``ggml_native.isa_for``, what llama.cpp always does), which is what lets decode keep up with
DRAM.

Legend: T tokens, D hidden, g neurons per group, n groups.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import ggml_native
from .formats import PARAMETRIC
from .ggml import TYPES, BlockType, block_type, dequantize

HEADER = 64
MAGIC = b"MERG"
ROLES = ("gate", "up", "down")


def _up64(n: int) -> int:
    return -(-n // 64) * 64


class GGUFView(NamedTuple):
    types: tuple[BlockType, BlockType, BlockType]  # gate, up, down of these bytes
    gate: torch.Tensor  # [n, g, row_bytes(D)] uint8
    up: torch.Tensor  # [n, g, row_bytes(D)] uint8
    down: torch.Tensor  # [n, D, row_bytes(g)] uint8
    hidden: int
    group: int
    buf: torch.Tensor  # the whole segment (what the native kernel reads)
    per: int  # bytes per group
    offsets: tuple[int, int, int]  # section offsets inside a group


class GGUFExperts:
    """One store's GGUF expert format: per role, the types its groups may hold."""

    native_below = 16  # decode: the native kernels; batches: dequantize + torch matmul

    def __init__(self, types: tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]) -> None:
        self.types = tuple(tuple(sorted({block_type(n).name for n in r})) for r in types)
        if len(self.types) != 3 or not all(self.types):
            raise ConfigError(f"a gguf expert format needs types for gate, up and down: {types}")
        self.name = "gguf:" + "/".join("+".join(t.lower() for t in r) for r in self.types)
        self.group_multiple = max(TYPES[t].block for t in self.types[2])

    @classmethod
    def parse(cls, name: str) -> GGUFExperts:
        roles = name.removeprefix("gguf:").split("/")
        if len(roles) != 3:
            raise ConfigError(f"expert format {name!r}: expected gguf:GATE/UP/DOWN types")
        return cls(tuple(tuple(r.split("+")) for r in roles))  # type: ignore[arg-type]

    # -- arithmetic ------------------------------------------------------------------------
    def _sizes(self, hidden: int, group: int) -> tuple[int, int, int]:
        g, d = group, hidden
        return (max(_up64(g * TYPES[t].row_bytes(d)) for t in self.types[0]),
                max(_up64(g * TYPES[t].row_bytes(d)) for t in self.types[1]),
                max(_up64(d * TYPES[t].row_bytes(g)) for t in self.types[2]))  # fmt: skip

    def _check_dims(self, hidden: int, group: int) -> None:
        for role, names in zip(ROLES, self.types, strict=True):
            k = group if role == "down" else hidden
            for n in names:
                if k % TYPES[n].block:
                    raise ConfigError(f"{self.name}: {role} rows of {k} weights are not whole "
                                      f"{n} blocks of {TYPES[n].block}")  # fmt: skip

    def group_nbytes(self, hidden: int, group: int) -> int:
        return HEADER + sum(self._sizes(hidden, group))

    def offsets(self, hidden: int, group: int) -> tuple[int, int, int]:
        a, b, _ = self._sizes(hidden, group)
        return HEADER, HEADER + a, HEADER + a + b

    # -- bytes -----------------------------------------------------------------------------
    def pack_blocks(self, parts: tuple, types: tuple[str, str, str],
                    hidden: int, inter: int, group: int) -> torch.Tensor:  # fmt: skip
        """One expert from its GGUF bytes (gate ``[I, D]``, up ``[I, D]``, down ``[D, I]`` in
        their block types) into n groups, 1-D uint8; the blocks are copied unchanged."""
        self._check_dims(hidden, group)
        tg, tu, td = (block_type(t) for t in types)
        for role, t, allowed in zip(ROLES, (tg, tu, td), self.types, strict=True):
            if t.name not in allowed:
                raise ConfigError(f"{self.name}: {role} type {t.name} is not one of {allowed}")
        n, g, d, per = inter // group, group, hidden, self.group_nbytes(hidden, group)
        og, ou, od = self.offsets(hidden, group)
        gate = np.frombuffer(parts[0], dtype=np.uint8).reshape(n, g * tg.row_bytes(d))
        up = np.frombuffer(parts[1], dtype=np.uint8).reshape(n, g * tu.row_bytes(d))
        down = np.frombuffer(parts[2], dtype=np.uint8).reshape(d, n, td.row_bytes(g))
        out = np.empty((n, per), dtype=np.uint8)  # every byte is written once below
        out[:, :HEADER] = 0
        out[:, :4] = np.frombuffer(MAGIC, dtype=np.uint8)
        out[:, 4:10] = np.array([tg.id, tu.id, td.id], dtype="<i2").view(np.uint8)
        ends = (og + gate.shape[1], ou + up.shape[1], od + d * td.row_bytes(g))
        out[:, og : ends[0]] = gate
        out[:, ou : ends[1]] = up
        dn = out[:, od : ends[2]].reshape(n, d, -1)  # [n, D, g-slice bytes]
        dn[...] = down.transpose(1, 0, 2)  # each down row's blocks of group j, unchanged
        for end, nxt in zip(ends, (ou, od, per), strict=True):
            out[:, end:nxt] = 0  # section padding
        return torch.from_numpy(out).view(-1)

    def pack(self, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int):
        raise ConfigError(f"{self.name} holds a GGUF file's blocks as they are; create such a "
                          "store with `mer convert MODEL.gguf STORE`")  # fmt: skip

    def view(self, buf: torch.Tensor, hidden: int, group: int) -> GGUFView:
        self._check_dims(hidden, group)
        per = self.group_nbytes(hidden, group)
        if buf.dtype != torch.uint8 or buf.dim() != 1 or buf.numel() % per or not buf.numel():
            raise ConfigError(f"{self.name} expert buffer of {buf.numel()} bytes is not a whole "
                              f"number of {per}-byte groups (D={hidden}, g={group})")  # fmt: skip
        rows = buf.view(-1, per)  # [n, per]
        types = _header_types(bytes(rows[0, :10].numpy()), self)
        n, g, d = rows.shape[0], group, hidden
        og, ou, od = self.offsets(hidden, group)
        tg, tu, td = types
        return GGUFView(
            types,
            rows[:, og : og + g * tg.row_bytes(d)].view(n, g, -1),
            rows[:, ou : ou + g * tu.row_bytes(d)].view(n, g, -1),
            rows[:, od : od + d * td.row_bytes(g)].view(n, d, -1),
            hidden, group, buf, per, (og, ou, od),
        )  # fmt: skip

    def dequantize_group(
        self, w: GGUFView, j: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Group j as float32 gate ``[g, D]``, up ``[g, D]``, down ``[D, g]``."""
        tg, tu, td = w.types
        return (dequantize(tg, w.gate[j], w.hidden), dequantize(tu, w.up[j], w.hidden),
                dequantize(td, w.down[j], w.group))  # fmt: skip

    def unpack(
        self, buf: torch.Tensor, hidden: int, inter: int, group: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w = self.view(buf, hidden, group)
        if w.gate.shape[0] * group != inter:
            raise ConfigError(f"{self.name} buffer of {buf.numel()} bytes does not hold I={inter}")
        parts = [self.dequantize_group(w, j) for j in range(w.gate.shape[0])]
        return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                torch.cat([p[2] for p in parts], dim=1))  # fmt: skip

    # -- compute ---------------------------------------------------------------------------
    def partials(self, x: torch.Tensor, w: GGUFView) -> Iterator[torch.Tensor]:
        for j in range(w.gate.shape[0]):
            gate, up, down = (t.to(x.dtype) for t in self.dequantize_group(w, j))
            a = F.silu(F.linear(x, gate)) * F.linear(x, up)  # [T, g]
            yield F.linear(a, down)  # [T, D]

    def accumulate(
        self, x: torch.Tensor, w: GGUFView, y: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The whole segment added to y by the native kernels, or ``None`` (use partials)."""
        if x.dim() != 2 or x.shape[0] >= self.native_below or x.shape[1] != w.hidden:
            return None
        isa = _isa(x.dtype, w.types)  # also None: no native path for these types or dtype
        if isa is None:
            return None
        # the op takes float32 or bfloat16 x and y (y accumulated in float32 over the call and
        # rounded once at the end); any other y goes through a float32 copy
        direct = y is None or (y.dtype in (torch.float32, torch.bfloat16) and y.is_contiguous())
        yo = torch.zeros((x.shape[0], w.hidden), dtype=x.dtype) if y is None else y
        yf = yo if direct else yo.float()
        og, ou, od = w.offsets
        tg, tu, td = w.types
        torch.ops.mer_ggml.swiglu_(yf, x if x.is_contiguous() else x.contiguous(), w.buf,
                                   w.hidden, w.group, w.per, tg.id, tu.id, td.id, og, ou, od,
                                   isa)  # fmt: skip
        if yf is not yo:
            yo.copy_(yf)
        return yo


@functools.cache
def _isa(dtype: torch.dtype, types: tuple[BlockType, ...]) -> int | None:
    """The native kernel variant for this activation dtype and these types (cached: decode asks
    once per expert and token), or ``None`` when the native kernels cannot run them."""
    if dtype not in (torch.float32, torch.bfloat16):
        return None
    if not all(t.name in ggml_native.NATIVE_TYPES for t in types):
        return None
    if not ggml_native.available():
        return None
    return ggml_native.isa_for(dtype, types)


def _header_types(head: bytes, fmt: GGUFExperts) -> tuple[BlockType, BlockType, BlockType]:
    if head[:4] != MAGIC:
        raise ConfigError(f"{fmt.name}: expert bytes do not start with a {MAGIC!r} group header; "
                          "the store is damaged or was written by another format")  # fmt: skip
    return _types_of(head[4:10], fmt.name)


@functools.cache
def _types_of(ids: bytes, name: str) -> tuple[BlockType, BlockType, BlockType]:
    tids = torch.frombuffer(bytearray(ids), dtype=torch.int16).tolist()
    return tuple(block_type(int(t)) for t in tids)  # type: ignore[return-value]


@functools.cache
def _parse(name: str) -> GGUFExperts:
    return GGUFExperts.parse(name)


PARAMETRIC["gguf"] = _parse
