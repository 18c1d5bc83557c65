"""MoEpic end to end (issue 7, point 4): time per output token of split experts + LCP + the
planner's plan, against whole-expert LRU at the same total cache memory, both without prefetch
(the same prefetching). Alternating ABAB rounds; median and spread.

The default store is the demo model with 12.6 MB experts (bench/widened_demo.py: the trained
demo's routing, experts 4x the 25% budget, reads that dominate decode); ``--store demo`` runs the
bundled 0.7 MB-expert store, which is compute-bound. The plan is made from the demo traces
(recorded on demand, docs/demo-model.md; the widened model routes like the demo); the timed runs
use other prompts, so the plan is judged out of sample. Prints one line per trial and the
reduction last; writes JSON lines to bench/results/moepic.jsonl.

    python bench/moepic.py [--store wide|demo] [--budget-frac F] [--rounds N] [--tokens N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import micro_expert_router as mer
from micro_expert_router.demo.store import demo_store_path
from micro_expert_router.demo.traces import record_demo_traces
from micro_expert_router.plan.profile import build_profile, make_plan
from micro_expert_router.store import Store
from micro_expert_router.trace import read_trace

PROMPTS = ("Q: Why did the programmer quit his job?\nA:", "Never trust a man who",
           "The best things in life are", "If at first you don't succeed,")  # fmt: skip


def merge_traces(paths: list[Path], out: Path) -> Path:
    """One trace of all the demo runs back to back (steps renumbered)."""
    lines, step, i = [], 0, 0
    header = None
    for p in paths:
        with open(p) as f:
            header = f.readline()
            last = None
            for line in f:
                d = json.loads(line)
                if d["step"] != last:
                    last, step = d["step"], step + 1
                d["step"], d["i"] = step - 1, i
                i += 1
                lines.append(json.dumps(d))
    h = json.loads(header)
    h["hidden"] = None
    out.write_text(json.dumps(h) + "\n" + "\n".join(lines) + "\n")
    return out


def tpot(store: Path, tokens: int, threads: int, **options) -> tuple[float, float]:
    """(mean decode seconds per token, pool bytes) over the timed prompts."""
    times = []
    with mer.load(store, threads=threads, **options) as engine:
        for prompt in PROMPTS:
            steps = list(engine.generate(prompt, tokens, temperature=0.8, seed=5,
                                         stop_at_eos=False))  # fmt: skip
            times += [s.step_s for s in steps[1:]]
        pool = engine.provider.pool_bytes
    return statistics.mean(times), pool


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--store", choices=("wide", "demo"), default="wide")
    args = ap.parse_args()
    if args.store == "wide":
        from widened_demo import widened_demo_store

        store = widened_demo_store()
    else:
        store = demo_store_path()
    s = Store.open(store)
    work = store.parent / f"{store.name}-bench"
    work.mkdir(exist_ok=True)
    trace = merge_traces(record_demo_traces(), work / "all.jsonl")
    budget = int(args.budget_frac * s.total_expert_bytes)
    profile = build_profile(store, trace, policy="lcp", threads=args.threads)
    result, _ = make_plan(profile, s, budget)
    plan_path = work / "plan.json"
    plan_path.write_text(result.plan.to_json())
    print(f"{store.name}: {len(s.experts)} experts x {s.expert_bytes / 1e6:.2f} MB; budget "
          f"{budget / 1e6:.1f} MB ({args.budget_frac:.0%}); trace {read_trace(trace).num_tokens} "
          f"tokens; plan thetas {sorted(set(result.plan.thetas().values()))}, predicted "
          f"{result.s_per_token * 1e3:.1f} ms/token")  # fmt: skip
    configs = {
        "A whole-expert LRU": dict(cache_bytes=budget, policy="lru"),
        "B split+LCP+plan": dict(plan=str(plan_path), policy="lcp"),
    }
    res: dict[str, list[float]] = {k: [] for k in configs}
    out = Path(__file__).resolve().parent / "results" / "moepic.jsonl"
    out.parent.mkdir(exist_ok=True)
    for r in range(args.rounds):
        for name, opts in configs.items():
            t, pool = tpot(store, args.tokens, args.threads, **opts)
            res[name].append(t)
            print(f"round {r} {name:20s} {t * 1e3:7.2f} ms/token  (pool {pool / 1e6:.1f} MB)")
            with open(out, "a") as f:
                f.write(json.dumps({"time": time.time(), "config": name, "s_per_token": t,
                                    "pool_bytes": pool, "budget": budget}) + "\n")  # fmt: skip
    a, b = (statistics.median(v) for v in res.values())
    spread = {k: (min(v) * 1e3, max(v) * 1e3) for k, v in res.items()}
    print(
        f"median A {a * 1e3:.2f} ms ({spread['A whole-expert LRU'][0]:.2f}-"
        f"{spread['A whole-expert LRU'][1]:.2f}), B {b * 1e3:.2f} ms "
        f"({spread['B split+LCP+plan'][0]:.2f}-{spread['B split+LCP+plan'][1]:.2f})"
    )
    print(f"time per output token reduction of B vs A: {(a - b) / a:.1%}")


if __name__ == "__main__":
    main()
