"""Replay speed of the simulator on the OLMoE trace (897 tokens x 16 layers x top-8), ABAB.

Trial A replays the trace through ``sim.Replay`` (the real ``ExpertCache`` and policy classes the
engine uses: lazy heaps, protected layers, counters per layer). Trial B is the floor for a Python
simulator: the upstream-style loop (one ``OrderedDict`` LRU over (layer, expert) keys, no
protection, no counters per layer). Both at the same capacity, alternated A B A B; prints one line
per trial, medians and spread, then every policy at 10/25/50% against the issue's limits
(online < 2 s, OPT < 5 s) and the ratio A/B last. Trace preparation (reading, grouping, OPT's
future index) is timed separately and included in the per-policy lines.

    python bench/sim_speed.py [--trace FILE] [--rounds 5] [--frac 0.25] [--out results.jsonl]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import OrderedDict
from pathlib import Path

from micro_expert_router.sim import Replay, experts_for_fraction
from micro_expert_router.trace import read_trace

REPO = Path(__file__).resolve().parent.parent
TRACE = REPO.parent / "shared/data/traces/olmoe-1b-7b-llamacpp/olmoe-all.tokens.jsonl"
LIMITS = {"lru": 2.0, "lfu": 2.0, "lcp": 2.0, "opt": 5.0}


def floor_lru(tokens: list[list[tuple[int, int]]], capacity: int, warmup: int) -> float:
    lru: OrderedDict[tuple[int, int], None] = OrderedDict()
    hits = accesses = 0
    for i, token in enumerate(tokens):
        for key in token:
            counting = i >= warmup
            accesses += counting
            if key in lru:
                lru.move_to_end(key)
                hits += counting
            elif capacity:
                lru[key] = None
                if len(lru) > capacity:
                    lru.popitem(last=False)
    return hits / accesses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=TRACE)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--frac", type=float, default=0.25)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--out", type=Path, help="append JSON lines here")
    args = ap.parse_args()
    if not args.trace.is_file():
        raise SystemExit(f"{args.trace}: not found (the OLMoE trace lives in ../shared/data)")
    t0 = time.perf_counter()
    trace = read_trace(args.trace)
    t_read = time.perf_counter() - t0
    t0 = time.perf_counter()
    replay = Replay(trace)
    t_group = time.perf_counter() - t0
    t0 = time.perf_counter()
    replay.future  # noqa: B018 (built once, shared by every OPT run)
    t_future = time.perf_counter() - t0
    tokens = [[(l, int(e)) for j, l in enumerate(trace.layers) for e in row[j]]
              for row in trace.experts]  # fmt: skip
    cap = experts_for_fraction(trace, args.frac)
    print(f"trace {args.trace.name}: {trace.num_tokens} tokens; read {t_read:.3f} s, grouped "
          f"{t_group:.3f} s, OPT future {t_future:.3f} s; capacity {cap}; "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cpus")  # fmt: skip
    rows, a_times, b_times = [], [], []
    for i in range(args.rounds):
        t0 = time.perf_counter()
        a = replay.run("lru", cap, warmup=args.warmup).hit_rate
        a_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        b = floor_lru(tokens, cap, args.warmup)
        b_times.append(time.perf_counter() - t0)
        print(f"trial {i}: A mer sim lru {a_times[-1]:.3f} s (hit {100 * a:.2f}%)   "
              f"B floor loop {b_times[-1]:.3f} s (hit {100 * b:.2f}%)")  # fmt: skip
        rows.append({"trial": i, "a_s": a_times[-1], "b_s": b_times[-1]})
    for name, ts in (("A", a_times), ("B", b_times)):
        print(f"{name}: median {statistics.median(ts):.3f} s, spread {min(ts):.3f}-{max(ts):.3f}")
    for policy, limit in LIMITS.items():
        for frac in (0.1, 0.25, 0.5):
            t0 = time.perf_counter()
            r = Replay(trace).run(policy, experts_for_fraction(trace, frac), warmup=args.warmup)
            s = time.perf_counter() - t0 + t_read
            ok = "ok" if s < limit else "OVER"
            print(f"{policy:4s} {100 * frac:4.0f}%: {s:.3f} s incl. reading the trace "
                  f"(limit {limit:.0f} s, {ok}); hit {100 * r.hit_rate:.2f}%")  # fmt: skip
            rows.append({"policy": policy, "frac": frac, "s": s, "hit_rate": r.hit_rate})
    ratio = statistics.median(a_times) / statistics.median(b_times)
    print(f"ratio A/B (mer sim lru vs the floor loop, medians): {ratio:.2f}x")
    if args.out:
        with open(args.out, "a") as fh:
            for row in rows:
                fh.write(json.dumps({"bench": "sim_speed", **row}) + "\n")


if __name__ == "__main__":
    main()
