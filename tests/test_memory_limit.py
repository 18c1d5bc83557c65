"""The memory limit: size parsing, cgroup detection (v1 and v2 layouts), the split of the limit
into fixed costs and the expert cache, the errors, and (slow, root only) real runs in a cgroup-v1
memory group at several limits: never OOM-killed, peak usage within the limit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import micro_expert_router as mer
from micro_expert_router import memory
from micro_expert_router.errors import BudgetError, ConfigError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("text,expect", [
    ("2.5G", 2_500_000_000), ("1800M", 1_800_000_000), ("512MiB", 512 * 2**20),
    ("1GiB", 2**30), ("123", 123), (4096, 4096), (" 3 k ", 3000), ("0.5GB", 500_000_000),
    ("1.5e9", 1_500_000_000), ("2Gi", 2 * 2**30),
])  # fmt: skip
def test_parse_size(text, expect):
    assert memory.parse_size(text) == expect


@pytest.mark.parametrize("bad", ["", "G", "2.5X", "-1G", "0", 0, -5, "1e", True, "nan", "2 G B"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        memory.parse_size(bad)


def test_engine_config_parses_memory_limit():
    from micro_expert_router.config import EngineConfig

    assert EngineConfig(memory_limit="1.5G").memory_limit == 1_500_000_000
    with pytest.raises(ConfigError, match="not a size"):
        EngineConfig(memory_limit="lots")


def _write(p: Path, text: str) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_cgroup_v1_limit_smallest_on_the_path(tmp_path):
    root = tmp_path / "cg"
    proc = tmp_path / "proc-cgroup"
    _write(proc, "9:name=systemd:/\n4:memory:/outer/inner\n0::/\n")
    unlimited = "9223372036854771712\n"
    _write(root / "memory" / "memory.limit_in_bytes", unlimited)
    _write(root / "memory" / "outer" / "memory.limit_in_bytes", "700000000\n")
    _write(root / "memory" / "outer" / "inner" / "memory.limit_in_bytes", "900000000\n")
    limit, where = memory.cgroup_limit(proc, root)
    assert limit == 700_000_000 and where.endswith("outer/memory.limit_in_bytes")
    _write(root / "memory" / "outer" / "memory.limit_in_bytes", unlimited)
    assert memory.cgroup_limit(proc, root)[0] == 900_000_000
    _write(root / "memory" / "outer" / "inner" / "memory.limit_in_bytes", unlimited)
    assert memory.cgroup_limit(proc, root) is None  # unlimited everywhere


def test_cgroup_v2_memory_max(tmp_path):
    root = tmp_path / "cg"
    proc = tmp_path / "proc-cgroup"
    _write(proc, "0::/user.slice/job\n")
    _write(root / "cgroup.controllers", "cpu memory\n")
    _write(root / "user.slice" / "memory.max", "max\n")
    _write(root / "user.slice" / "job" / "memory.max", "1800000000\n")
    assert memory.cgroup_limit(proc, root)[0] == 1_800_000_000
    _write(root / "user.slice" / "job" / "memory.max", "max\n")
    assert memory.cgroup_limit(proc, root) is None


def test_split_fits_streams_and_fails_naming_each_cost():
    kw = dict(dense=100, kv=50, pool_staging=30, runtime_rss=20)
    lim = memory.RUNTIME_EXTRA + 200 + 1000
    s = memory.split((lim, "memory_limit"), experts_total=5000, **kw)
    assert s.cache == 1000 and s.cache_source == "limit" and s.fixed + s.cache == lim
    s = memory.split((lim, "memory_limit"), experts_total=800, **kw)
    assert s.cache == 800 and s.cache_source == "all experts fit"
    s = memory.split((lim, "memory_limit"), experts_total=5000, cache_bytes=3000, **kw)
    assert s.cache == 3000 and s.cache_source == "cache_bytes"  # an explicit budget wins
    with pytest.raises(BudgetError) as e:
        memory.split((150, "memory_limit"), experts_total=5000, **kw)
    for word in ("dense weights", "KV cache", "staging", "runtime", "memory limit"):
        assert word in str(e.value)


@pytest.fixture(scope="module")
def demo_store():
    from micro_expert_router.demo.store import demo_store_path

    return demo_store_path()


def test_load_splits_the_limit(demo_store):
    # no limit given: the default, and this model fits it. Twice: the first load in a process
    # grows its RSS (torch's and the allocator's first-use state) by about as much as the
    # demo's experts, so the second one's fixed costs are the ones the next load measures
    for _ in range(2):
        with mer.load(demo_store) as eng:
            m = eng.memory
            assert m.cache_source == "all experts fit"
            assert eng.provider.cache_bytes == m.experts_total
            fixed = m.fixed
    limit = fixed + m.experts_total // 3
    with mer.load(demo_store, memory_limit=limit) as eng:
        m = eng.memory
        assert m.limit == limit and m.cache_source == "limit"
        # the runtime is measured, so it moves a little between loads
        assert abs(m.cache - m.experts_total // 3) < 32 * 2**20
        assert eng.provider.cache_bytes <= m.cache
        assert m.dense >= 8 * 2**20 and m.kv == 2 * 4 * 2 * 4096 * 64 * 4
        assert m.pool_staging > 0
        ids = list(range(1, 9))
        assert len(list(eng.generate(ids, 3, temperature=0, stop_at_eos=False))) == 3
    with mer.load(demo_store, memory_limit=limit, cache_bytes=10**6) as eng:
        assert eng.memory.cache_source == "cache_bytes" and eng.provider.cache_bytes <= 10**6
    with pytest.raises(BudgetError, match="KV cache at max_context"):
        mer.load(demo_store, memory_limit="50M")


def test_checkpoint_reports_and_refuses_a_limit_it_cannot_meet():
    from micro_expert_router.demo import demo_model_path

    with mer.load(demo_model_path()) as eng:
        assert eng.memory.cache == eng.memory.experts_total > 0
    with pytest.raises(BudgetError, match="mer convert"):
        mer.load(demo_model_path(), memory_limit="60M")


def test_plan_budgets_scale_into_the_cache_share():
    assert memory.scale_budgets({0: 600, 1: 400}, 500) == {0: 300, 1: 200}
    assert memory.scale_budgets({0: 600, 1: 400}, 5000) == {0: 600, 1: 400}


# -- a real memory cgroup ------------------------------------------------------------------------
def _own_v1_memory_dir() -> Path | None:
    base = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (base / "memory.limit_in_bytes").is_file():
        return None
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, ctrl, rel = line.split(":", 2)
            if "memory" in ctrl.split(","):
                d = base / rel.lstrip("/")
                return d if d.is_dir() else base
    except OSError:
        return None
    return None


def _run_in_cgroup(parent: Path, limit: int, args: list[str]) -> tuple[dict, int, int, int, str]:
    """Run ``mer generate ARGS --json`` in a fresh child memory group of ``limit`` bytes;
    (its JSON or {}, return code, peak usage bytes, the limit as set, stderr)."""
    group = parent / f"mer-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(limit))
        limit = int((group / "memory.limit_in_bytes").read_text())  # rounded to pages
        cmd = [sys.executable, "-m", "micro_expert_router.cli", "generate", *args, "--json"]
        env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
        # the child joins the group before exec, so everything it maps is charged there
        procs = group / "cgroup.procs"
        p = subprocess.run(["sh", "-c", f'echo $$ > "{procs}" && exec "$@"', "sh", *cmd],
                           capture_output=True, text=True, timeout=900, env=env)  # fmt: skip
        peak = int((group / "memory.max_usage_in_bytes").read_text())
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        return (json.loads(lines[-1]) if lines else {}), p.returncode, peak, limit, p.stderr
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@pytest.mark.slow
def test_never_oom_killed_in_a_memory_cgroup(demo_store):
    parent = _own_v1_memory_dir()
    if parent is None:
        pytest.skip("needs root and a cgroup-v1 memory hierarchy")
    common = ["--model", str(demo_store), "--prompt-ids", ",".join(map(str, range(1, 33))),
              "--max-tokens", "16", "--temperature", "0", "--ignore-eos"]  # fmt: skip
    # the fixed costs, measured by a run whose limit holds every expert
    probe, rc, _, _, err = _run_in_cgroup(parent, 2 * 2**30, common)
    assert rc == 0, err
    fixed, experts = probe["memory"]["fixed"], probe["memory"]["experts_total"]
    limits = [fixed + 4 * 2**20, fixed + experts // 2, fixed + experts + 8 * 2**20]
    for limit in limits:  # the limit comes from the cgroup itself: no --memory-limit
        out, rc, peak, limit, err = _run_in_cgroup(parent, limit, common)
        assert rc == 0, f"limit {limit}: exit {rc} (137 = OOM-killed)\n{err[-2000:]}"
        m = out["memory"]
        assert m["limit"] == limit and m["limit_source"].startswith("cgroup")
        assert peak <= limit
        assert m["cache"] <= max(limit - m["fixed"], 0) or m["cache_source"] == "all experts fit"
        print(f"limit {limit / 1e6:.0f} MB: peak {peak / 1e6:.0f} MB, cache "
              f"{m['cache'] / 1e6:.1f} MB ({m['cache_source']}), fixed {m['fixed'] / 1e6:.0f} MB, "
              f"hit rate {out['hit_rate']:.2f}")  # fmt: skip
    # below the fixed costs: a clear error, not an OOM kill
    out, rc, _, _, err = _run_in_cgroup(parent, fixed - 40 * 2**20, common)
    assert rc == 2 and "fixed costs alone exceed" in err, err[-2000:]
