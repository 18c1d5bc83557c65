"""Builds and loads the native q4/q8 decode kernels (``native.cpp`` and its row kernels
``native_q4.cpp``, ``native_q8.cpp``, ``native_int8.cpp`` for experts, ``native_dense.cpp`` for
the quantized dense weights, ``native_batch.cpp`` for the batched decode step) as torch custom
ops, one library.

The C++ source is compiled on first use with the system C++ compiler (``$CXX``, else ``g++``)
against the installed torch, into the project's cache directory (``$MER_CACHE_DIR``, else
``$XDG_CACHE_HOME/micro-expert-router``, else ``~/.cache/micro-expert-router``) under a name
keyed by a hash of the sources (and the local headers they ``#include "..."``), the compile
command and the torch version, so a new source or torch never loads a stale library. The build
writes to a temporary name and renames, so concurrent first uses do not see a half-written file.
There is no ninja or setuptools step.

The ops use torch's own thread pool (``at::parallel_for``, OpenMP in torch's CPU wheels), linked
against the ``libgomp`` torch ships, so there is no second OpenMP runtime. The
AVX-512 and AVX2 code is compiled with per-function target attributes and chosen at run time, so
the library runs on any x86-64; elsewhere only the portable scalar code is built.

``available()`` is ``False`` (and the formats keep torch's int4/int8 ops) when ``MER_NATIVE=0``,
when the build fails (one warning naming the reason), or when the CPU has neither AVX-512 nor
AVX2 + FMA (then the scalar C++ code would be slower than torch's vectorised kernels; tests still
run it via ``isa=0``). The ops themselves are called by ``quant.py``'s ``accumulate`` methods and
``experts.py``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from ..paths import cache_dir

SOURCE = Path(__file__).with_name("native.cpp")  # the expert ops (q4/q8 SwiGLU)
SOURCES = (
    SOURCE,
    *(SOURCE.with_name(f"native_{part}.cpp") for part in ("q4", "q8", "int8")),  # row kernels
    SOURCE.with_name("native_dense.cpp"),  # the dense GEMV ops
    SOURCE.with_name("native_dense_vnni.cpp"),  # their q4 rows with AVX-512 VNNI
    SOURCE.with_name("native_batch.cpp"),  # batched decode: experts on token subsets, combine
    SOURCE.with_name("native_dequant.cpp"),  # q4 experts -> float32, for the prefill GEMM
    SOURCE.with_name("native_vnni.cpp"),  # the q4 int8 rows with AVX-512 VNNI
)
# -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers; the library
# links torch's own libgomp (torch/lib), so the process keeps one OpenMP runtime.
FLAGS = ["-O3", "-std=c++17", "-shared", "-fPIC", "-fopenmp", "-ffp-contract=off", "-w"]


class NativeInfo:
    """What happened when the library was loaded (for benchmarks and messages)."""

    path: Path | None = None
    build_seconds: float | None = None  # None: loaded from the cache
    reason: str = ""  # why it is not available, when it is not


INFO = NativeInfo()


def _command(out: Path, sources: tuple[Path, ...] | None = None) -> list[str]:
    sources = sources or SOURCES
    from torch.utils.cpp_extension import include_paths, library_paths

    cxx = os.environ.get("CXX", "g++")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    libs = library_paths()
    cmd = [cxx, *FLAGS, f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
    cmd += [f"-I{p}" for p in include_paths()]
    cmd += [str(src) for src in sources] + ["-o", str(out)]
    cmd += [f"-L{p}" for p in libs] + ["-lc10", "-ltorch_cpu", "-lgomp"]
    cmd += [f"-Wl,-rpath,{p}" for p in libs]
    return cmd


def _headers(sources: tuple[Path, ...]) -> list[Path]:
    """The local headers (``#include "name"``, next to the source) the sources include."""
    found: list[Path] = []
    for src in sources:
        for name in re.findall(r'^\s*#\s*include\s+"([^"]+)"', src.read_text(), re.M):
            path = src.with_name(name)
            if path not in found:
                found.append(path)
    return found


def library_path(sources: tuple[Path, ...] | None = None) -> Path:
    """Where the built library for these sources (default: the q4/q8 and dense ops), the
    headers they include, compiler flags and torch lives."""
    sources = sources or SOURCES
    files = [*sources, *_headers(sources)]
    h = hashlib.sha256(b"".join(f.read_bytes() for f in files if f.is_file()))
    cxx = os.environ.get("CXX", "g++")
    key = [torch.__version__, sys.platform, platform.machine(), cxx, *FLAGS]
    h.update("\0".join(key).encode())
    return cache_dir() / "native" / f"mer_{sources[0].stem}_{h.hexdigest()[:16]}.so"


def build(path: Path, sources: tuple[Path, ...] | None = None) -> float:
    """Compile to ``path`` (atomically); returns the seconds it took. Raises on failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    t = time.perf_counter()
    try:
        run = subprocess.run(_command(Path(tmp), sources), capture_output=True, text=True)
        if run.returncode:
            raise RuntimeError(f"compiler failed: {run.stderr.strip()[-2000:]}")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return time.perf_counter() - t


@functools.cache
def load_library(sources: tuple[Path, ...], what: str, fallback: str) -> NativeInfo | None:
    """Build (if needed) and load the ops of ``sources`` (one library); the ``NativeInfo`` when
    loaded.

    Never raises: a failure (or ``MER_NATIVE=0``) returns ``None`` and warns once, naming
    ``what`` the library holds and the ``fallback`` the engine uses instead.
    """
    info = NativeInfo()
    if os.environ.get("MER_NATIVE", "1") == "0":
        return None
    try:
        path = library_path(sources)
        if not path.is_file():
            info.build_seconds = build(path, sources)
        torch.ops.load_library(str(path))
        info.path = path
        return info
    except Exception as e:  # no compiler, no headers, a link error: keep the torch path
        warnings.warn(
            f"micro_expert_router: the native {what} could not be built or loaded "
            f"({type(e).__name__}: {e}); using {fallback} instead. Install a C++ compiler "
            "(e.g. `apt-get install g++`, or set $CXX), or set MER_NATIVE=0 to skip the "
            "native kernels.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


@functools.cache
def load() -> bool:
    """Load the q4/q8 ops into ``torch.ops.mer`` (building them first if needed); ``True`` if
    loaded. Never raises: a failure leaves the torch-op path in use and warns once.
    """
    if os.environ.get("MER_NATIVE", "1") == "0":
        INFO.reason = "disabled by MER_NATIVE=0"
        return False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        info = load_library(
            SOURCES, "q4/q8 kernels", "torch's int4/int8 ops, which are slower for decode"
        )
    for w in caught:
        INFO.reason = str(w.message)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if info is None:
        return False
    INFO.path, INFO.build_seconds = info.path, info.build_seconds
    return True


@functools.cache
def dense_available() -> bool:
    """Whether the dense q8/q4 GEMV ops should be used: loaded, and an AVX2+FMA CPU (their
    scalar code is slower than dequantize + GEMM)."""
    return load() and bool(torch.ops.mer.has_avx2())


@functools.cache
def has_avx512() -> bool:
    return load() and bool(torch.ops.mer.has_avx512())


@functools.cache
def has_avx512_bf16() -> bool:
    return load() and bool(torch.ops.mer.has_avx512_bf16())


@functools.cache
def has_avx2_fma() -> bool:
    return load() and bool(torch.ops.mer.has_avx2_fma())


def available() -> bool:
    """Whether the formats should use the native expert ops: loaded, and an AVX-512 or
    AVX2 + FMA CPU (elsewhere the scalar C++ code is slower than torch's ops)."""
    if not load():
        return False
    if not (has_avx512() or has_avx2_fma()):
        INFO.reason = (
            "this CPU has neither AVX-512 nor AVX2 + FMA (the scalar C++ code is slower "
            "than torch's ops)"
        )
        return False
    return True


@functools.cache  # called per layer and expert call on the decode path
def q4_block_rows() -> int | None:
    """Rows per block of torch's int4 packing on this CPU that the native q4 code decodes with
    SIMD ("n64": 64 on AVX-512, "n32": 32 on AVX2), or None (another packing: torch's ops)."""
    from .quant import int4_layout

    return {"n64": 64, "n32": 32}.get(int4_layout())
