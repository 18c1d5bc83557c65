"""Builds and loads the native GGUF block kernels (``ggml_native.cpp``: the ops;
``ggml_blocks.cpp``: the block decoders and row dots; one library) as the torch ops
``torch.ops.mer_ggml.swiglu_`` (a segment of a ``gguf:`` expert) and ``linear_`` (a dense GGUF
matrix), by the same compile-on-first-use mechanism as ``native.py``.

Native kernels exist for Q4_0, Q8_0, MXFP4, Q4_K, Q5_K and Q6_K (AVX2 + FMA + F16C chosen at run
time, AVX-512 VNNI row dots for Q4_K and Q6_K where the CPU has them, and a portable scalar path
giving the same bits); the float types and Q4_1/Q5_0/Q5_1 use
the dequantize + torch path. With float32 activations (the engine's float32 mode) the kernels
compute in float32. With bfloat16 activations they round the activations to int8 per weight
block (256 for the K-quants, 32 otherwise; one float scale each, as llama.cpp's Q8_K and Q8_0)
and multiply with integer dot products (``isa_for`` picks): bf16 activations already carry 8
significant bits, and float FMAs cannot decode 4-6-bit weights as fast as DRAM delivers them.
``available()`` is ``False`` when ``MER_NATIVE=0``, when the build fails (one warning), or when
the CPU lacks AVX2.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

from .native import NativeInfo, load_library

SOURCE = Path(__file__).with_name("ggml_native.cpp")
SOURCES = (SOURCE, *(SOURCE.with_name(f"ggml_{p}.cpp") for p in ("blocks", "kquant", "kquant512")))
NATIVE_TYPES = frozenset({"Q4_0", "Q8_0", "MXFP4", "Q4_K", "Q5_K", "Q6_K"})
INT8_TYPES = NATIVE_TYPES  # types with an int8-activation path
INFO = NativeInfo()


@functools.cache
def load() -> bool:
    """Load the ops into ``torch.ops.mer_ggml`` (building first if needed); never raises."""
    if os.environ.get("MER_NATIVE", "1") == "0":
        INFO.reason = "disabled by MER_NATIVE=0"
        return False
    info = load_library(SOURCES, "GGUF block kernels",
                        "dequantize + torch matmul, which is slower for decode")  # fmt: skip
    if info is None:
        INFO.reason = "the build or load failed (see the warning)"
        return False
    INFO.path, INFO.build_seconds = info.path, info.build_seconds
    return True


@functools.cache
def available() -> bool:
    """Whether the formats should use the native ops: loaded, and an AVX2 + FMA CPU."""
    if not load():
        return False
    if not bool(torch.ops.mer_ggml.has_avx2()):
        INFO.reason = "this CPU has no AVX2 (the scalar code is slower than torch's matmul)"
        return False
    return True


def isa_for(dtype: torch.dtype, types) -> int:
    """The kernel variant for activations of ``dtype`` over these block types: 1 (AVX2,
    float32 activations) or 2 (int8 activations: bfloat16 mode; AVX-512 VNNI where the CPU and
    the type have it, else AVX2). The ops also take 0 and 3 (the scalar code, float32 and int8)
    and 4 (AVX2 int8 even on an AVX-512 CPU), which the tests compare."""
    if dtype == torch.bfloat16 and all(t.name in INT8_TYPES for t in types):
        return 2
    return 1
