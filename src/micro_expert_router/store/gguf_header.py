"""Parsing the front of a GGUF file: header, metadata and tensor table (everything before the
tensor data), for ``gguf_file.GGUFFile``.

gguf-py's ``GGUFReader`` builds a NumPy view per value, which takes seconds on a 50k-token
vocabulary (about 15 s of a 4 GB file's conversion here); this parser walks the same layout with
``struct`` over a read-only memory map of the file and converts arrays of numbers in one
``np.frombuffer``. Values come out as ``GGUFReader``'s ``field.contents()`` gives them: Python
ints, floats, bools, strs (UTF-8), and lists of them.

Layout (little-endian; versions 2 and 3): magic, u32 version, u64 tensor count, u64 metadata
count; per metadata entry a string key, a u32 value type and the value (a string is a u64 length
and its bytes; an array is a u32 element type, a u64 count and the elements); per tensor a string
name, u32 dimension count, u64 dimensions (ggml order), u32 GGML type, u64 offset into the data,
which starts at the next multiple of ``general.alignment`` (32 by default) after the table.
Running past the end of the file raises ``Truncated``; ``GGUFFile`` names the file.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
           11: "<q", 12: "<d"}  # fmt: skip
STRING, ARRAY = 8, 9
DEFAULT_ALIGNMENT = 32


class Truncated(Exception):
    """The header, metadata or tensor table runs past the end of the file."""


class Malformed(Exception):
    """A value that cannot be read (unknown value type, bad UTF-8, bad alignment)."""


class _Cursor:
    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise Truncated(f"needs {size} bytes at offset {self.pos}")
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return v

    def raw(self, n: int) -> bytes:
        if self.pos + n > len(self.buf):
            raise Truncated(f"needs {n} bytes at offset {self.pos}")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def string(self) -> str:
        try:
            return self.raw(self.take("<Q")).decode("utf-8")
        except UnicodeDecodeError as e:
            raise Malformed(f"a string at offset {self.pos} is not UTF-8 ({e})") from None

    def value(self, vtype: int) -> Any:
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.take("<I"), self.take("<Q")
            if etype in SCALARS:
                dt = np.dtype(SCALARS[etype])
                data = self.raw(count * dt.itemsize)
                return np.frombuffer(data, dtype=dt).tolist()
            return [self.value(etype) for _ in range(count)]
        fmt = SCALARS.get(vtype)
        if fmt is None:
            raise Malformed(f"unknown metadata value type {vtype} at offset {self.pos}")
        return self.take(fmt)


def parse(path: Path) -> tuple[dict[str, Any], list[tuple[str, list[int], int, int]]]:
    """The metadata of ``path`` (key -> value) and its tensors as (name, dims in ggml order,
    GGML type id, absolute offset of the data)."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise Truncated("empty file")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        c = _Cursor(buf)
        c.raw(4)  # magic (checked by the caller)
        c.take("<I")  # version (checked by the caller)
        n_tensors, n_kv = c.take("<Q"), c.take("<Q")
        meta: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            meta[key] = c.value(c.take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            dims = [c.take("<Q") for _ in range(c.take("<I"))]
            infos.append((name, dims, c.take("<I"), c.take("<Q")))
        align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise Malformed(f"general.alignment {align!r} is not a power of two")
        start = -(-c.pos // align) * align
        return meta, [(n, d, t, start + off) for n, d, t, off in infos]
    finally:
        buf.close()
