"""The replay simulator: counts worked out by hand, prefill steps, warmup, per-layer plans, a
replay identical to an engine-style driver, the calibration figures on the OLMoE trace, and the
``mer sim`` command."""

from __future__ import annotations

import csv
import json
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micro_expert_router.cache import ExpertCache, FutureIndex, make_policy
from micro_expert_router.cli import main
from micro_expert_router.errors import ConfigError
from micro_expert_router.sim import Replay, experts_for_fraction, simulate
from micro_expert_router.trace import Trace, read_trace

OLMOE = Path(__file__).resolve().parents[1].parent / "shared/data/traces/olmoe-1b-7b-llamacpp"
OLMOE_TRACE = OLMOE / "olmoe-all.tokens.jsonl"
needs_olmoe = pytest.mark.skipif(not OLMOE.is_dir(), reason="../shared/data is not present")


def hand_trace():
    # one layer, 4 experts, top-2; tokens [0 1] [1 2] [0 1] [3 1]
    return Trace.from_arrays([[[0, 1]], [[1, 2]], [[0, 1]], [[3, 1]]], 4)


def test_lru_counts_by_hand():
    # capacity 2: t1 0,1 miss -> {0,1}; t2 1 hit, 2 miss evicts 0 (1 is protected) -> {1,2};
    # t3 1 hit, 0 miss evicts 2 -> {0,1}; t4 1 hit, 3 miss evicts 0 -> {1,3}
    r = simulate(hand_trace(), "lru", 2)
    assert (r.requests, r.hits, r.misses, r.evictions) == (8, 3, 5, 3)
    assert r.capacity_experts == 2 and r.bytes_read_per_token is None
    r = simulate(hand_trace(), "lru", 20, expert_bytes=10, warmup=2)  # counts t3 and t4 only
    assert (r.tokens, r.requests, r.hits, r.misses) == (2, 4, 2, 2)
    assert r.misses_per_token == 1.0 and r.bytes_read_per_token == 10.0
    assert r.per_layer_hit_rate == {0: 0.5}
    # OPT does not admit 2 at t2 (never needed again), so t3 hits both: 4 hits
    assert simulate(hand_trace(), "opt", 2).hits == 4
    assert simulate(hand_trace(), "lru", 0).hits == 0


def test_prefill_step_requests_each_expert_once():
    tr = Trace.from_arrays([[[0, 1]], [[1, 2]], [[0, 2]], [[3, 0]]], 4,
                           prefill=[1, 1, 1, 0], step=[0, 0, 0, 1])  # fmt: skip
    r = simulate(tr, "lru", 4)
    assert (r.tokens, r.steps, r.requests, r.hits) == (4, 2, 5, 1)  # {0,1,2} then {0,3}
    r = simulate(tr, "lru", 4, warmup=1)  # the prefill step started before token 1
    assert (r.tokens, r.steps, r.requests, r.hits) == (1, 1, 2, 1)


def test_per_layer_plan():
    tr = Trace.from_arrays([[[0], [0]], [[0], [0]], [[1], [1]], [[0], [0]]], 2)
    r = simulate(tr, "lru", {0: 10, 1: 0}, expert_bytes=10)
    # layer 0 holds one expert (0 hit, 0 hit, 1 evicts 0, 0 misses), layer 1 none
    assert r.per_layer_hit_rate == {0: 0.25, 1: 0.0}
    with pytest.raises(ConfigError, match=r"no entry for layers \[1\]"):
        simulate(tr, "lru", {0: 10}, expert_bytes=10)


def test_bad_arguments():
    with pytest.raises(ConfigError, match="leaves nothing"):
        simulate(hand_trace(), "lru", 2, warmup=4)
    with pytest.raises(ConfigError, match="unknown cache policy"):
        simulate(hand_trace(), "belady", 2)
    with pytest.raises(ConfigError, match="fraction"):
        experts_for_fraction(hand_trace(), 1.5)
    assert experts_for_fraction(Trace.from_arrays(np.zeros((1, 10, 1), int), 10), 0.29) == 29


def engine_style(trace: Trace, policy: str, capacity: int) -> tuple[int, int]:
    """Drive an ExpertCache the way StreamingProvider does, from the raw trace arrays: per step
    one begin_token; per layer the torch.unique of the step's experts, all looked up, then each
    miss admitted with the layer protected."""
    name = policy.split(":")[0]
    cache = None
    starts = [s for s, _ in trace.step_bounds()]
    ends = starts[1:] + [trace.num_tokens]
    if name == "opt":
        future = [[(l, e) for j, l in enumerate(trace.layers)
                   for e in torch.unique(torch.from_numpy(trace.experts[s:t, j].copy())).tolist()]
                  for s, t in zip(starts, ends, strict=True)]  # fmt: skip
        cache = ExpertCache(capacity, lambda: make_policy("opt", future=FutureIndex(future)))
    else:
        cache = ExpertCache(capacity, policy)
    for s, t in zip(starts, ends, strict=True):
        cache.begin_token()
        for j, layer in enumerate(trace.layers):
            needed = torch.unique(torch.from_numpy(trace.experts[s:t, j].copy())).tolist()
            keys = [(layer, e) for e in needed]
            hit = [cache.lookup(k) is not None for k in keys]
            for k, h in zip(keys, hit, strict=True):
                if not h:
                    cache.admit(k, "lease", 1, set(keys))
    return cache.hits, cache.misses


@settings(max_examples=40, deadline=None)
@given(data=st.data(), policy=st.sampled_from(["lru", "lfu", "lcp:omega=4", "opt"]),
       capacity=st.integers(0, 12))  # fmt: skip
def test_replay_matches_an_engine_style_driver(data, policy, capacity):
    n_layers, n_exp, k = 2, 6, 2
    n = data.draw(st.integers(1, 20))
    experts = [[data.draw(st.permutations(range(n_exp)))[:k] for _ in range(n_layers)]
               for _ in range(n)]  # fmt: skip
    n_prefill = data.draw(st.integers(0, n - 1))
    step = [0] * n_prefill + list(range(1 if n_prefill else 0, n - n_prefill + 1))[: n - n_prefill]
    tr = Trace.from_arrays(experts, n_exp, layers=[3, 5], step=step,
                           prefill=[i < n_prefill for i in range(n)])  # fmt: skip
    r = simulate(tr, policy, capacity)
    assert (r.hits, r.misses) == engine_style(tr, policy, capacity)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from hf_models import save_hf_model

    from micro_expert_router.store import convert

    root = tmp_path_factory.mktemp("olmoe")
    save_hf_model("olmoe", root / "ckpt")
    store = convert(root / "ckpt", root / "store", progress=False, log=None)
    return root / "store", store.total_expert_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "lcp:rho=0.5,omega=4"])
def test_recorded_generation_replays_to_the_engines_counts(tiny_store, tmp_path, policy):
    """Acceptance: a trace recorded by the live engine replays to the same hits and misses."""
    import micro_expert_router as mer

    store, expert_bytes = tiny_store
    ids = torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(3)).tolist()
    with mer.load(store, cache_bytes=expert_bytes // 4, policy=policy) as engine:
        steps = list(engine.generate(ids, 16, temperature=0, stop_at_eos=False,
                                     trace=tmp_path / "run.trace"))  # fmt: skip
        p = engine.provider
        budget, slot = p.cache_bytes, p.slot_bytes
    live = (sum(s.hits for s in steps), sum(s.misses for s in steps))
    tr = read_trace(tmp_path / "run.trace")
    assert tr.prefill.sum() == len(ids) and tr.num_steps == 16
    r = simulate(tr, policy, budget, expert_bytes=slot)
    assert (r.hits, r.misses) == live and 0 < r.hits < r.requests


# -- calibration against the upstream simulator's figures -----------------------------------
@needs_olmoe
@pytest.mark.parametrize(("policy", "frac", "want"),
                         [("lru", 0.25, 55.0), ("lru", 0.5, 82.7),
                          ("opt", 0.25, 78.1), ("opt", 0.5, 93.5)])  # fmt: skip
def test_calibration_on_the_olmoe_trace(capsys, policy, frac, want):
    argv = ["sim", str(OLMOE_TRACE), "--policy", policy, "--cache-frac", str(frac),
            "--warmup", "200", "--json"]  # fmt: skip
    assert main(argv) == 0
    d = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert d["capacity_experts"] == int(frac * 1024) and d["tokens"] == 697
    assert abs(100 * d["hit_rate"] - want) <= 0.2, d["hit_rate"]


@needs_olmoe
def test_opt_is_the_upper_line_on_the_olmoe_trace():
    replay = Replay(read_trace(OLMOE_TRACE))
    best = replay.run("opt", 102, warmup=200).hit_rate
    for p in ("lru", "lcp"):
        assert replay.run(p, 102, warmup=200).hit_rate <= best


# -- the command ----------------------------------------------------------------------------
def small_trace(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "small.jsonl"
    lines = []
    for _ in range(60):
        lines.append([[l, int(e)] for l in range(4) for e in rng.choice(8, 2, replace=False)])
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_cli_json_line(tmp_path, capsys):
    path = small_trace(tmp_path)
    assert main(["sim", str(path), "--policy", "lcp:rho=0.5", "--cache-experts", "12",
                 "--expert-bytes", "1MiB", "--json"]) == 0  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    d = json.loads(out[-1])
    for key in ("hit_rate", "misses_per_token", "bytes_read_per_token", "per_layer_hit_rate"):
        assert key in d
    assert d["bytes_read_per_token"] == pytest.approx(d["misses_per_token"] * 2**20)
    assert set(d["per_layer_hit_rate"]) == {"0", "1", "2", "3"}
    assert "hit rate" in out[3]


def test_cli_sweep_writes_csv_and_png(tmp_path, capsys):
    path = small_trace(tmp_path)
    assert main(["sim", str(path), "--sweep", "--policy", "lru", "--fracs", "0.25,0.5",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 0  # fmt: skip
    rows = list(csv.DictReader(open(tmp_path / "out" / "sim-small.csv")))
    assert [(r["policy"], r["fraction"]) for r in rows] == [
        ("lru", "0.25"), ("opt", "0.25"), ("lru", "0.5"), ("opt", "0.5")]  # fmt: skip
    assert float(rows[1]["hit_rate"]) >= float(rows[0]["hit_rate"])
    png = (tmp_path / "out" / "sim-small.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


@pytest.mark.parametrize(("args", "words"), [
    (["--cache-experts", "4"], "exactly one --policy"),
    (["--policy", "lru"], "give a cache size"),
    (["--policy", "nope", "--cache-experts", "4"], "unknown cache policy"),
    (["--policy", "lru", "--cache-bytes", "1GB"], "--expert-bytes"),
    (["--policy", "lru", "--cache-bytes", "lots"], None),
    (["--sweep"], "--out DIR"),
])  # fmt: skip
def test_cli_errors(tmp_path, capsys, args, words):
    path = small_trace(tmp_path)
    if words is None:  # argparse rejects the value itself
        with pytest.raises(SystemExit):
            main(["sim", str(path), *args])
        return
    assert main(["sim", str(path), *args]) == 2
    assert words in capsys.readouterr().err


def test_cli_sweep_without_matplotlib_is_a_named_error(tmp_path, capsys, monkeypatch):
    # a None entry in sys.modules makes `import matplotlib` raise ImportError
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = small_trace(tmp_path)
    out = tmp_path / "out"
    assert main(["sim", str(path), "--sweep", "--policy", "lru", "--fracs", "0.5",
                 "--out", str(out), "--quiet"]) == 2  # fmt: skip
    err = capsys.readouterr().err
    assert "matplotlib" in err and "pip install matplotlib" in err and "sim-small.csv" in err
    assert (out / "sim-small.csv").is_file()


def test_matplotlib_is_a_runtime_dependency():
    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    deps = [d.split(">")[0].split("=")[0].strip() for d in meta["project"]["dependencies"]]
    assert "matplotlib" in deps
