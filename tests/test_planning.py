"""``mer plan`` end to end: measure, replay a recorded trace, plan, and run with the plan."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.cli import main
from micro_expert_router.plan import LayerProfile, Plan, Profile, predict
from micro_expert_router.plan.profile import hit_curves, prefetch_accuracy
from micro_expert_router.store import convert
from micro_expert_router.trace import read_trace


def test_plan_command_end_to_end(tmp_path):
    save_hf_model("olmoe", tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "store", progress=False, log=None)
    trace = tmp_path / "t.jsonl"
    with mer.load(store.path) as engine:
        list(engine.generate(list(range(2, 20)), 40, temperature=1.2, seed=3, stop_at_eos=False,
                             trace=trace))  # fmt: skip
    budget_mb = store.total_expert_bytes / 3 / 1e6
    out, prof = tmp_path / "plan.json", tmp_path / "profile.json"
    p = subprocess.run([sys.executable, "-m", "micro_expert_router.cli", "plan", str(store.path),
                        "--trace", str(trace), "--budget-mb", f"{budget_mb:.6f}", "--out", str(out),
                        "--profile-out", str(prof)],
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "predicted time per token" in p.stdout
    layers = [0, 1, 2]
    plan = Plan.from_json(out.read_text(), layers=layers)
    assert plan.budget_bytes <= budget_mb * 1e6 + 1
    profile = Profile.from_json(prof.read_text())
    assert profile.bandwidth_bps > 0 and all(lp.expert_s > 0 for lp in profile.layers)
    assert abs(predict(profile, plan).s_per_token - plan.predicted_s_per_token) < 1e-12
    ids = list(range(5, 25))
    ref = mer.load(tmp_path / "ckpt").logits(ids)
    with mer.load(store.path, plan=str(out)) as engine:
        assert np.array_equal(engine.logits(ids), ref)
        assert engine.provider.cache.used_bytes <= plan.budget_bytes


def test_hit_curves_match_direct_replay(tmp_path):
    save_hf_model("qwen3moe-plain", tmp_path / "ckpt")
    trace = tmp_path / "t.jsonl"
    with mer.load(tmp_path / "ckpt") as engine:
        list(engine.generate(list(range(2, 12)), 30, temperature=1.3, seed=1, stop_at_eos=False,
                             trace=trace))  # fmt: skip
    tr = read_trace(trace)
    curves = hit_curves(tr, [0, 1], 8, "lru")
    for layer in (0, 1):
        c = curves[layer]
        assert c[0] == 0.0 and c[8] > 0 and len(c) == 9
        # LRU has the inclusion property: more cached experts never lower the hit rate
        assert all(b >= a - 1e-12 for a, b in zip(c, c[1:], strict=False))
        # C = all experts: every request after the first touch of each expert is a hit
        seq = [tuple(sorted(set(tr.experts[t, layer].tolist()))) for t in range(tr.num_tokens)]
        steps = {}
        for t in range(tr.num_tokens):
            steps.setdefault(int(tr.step[t]), set()).update(seq[t])
        seen, hits, reqs = set(), 0, 0
        for s in sorted(steps):
            for e in steps[s]:
                reqs += 1
                hits += e in seen
            seen |= steps[s]
        assert abs(c[8] - hits / reqs) < 1e-12


def cyclic_trace(path, tokens: int = 400):
    """2 layers x 8 experts, top-2, a routing that repeats every 4 tokens: a Markov predictor
    learns it, so almost every routed expert is prefetched once it has."""
    lines = []
    for t in range(tokens):
        a = t % 4
        lines.append([[0, a], [0, a + 4], [1, (a + 1) % 4], [1, (a + 1) % 4 + 4]])
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return read_trace(path, num_experts=8)


def test_prefetch_accuracy_is_the_share_of_routed_experts_read_ahead(tmp_path):
    tr = cyclic_trace(tmp_path / "cyc.jsonl")
    acc = prefetch_accuracy(tr, "s", warmup=100)
    assert set(acc) == {0, 1} and all(a > 0.95 for a in acc.values()), acc
    # a routing with no pattern to learn: far below the cyclic one
    rng = np.random.default_rng(0)
    lines = [[[l, int(e)] for l in range(2) for e in rng.choice(8, 2, replace=False)]
             for _ in range(400)]  # fmt: skip
    (tmp_path / "rnd.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    rnd = prefetch_accuracy(read_trace(tmp_path / "rnd.jsonl", num_experts=8), "s", warmup=100)
    assert all(a < 0.6 for a in rnd.values()), rnd


def test_plan_command_uses_the_prefetch_accuracy(tmp_path, capsys):
    save_hf_model("qwen3moe-plain", tmp_path / "ckpt")  # 8 experts, top-2, 2 layers
    store = convert(tmp_path / "ckpt", tmp_path / "store", progress=False, log=None)
    trace = tmp_path / "t.jsonl"
    with mer.load(store.path) as engine:
        list(engine.generate(list(range(2, 20)), 80, temperature=1.2, seed=3, stop_at_eos=False,
                             trace=trace))  # fmt: skip
    tr = read_trace(trace)
    curves = hit_curves(tr, list(tr.layers), 8, "lcp")
    # a disk-bound profile (reads >> compute), so prefetch pays wherever it is right
    lps = [LayerProfile(expert_bytes=store.expert_bytes, top_k=2, dense_s=2e-3, expert_s=1e-4,
                        hit_curve=curves[l]) for l in tr.layers]  # fmt: skip
    prof = tmp_path / "profile.json"
    bandwidth = store.expert_bytes / 3e-3  # an expert's read: 3 ms, against 2 ms of dense work
    prof.write_text(Profile(tuple(lps), bandwidth_bps=bandwidth, read_latency_s=1e-4).to_json())
    expected = prefetch_accuracy(tr, "s,l", store.path)
    assert any(a > 0 for a in expected.values())
    budget = f"{store.total_expert_bytes / 4 / 1e6:.6f}"
    times = {}
    for prefetch in ("off", "s,l"):
        out = tmp_path / f"plan-{prefetch}.json"
        assert main(["plan", str(store.path), "--trace", str(trace), "--budget-mb", budget,
                     "--profile", str(prof), "--prefetch", prefetch, "--out", str(out)]) == 0
        text = capsys.readouterr().out
        rows = [line.split() for line in text.splitlines() if line.split()[:1] in (["0"], ["1"])]
        shown = [float(r[5].rstrip("%")) / 100 for r in rows]
        want = [expected[l] if prefetch != "off" else 0.0 for l in tr.layers]
        assert shown == pytest.approx(want, abs=1e-3), text
        times[prefetch] = Plan.from_json(out.read_text()).predicted_s_per_token
    assert times["s,l"] < times["off"]
