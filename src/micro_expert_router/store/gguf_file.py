"""Opening GGUF files (one file, or the parts of a split file) and checking them.

The header, metadata and tensor table are parsed by ``gguf_header`` (the layout gguf-py's
``GGUFReader`` reads, without its per-value NumPy views, which take seconds on a large
vocabulary); this module checks the rest: the magic and version before parsing, every part of a
split file present and agreeing, and every tensor's bytes (``shape`` and type give its size)
inside its file and clear of the next tensor. Every problem is a ``GGUFError`` naming the file
and the problem. Tensor bytes are read with positional reads (``read``), or for the converter's
large sequential reads with O_DIRECT (``read_large``).

A split file is named ``NAME-00001-of-0000N.gguf`` (llama.cpp's ``gguf-split``); given any part,
``GGUFFile`` opens all N, and the metadata comes from the first.

Shapes here are in NumPy order (``[rows, K]``, the reverse of ggml's ``ne``).
"""

from __future__ import annotations

import errno
import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GGUFError
from ..kernels.ggml import BY_ID, TYPES, BlockType
from . import gguf_header

MAGIC = b"GGUF"
VERSIONS = (2, 3)
PAGE = 4096  # O_DIRECT alignment of offsets, lengths and buffers
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    type_id: int  # GGML type id (may be one MER does not support: see ``block``)
    type_name: str
    shape: tuple[int, ...]  # NumPy order
    path: Path
    offset: int  # absolute byte offset in ``path``
    nbytes: int

    @property
    def block(self) -> BlockType | None:
        return BY_ID.get(self.type_id)

    def supported(self) -> BlockType:
        t = self.block
        if t is None:
            raise GGUFError(
                f"{self.path}: tensor {self.name} has GGML type {self.type_name}, which MER does "
                f"not read; supported types: {', '.join(TYPES)}. Convert with `--requantize q8` "
                "to turn it into Q8_0 (lossy: see the conversion report), or use a file "
                "quantized to a supported type"
            )
        return t


def _type_name(type_id: int) -> str:
    try:
        import gguf

        return gguf.GGMLQuantizationType(type_id).name
    except ValueError:
        return f"unknown type {type_id}"


def _check_start(path: Path) -> None:
    if not path.is_file():
        raise GGUFError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise GGUFError(f"{path}: truncated GGUF file ({len(head)} bytes, no header)")
    if head[:4] != MAGIC:
        raise GGUFError(f"{path}: not a GGUF file (magic {head[:4]!r}, expected {MAGIC!r})")
    (version,) = struct.unpack("<I", head[4:])
    if version not in VERSIONS:
        raise GGUFError(f"{path}: GGUF version {version} is not one this reader knows "
                        f"({', '.join(map(str, VERSIONS))})")  # fmt: skip


def _tensor_nbytes(path: Path, name: str, dims: list[int], type_id: int) -> int:
    t = BY_ID.get(type_id)
    import gguf

    if t is not None:
        block, size = t.block, t.nbytes
    else:
        try:
            block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(type_id)]
        except (ValueError, KeyError):
            raise GGUFError(f"{path}: tensor {name} has unknown GGML type id {type_id}; "
                            f"supported types: {', '.join(TYPES)}") from None  # fmt: skip
    if not dims or dims[0] % block:
        raise GGUFError(f"{path}: tensor {name} has rows of {dims[0] if dims else 0} weights, "
                        f"not a multiple of its type's block of {block}")  # fmt: skip
    n = 1
    for d in dims:
        n *= d
    return n // block * size


class GGUFFile:
    """A GGUF model: metadata (from the first part) and a table of tensors across all parts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.parts = self._find_parts(self.path)
        self.metadata: dict[str, Any] = {}
        self.tensors: dict[str, TensorInfo] = {}
        self._fds: dict[Path, int] = {}
        self._direct: dict[Path, int | None] = {}  # O_DIRECT descriptors (None: refused)
        for i, part in enumerate(self.parts):
            self._read_part(part, first=i == 0)

    @staticmethod
    def _find_parts(path: Path) -> list[Path]:
        m = SPLIT_RE.match(path.name)
        if m is None:
            _check_start(path)
            return [path]
        count = int(m["count"])
        parts = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf")
                 for i in range(1, count + 1)]  # fmt: skip
        missing = [p.name for p in parts if not p.is_file()]
        if missing:
            raise GGUFError(f"{path}: split GGUF of {count} parts, but part(s) "
                            f"{', '.join(missing)} are missing from {path.parent}")  # fmt: skip
        for p in parts:
            _check_start(p)
        return parts

    def _read_part(self, path: Path, first: bool) -> None:
        try:
            meta, tensors = gguf_header.parse(path)
        except gguf_header.Truncated as e:
            raise GGUFError(f"{path}: cannot parse the GGUF header, metadata or tensor table "
                            f"({e}); the file is truncated or corrupt") from None  # fmt: skip
        except gguf_header.Malformed as e:
            raise GGUFError(f"{path}: malformed GGUF metadata ({e})") from None
        if first:
            self.metadata = meta
        count = int(meta.get("split.count", 1))
        if count != len(self.parts):
            raise GGUFError(f"{path}: metadata says the model is split into {count} part(s), "
                            f"but {len(self.parts)} were found by name")  # fmt: skip
        size = path.stat().st_size
        infos = []
        for name, dims, type_id, offset in tensors:
            if name in self.tensors:
                raise GGUFError(f"{path}: tensor {name} appears twice in the model")
            nbytes = _tensor_nbytes(path, name, dims, type_id)
            infos.append(TensorInfo(name, type_id, _type_name(type_id), tuple(reversed(dims)),
                                    path, offset, nbytes))  # fmt: skip
        infos.sort(key=lambda t: t.offset)
        for k, t in enumerate(infos):
            nxt = infos[k + 1] if k + 1 < len(infos) else None
            end = nxt.offset if nxt is not None else size
            if t.offset + t.nbytes > size:
                raise GGUFError(f"{path}: truncated: tensor {t.name} ({t.type_name}, shape "
                                f"{list(t.shape)}) needs bytes {t.offset}..{t.offset + t.nbytes}"
                                f" but the file has {size} bytes")  # fmt: skip
            if t.offset + t.nbytes > end:
                raise GGUFError(f"{path}: tensor {t.name} ({t.type_name}, shape {list(t.shape)}"
                                f") is {t.nbytes} bytes by its shape and type, but only "
                                f"{end - t.offset} bytes lie before the next tensor")  # fmt: skip
        for t in infos:
            self.tensors[t.name] = t

    # -- access ----------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorInfo:
        t = self.tensors.get(name)
        if t is None:
            raise GGUFError(f"{self.path}: tensor {name} is missing from the GGUF file")
        return t

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            fd = self._fds[path] = os.open(path, os.O_RDONLY)  # closed in close()
        return fd

    def read(self, t: TensorInfo, start: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[start, start + length)`` of tensor ``t``'s data (a positional read: threads
        may read at once; the GIL is released while reading)."""
        length = t.nbytes - start if length is None else length
        data = os.pread(self._fd(t.path), length, t.offset + start)
        if len(data) != length:
            raise GGUFError(f"{t.path}: short read of tensor {t.name} (file changed?)")
        return data

    def read_large(self, t: TensorInfo, start: int, length: int,
                   buf: mmap.mmap | None = None) -> memoryview:  # fmt: skip
        """Bytes ``[start, start + length)`` of tensor ``t``'s data for a large sequential read:
        one read of the enclosing 4096-byte pages into page-aligned memory (``buf``, at least
        ``length + 2 * PAGE`` bytes, reused by the caller: fresh pages cost as much as the read;
        else a new one), with O_DIRECT where the file system takes it (no copy out of the page
        cache, none left behind)."""
        at = t.offset + start
        lo, hi = at - at % PAGE, -(-(at + length) // PAGE) * PAGE
        if buf is None or len(buf) < hi - lo:
            buf = mmap.mmap(-1, hi - lo)  # page-aligned, as O_DIRECT needs
        done = 0
        while done < at + length - lo:
            fd = self._direct_fd(t.path)
            try:
                n = os.preadv(fd if fd is not None else self._fd(t.path),
                              [memoryview(buf)[done : hi - lo]], lo + done)  # fmt: skip
            except OSError as e:
                if fd is None or e.errno != errno.EINVAL:
                    raise
                self._direct[t.path] = None  # O_DIRECT refused: buffered reads from now on
                continue
            if n == 0:
                raise GGUFError(f"{t.path}: short read of tensor {t.name} (file changed?)")
            done += n
        return memoryview(buf)[at - lo : at - lo + length]

    def _direct_fd(self, path: Path) -> int | None:
        if path not in self._direct:
            try:
                self._direct[path] = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            except OSError:
                self._direct[path] = None
        return self._direct[path]

    def close(self) -> None:
        for fds in (getattr(self, "_fds", {}), getattr(self, "_direct", {})):
            for fd in fds.values():
                if fd is not None:
                    os.close(fd)
            fds.clear()

    def __del__(self) -> None:
        self.close()

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    @property
    def arch(self) -> str:
        a = self.metadata.get("general.architecture")
        if not isinstance(a, str):
            raise GGUFError(f"{self.path}: metadata has no general.architecture")
        return a

    @property
    def nbytes(self) -> int:
        return sum(p.stat().st_size for p in self.parts)
