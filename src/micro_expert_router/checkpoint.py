"""Reading HuggingFace checkpoint folders: config.json plus safetensors shards.

``Checkpoint`` finds the shards (``model.safetensors.index.json`` or a single
``model.safetensors``), parses each shard's safetensors header itself (names, dtypes, shapes and
byte offsets, all bounds-checked) and reads tensors with positional reads (``os.preadv``) into
fresh tensors. The reads release the GIL and are safe from several threads at once, which is what
lets the store converter read the next expert while others are being quantized. Block-wise FP8
weights (``fp8.py``) are dequantized to float32 as they are read, with one note printed per
checkpoint. ``tensor_names`` maps the engine's view of a model (dense weights, routed experts) to
each architecture's checkpoint names.
"""

from __future__ import annotations

import json
import logging
import math
import os
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .config import ModelArgs
from .errors import CheckpointError, MERError
from .fp8 import FP8_DTYPES, SCALE_SUFFIX, BlockFp8, dequantize_blockwise, parse_quantization
from .models.mla import mla_tensor_shapes

SAFETENSORS_DTYPES = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip

log = logging.getLogger(__name__)


def _warn(msg: str) -> None:
    log.warning(msg)


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
    """A HuggingFace model folder: config.json and safetensors weights.

    ``note`` receives one line when the checkpoint needs a conversion the user should know about
    (block-wise FP8 weights); by default it goes to the ``logging`` warning channel (stderr).
    """

    def __init__(self, folder: str | Path, note: Callable[[str], None] | None = _warn) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError(
                f"{self.folder}: not a directory (expected a model folder "
                "with config.json and *.safetensors)"
            )
        self.args = ModelArgs.from_file(self.folder / "config.json")
        self.fp8: BlockFp8 | None = parse_quantization(
            json.loads((self.folder / "config.json").read_text()), str(self.folder / "config.json")
        )
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()  # guards _fds and _headers (reads come from threads)
        self._headers: dict[str, dict[str, Any]] = {}
        self.weight_map = self._weight_map()
        if self.fp8 is not None and note is not None:
            note(self.fp8.note(self.folder))

    def _weight_map(self) -> dict[str, str]:
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
                if not isinstance(wm, dict):
                    raise TypeError("weight_map is not an object")
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: malformed index ({e})") from None
            for shard in sorted(set(wm.values())):
                if not (self.folder / str(shard)).is_file():
                    raise CheckpointError(
                        f"{self.folder / str(shard)}: shard named by {index.name} is missing"
                    )
            return {str(k): str(v) for k, v in wm.items()}
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
        with self._lock:
            if shard not in self._headers:
                self._headers[shard] = read_safetensors_header(self.folder / shard)
            return self._headers[shard]

    def _fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                try:
                    fd = os.open(self.folder / shard, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(
                        f"{self.folder / shard}: cannot open ({e.strerror or e})"
                    ) from None
                self._fds[shard] = fd
            return fd

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _info(self, name: str) -> tuple[str, dict[str, Any]]:
        shard = self.weight_map.get(name)
        if shard is None:
            raise CheckpointError(f"{self.folder}: tensor {name} is missing from the checkpoint")
        info = self.header(shard).get(name)
        if info is None:
            raise CheckpointError(
                f"{self.folder / shard}: tensor {name} is named by the index but not in the shard"
            )
        return shard, info

    def _pread(self, shard: str, out: torch.Tensor, offset: int, name: str) -> None:
        """Fill ``out`` (contiguous) from ``offset`` of ``shard`` (GIL released while reading)."""
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd, done = self._fd(shard), 0
        while done < len(buf):
            try:
                got = os.preadv(fd, [buf[done:]], offset + done)
            except OSError as e:
                raise CheckpointError(
                    f"{self.folder / shard}: cannot read tensor {name} ({e.strerror or e})"
                ) from None
            if got == 0:
                raise CheckpointError(
                    f"{self.folder / shard}: tensor {name} is cut short (file shrank while read)"
                )
            done += got

    def raw(self, name: str, index: int | None = None) -> torch.Tensor:
        """Tensor ``name`` exactly as stored (dtype unchanged, FP8 included); with ``index``,
        only ``tensor[index]`` is read (one expert of a fused ``[E, ...]`` tensor)."""
        shard, info = self._info(name)
        dtype = SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(
                f"{self.folder / shard}: tensor {name} has dtype {info['dtype']}, which MER "
                f"cannot read (known: {', '.join(SAFETENSORS_DTYPES)})"
            )
        shape, offset = list(info["shape"]), info["offset"]
        if index is not None:
            if not shape or not 0 <= index < shape[0]:
                raise CheckpointError(f"{self.folder / shard}: tensor {name} {shape} has no "
                                      f"row {index}")  # fmt: skip
            shape = shape[1:]
            offset += index * math.prod(shape) * dtype.itemsize
        out = torch.empty(shape, dtype=dtype)
        if out.numel():
            self._pread(shard, out, offset, name)
        return out

    def get(
        self, name: str, shape: tuple[int, ...] | None = None, index: int | None = None
    ) -> torch.Tensor:
        """Tensor ``name`` (``tensor[index]`` with ``index``) as stored, except that block-wise
        FP8 weights come back dequantized to float32; its shape checked against ``shape``."""
        t = self.raw(name, index)
        if t.dtype in FP8_DTYPES:
            t = self._dequantize(name, t, index)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(
                f"{self.folder / self.weight_map[name]}: tensor {name}"
                f"{'' if index is None else f'[{index}]'} has shape {list(t.shape)}, expected "
                f"{list(shape)} from config.json"
            )
        return t

    def _dequantize(self, name: str, q: torch.Tensor, index: int | None) -> torch.Tensor:
        where = self.folder / self.weight_map[name]
        if self.fp8 is None:
            raise CheckpointError(
                f"{where}: tensor {name} is {q.dtype} but config.json has no "
                "quantization_config with quant_method fp8 to say how to scale it"
            )
        if name + SCALE_SUFFIX not in self.weight_map:
            raise CheckpointError(
                f"{where}: FP8 tensor {name} has no {name}{SCALE_SUFFIX}; only block-wise FP8 "
                "with per-block weight_scale_inv (DeepSeek-V3 style) is supported"
            )
        scale = self.raw(name + SCALE_SUFFIX, index)
        return dequantize_blockwise(q, scale, self.fp8.block, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)[1]["shape"])

    def expert_names(self, layer: int, expert: int) -> list[tuple[str, int | None]]:
        """Where one routed expert's (gate, up, down) live: (tensor name, index into a fused
        ``[E, ...]`` tensor or ``None``), for ``expert`` to read."""
        a = self.args
        prefix = f"model.layers.{layer}.{a.spec.moe_prefix}.experts"
        g, u, dn = a.spec.expert_names
        per_expert = f"{prefix}.{expert}.{g}.weight"
        if per_expert in self.weight_map:
            return [(per_expert, None), (f"{prefix}.{expert}.{u}.weight", None),
                    (f"{prefix}.{expert}.{dn}.weight", None)]  # fmt: skip
        if f"{prefix}.gate_up_proj" in self.weight_map:  # transformers' in-memory fused layout
            return [(f"{prefix}.gate_up_proj", expert), (f"{prefix}.down_proj", expert)]
        raise CheckpointError(f"{self.folder}: tensor {per_expert} is missing from the checkpoint")

    def expert(self, layer: int, expert: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gate [I, D], up [I, D], down [D, I]) of one routed expert, as stored (FP8
        dequantized); safe to call from several threads at once."""
        d, i = self.args.hidden_size, self.args.expert_inter
        names = self.expert_names(layer, expert)
        if len(names) == 3:
            (g, _), (u, _), (dn, _) = names
            return self.get(g, (i, d)), self.get(u, (i, d)), self.get(dn, (d, i))
        (gu_name, e), (dn_name, _) = names
        gu = self.get(gu_name, (2 * i, d), index=e)  # [2I, D]
        return gu[:i], gu[i:], self.get(dn_name, (d, i), index=e)

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def dense_tensor_shapes(a: ModelArgs) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every RAM-resident tensor of the model: name and expected shape."""
    if a.spec.family == "gpt_oss":  # its own names (router, sinks)
        from .models.gpt_oss import dense_tensor_shapes as gpt_oss_shapes

        yield from gpt_oss_shapes(a)
        return
    d = a.hidden_size
    yield "model.embed_tokens.weight", (a.vocab_size, d)
    yield "model.norm.weight", (d,)
    if not a.tie_word_embeddings:
        yield "lm_head.weight", (a.vocab_size, d)
    for i in range(a.n_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        if a.attention == "mla":
            yield from mla_tensor_shapes(a, i)
        else:
            yield from _gqa_shapes(a, p)
        if a.moe_layers[i]:
            yield f"{p}.{a.spec.moe_prefix}.gate.weight", (a.n_experts, d)
            if a.topk_method == "noaux_tc":
                yield f"{p}.{a.spec.moe_prefix}.gate.e_score_correction_bias", (a.n_experts,)
            if a.shared_expert_inter:
                s, sp = a.shared_expert_inter, f"{p}.mlp.{a.spec.shared_prefix}"
                yield f"{sp}.gate_proj.weight", (s, d)
                yield f"{sp}.up_proj.weight", (s, d)
                yield f"{sp}.down_proj.weight", (d, s)
                if a.spec.shared_gate:
                    yield f"{p}.mlp.shared_expert_gate.weight", (1, d)
        else:
            m = a.dense_inter
            yield f"{p}.mlp.gate_proj.weight", (m, d)
            yield f"{p}.mlp.up_proj.weight", (m, d)
            yield f"{p}.mlp.down_proj.weight", (d, m)


def _gqa_shapes(a: ModelArgs, p: str) -> Iterator[tuple[str, tuple[int, ...]]]:
    d, hd = a.hidden_size, a.head_dim
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


def load_dense(ckpt: Checkpoint, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """All RAM-resident tensors, converted to ``dtype``, shapes checked."""
    return {name: ckpt.get(name, shape).to(dtype).contiguous()
            for name, shape in dense_tensor_shapes(ckpt.args)}  # fmt: skip
