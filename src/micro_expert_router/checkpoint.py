"""Reading HuggingFace checkpoint folders: config.json plus safetensors shards.

``Checkpoint`` finds the shards (``model.safetensors.index.json`` or a single
``model.safetensors``), opens each shard once, and hands out tensors by name with their shapes
checked; it also parses safetensors headers itself, because the library exposes no byte offsets
(the store converter streams tensors by offset). ``tensor_names`` maps the engine's view of a model
(dense weights, routed experts) to each architecture's checkpoint names.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .config import ModelArgs
from .errors import CheckpointError

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
}  # fmt: skip


def read_safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, with ``data_offsets`` made absolute.

    Raises ``CheckpointError`` naming the file for a truncated or malformed header, or for
    tensors whose bytes lie beyond the end of the file.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file (no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: corrupt safetensors header length {n}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        if base + b > size:
            raise CheckpointError(
                f"{path}: tensor {name} ends at byte {base + b} but the file has {size} bytes "
                "(truncated download or copy?)"
            )
        out[name] = {"dtype": info["dtype"], "shape": info["shape"], "offset": base + a,
                     "nbytes": b - a}  # fmt: skip
    return out


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
