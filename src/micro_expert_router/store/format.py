"""The expert store format and its reader.

A store is a directory::

    manifest.json        format name + version, model args, expert format and layout, group size,
                         dense tensor index, one extent (file, offset, length, xxh3) per expert
    dense.safetensors    everything RAM-resident: embeddings, attention, norms, routers, shared
                         experts, dense MLPs (float32 for f32 stores, bfloat16 otherwise)
    experts-00000.bin    expert extents, each starting on a 4096-byte boundary, in the bundled
                         layout of ``kernels.formats`` (any prefix of groups is a prefix of bytes)
    tokenizer.json ...   the checkpoint's tokenizer and config files, copied

``Store.open`` validates the manifest (name, version, keys), the files (present, long enough for
every extent) and alignment, raising ``StoreError`` naming the file and the problem. ``verify``
re-hashes every extent. The manifest is written last, by rename, so a folder without one is never
a store.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from ..errors import StoreError
from ..kernels import ExpertFormat
from .manifest import (  # noqa: F401 (the format constants are re-exported)
    ALIGN,
    FORMAT_NAME,
    FORMAT_VERSION,
    REQUIRED_KEYS,
    check_manifest,
)

DENSE_FILE = "dense.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "config.json", "chat_template.jinja")  # fmt: skip


def torch_version() -> str:
    import torch

    return torch.__version__


def checksum(data: bytes | memoryview) -> str:
    return xxhash.xxh3_64_hexdigest(data)


@dataclass(frozen=True)
class ExpertEntry:
    layer: int
    expert: int
    file: str  # absolute path
    offset: int
    length: int
    xxh3: str


class Store:
    """A validated, opened store (read-only)."""

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        self.path = path
        m = check_manifest(path / "manifest.json", manifest)
        self.manifest = manifest
        self.args = m.model
        self.format: ExpertFormat = m.expert_format
        self.group = m.group
        if hasattr(self.format, "layout_tag") and m.layout != self.format.layout_tag():
            raise StoreError(
                f"{path / 'manifest.json'}: the {self.format.name} experts were packed in layout "
                f"{m.layout!r}, but this machine's torch ({torch_version()}) uses "
                f"{self.format.layout_tag()!r}; reconvert the store here with `mer convert "
                f"SRC {path} --dtype {self.format.name} --force`"
            )
        self.dense_file = path / m.dense["file"]
        self.dense_dtype: str = m.dense["dtype"]
        self.experts: dict[tuple[int, int], ExpertEntry] = {
            (x.layer, x.expert): ExpertEntry(x.layer, x.expert, str(path / m.expert_files[x.file]),
                                             x.offset, x.length, x.xxh3)
            for x in m.experts
        }  # fmt: skip

    @classmethod
    def open(cls, path: str | Path) -> Store:
        path = Path(path)
        mpath = path / "manifest.json"
        if not path.is_dir():
            raise StoreError(f"{path}: not a directory")
        if not mpath.is_file():
            raise StoreError(f"{path}: not an expert store (no manifest.json); create one with "
                             "`mer convert CHECKPOINT STORE`")  # fmt: skip
        try:
            text = mpath.read_bytes()
        except OSError as e:
            raise StoreError(f"{mpath}: cannot read the manifest ({e.strerror or e})") from None
        try:
            manifest = json.loads(text)
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise StoreError(f"{mpath}: not valid JSON ({e}); reconvert the store") from None
        store = cls(path, manifest)
        store._check_files()
        return store

    def _check_files(self) -> None:
        """The files the manifest names are there, and long enough for every extent (the
        extents themselves were checked with the manifest)."""
        if not self.dense_file.is_file():
            raise StoreError(f"{self.dense_file}: dense weights file is missing; reconvert")
        sizes: dict[str, int] = {}
        for f in self.manifest["expert_files"]:
            p = self.path / f
            if not p.is_file():
                raise StoreError(f"{p}: expert file is missing; reconvert the store")
            sizes[str(p)] = p.stat().st_size
        for e in self.experts.values():
            if e.offset + e.length > sizes[e.file]:
                raise StoreError(f"{e.file}: truncated: expert ({e.layer}, {e.expert}) ends at "
                                 f"byte {e.offset + e.length} but the file has {sizes[e.file]} "
                                 "bytes; reconvert the store")  # fmt: skip

    # -- facts ------------------------------------------------------------------------------
    @property
    def expert_bytes(self) -> int:
        """Bytes of one expert's extent (all experts are the same size)."""
        return next(iter(self.experts.values())).length

    @property
    def total_expert_bytes(self) -> int:
        return sum(e.length for e in self.experts.values())

    @property
    def dense_bytes(self) -> int:
        return self.dense_file.stat().st_size

    def summary(self) -> dict[str, Any]:
        a = self.args
        return {
            "path": str(self.path), "format_version": self.manifest["version"],
            "architecture": a.arch, "layers": a.n_layers, "moe_layers": sum(a.moe_layers),
            "experts_per_layer": a.n_experts, "top_k": a.top_k, "hidden": a.hidden_size,
            "expert_intermediate": a.expert_inter, "expert_format": self.format.name,
            "layout": self.manifest["layout"], "group": self.group,
            "groups_per_expert": a.expert_inter // self.group,
            "expert_bytes": self.expert_bytes, "total_expert_bytes": self.total_expert_bytes,
            "dense_bytes": self.dense_bytes, "dense_dtype": self.dense_dtype,
            "dense_format": self.dense_format,
            "expert_files": self.manifest["expert_files"],
            "converted_from": self.manifest.get("source"),
        }  # fmt: skip

    # -- integrity --------------------------------------------------------------------------
    def iter_extents(self) -> Iterator[tuple[ExpertEntry, bytes]]:
        """Every expert's bytes, in file order (buffered reads; for verification)."""
        entries = sorted(self.experts.values(), key=lambda x: (x.file, x.offset))
        for name in dict.fromkeys(e.file for e in entries):
            with open(name, "rb") as f:  # each file opened once, read front to back
                for e in (e for e in entries if e.file == name):
                    f.seek(e.offset)
                    yield e, f.read(e.length)

    def verify(self, progress: Callable[[int], None] | None = None) -> list[ExpertEntry]:
        """Experts whose bytes do not match their recorded checksum."""
        bad = []
        for e, data in self.iter_extents():
            if len(data) != e.length or checksum(data) != e.xxh3:
                bad.append(e)
            if progress is not None:
                progress(e.length)
        return bad

    @property
    def dense_format(self) -> str:
        """``f32``, ``bf16``, ``q8`` or ``q4`` (``store/dense.py``); old stores: their dtype."""
        d = self.manifest["dense"]
        return d.get("format", "f32" if d.get("dtype") == "float32" else "bf16")

    def load_dense(self, dtype: Any) -> dict[str, Any]:
        """Dense tensors: float ones converted to ``dtype`` (a torch dtype), quantized ones as
        ``kernels.dense.DenseWeight`` objects (``store/dense.py``; a store converted from GGUF
        keeps its matrices in their GGUF types: ``store/gguf_dense.py``)."""
        from ..checkpoint import dense_tensor_shapes
        from .dense import load_dense

        if self.manifest["dense"].get("format") == "gguf":
            from .gguf_dense import load_gguf_dense

            return load_gguf_dense(self, dtype)

        shapes = list(dense_tensor_shapes(self.args))
        return load_dense(self.dense_file, self.args, self.manifest["dense"], shapes, dtype)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_or_build(dst: Path, what: str, build: Callable[[Callable[[str], None]], object]) -> Path:
    """``dst`` if it holds a store that opens; else ``build(log)`` makes it there (a first run:
    the demo model, a GGUF file), saying so on stderr. A damaged store is rebuilt."""
    if (dst / "manifest.json").is_file():
        try:
            Store.open(dst)
            return dst
        except Exception:
            pass  # damaged: rebuild below

    def log(msg: str) -> None:
        print(msg, file=sys.stderr)

    log(f"first run: converting {what} into an expert store at {dst}")
    build(log)
    return dst


def place_store(tmp: Path, dst: Path, manifest: dict[str, Any]) -> None:
    """Finish a conversion written into the hidden folder ``tmp``: write the manifest under a
    partial name, fsync, rename the folder to ``dst`` (replacing an old one), then rename the
    manifest into place, so no moment leaves a folder that ``Store.open`` accepts half-written.
    A failure after the folder was renamed removes ``dst`` (it is this run's)."""
    with open(tmp / "manifest.json.partial", "w") as mf:
        json.dump(manifest, mf, indent=1)
        mf.flush()
        os.fsync(mf.fileno())
    fsync_dir(tmp)
    if dst.exists():
        shutil.rmtree(dst)
    os.rename(tmp, dst)
    try:
        fsync_dir(dst.parent)
        os.rename(dst / "manifest.json.partial", dst / "manifest.json")
        fsync_dir(dst)
    except BaseException:
        shutil.rmtree(dst, ignore_errors=True)
        raise
