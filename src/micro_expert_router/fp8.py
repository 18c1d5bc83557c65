"""Block-wise FP8 checkpoints (DeepSeek-V3's official release and the checkpoints that copy it).

Such a checkpoint stores each quantized linear weight ``W [N, K]`` as float8 (e4m3) together with
``W_scale_inv [ceil(N/bn), ceil(K/bk)]`` (float32): one factor per ``bn x bk`` block, the last
block of a dimension that is not a multiple of the block size being short. ``config.json``
describes it::

    "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                            "weight_block_size": [128, 128], "activation_scheme": "dynamic"}

The weight the model computes with is ``W[i, k] = float(q[i, k]) * scale_inv[i // bn, k // bk]``
(the name notwithstanding, the factor multiplies). MER does not compute in FP8: the checkpoint
reader dequantizes each such tensor to float32 when it is read, which is exact (an e4m3 value
times a float32 factor is one float32 rounding), and the converter or the resident loader then
stores it in the chosen format. ``activation_scheme`` concerns activations, which MER keeps in
full precision, so it is not used. This module owns the config parsing and the dequantization;
``checkpoint.py`` finds the tensors.

Legend: N output rows, K input columns, bn x bk block, sn x sk blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import CheckpointError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = "_scale_inv"  # "x.weight" -> "x.weight_scale_inv"


@dataclass(frozen=True)
class BlockFp8:
    """The ``quantization_config`` of a block-wise FP8 checkpoint."""

    fmt: str  # "e4m3" (DeepSeek-V3) or "e5m2"
    block: tuple[int, int]  # (bn, bk): rows x columns per scale factor

    def note(self, folder: object) -> str:
        bn, bk = self.block
        return (
            f"note: {folder} holds block-wise FP8 weights ({self.fmt}, {bn}x{bk} blocks with "
            "weight_scale_inv); MER dequantizes them to float32 as it reads them (exact: one "
            "multiply per weight) and then uses the format you chose"
        )


def parse_quantization(cfg: dict[str, Any], where: str) -> BlockFp8 | None:
    """The FP8 description in a config.json dict, ``None`` when it has no FP8
    ``quantization_config``; ``CheckpointError`` for an FP8 config MER cannot read."""
    q = cfg.get("quantization_config")
    if not isinstance(q, dict) or q.get("quant_method") != "fp8":
        return None  # unquantized, or another method (whose tensors are checked when read)
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "e5m2"):
        raise CheckpointError(f"{where}: quantization_config fmt {fmt!r} is not e4m3 or e5m2")
    block = q.get("weight_block_size", [128, 128])
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{where}: quantization_config weight_block_size {block!r} is not two positive "
            "integers (rows, columns), e.g. [128, 128]"
        )
    return BlockFp8(fmt, (block[0], block[1]))


def dequantize_blockwise(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], name: str
) -> torch.Tensor:
    """float8 ``q [N, K]`` times its per-block factors ``scale_inv [sn, sk]`` -> float32 ``[N, K]``.

    ``sn = ceil(N / bn)`` and ``sk = ceil(K / bk)``: edge blocks are short, not padded.
    """
    if q.dim() != 2:
        raise CheckpointError(f"FP8 tensor {name} has shape {list(q.shape)}; expected 2-D [N, K]")
    n, k = q.shape
    bn, bk = block
    sn, sk = -(-n // bn), -(-k // bk)
    if tuple(scale_inv.shape) != (sn, sk):
        raise CheckpointError(
            f"FP8 tensor {name} [{n}, {k}] with {bn}x{bk} blocks needs a {name}{SCALE_SUFFIX} of "
            f"shape [{sn}, {sk}], found {list(scale_inv.shape)}"
        )
    if not scale_inv.is_floating_point() or scale_inv.dtype in FP8_DTYPES:
        raise CheckpointError(
            f"{name}{SCALE_SUFFIX} has dtype {scale_inv.dtype}; expected float32 or bfloat16"
        )
    s = scale_inv.float().repeat_interleave(bn, dim=0)[:n]  # [N, sk]: each row's factors
    w = q.float()  # [N, K]
    kf = (k // bk) * bk  # columns in whole blocks; the rest is the short edge block
    if kf:
        w[:, :kf].unflatten(1, (k // bk, bk)).mul_(s[:, : k // bk, None])  # [N, K/bk, bk] view
    if kf < k:
        w[:, kf:].mul_(s[:, -1:])
    return w
