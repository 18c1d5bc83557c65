"""Validation of an expert store's ``manifest.json``, one checker per section.

``check_manifest`` takes the parsed JSON and returns a ``Manifest`` whose every field has the
type and range the rest of the engine relies on, or raises ``StoreError`` naming the manifest,
the section and the problem (never a Python exception of another type: a manifest that parses
but is wrong is a damaged store, not a bug). The checkers run in ``SECTIONS`` order, each seeing
what the earlier ones accepted, so cross-checks (a group that divides the expert width, an expert
table that covers the model, extents that do not overlap) sit with the section they concern. A
new manifest field is a new entry in ``SECTIONS`` (top level) or ``DENSE_FIELDS`` (the dense
weights' record), with its checker. Whether the files named here exist and are long enough is
``Store._check_files``'s job; this module does no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from ..config import ARCHITECTURES, ModelArgs
from ..errors import ConfigError, StoreError
from ..kernels import ExpertFormat, get_format

FORMAT_NAME = "mer-expert-store"
FORMAT_VERSION = 1
ALIGN = 4096
DENSE_DTYPES = ("float32", "bfloat16", "float16", "gguf")  # gguf: types per tensor (gguf.md)


@dataclass(frozen=True)
class Extent:
    """One expert's bytes: ``length`` bytes at ``offset`` of ``expert_files[file]``."""

    layer: int
    expert: int
    file: int
    offset: int
    length: int
    xxh3: str


class _Ctx:
    """The manifest being checked: its path (for messages) and the sections accepted so far."""

    def __init__(self, path: Path, doc: dict[str, Any]) -> None:
        self.path = path
        self.doc = doc
        self.ok: dict[str, Any] = {}

    def fail(self, section: str, problem: str) -> StoreError:
        return StoreError(f"{self.path}: {section}: {problem}; the store is damaged: reconvert it")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plain_name(v: object) -> bool:
    """A file name inside the store folder (no directories, no '..')."""
    return isinstance(v, str) and v not in ("", ".", "..") and "/" not in v and "\0" not in v


# -- top-level sections ------------------------------------------------------------------------
def _format(v: Any, c: _Ctx) -> str:
    if v != FORMAT_NAME:
        raise StoreError(f"{c.path}: not an MER expert store manifest (format is {v!r})")
    return v


def _version(v: Any, c: _Ctx) -> int:
    if not _is_int(v) or v < 1:
        raise StoreError(f"{c.path}: bad store format version {v!r} (a whole number >= 1)")
    if v > FORMAT_VERSION:
        raise StoreError(f"{c.path}: store format version {v} is newer than this MER "
                         f"reads ({FORMAT_VERSION}); upgrade micro-expert-router")  # fmt: skip
    return v


# model args: a type check per annotation of ModelArgs, then ranges
def _num(v: object) -> bool:
    return (_is_int(v) or isinstance(v, float)) and math.isfinite(v)


_TYPES: dict[str, Callable[[object], bool]] = {
    "int": _is_int,
    "float": _num,
    "bool": lambda v: isinstance(v, bool),
    "str": lambda v: isinstance(v, str),
    "int | None": lambda v: v is None or _is_int(v),
    "float | None": lambda v: v is None or _num(v),
    "tuple[bool, ...]": lambda v: isinstance(v, list) and all(isinstance(x, bool) for x in v),
    "tuple[int, ...]": lambda v: isinstance(v, list) and all(_is_int(x) for x in v),
}
_POSITIVE = ("vocab_size", "hidden_size", "n_layers", "n_heads", "n_kv_heads", "head_dim",
             "n_experts", "top_k", "expert_inter", "rms_norm_eps", "rope_theta", "rope_scaling",
             "max_position_embeddings")  # fmt: skip
_NON_NEGATIVE = ("shared_expert_inter", "dense_inter")


def _model(v: Any, c: _Ctx) -> ModelArgs:
    sec = "model"
    if not isinstance(v, dict):
        raise c.fail(sec, f"expected an object of model arguments, got {type(v).__name__}")
    known = {f.name: f for f in fields(ModelArgs)}
    if extra := sorted(set(v) - set(known)):
        raise c.fail(sec, f"unknown model argument(s) {extra}")
    for name, f in known.items():
        if name not in v:
            if f.default is MISSING and f.default_factory is MISSING:  # required
                raise c.fail(sec, f"model argument {name!r} is missing")
            continue
        if not _TYPES[str(f.type)](v[name]):
            raise c.fail(sec, f"model argument {name!r} = {v[name]!r} is not of type {f.type}")
    for name in _POSITIVE:
        if not v[name] > 0:
            raise c.fail(sec, f"model argument {name!r} = {v[name]!r} must be > 0")
    for name in _NON_NEGATIVE:
        if v[name] < 0:
            raise c.fail(sec, f"model argument {name!r} = {v[name]!r} must be >= 0")
    if v["arch"] not in ARCHITECTURES:
        raise c.fail(sec, f"architecture {v['arch']!r} is not one of {sorted(ARCHITECTURES)}")
    if v["qk_norm"] not in ("none", "head", "proj"):
        raise c.fail(sec, f"qk_norm {v['qk_norm']!r} is not 'none', 'head' or 'proj'")
    if len(v["moe_layers"]) != v["n_layers"] or not any(v["moe_layers"]):
        raise c.fail(sec, f"moe_layers must flag each of the {v['n_layers']} layers, at least "
                          "one of them MoE")  # fmt: skip
    if v["top_k"] > v["n_experts"] or v["n_heads"] % v["n_kv_heads"]:
        raise c.fail(sec, f"top_k {v['top_k']} > n_experts {v['n_experts']}, or n_heads "
                     f"{v['n_heads']} not a multiple of n_kv_heads {v['n_kv_heads']}")  # fmt: skip
    if not all(v["moe_layers"]) and not v["dense_inter"]:
        raise c.fail(sec, "a model with dense-MLP layers needs dense_inter > 0")
    if v.get("sliding_window") is not None and v["sliding_window"] < 1:
        raise c.fail(sec, f"sliding_window {v['sliding_window']} must be >= 1 or null")
    return ModelArgs.from_dict(v)


def _expert_format(v: Any, c: _Ctx) -> ExpertFormat:
    if not isinstance(v, str):
        raise c.fail("expert_format", f"expected a format name, got {v!r}")
    try:
        return get_format(v)
    except ConfigError as e:
        raise StoreError(f"{c.path}: {e}") from None


def _layout(v: Any, c: _Ctx) -> str:
    if not isinstance(v, str):
        raise c.fail("layout", f"expected a layout tag, got {v!r}")
    return v  # compared with this machine's tag by Store (its message says how to repack)


def _group(v: Any, c: _Ctx) -> int:
    a: ModelArgs = c.ok["model"]
    fmt: ExpertFormat = c.ok["expert_format"]
    if not _is_int(v) or v < 1:
        raise c.fail("group", f"neurons per group must be a whole number >= 1, not {v!r}")
    if a.expert_inter % v or v % fmt.group_multiple:
        raise c.fail("group", f"{v} neurons per group does not divide the expert width "
                     f"{a.expert_inter} into groups of a multiple of {fmt.group_multiple} "
                     f"(format {fmt.name})")  # fmt: skip
    return v


# the dense weights' record: one checker per field (None: the field is optional)
def _dense_file(v: Any) -> str | None:
    return None if _plain_name(v) else "must be a file name inside the store"


def _dense_dtype(v: Any) -> str | None:
    return None if v in DENSE_DTYPES else f"must be one of {DENSE_DTYPES}"


def _dense_tensors(v: Any) -> str | None:
    # [name, shape], or [name, shape, GGUF type] in a store converted from GGUF
    ok = isinstance(v, list) and all(
        isinstance(t, list) and len(t) in (2, 3) and isinstance(t[0], str)
        and isinstance(t[1], list) and all(_is_int(s) and s >= 0 for s in t[1])
        and (len(t) == 2 or isinstance(t[2], (str, int))) for t in v
    )  # fmt: skip
    return None if ok else "must be a list of [name, shape] (or [name, shape, type]) entries"


def _dense_format(v: Any) -> str | None:
    from .dense import DENSE_CHOICES

    choices = (*DENSE_CHOICES, "gguf")
    return None if v in choices else f"must be one of {choices}"


def _dense_quantized(v: Any) -> str | None:
    ok = isinstance(v, list) and all(isinstance(n, str) for n in v)
    return None if ok else "must be a list of tensor names"


DENSE_FIELDS: dict[str, tuple[Callable[[Any], str | None], bool]] = {
    # field: (checker returning a problem or None, required)
    "file": (_dense_file, True),
    "dtype": (_dense_dtype, True),
    "tensors": (_dense_tensors, False),
    "format": (_dense_format, False),  # absent in stores older than the dense format
    "quantized": (_dense_quantized, False),
}


def _dense(v: Any, c: _Ctx) -> dict[str, Any]:
    if not isinstance(v, dict):
        raise c.fail("dense", f"expected an object (file, dtype), got {type(v).__name__}")
    for name, (check, required) in DENSE_FIELDS.items():
        if name not in v:
            if required:
                raise c.fail("dense", f"field {name!r} is missing")
            continue
        problem = check(v[name])
        if problem is not None:
            raise c.fail("dense", f"{name} {v[name]!r} {problem}")
    return v


def _expert_files(v: Any, c: _Ctx) -> list[str]:
    if not isinstance(v, list) or not v or not all(_plain_name(f) for f in v):
        raise c.fail("expert_files", f"expected a non-empty list of file names, got {v!r}")
    if len(set(v)) != len(v) or c.ok["dense"]["file"] in v:
        raise c.fail("expert_files", "a file is named twice (or is also the dense file)")
    return v


_EXTENT_KEYS = ("layer", "expert", "file", "offset", "length", "xxh3")


def _extent(i: int, e: Any, c: _Ctx) -> Extent:
    if not isinstance(e, dict) or not all(k in e for k in _EXTENT_KEYS):
        raise c.fail("experts", f"entry {i} must be an object with {', '.join(_EXTENT_KEYS)}")
    if not all(_is_int(e[k]) and e[k] >= 0 for k in _EXTENT_KEYS[:-1]):
        raise c.fail("experts", f"entry {i}: layer, expert, file, offset and length must be "
                                f"whole numbers >= 0 ({e!r})")  # fmt: skip
    x = e["xxh3"]
    if not (isinstance(x, str) and len(x) == 16 and all(ch in "0123456789abcdef" for ch in x)):
        raise c.fail("experts", f"entry {i}: xxh3 {x!r} is not 16 hex digits")
    if e["file"] >= len(c.ok["expert_files"]):
        raise c.fail("experts", f"entry {i}: file index {e['file']} is out of range")
    if e["offset"] % ALIGN:
        raise c.fail("experts", f"expert ({e['layer']}, {e['expert']}) starts at offset "
                                f"{e['offset']}, not on a {ALIGN}-byte boundary")  # fmt: skip
    return Extent(*(e[k] for k in _EXTENT_KEYS))


def _experts(v: Any, c: _Ctx) -> list[Extent]:
    a: ModelArgs = c.ok["model"]
    fmt: ExpertFormat = c.ok["expert_format"]
    group = c.ok["group"]
    if not isinstance(v, list):
        raise c.fail("experts", f"expected a list of extents, got {type(v).__name__}")
    want = sum(a.moe_layers) * a.n_experts
    if len(v) != want:
        raise c.fail("experts", f"the expert table has {len(v)} entries, the model has {want} "
                                "routed experts")  # fmt: skip
    extents = [_extent(i, e, c) for i, e in enumerate(v)]
    keys = {(x.layer, x.expert) for x in extents}
    if len(keys) != want or any(
        x.layer >= a.n_layers or not a.moe_layers[x.layer] or x.expert >= a.n_experts
        for x in extents
    ):
        raise c.fail("experts", "the expert table does not name every routed expert once")
    expect = (a.expert_inter // group) * fmt.group_nbytes(a.hidden_size, group)
    for x in extents:
        if x.length != expect:
            raise c.fail("experts", f"expert ({x.layer}, {x.expert}) has {x.length} bytes, "
                                    f"expected {expect}")  # fmt: skip
    prev: Extent | None = None
    for x in sorted(extents, key=lambda x: (x.file, x.offset)):
        if prev is not None and prev.file == x.file and x.offset < prev.offset + prev.length:
            raise c.fail("experts", f"experts ({prev.layer}, {prev.expert}) and ({x.layer}, "
                                    f"{x.expert}) overlap in {c.ok['expert_files'][x.file]} "
                                    f"(byte {x.offset})")  # fmt: skip
        prev = x
    return extents


SECTIONS: tuple[tuple[str, Callable[[Any, _Ctx], Any]], ...] = (
    ("format", _format),
    ("version", _version),
    ("model", _model),
    ("expert_format", _expert_format),
    ("layout", _layout),
    ("group", _group),
    ("dense", _dense),
    ("expert_files", _expert_files),
    ("experts", _experts),
)
REQUIRED_KEYS = tuple(name for name, _ in SECTIONS)


@dataclass(frozen=True)
class Manifest:
    """A checked manifest: each section as the engine uses it, and the raw document."""

    version: int
    model: ModelArgs
    expert_format: ExpertFormat
    layout: str
    group: int
    dense: dict[str, Any]
    expert_files: list[str]
    experts: list[Extent]
    doc: dict[str, Any]


def check_manifest(path: Path, doc: Any) -> Manifest:
    """``doc`` (parsed from ``path``) checked section by section; ``StoreError`` on the first
    problem."""
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        fmt = doc.get("format") if isinstance(doc, dict) else None
        raise StoreError(f"{path}: not an MER expert store manifest (format is {fmt!r})")
    missing = [k for k in REQUIRED_KEYS if k not in doc]
    if missing:
        raise StoreError(f"{path}: manifest is missing key(s) {', '.join(missing)}; the "
                         "store is damaged: reconvert it")  # fmt: skip
    c = _Ctx(path, doc)
    for name, check in SECTIONS:
        c.ok[name] = check(doc[name], c)
    del c.ok["format"]
    return Manifest(**c.ok, doc=doc)


__all__ = ["DENSE_FIELDS", "SECTIONS", "Extent", "Manifest", "check_manifest"]
