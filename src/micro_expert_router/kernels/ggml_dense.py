"""Dense (RAM-resident) matrices kept in their GGUF block type: ``GGMLDense`` implements the
``DenseWeight`` protocol of ``dense.py`` for every type of ``ggml.TYPES``.

``linear`` runs the native block kernel (``ggml_native.cpp``) for decode-sized batches of the
types that have one; otherwise it dequantizes ``ROWS`` rows at a time (so the temporary stays
small even for an embedding-sized matrix) and multiplies in the activations' dtype. ``rows``
dequantizes only the rows asked for (the embedding gather).

Legend: T tokens, N rows (output features), K reduction length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from . import ggml_native
from .ggml import BlockType, dequantize

ROWS = 4096  # rows dequantized at a time on the torch path


class GGMLDense:
    """An ``[N, K]`` matrix as GGUF block rows ``raw [N, row_bytes]`` uint8."""

    native_below = 16  # tokens: below this, the native kernel (when the type has one)

    def __init__(self, t: BlockType, raw: torch.Tensor, shape: tuple[int, int]) -> None:
        n, k = shape
        if raw.dtype != torch.uint8 or tuple(raw.shape) != (n, t.row_bytes(k)):
            raise ConfigError(f"{t.name} matrix {list(shape)} needs uint8 rows [{n}, "
                              f"{t.row_bytes(k)}], got {raw.dtype} {list(raw.shape)}")  # fmt: skip
        self.type = t
        self.raw = raw.contiguous()
        self.shape = (n, k)

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.type, self.raw, self.shape[1])  # [N, K]

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return dequantize(self.type, self.raw[ids], self.shape[1]).to(dtype)  # [T, K]

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.shape
        if x.dim() != 2 or x.shape[1] != k:
            raise ConfigError(f"activations must be [T, {k}], got {tuple(x.shape)}")
        if (x.shape[0] < self.native_below and self.type.name in ggml_native.NATIVE_TYPES
                and ggml_native.available()):  # fmt: skip
            y = torch.empty((x.shape[0], n), dtype=torch.float32)
            isa = ggml_native.isa_for(x.dtype, (self.type,))
            torch.ops.mer_ggml.linear_(y, x.float().contiguous(), self.raw, self.type.id, isa)
            return y.to(x.dtype)  # [T, N]
        parts = [F.linear(x, dequantize(self.type, self.raw[r : r + ROWS], k).to(x.dtype))
                 for r in range(0, n, ROWS)]  # fmt: skip
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # [T, N]
