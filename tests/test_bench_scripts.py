"""The benchmark scripts under bench/ run on small sizes and report what they should (the
figures themselves are measured on an idle machine; see each script's docstring)."""

from __future__ import annotations

import errno
import importlib.util
import os
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def load_bench(name: str):
    """bench/NAME.py as a module (bench/ is not a package; io.py would shadow the stdlib)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_main(mod, monkeypatch, *argv: str) -> None:
    monkeypatch.setattr(sys, "argv", [f"{mod.__name__}.py", *argv])
    assert mod.main() == 0


def test_io_bench_warns_when_o_direct_is_refused(tmp_path, monkeypatch, capsys):
    io_bench = load_bench("io")
    real_open = os.open

    def no_direct(path, flags, *args):  # a filesystem that refuses O_DIRECT at open
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    run_main(io_bench, monkeypatch, "--dir", str(tmp_path), "--size-gib", "0.004", "--rounds",
             "1", "--expert-bytes", "300000", "--json", str(tmp_path / "io.jsonl"))  # fmt: skip
    out = capsys.readouterr().out
    assert out.count("WARNING: O_DIRECT refused") == 1, out
    assert "ratio ours/dd" in out.splitlines()[-1]
