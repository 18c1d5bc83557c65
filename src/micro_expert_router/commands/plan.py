"""``mer plan``: choose per-layer cache budgets and split ratios for a store (MoEpic)."""

from __future__ import annotations

import argparse
import sys

HELP = "plan per-layer expert-cache budgets and split ratios from a routing trace (MoEpic)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="expert store")
    p.add_argument("--trace", required=True, help="routing trace recorded from this model")
    p.add_argument("--budget-mb", type=float, default=None,
                   help="total expert-cache budget (default: what --memory-limit leaves the "
                   "cache, docs/memory.md)")  # fmt: skip
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="plan for this memory limit (default: the cgroup's, else 0.8 x "
                   "MemAvailable); ignored with --budget-mb")  # fmt: skip
    p.add_argument("--out", default="plan.json", help="plan file to write (default plan.json)")
    p.add_argument("--policy", default="lcp", help="cache policy the hit curves assume")
    p.add_argument("--theta-grid", type=int, default=None,
                   help="split-ratio grid (default: the store's neuron groups, 8)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=0, help="trace tokens not counted")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="compute threads to measure with (use what generate will use)",
    )
    p.add_argument("--profile-out", default=None, help="also write the measured profile (JSON)")
    p.add_argument("--profile", default=None,
                   help="use a profile written earlier instead of measuring")  # fmt: skip
    p.add_argument("--prefetch", default="off", metavar="off|s,l,m",
                   help="plan for a run with these prefetch predictors (as `mer generate "
                   "--prefetch`): each layer's prediction accuracy is replayed from the trace; "
                   "off (default) plans for no prefetch")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..errors import ConfigError
    from ..plan import Profile, predict
    from ..plan.profile import build_profile, make_plan, prefetch_accuracy
    from ..store import Store
    from ..trace import read_trace

    if args.budget_mb is not None and args.budget_mb < 0:
        raise ConfigError("--budget-mb must be >= 0")
    store = Store.open(args.store)
    if args.budget_mb is None:  # the cache's share of the memory limit, as generate splits it
        from ..engine import load

        with load(args.store, memory_limit=args.memory_limit) as engine:
            print(engine.memory.line(), file=sys.stderr)
            args.budget_mb = engine.memory.cache / 1e6
    prefetch = args.prefetch.strip().lower()
    if args.profile:
        profile = Profile.from_json(Path(args.profile).read_text(), where=args.profile)
        if prefetch != "off":  # the trace's accuracy replaces the saved one
            trace = read_trace(args.trace, num_experts=store.args.n_experts)
            acc = prefetch_accuracy(trace, prefetch, args.store, args.warmup)
            profile = profile.with_accuracy([acc[layer] for layer in trace.layers])
    else:
        print("measuring disk and compute, replaying the trace ...", file=sys.stderr)
        profile = build_profile(args.store, args.trace, args.policy, args.warmup,
                                threads=args.threads, prefetch=prefetch)  # fmt: skip
    if args.profile_out:
        Path(args.profile_out).write_text(profile.to_json())
    result, baseline = make_plan(profile, store, int(args.budget_mb * 1e6), args.theta_grid)
    plan = result.plan
    Path(args.out).write_text(plan.to_json())
    tl = predict(profile, plan)
    print(
        f"disk {profile.bandwidth_bps / 1e9:.2f} GB/s, read latency "
        f"{profile.read_latency_s * 1e3:.2f} ms; expert {store.expert_bytes / 1e6:.2f} MB"
    )
    print("prefetch: " + (f"{prefetch}; accuracy is the share of each layer's routed experts "
          f"it had read ahead (run with `mer generate --prefetch {prefetch}`)"
          if prefetch != "off" else "off; the plan assumes no prefetch"))  # fmt: skip
    print(f"{'layer':>5} {'budget MB':>10} {'theta':>6} {'cached':>7} {'hit rate':>8} "
          f"{'accuracy':>8} {'stall ms':>8}")  # fmt: skip
    for lp, lt, prof in zip(plan.layers, tl.layers, profile.layers, strict=True):
        print(f"{lp.layer:>5} {lp.budget_bytes / 1e6:>10.2f} {lp.theta(plan.theta_grid):>6.3f} "
              f"{lt.cached:>7} {lt.hit_rate:>8.1%} {prof.accuracy:>8.1%} "
              f"{lt.stall_s * 1e3:>8.2f}")  # fmt: skip
    print(f"predicted time per token: {result.s_per_token * 1e3:.2f} ms (whole-expert caching, "
          f"even split: {baseline.predicted_s_per_token * 1e3:.2f} ms); "
          f"{'converged' if result.converged else 'NOT converged'} after {result.iterations} "
          f"rounds; wrote {args.out}")  # fmt: skip
    return 0
