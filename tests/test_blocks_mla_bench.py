"""bench/mla_decode.py runs on small sizes and prints its table and ratio line (the figures are
measured on an idle machine, docs/benchmarks.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "mla_decode.py"


def test_mla_decode_bench_prints_table_and_ratio(monkeypatch, capsys):
    import torch

    spec = importlib.util.spec_from_file_location("bench_mla_decode", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    threads = torch.get_num_threads()
    monkeypatch.setattr(sys, "argv", ["mla_decode.py", "--contexts", "16,48", "--layers", "1",
                                      "--hidden", "64", "--heads", "2", "--rounds", "1",
                                      "--steps", "1"])  # fmt: skip
    try:
        assert mod.main() == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert "KV 2304 bytes/token" in out[0]  # (512 + 64) x 1 layer x 4 bytes
    errs = [float(line.rsplit(" ", 1)[1]) for line in out if "relative L2" in line]
    assert len(errs) == 2 and max(errs) < 1e-5
    assert out[-1].startswith("ratio expanded/absorbed at context 48:")
