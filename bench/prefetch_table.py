"""Prefetch tables for docs/prefetch.md: exposed misses per token with prefetch against the same
policy without prefetch and OPT without prefetch, at 10/25/50% cache budgets and three disk
windows; then each predictor's precision and recall per layer.

Default: the OLMoE trace from <repo>/../shared/data (exits cleanly if absent), predictors S+L and
S alone, warmup 200 tokens. ``--demo``: the bundled demo model's traces (recorded on first use,
with hidden states; concatenated), predictors S+L+M, S, L and M, warmup 100 tokens. Sim
conventions: capacity floor(f x layers x experts), one cache over all layers, sizes in experts.
A disk window is what the disk reads while one layer computes (lookahead 1). Timing: the first
prefetch replay against sim/replay.py's plain replay, ABAB, median and spread.

    python bench/prefetch_table.py [--demo] [--trace FILE] [--json FILE] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT = REPO.parent / "shared/data/traces/olmoe-1b-7b-llamacpp/olmoe-all.tokens.jsonl"
FRACTIONS = (0.10, 0.25, 0.50)


def demo_trace(tmp: Path):
    """The demo traces as one trace (steps renumbered), its hidden states and its gates."""
    from micro_expert_router.demo.store import demo_store_path
    from micro_expert_router.demo.traces import record_demo_traces
    from micro_expert_router.sim.prefetch import gates_from_store
    from micro_expert_router.trace import Trace, read_trace

    parts = [read_trace(p) for p in record_demo_traces()]
    steps, base = [], 0
    for t in parts:
        steps.append(t.step + base)
        base += t.num_steps
    hidden = tmp / "demo.hidden.npy"
    np.save(hidden, np.concatenate([np.asarray(t.hidden_states()) for t in parts]))
    cat = np.concatenate
    tr = Trace.from_arrays(
        cat([t.experts for t in parts]), parts[0].num_experts, layers=parts[0].layers,
        prefill=cat([t.prefill for t in parts]), step=cat(steps), hidden_file=hidden,
        path=Path("demo traces"),
    )  # fmt: skip
    return tr, gates_from_store(demo_store_path())


def big_table(replay, tr, sets, policies, warmup, gates, out) -> dict:
    from micro_expert_router.sim import experts_for_fraction
    from micro_expert_router.sim.prefetch import summary

    names = [s.upper().replace(",", "+") for s in sets]
    print(
        "| cache | policy | disk window | no prefetch | "
        + " | ".join(f"{n} exposed" for n in names)
        + f" | OPT, no prefetch | {names[0]} reads/token (wasted) | {names[0]} coverage |"
    )
    print("|---" * (7 + len(sets)) + "|")  # fmt: skip
    wins = [("unlimited", None), (f"{tr.top_k}/layer", tr.top_k)]
    wins.append(("2/layer", 2) if tr.top_k > 2 else ("1/layer", 1))
    first = {}
    for f in FRACTIONS:
        cap = experts_for_fraction(tr, f)
        opt = replay.baseline.run("opt", cap, warmup=warmup).misses_per_token
        for policy in policies:
            for wname, wb in wins:
                runs = []
                for preds in sets:
                    r = replay.run(policy, cap, predictors=preds, warmup=warmup,
                                   window_bytes=wb, gates=gates)  # fmt: skip
                    runs.append(summary(r, opt))
                    if out:
                        out.write(json.dumps(dict(runs[-1], fraction=f, window=wname)) + "\n")
                d = runs[0]
                if policy == "lru" and wb == tr.top_k:
                    first[f] = d
                print(f"| {100 * f:.0f}% ({cap}) | {policy} | {wname} | "
                      f"{d['misses_per_token']:.2f} | "
                      + " | ".join(f"{x['exposed_misses_per_token']:.2f}" for x in runs)
                      + f" | {opt:.2f} | {d['prefetch_bytes_per_token']:.1f} "
                      f"({d['wasted_prefetch_bytes_per_token']:.1f}) | "
                      f"{100 * d['miss_coverage']:.0f}% |", flush=True)  # fmt: skip
    return first


def layer_tables(first: dict, tr, preds: list[str]) -> None:
    cols = [*preds, "issued"]
    for f, d in first.items():
        print(
            f"\nPer layer, {100 * f:.0f}% cache, LRU, {tr.top_k}/layer window: precision / "
            f"recall of each predictor's own candidates (its best {tr.top_k} non-resident "
            "experts), 'on' = share of targets it was issuing; 'issued' = what was read\n"
        )
        print("| layer | misses per token | "
              + " | ".join(f"{c.upper()} prec | {c.upper()} rec" + (f" | {c.upper()} on"
                           if c != "issued" else "") for c in cols) + " |")  # fmt: skip
        print("|---" * (2 + 3 * len(preds) + 2) + "|")
        for layer, sc in [*d["per_layer"].items(), ("all", d["per_predictor"])]:
            i = sc["issued"]
            misses = d["misses_per_token"] if layer == "all" else i["misses"] / max(1, i["targets"])
            cells = []
            for c in cols:
                x = sc[c]
                cells.append(f"{x['precision']:.2f} | {x['recall']:.2f}")
                if c != "issued":
                    cells[-1] += f" | {x['issuing'] / max(1, x['targets']):.2f}"
            print(f"| {layer} | {misses:.2f} | " + " | ".join(cells) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", action="store_true", help="the demo model's traces, with M")
    ap.add_argument("--trace", type=Path, default=DEFAULT)
    ap.add_argument("--json", type=Path, help="also write one JSON line per run here")
    ap.add_argument("--rounds", type=int, default=3, help="ABAB timing rounds (default 3)")
    args = ap.parse_args()
    from micro_expert_router.sim import experts_for_fraction
    from micro_expert_router.sim.prefetch import PrefetchReplay
    from micro_expert_router.trace import read_trace

    tmp = tempfile.TemporaryDirectory()
    if args.demo:
        tr, gates = demo_trace(Path(tmp.name))
        sets, policies, warmup = ["s,l,m", "s", "l", "m"], ["lru"], 100
    else:
        if not args.trace.is_file():
            print(f"skipped: {args.trace} is absent (it lives in ../shared/data)")
            return 0
        tr, gates = read_trace(args.trace), None
        sets, policies, warmup = ["s,l", "s"], ["lru", "lcp"], 200
    replay = PrefetchReplay(tr)
    out = open(args.json, "w") if args.json else None  # noqa: SIM115
    print(
        f"trace {tr.path.name}: {tr.num_tokens} tokens ({int(tr.prefill.sum())} prefill) in "
        f"{tr.num_steps} steps, {tr.num_layers} layers x {tr.num_experts} experts, "
        f"top-{tr.top_k}; warmup {warmup}; staging slots {2 * tr.top_k}; lookahead 1\n"
    )
    first = big_table(replay, tr, sets, policies, warmup, gates, out)
    if out:
        out.close()
    layer_tables(first, tr, sets[0].split(","))

    cap = experts_for_fraction(tr, 0.25)
    a_times, b_times = [], []
    print(f"\ntiming (25%, lru): A = {sets[0]} prefetch replay, B = sim/replay.py replay")
    for n in range(args.rounds):
        t0 = time.perf_counter()
        replay.run("lru", cap, predictors=sets[0], warmup=warmup, window_bytes=tr.top_k,
                   gates=gates)  # fmt: skip
        a = time.perf_counter() - t0
        t0 = time.perf_counter()
        replay.baseline.run("lru", cap, warmup=warmup)
        b = time.perf_counter() - t0
        a_times.append(a)
        b_times.append(b)
        print(f"round {n}: A {a:.2f} s  B {b:.2f} s")
    ratios = [a / b for a, b in zip(a_times, b_times, strict=True)]
    print(f"ratio A/B: median {statistics.median(ratios):.1f}x "
          f"(spread {min(ratios):.1f}-{max(ratios):.1f}x); A median "
          f"{statistics.median(a_times):.2f} s for {tr.num_tokens} tokens")  # fmt: skip
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
