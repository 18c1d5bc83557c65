"""``mer plan`` end to end: measure, replay a recorded trace, plan, and run with the plan."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.plan import Plan, Profile, predict
from micro_expert_router.planning import hit_curves
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
