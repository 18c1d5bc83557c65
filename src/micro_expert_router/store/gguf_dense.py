"""Loading a store's dense tensors kept in their GGUF types (``dense.gguf``, written by
``gguf_convert.py``; the manifest's dense section has ``"format": "gguf"``).

Plain float tensors (F32, F16, BF16: norms, biases, and matrices stored unquantized) become
torch tensors in the engine's dtype (F16 and BF16 are exact in float32; in bfloat16 mode F16 is
rounded). Quantized matrices stay in their blocks as ``GGMLDense`` (``kernels/ggml_dense.py``),
which the forward pass reaches only through ``kernels.dense.linear`` / ``embedding``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..checkpoint import dense_tensor_shapes
from ..errors import StoreError
from ..kernels.ggml import dequantize
from ..kernels.ggml_dense import GGMLDense
from .gguf_file import GGUFFile

PLAIN = ("F32", "F16", "BF16")


def load_gguf_dense(store: Any, dtype: torch.dtype) -> dict[str, Any]:
    """Every dense tensor of ``store`` (a ``Store``), by HuggingFace name."""
    gf = GGUFFile(store.dense_file)
    out: dict[str, Any] = {}
    for name, shape in dense_tensor_shapes(store.args):
        t = gf.tensors.get(name)
        if t is None:
            raise StoreError(f"{store.dense_file}: tensor {name} is missing; reconvert")
        bt = t.supported()
        numel = 1
        for s in shape:
            numel *= s
        if tuple(t.shape) != tuple(shape) and t.nbytes != bt.row_bytes(shape[-1]) * (
            numel // shape[-1]
        ):
            raise StoreError(f"{store.dense_file}: tensor {name} has shape {list(t.shape)}, "
                             f"expected {list(shape)}")  # fmt: skip
        rows = numel // shape[-1]
        raw = torch.frombuffer(bytearray(gf.read(t)), dtype=torch.uint8).view(rows, -1)
        if bt.name in PLAIN or len(shape) == 1:
            out[name] = dequantize(bt, raw, shape[-1]).view(shape).to(dtype).contiguous()
        else:
            out[name] = GGMLDense(bt, raw, (shape[0], shape[1]))
    return out
