"""A trace recorded from a live generation replays in the simulator to exactly the hit and
miss counts the engine reported, under the same policy and budget (one implementation of
each policy, driven by the live router or by the trace)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.cache import POLICIES
from micro_expert_router.store import convert
from micro_expert_router.trace import read_trace


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("live")
    save_hf_model("qwen3moe-plain", root / "ckpt")  # 8 experts, top-2, 2 layers
    return convert(root / "ckpt", root / "store", progress=False, log=None).path


@pytest.mark.parametrize("policy", ["lru", "lfu", "lcp"])
@pytest.mark.parametrize("n_cached", [3, 7])
def test_recorded_trace_replays_to_the_engine_counts(store, tmp_path, policy, n_cached):
    trace = tmp_path / "run.jsonl"
    with mer.load(store, cache_bytes=0) as probe:
        slot = probe.provider.slot_bytes
    with mer.load(store, cache_bytes=n_cached * slot, policy=policy) as engine:
        cache = engine.provider.cache  # the engine runs the policy and budget asked for
        assert type(cache._single.policy) is POLICIES[policy]
        assert cache.budget_bytes == n_cached * slot
        steps = list(engine.generate(list(range(1, 25)), 60, temperature=1.5, seed=7,
                                     stop_at_eos=False, trace=trace))  # fmt: skip
    hits, misses = sum(s.hits for s in steps), sum(s.misses for s in steps)
    tr = read_trace(trace)
    assert tr.num_tokens == 24 + 59  # the prompt (one prefill step) and 59 decode steps
    p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", "sim", str(trace),
                        "--policy", policy, "--cache-experts", str(n_cached), "--json"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr
    sim = json.loads(p.stdout.strip().splitlines()[-1])
    assert (sim["hits"], sim["misses"]) == (hits, misses)


def test_policies_differ_on_this_routing(store, tmp_path):
    """Guards the test above against routing so concentrated that every policy agrees."""
    trace = tmp_path / "run.jsonl"
    with mer.load(store) as engine:
        list(engine.generate(list(range(1, 25)), 60, temperature=1.5, seed=7, stop_at_eos=False,
                             trace=trace))  # fmt: skip
    from micro_expert_router.sim import simulate

    tr = read_trace(trace)
    rates = {p: simulate(tr, p, 3, expert_bytes=1).hit_rate for p in ("lru", "lfu", "opt")}
    assert len(set(np.round(list(rates.values()), 6))) > 1, rates


def test_trace_hidden_states_are_the_router_inputs(store, tmp_path):
    trace = tmp_path / "h.jsonl"
    with mer.load(store) as engine:
        seen = []
        engine.model.on_route.append(lambda r: seen.append(r.hidden.clone()))
        list(engine.generate([3, 4, 5], 4, temperature=0, stop_at_eos=False, trace=trace,
                             trace_hidden=True))  # fmt: skip
    tr = read_trace(trace)
    h = tr.hidden_states()  # [tokens, layers, D]
    assert h.shape == (3 + 3, 2, engine.args.hidden_size)
    first = np.stack([seen[0].numpy(), seen[1].numpy()], axis=1)  # prefill step, both layers
    assert np.allclose(h[:3], first, rtol=1e-2, atol=1e-2)  # stored as float16


def test_sim_with_predictors_reports_exposed_misses(store, tmp_path):
    trace = tmp_path / "h.jsonl"
    with mer.load(store) as engine:
        list(engine.generate(list(range(1, 25)), 60, temperature=1.5, seed=7, stop_at_eos=False,
                             trace=trace, trace_hidden=True))  # fmt: skip
    for preds, extra in (("s,l", []), ("s,l,m", ["--store", str(store)])):
        p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", "sim", str(trace),
                            "--policy", "lru", "--cache-experts", "4", "--predictors", preds,
                            "--json", *extra],
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr
        d = json.loads(p.stdout.strip().splitlines()[-1])
        assert 0 <= d["exposed_misses_per_token"] <= d["misses_per_token"]
        assert d["prefetch_bytes_per_token"] >= 0
        assert set(preds.split(",")) <= set(d["per_predictor"])
    p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", "sim", str(trace),
                        "--policy", "lru", "--cache-experts", "4", "--predictors", "m"],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode != 0 and "Traceback" not in p.stderr
