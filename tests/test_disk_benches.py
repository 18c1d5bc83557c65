"""The disk benches (bench/disk_busy.py, bench/defaults_sweep.py) run end to end on a small
store and print what they promise (their figures are measured on an idle machine)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from hf_models import save_hf_model

from micro_expert_router.store import convert

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmoe")
    save_hf_model("olmoe", root / "ckpt")
    return convert(root / "ckpt", root / "store", progress=False, log=None)


def load_bench(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_disk_busy_bench_runs_on_a_small_store(store, monkeypatch, capsys):
    mod = load_bench("disk_busy")
    argv = ["disk_busy.py", "--store", str(store.path), "-n", "3", "--limit", "4G",
            "--no-drop", "--bw-mib", "1", "--bw-read-mib", "1", "--prompt-tokens", "16",
            "--measure-resident",
            "--options", json.dumps({"cache_bytes": 2 * store.expert_bytes})]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert mod.main() == 0
    lines = capsys.readouterr().out.strip().splitlines()
    row = json.loads(lines[0])
    assert row["bw_mb_s"] > 0 and row["bytes_read"] > 0 and 0 < row["disk_busy"]
    assert 0 <= row["busy_frac"] <= 1.0 + 1e-6
    assert row["prefill"]["bytes_read"] > 0 and row["prefill"]["vs_disk_bound"] > 0
    assert lines[-1].startswith("ratio: disk busy during decode")
    assert "min(disk, compute)" in lines[-1]


def test_defaults_sweep_prints_a_table_and_winners(store, monkeypatch, capsys):
    mod = load_bench("defaults_sweep")
    argv = ["defaults_sweep.py", "--store", str(store.path), "--limit", "4G", "-n", "2",
            "--prompt-tokens", "4", "--repeats", "1", "--policies", "lru,lfu",
            "--prefetch-spec", "s", "--io-threads", "1,2", "--chunk-kib", "64,1024"]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert mod.main() == 0
    out = capsys.readouterr().out.strip().splitlines()
    rows = [json.loads(line) for line in out if line.startswith("{")]
    assert len(rows) == 2 + 2 + 2 + 2  # one factor at a time, two values each
    assert {r["chunk_kib"] for r in rows} == {64, 1024} and all(r["decode_tps"] > 0 for r in rows)
    assert sum("**(chosen)**" in line for line in out) == 1
    assert out[-1].startswith("winners (policy | prefetch | I/O threads | chunk KiB): gates: ")
