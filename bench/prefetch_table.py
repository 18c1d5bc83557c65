"""Prefetch tables for docs/prefetch.md: exposed misses per token with prefetch (S+L, and S
alone) against the same policy without prefetch and OPT without prefetch, at 10/25/50% cache
budgets and three disk windows; then S's and L's precision and recall per layer.

Reads the OLMoE trace from <repo>/../shared/data (exits cleanly if absent). Sim conventions:
capacity floor(f x 16 x 64) experts, one cache over all layers, first 200 tokens not counted,
sizes in experts. A disk window is what the disk reads while one layer computes (lookahead 1).
Timing: the S+L prefetch replay against the plain replay of sim.py, ABAB, median and spread.

    python bench/prefetch_table.py [--trace FILE] [--json FILE] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared/data/traces/olmoe-1b-7b-llamacpp/olmoe-all.tokens.jsonl"
FRACTIONS = (0.10, 0.25, 0.50)
POLICIES = ("lru", "lcp")
WARMUP = 200


def windows(top_k: int) -> list[tuple[str, int | None]]:
    return [("unlimited", None), (f"{top_k}/layer", top_k), ("2/layer", 2)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT)
    ap.add_argument("--json", type=Path, help="also write one JSON line per run here")
    ap.add_argument("--rounds", type=int, default=3, help="ABAB timing rounds (default 3)")
    args = ap.parse_args()
    if not args.trace.is_file():
        print(f"skipped: {args.trace} is absent (it lives in ../shared/data)")
        return 0

    from micro_expert_router.prefetch_sim import PrefetchReplay, summary
    from micro_expert_router.sim import experts_for_fraction
    from micro_expert_router.trace import read_trace

    tr = read_trace(args.trace)
    replay = PrefetchReplay(tr)
    out = open(args.json, "w") if args.json else None  # noqa: SIM115
    wins = windows(tr.top_k)
    print(f"trace {args.trace.name}: {tr.num_tokens} tokens, {tr.num_layers} layers x "
          f"{tr.num_experts} experts, top-{tr.top_k}; warmup {WARMUP}; staging slots "
          f"{2 * tr.top_k}; lookahead 1\n")  # fmt: skip
    print("| cache | policy | disk window | no prefetch | S+L exposed | S exposed | "
          "OPT, no prefetch | S+L reads/token (wasted) | S+L coverage |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    per_layer = {}
    for f in FRACTIONS:
        cap = experts_for_fraction(tr, f)
        opt = replay.baseline.run("opt", cap, warmup=WARMUP).misses_per_token
        for policy in POLICIES:
            for wname, wb in wins:
                runs = {}
                for preds in ("s,l", "s"):
                    r = replay.run(policy, cap, predictors=preds, warmup=WARMUP, window_bytes=wb)
                    runs[preds] = d = summary(r, opt)
                    if out:
                        out.write(json.dumps(dict(d, fraction=f, window=wname)) + "\n")
                sl, s = runs["s,l"], runs["s"]
                if policy == "lru" and wb == tr.top_k:
                    per_layer[f] = sl
                print(f"| {100 * f:.0f}% ({cap}) | {policy} | {wname} | "
                      f"{sl['misses_per_token']:.1f} | {sl['exposed_misses_per_token']:.1f} | "
                      f"{s['exposed_misses_per_token']:.1f} | {opt:.1f} | "
                      f"{sl['prefetch_bytes_per_token']:.1f} "
                      f"({sl['wasted_prefetch_bytes_per_token']:.1f}) | "
                      f"{100 * sl['miss_coverage']:.0f}% |", flush=True)  # fmt: skip
    if out:
        out.close()

    for f, d in per_layer.items():
        print(f"\nPer layer, {100 * f:.0f}% cache, LRU, {tr.top_k}/layer window, S+L run: "
              "precision / recall of each predictor's own candidates (its best "
              f"{tr.top_k} non-resident experts); 'on' = share of targets it was issuing; "
              "'issued' = what the controller read\n")  # fmt: skip
        print("| layer | misses per token | S prec | S rec | S on | L prec | L rec | L on | "
              "issued prec | issued rec |")  # fmt: skip
        print("|---|---|---|---|---|---|---|---|---|---|")
        rows = list(d["per_layer"].items()) + [("all", d["per_predictor"])]
        for layer, sc in rows:
            s, l, i = sc["s"], sc["l"], sc["issued"]
            misses = i["misses"] / max(1, i["targets"]) if layer != "all" else d["misses_per_token"]
            print(f"| {layer} | {misses:.2f} | "
                  + " | ".join(f"{x['precision']:.2f} | {x['recall']:.2f} | "
                               f"{x['issuing'] / max(1, x['targets']):.2f}" for x in (s, l))
                  + f" | {i['precision']:.2f} | {i['recall']:.2f} |")  # fmt: skip

    # timing: prefetch replay (S+L) vs sim.py's replay, same budget, alternated
    cap = experts_for_fraction(tr, 0.25)
    a_times, b_times = [], []
    print("\ntiming (25%, lru): A = S+L prefetch replay, B = sim.py replay")
    for n in range(args.rounds):
        t0 = time.perf_counter()
        replay.run("lru", cap, predictors="s,l", warmup=WARMUP, window_bytes=tr.top_k)
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        replay.baseline.run("lru", cap, warmup=WARMUP)
        b = time.perf_counter() - t0
        a_times.append(a)
        b_times.append(b)
        print(f"round {n}: A {a:.2f} s  B {b:.2f} s")
    ratios = [a / b for a, b in zip(a_times, b_times, strict=True)]
    print(f"ratio A/B: median {statistics.median(ratios):.1f}x "
          f"(spread {min(ratios):.1f}-{max(ratios):.1f}x); A median "
          f"{statistics.median(a_times):.2f} s for {tr.num_tokens} tokens")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
