"""GPT-OSS experts from a GGUF file into the store's GPT-OSS expert formats.

llama.cpp's converter writes a GPT-OSS layer's experts as ``ffn_gate_exps`` / ``ffn_up_exps``
``[E, I, D]`` and ``ffn_down_exps`` ``[E, D, I]`` (the checkpoint's interleaved gate_up rows
split into gate and up), each with a ``.bias`` (``[E, I]``, ``[E, D]``), and keeps the official
MXFP4 blocks in GGUF's MXFP4 layout: per 32 weights, the e8m0 exponent byte, then 16 bytes with
weight i in the low nibble of byte i and weight i + 16 in its high nibble
(``transform_nibble_layout``).

The ``mxfp4`` expert format (``kernels/mxfp4.py``: biases, the clamped SwiGLU and a native kernel)
holds the checkpoint's layout instead: gate and up rows interleaved, weights 2k and 2k + 1 in
byte k, exponents apart. ``raw_expert`` turns one expert's GGUF bytes into it: the same codes and
exponents, only moved (``kernels.mxfp4.to_ggml`` is the inverse, which the tests check byte for
byte), so the store is lossless. Experts in F32, F16 or BF16 go to ``gptoss:f32`` /
``gptoss:bf16`` (exact); other types are refused with a named error.

Legend: E experts, I intermediate, D hidden, B blocks of 32 per row.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..errors import GGUFError, StoreError
from ..kernels.biased import Biased, BiasedExpert
from ..kernels.ggml import dequantize
from ..kernels.mxfp4 import MXFP4, RawExpert
from .experts import Packed
from .format import checksum
from .gguf_file import GGUFFile, TensorInfo
from .gguf_model import expert_tensors

FLOATS = ("F32", "F16", "BF16")


def _blocks(data: Any, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GGUF MXFP4 rows -> checkpoint blocks ``[rows, B, 16]`` and exponents ``[rows, B]``."""
    b = np.frombuffer(data, dtype=np.uint8).reshape(rows, -1, 17)
    qs = b[..., 1:]  # [rows, B, 16]: byte i = weight i | weight i + 16 << 4
    codes = np.concatenate([qs & 15, qs >> 4], axis=-1)  # [rows, B, 32] in order
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # byte k = weight 2k | 2k + 1 << 4
    return torch.from_numpy(np.ascontiguousarray(blocks)), torch.from_numpy(b[..., 0].copy())


def _bias(gf: GGUFFile, weight: TensorInfo, e: int, n: int) -> torch.Tensor:
    """Row ``e`` (``n`` values) of the ``.bias`` next to stacked expert tensor ``weight``."""
    t = gf.tensor(weight.name.removesuffix(".weight") + ".bias")
    bt = t.supported()
    if bt.name not in FLOATS or tuple(t.shape[-1:]) != (n,):
        raise GGUFError(f"{t.path}: tensor {t.name} is {t.type_name} {list(t.shape)}, expected "
                        f"float rows of {n}")  # fmt: skip
    row = bt.row_bytes(n)
    raw = torch.frombuffer(bytearray(gf.read(t, e * row, row)), dtype=torch.uint8).view(1, -1)
    return dequantize(bt, raw, n)[0]


def expert_format(gf: GGUFFile, args: Any) -> MXFP4 | Biased:
    """The store format for the file's GPT-OSS experts (every MoE layer's must agree)."""
    kinds = set()
    for layer in range(args.n_layers):
        for t, _, _ in expert_tensors(gf, layer, 0, args):
            t.supported()
            kinds.add("mxfp4" if t.type_name == "MXFP4" else
                      "bf16" if t.type_name == "BF16" else
                      "f32" if t.type_name in FLOATS else t.type_name)  # fmt: skip
    a, lim = args.swiglu_alpha, args.swiglu_limit
    if kinds == {"mxfp4"}:
        return MXFP4(a, lim)
    if kinds <= {"f32", "bf16"}:
        return Biased("bf16" if kinds == {"bf16"} else "f32", a, lim)
    raise GGUFError(f"{gf.path}: GPT-OSS experts in {', '.join(sorted(kinds))}: MER keeps them "
                    "as MXFP4 (all of gate, up and down) or F32/F16/BF16")  # fmt: skip


class GptOssPacker:
    """One GPT-OSS expert's GGUF bytes (from ``gguf_convert._ExpertReader``) and biases into
    the store format, and its checksum (runs on the packer threads)."""

    def __init__(self, gf: GGUFFile, fmt: MXFP4 | Biased, args: Any, group: int,
                 per_expert: int, release) -> None:  # fmt: skip
        self.gf, self.fmt, self.args, self.group = gf, fmt, args, group
        self.per_expert, self.release = per_expert, release

    def expert(self, key: tuple[int, int], parts: tuple, types: tuple[str, ...]):
        layer, e = key
        d, n = self.args.hidden_size, self.args.expert_inter
        tensors = [t for t, _, _ in expert_tensors(self.gf, layer, e, self.args)]
        gb, ub, db = (_bias(self.gf, t, e, m) for t, m in zip(tensors, (n, n, d), strict=True))
        if isinstance(self.fmt, MXFP4):
            (g, gs), (u, us), (dn, ds) = (_blocks(p, r) for p, r in zip(parts, (n, n, d),
                                                                          strict=True))  # fmt: skip
            return RawExpert(torch.stack([g, u], 1).view(2 * n, -1, 16),
                             torch.stack([gs, us], 1).view(2 * n, -1), dn, ds,
                             torch.stack([gb, ub], 1).view(2 * n), db)  # fmt: skip
        w = [dequantize(t.supported(), torch.frombuffer(bytearray(p), dtype=torch.uint8)
                        .view(r, -1), k)
             for t, p, r, k in zip(tensors, parts, (n, n, d), (d, d, n), strict=True)]  # fmt: skip
        return BiasedExpert(w[0], w[1], w[2], gb, ub, db)

    def __call__(self, i: int, key: tuple[int, int], read) -> Packed:
        parts, types = read
        try:
            w = self.expert(key, parts, types)
        finally:
            del parts
            self.release(key)  # the parts were copied: the read buffer may be reused
        if isinstance(self.fmt, MXFP4):
            data = self.fmt.pack_raw(w, self.group).numpy()
        else:
            data = self.fmt.pack_expert(w, self.group).numpy()
        if len(data) != self.per_expert:
            raise StoreError(f"expert ({key[0]}, {key[1]}) packed into {len(data)} bytes, "
                             f"expected {self.per_expert}")  # fmt: skip
        return Packed(data, checksum(data), None)
