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


def test_io_cost_bench_prints_latency_and_cpu_per_gb(tmp_path, monkeypatch, capsys):
    run_main(load_bench("io_cost"), monkeypatch, "--dir", str(tmp_path), "--size-gib", "0.004",
             "--configs", "2x1,1x1", "--reads", "2", "--expert-bytes", "300000", "--json",
             str(tmp_path / "c.jsonl"))  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert sum("single read median" in line and "s/GB" in line for line in out) == 2
    assert out[-1].startswith("ratio CPU s/GB")


def test_gil_bench_runs_the_op_beside_the_loop(monkeypatch, capsys):
    run_main(load_bench("gil"), monkeypatch, "--shape", "128x256", "--seconds", "0.2",
             "--rounds", "1")  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    calls = float(out[1].split("(")[1].split(" expert calls")[0])
    assert calls > 0 and out[-1].startswith("ratio with op / alone")


def test_planner_bench_counts_quality_and_times_large_plans(tmp_path, monkeypatch, capsys):
    run_main(load_bench("planner"), monkeypatch, "--seeds", "7", "--per-seed", "3", "--layers",
             "6", "--rounds", "1", "--out", str(tmp_path / "p.jsonl"))  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("seed 7: 3 instances") and "converged" in out[1]
    assert out[-2].startswith("quality: 3 instances") and out[-1].startswith("runtime medians")


def test_threads_bench_alternates_thread_counts(monkeypatch, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        run_main(load_bench("threads"), monkeypatch, "--tokens", "3", "--rounds", "1")
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out[:2]] == ["round 1 threads 1", "round 1 threads 2"]
    assert out[-1].startswith("ratio 2 threads / 1 thread")


def test_expert_kernels_bench_prints_the_ratio_to_dram(monkeypatch, capsys):
    from micro_expert_router.kernels import native

    if not native.available():  # the bench measures the native kernels only
        import pytest

        pytest.skip(f"native kernels unavailable: {native.INFO.reason}")
    run_main(load_bench("expert_kernels"), monkeypatch, "--hidden", "128", "--inter", "128",
             "--rounds", "2", "--rotate-mb", "1", "--dram-mb", "8", "--tokens", "1,3")  # fmt: skip
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("round ") for line in out) == 2
    assert sum("int8 / f32 speedup" in line for line in out) == 4  # q4, q8 x T = 1, 3
    assert out[-1].startswith("expert decode ratio") and "lowest median" in out[-1]
