"""Builds and loads the native GGUF block kernels (``ggml_native.cpp``) as the torch ops
``torch.ops.mer_ggml.swiglu_`` (a segment of a ``gguf:`` expert) and ``linear_`` (a dense GGUF
matrix), by the same compile-on-first-use mechanism as ``native.py``.

Native kernels exist for Q4_K, Q6_K and Q8_0 (AVX2 + FMA, chosen at run time) and Q5_K (portable
scalar code); the other block types use the dequantize + torch path. ``available()`` is
``False`` when ``MER_NATIVE=0``, when the build fails (one warning), or when the CPU lacks AVX2.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from .native import NativeInfo, load_library

SOURCE = Path(__file__).with_name("ggml_native.cpp")
NATIVE_TYPES = frozenset({"Q4_K", "Q5_K", "Q6_K", "Q8_0"})
INFO = NativeInfo()


@functools.cache
def load() -> bool:
    """Load the ops into ``torch.ops.mer_ggml`` (building first if needed); never raises."""
    return load_library(SOURCE, "mer_ggml", INFO, "GGUF block kernels")


@functools.cache
def available() -> bool:
    """Whether the formats should use the native ops: loaded, and an AVX2 + FMA CPU."""
    if not load():
        return False
    if not bool(torch.ops.mer_ggml.has_avx2()):
        INFO.reason = "this CPU has no AVX2 (the scalar code is slower than torch's matmul)"
        return False
    return True
