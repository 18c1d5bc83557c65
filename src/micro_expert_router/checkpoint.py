"""Reading HuggingFace checkpoint folders: config.json plus safetensors shards.

``Checkpoint`` finds the shards (``model.safetensors.index.json`` or a single
``model.safetensors``), opens each shard once, and hands out tensors by name with their shapes
checked; it also parses safetensors headers itself, because the library exposes no byte offsets
(the store converter streams tensors by offset). ``tensor_names`` maps the engine's view of a model
(dense weights, routed experts) to each architecture's checkpoint names.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .config import ModelArgs
from .errors import CheckpointError, MERError

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
}  # fmt: skip


# bytes per element of the safetensors dtypes that take whole bytes (sub-byte ones are not sized)
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2,
                "U16": 2, "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8,
                "F64": 8, "C64": 8}  # fmt: skip


def read_safetensors_header(
    path: Path, error: type[MERError] = CheckpointError
) -> dict[str, Any]:
    """The JSON header of a safetensors file, with ``data_offsets`` made absolute.

    Raises ``error`` (``CheckpointError``, or ``StoreError`` for a store's dense file) naming the
    file for a truncated or malformed header: a header that is not an object, an entry without
    dtype, shape or data offsets, offsets that run backwards, overlap, disagree with the shape,
    or lie beyond the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise error(f"{path}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100 << 20):
                raise error(f"{path}: corrupt safetensors header length {n}")
            text = f.read(n)
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise error(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, "
                    "not an object)")  # fmt: skip
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        problem = _entry_problem(info)
        if problem:
            raise error(f"{path}: corrupt safetensors header: tensor {name} {problem}")
        a, b = info["data_offsets"]
        if base + b > size:
            raise error(
                f"{path}: tensor {name} ends at byte {base + b} but the file has {size} bytes "
                "(truncated download or copy?)"
            )
        out[name] = {"dtype": info["dtype"], "shape": info["shape"], "offset": base + a,
                     "nbytes": b - a}  # fmt: skip
    spans = sorted((t["offset"], t["offset"] + t["nbytes"], name) for name, t in out.items())
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise error(f"{path}: corrupt safetensors header: tensors {first} and {second} "
                        "overlap")  # fmt: skip
    return out


def _entry_problem(info: Any) -> str | None:
    """What is wrong with one tensor's header entry, or None."""
    if not isinstance(info, dict):
        return "has no dtype, shape and data_offsets"
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str):
        return f"has no dtype (got {dtype!r})"
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        return f"has no valid shape (got {shape!r})"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_count, offsets)):
        return f"has no valid data_offsets [start, end] (got {offsets!r})"
    if offsets[1] < offsets[0]:
        return f"ends (byte {offsets[1]}) before it starts (byte {offsets[0]})"
    if dtype in _DTYPE_BYTES:
        want = _DTYPE_BYTES[dtype] * math.prod(shape)
        if offsets[1] - offsets[0] != want:
            return (f"spans {offsets[1] - offsets[0]} bytes but its shape {shape} of {dtype} "
                    f"needs {want}")  # fmt: skip
    return None


def _is_count(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


class Checkpoint:
    """A HuggingFace model folder: config.json and safetensors weights."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{self.folder}: not a directory (expected a model folder "
                "with config.json and *.safetensors)"
            )
        self.args = ModelArgs.from_file(self.folder / "config.json")
        self._handles: dict[str, Any] = {}
        self._headers: dict[str, dict[str, Any]] = {}
        self.weight_map = self._weight_map()

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            for shard in sorted(set(wm.values())):
                if not (self.folder / shard).is_file():
                    raise CheckpointError(
                        f"{self.folder / shard}: shard named by {index.name} is missing"
                    )
            return dict(wm)
        single = self.folder / "model.safetensors"
        files = [single] if single.is_file() else sorted(self.folder.glob("*.safetensors"))
        if len(files) != 1:
            raise CheckpointError(
                f"{self.folder}: no model.safetensors.index.json and "
                + ("no *.safetensors file" if not files else f"{len(files)} safetensors files")
                + "; expected model.safetensors or an index naming the shards"
            )
        return {name: files[0].name for name in self.header(files[0].name)}

    def header(self, shard: str) -> dict[str, Any]:
        if shard not in self._headers:
            self._headers[shard] = read_safetensors_header(self.folder / shard)
        return self._headers[shard]

    def _handle(self, shard: str) -> Any:
        h = self._handles.get(shard)
        if h is None:
            self.header(shard)  # validates size and bounds with a clear message first
            try:
                h = safe_open(str(self.folder / shard), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.folder / shard}: cannot open ({e})") from None
            self._handles[shard] = h
        return h

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def get(self, name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Tensor ``name`` as stored (dtype unchanged), its shape checked against ``shape``."""
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        try:
            t = self._handle(shard).get_tensor(name)
        except Exception as e:
            raise CheckpointError(
                f"{self.folder / shard}: cannot read tensor {name} ({e})"
            ) from None
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.folder / shard}: tensor {name} has shape "
                f"{list(t.shape)}, expected {list(shape)} from config.json"
            )
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        return tuple(self.header(shard)[name]["shape"])

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, D], up [I, D], down [D, I]) of one routed expert, as stored."""
        a = self.args
        d, i = a.hidden_size, a.expert_inter
        prefix = f"model.layers.{layer}.{a.spec.moe_prefix}.experts"
        g, u, dn = a.spec.expert_names
        per_expert = f"{prefix}.{expert}.{g}.weight"
        if per_expert in self.weight_map:
            return (self.get(per_expert, (i, d)), self.get(f"{prefix}.{expert}.{u}.weight", (i, d)),
                    self.get(f"{prefix}.{expert}.{dn}.weight", (d, i)))  # fmt: skip
        fused = f"{prefix}.gate_up_proj"
        if fused in self.weight_map:  # transformers' in-memory fused layout, if saved as such
            gu = self.get(fused, (a.n_experts, 2 * i, d))[expert]
            return gu[:i], gu[i:], self.get(f"{prefix}.down_proj", (a.n_experts, d, i))[expert]
        raise CheckpointError(f"{self.folder}: tensor {per_expert} is missing from the checkpoint")

    def close(self) -> None:
        self._handles.clear()


def dense_tensor_shapes(a: ModelArgs) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every RAM-resident tensor of the model: name and expected shape."""
    d, hd = a.hidden_size, a.head_dim
    yield "model.embed_tokens.weight", (a.vocab_size, d)
    yield "model.norm.weight", (d,)
    if not a.tie_word_embeddings:
        yield "lm_head.weight", (a.vocab_size, d)
    for i in range(a.n_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        for name, rows in (("q", a.n_heads), ("k", a.n_kv_heads), ("v", a.n_kv_heads)):
            yield f"{p}.self_attn.{name}_proj.weight", (rows * hd, d)
            if a.qkv_bias:
                yield f"{p}.self_attn.{name}_proj.bias", (rows * hd,)
        yield f"{p}.self_attn.o_proj.weight", (d, a.n_heads * hd)
        if a.o_bias:
            yield f"{p}.self_attn.o_proj.bias", (d,)
        if a.qk_norm == "head":
            yield f"{p}.self_attn.q_norm.weight", (hd,)
            yield f"{p}.self_attn.k_norm.weight", (hd,)
        elif a.qk_norm == "proj":
            yield f"{p}.self_attn.q_norm.weight", (a.n_heads * hd,)
            yield f"{p}.self_attn.k_norm.weight", (a.n_kv_heads * hd,)
        if a.moe_layers[i]:
            yield f"{p}.{a.spec.moe_prefix}.gate.weight", (a.n_experts, d)
            if a.shared_expert_inter:
                s = a.shared_expert_inter
                yield f"{p}.mlp.shared_expert.gate_proj.weight", (s, d)
                yield f"{p}.mlp.shared_expert.up_proj.weight", (s, d)
                yield f"{p}.mlp.shared_expert.down_proj.weight", (d, s)
                yield f"{p}.mlp.shared_expert_gate.weight", (1, d)
        else:
            m = a.dense_inter
            yield f"{p}.mlp.gate_proj.weight", (m, d)
            yield f"{p}.mlp.up_proj.weight", (m, d)
            yield f"{p}.mlp.down_proj.weight", (d, m)


def load_dense(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All RAM-resident tensors, converted to ``dtype``, shapes checked."""
    return {name: ckpt.get(name, shape).to(dtype).contiguous()
            for name, shape in dense_tensor_shapes(ckpt.args)}  # fmt: skip
