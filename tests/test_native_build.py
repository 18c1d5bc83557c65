"""Building and loading the native kernels (kernels/native.py), apart from the kernels' own
tests so that it runs everywhere: the fallback tests are meant for machines without a compiler,
where tests/test_native_kernels.py skips as a whole.

- ``MER_NATIVE=0`` keeps torch's int4/int8 ops, without a warning;
- a failed build warns once, naming the compiler, and falls back;
- the built library is keyed by the source, the flags and torch's version, so a new source or
  torch never loads a stale library.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch

from micro_expert_router.kernels import native

FALLBACK = """
import warnings, torch
warnings.simplefilter("always")
from micro_expert_router.kernels import native
from micro_expert_router.kernels.formats import FORMATS, expert_forward
fmt = FORMATS["q8"]  # q8 asks for the library on any CPU (q4 only in the n64 layout)
d, g = 64, 64
buf = fmt.pack(torch.randn(g, d), torch.randn(g, d), torch.randn(d, g), g)
x = torch.randn(1, d)
with warnings.catch_warnings(record=True) as caught:
    y = expert_forward(fmt, x, [fmt.view(buf, d, g)])
    y2 = expert_forward(fmt, x, [fmt.view(buf, d, g)])
ref = fmt.partials(x, fmt.view(buf, d, g))
assert torch.equal(y, next(ref)) and torch.equal(y, y2)
print(native.available(), len([w for w in caught if "native" in str(w.message)]))
print(native.INFO.reason)
for w in caught:
    print(w.message)
"""


def run_fallback(env: dict[str, str]) -> list[str]:
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(FALLBACK)],
                         env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    return run.stdout.splitlines()


def test_mer_native_0_uses_the_torch_ops_without_warning():
    out = run_fallback({"MER_NATIVE": "0"})
    assert out[0] == "False 0" and "MER_NATIVE=0" in out[1]


def test_build_failure_warns_once_and_falls_back(tmp_path):
    out = run_fallback({"MER_CACHE_DIR": str(tmp_path), "CXX": str(tmp_path / "no-such-g++")})
    assert out[0] == "False 1"
    assert "no-such-g++" in out[1] and "g++" in out[2] and "MER_NATIVE=0" in out[2]


def test_library_is_cached_by_source_and_torch(tmp_path, monkeypatch):
    path = native.library_path()
    assert path.parent == native.cache_dir() / "native" and path.name.startswith("mer_native_")
    if native.load():  # what was loaded is the library for this source and torch
        assert path.is_file() and native.INFO.path == path
    # another torch version: another name
    monkeypatch.setattr(torch, "__version__", torch.__version__ + "+other")
    other_torch = native.library_path()
    monkeypatch.undo()
    # another source: another name
    src = tmp_path / "native.cpp"
    src.write_bytes(native.SOURCE.read_bytes() + b"\n// changed\n")
    monkeypatch.setattr(native, "SOURCES", (src, *native.SOURCES[1:]))
    other_source = native.library_path()
    monkeypatch.undo()
    assert len({path, other_torch, other_source}) == 3
    assert native.library_path() == path  # and nothing else moves it
