"""The dense weights file of a store (``dense.safetensors``): which tensors are quantized, writing
it one tensor at a time, and loading it into RAM.

A store's dense format (``mer convert --dense``) is one of ``DENSE_FORMATS``:

- ``f32`` / ``bf16``: every dense tensor in that float dtype (the only kind before the dense
  format existed; manifests without ``dense.format`` read this way);
- ``q8`` / ``q4`` (``kernels/dense_quant.py``): the attention projections, shared experts, dense
  MLPs, lm_head and the embedding table are quantized. Routers (the MoE gate and
  ``shared_expert_gate``), norms and biases stay exact, in the store's float dtype (f32 for f32
  stores, else bf16). A matrix whose K the format cannot block (q8: 32, q4: 64) stays float
  too. A quantized tensor ``NAME`` is stored as ``NAME.q8`` + ``NAME.s`` or ``NAME.q4`` +
  ``NAME.sz``; the manifest lists the quantized names under ``dense.quantized``.

Legend: N output rows, K input features.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..config import ModelArgs
from ..errors import ConfigError, MERError, StoreError
from ..kernels.dense_quant import DENSE_FORMATS, from_parts
from ..kernels.quality import rel_l2

FLOAT_DENSE = {"f32": torch.float32, "bf16": torch.bfloat16}
DENSE_CHOICES = (*FLOAT_DENSE, *DENSE_FORMATS)
# expert format -> dense format when --dense is not given (docs/quantization.md, "Dense weights")
DEFAULT_DENSE = {"f32": "f32", "bf16": "bf16", "q8": "q8", "q4": "q4"}
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
             torch.int8: "I8", torch.uint8: "U8"}  # fmt: skip
PART_DTYPES = {"q8": (("q8", torch.int8), ("s", torch.bfloat16)),
               "q4": (("q4", torch.uint8), ("sz", torch.bfloat16))}  # fmt: skip


def choose_dense(dense: str | None, expert_format: str) -> str:
    """The dense format for a conversion: ``dense`` checked, or the default for the experts."""
    if dense is None:
        return DEFAULT_DENSE.get(expert_format, "bf16")
    if dense not in DENSE_CHOICES:
        raise ConfigError(f"--dense {dense!r} is not a dense format; choose one of "
                          f"{', '.join(DENSE_CHOICES)}")  # fmt: skip
    return dense


def stays_exact(args: ModelArgs, name: str, shape: tuple[int, ...]) -> bool:
    """Routers, norms and biases (every 1-D tensor) keep the store's float dtype."""
    router = name.endswith(f".{args.spec.moe_prefix}.gate.weight") or name.endswith(
        (".shared_expert_gate.weight", ".mlp.router.weight")  # the last: GPT-OSS's router
    )
    return router or len(shape) != 2


def _part_shapes(fmt: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    n, k = shape
    return [(n, k), (n,)] if fmt == "q8" else [(n, k // 2), (n, k // 64, 2)]


def _write_safetensors(
    path: Path,
    specs: list[tuple[str, tuple[int, ...], torch.dtype]],
    get: Callable[[str], torch.Tensor],
) -> None:
    """A safetensors file written one tensor at a time, each in its own dtype."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, shape, dtype in specs:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [pos, pos + n]}  # fmt: skip
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, shape, dtype in specs:
            t = get(name)
            if t.dtype != dtype or tuple(t.shape) != tuple(shape):
                raise StoreError(f"dense tensor {name}: got {t.dtype} {tuple(t.shape)}, "
                                 f"expected {dtype} {tuple(shape)}")  # fmt: skip
            f.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        f.flush()
        os.fsync(f.fileno())


def write_dense(
    path: Path,
    args: ModelArgs,
    shapes: list[tuple[str, tuple[int, ...]]],
    get: Callable[[str, tuple[int, ...]], torch.Tensor],
    dense: str,
    float_dtype: torch.dtype,
) -> tuple[dict[str, Any], dict[str, float]]:
    """Write the dense file; returns the manifest's ``dense`` entry (without ``file``) and the
    relative L2 error of each quantized tensor."""
    if dense in FLOAT_DENSE:
        float_dtype = FLOAT_DENSE[dense]
    fmt_cls = DENSE_FORMATS.get(dense)
    quantized = [n for n, s in shapes if fmt_cls is not None and not stays_exact(args, n, s)
                 and fmt_cls.check_shape(s)]  # fmt: skip
    qset = set(quantized)
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for name, shape in shapes:
        if name in qset:
            for (suffix, dt), pshape in zip(PART_DTYPES[dense], _part_shapes(dense, shape),
                                            strict=True):  # fmt: skip
                specs.append((f"{name}.{suffix}", pshape, dt))
        else:
            specs.append((name, shape, float_dtype))
    shape_of = dict(shapes)
    errors: dict[str, float] = {}
    last: dict[str, dict[str, torch.Tensor]] = {}  # one quantized tensor's parts at a time

    def get_part(key: str) -> torch.Tensor:
        if key in shape_of:
            return get(key, shape_of[key]).to(float_dtype)
        name, suffix = key.rsplit(".", 1)
        if name not in last:
            last.clear()
            w = get(name, shape_of[name]).float()
            q = fmt_cls.quantize(w)  # type: ignore[union-attr]
            errors[name] = rel_l2(w, q.dequantize())
            last[name] = q.parts()
        return last[name][suffix]

    _write_safetensors(path, specs, get_part)
    entry = {"dtype": str(float_dtype).removeprefix("torch."), "format": dense,
             "tensors": [[n, list(s)] for n, s in shapes], "quantized": quantized}  # fmt: skip
    return entry, errors


def load_dense(
    path: Path, args: ModelArgs, entry: dict[str, Any], shapes, dtype: torch.dtype
) -> dict[str, Any]:
    """Every dense tensor: float tensors converted to ``dtype``, quantized ones as
    ``DenseWeight`` objects. ``entry`` is the manifest's ``dense`` entry.

    The bytes are read once with the engine's ``DirectReader`` (``io/bulk.py``) into tensors
    allocated here, so every dense weight lives in anonymous memory: nothing maps the file, and
    no page of it can be evicted under a memory limit and faulted in again during decode. Each
    tensor is converted as soon as its bytes are in, so peak memory stays near the result."""
    from ..checkpoint import SAFETENSORS_DTYPES, read_safetensors_header
    from ..io.bulk import read_ranges

    fmt = entry.get("format", "f32" if entry.get("dtype") == "float32" else "bf16")
    quantized = entry.get("quantized", [])
    if fmt not in DENSE_CHOICES or not isinstance(quantized, list):
        raise StoreError(f"{path}: unknown dense format {fmt!r} in the manifest; upgrade "
                         "micro-expert-router or reconvert the store")  # fmt: skip
    if quantized and fmt not in DENSE_FORMATS:
        raise StoreError(f"{path}: dense format {fmt} lists quantized tensors; reconvert")
    qset = set(quantized)
    header = read_safetensors_header(path, StoreError)  # bounds and entry checks, clear messages
    keys: list[tuple[str, str]] = []  # (tensor name, stored key)
    for name, shape in shapes:
        parts = [f"{name}.{sfx}" for sfx, _ in PART_DTYPES[fmt]] if name in qset else [name]
        for key in parts:
            info = header.get(key)
            if info is None:
                raise StoreError(f"{path}: tensor {key} is missing; reconvert")
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise StoreError(f"{path}: tensor {key} has dtype {info['dtype']}, which a "
                                 "store never writes; reconvert")  # fmt: skip
            keys.append((name, key))
        if name not in qset and tuple(header[name]["shape"]) != tuple(shape):
            raise StoreError(f"{path}: tensor {name} has shape {header[name]['shape']}, "
                             f"expected {list(shape)}")  # fmt: skip
    raw = {key: torch.empty(header[key]["shape"], dtype=SAFETENSORS_DTYPES[header[key]["dtype"]])
           for _, key in keys}  # fmt: skip
    left = {name: 0 for name, _ in shapes}  # stored parts of each tensor not yet read
    for name, _ in keys:
        left[name] += 1
    shape_of = dict(shapes)
    out: dict[str, Any] = {}

    def done(i: int) -> None:  # stored key i is read: finish its tensor once all parts are in
        name = keys[i][0]
        left[name] -= 1
        if left[name]:
            return
        if name not in qset:
            out[name] = raw.pop(name).to(dtype).contiguous()
            return
        parts = {sfx: raw.pop(f"{name}.{sfx}") for sfx, _ in PART_DTYPES[fmt]}
        w = from_parts(fmt, parts)
        if w.shape != tuple(shape_of[name]):
            raise StoreError(f"{path}: quantized tensor {name} has shape "
                             f"{list(w.shape)}, expected {list(shape_of[name])}")  # fmt: skip
        out[name] = w

    try:
        read_ranges(path, [(header[key]["offset"], raw[key]) for _, key in keys], done)
    except MERError as e:
        if isinstance(e, StoreError):
            raise
        raise StoreError(f"{path}: {e}") from None
    except Exception as e:
        raise StoreError(f"{path}: cannot read dense weights ({e})") from None
    return {name: out[name] for name, _ in shapes}
