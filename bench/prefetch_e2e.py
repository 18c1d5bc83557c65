"""Prefetch on vs off, end to end (issue 6, point 3): ABAB rounds of generation on a streamed
store, decode tok/s and I/O stall per token, prefetch on (`--prefetch s,l,m` by default) vs off
at the same cache budget. Prints one line per trial and the on/off speed ratio last; writes JSON
lines to bench/results/prefetch_e2e.jsonl.

    python bench/prefetch_e2e.py                # widened demo: learned routing, disk-bound
    python bench/prefetch_e2e.py --store demo   # the bundled demo store (compute-bound)
    python bench/prefetch_e2e.py --store DIR    # any store, e.g. random weights (token-id prompts)

The default store is the demo model with 12.6 MB experts (bench/widened_demo.py): the trained
demo's routing, with reads that dominate decode time as they do for real models.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import micro_expert_router as mer
from micro_expert_router.store import Store

PROMPTS = ("Q: Why did the programmer quit his job?\nA:", "Never trust a man who",
           "The best things in life are", "If at first you don't succeed,")  # fmt: skip


def run(engine, prompt, tokens: int) -> list:
    """Decode steps of one generation."""
    return list(engine.generate(prompt, tokens, temperature=0.8, seed=5, stop_at_eos=False))[1:]


def pool_runs(runs: list[list]) -> dict:
    steps = [s for r in runs for s in r]
    n = len(steps)
    return {"tok_s": n / sum(s.step_s for s in steps),
            "stall_ms": 1e3 * sum(s.io_wait_s for s in steps) / n,
            "mb_per_token": sum(s.bytes_read for s in steps) / n / 1e6,
            "prefetch_hits_per_token": sum(s.prefetch_hits for s in steps) / n,
            "misses_per_token": sum(s.misses for s in steps) / n}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", default="wide", help="wide (default), demo, or a store folder")
    ap.add_argument("--budget-frac", type=float, default=0.25)
    ap.add_argument("--prefetch", default="s,l,m")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if args.store == "demo":
        from micro_expert_router.demo.store import demo_store_path

        store, prompts = demo_store_path(), PROMPTS
    elif args.store == "wide":
        from widened_demo import widened_demo_store

        store, prompts = widened_demo_store(), PROMPTS
    else:
        store = Path(args.store)
        prompts = [list(range(5 + 7 * i, 21 + 7 * i)) for i in range(len(PROMPTS))]
    s = Store.open(store)
    budget = int(args.budget_frac * s.total_expert_bytes)
    print(
        f"{store}: {len(s.experts)} experts x {s.expert_bytes / 1e6:.2f} MB, cache "
        f"{budget / 1e6:.1f} MB ({args.budget_frac:.0%}), {args.threads} thread(s)"
    )
    out = Path(__file__).resolve().parent / "results" / "prefetch_e2e.jsonl"
    out.parent.mkdir(exist_ok=True)
    res = {"off": [], args.prefetch: []}
    # Both engines stay loaded, as in a server: caches and predictors warm up once and carry
    # over between prompts. They take turns prompt by prompt (this VM's disk drifts within
    # seconds), alternating which goes first; a round pools its prompts.
    engines = {pf: mer.load(store, threads=args.threads, cache_bytes=budget, prefetch=pf)
               for pf in res}  # fmt: skip
    for r in range(args.rounds):
        per = {pf: [] for pf in res}
        for j, prompt in enumerate(prompts):
            order = list(res) if (r + j) % 2 == 0 else list(res)[::-1]
            for pf in order:
                per[pf].append(run(engines[pf], prompt, args.tokens))
        for pf in res:
            d = pool_runs(per[pf])
            res[pf].append(d)
            print(
                f"round {r} prefetch {pf:8s} {d['tok_s']:7.2f} tok/s  stall "
                f"{d['stall_ms']:6.2f} ms/token  {d['mb_per_token']:6.2f} MB/token  misses "
                f"{d['misses_per_token']:.2f} (prefetched {d['prefetch_hits_per_token']:.2f})"
            )
            with open(out, "a") as f:
                f.write(json.dumps({"time": time.time(), "store": str(store), "prefetch": pf,
                                    **d}) + "\n")  # fmt: skip
    for engine in engines.values():
        engine.close()
    med = {pf: statistics.median(d["tok_s"] for d in v) for pf, v in res.items()}
    stall = {pf: statistics.median(d["stall_ms"] for d in v) for pf, v in res.items()}
    on, off = med[args.prefetch], med["off"]
    paired = [a["tok_s"] / b["tok_s"] for a, b in zip(res[args.prefetch], res["off"], strict=True)]
    print(
        f"median decode: off {off:.2f} tok/s (stall {stall['off']:.2f} ms), on {on:.2f} tok/s "
        f"(stall {stall[args.prefetch]:.2f} ms); per-round on/off "
        f"{' '.join(f'{v:.2f}' for v in paired)}"
    )
    print(
        f"prefetch on/off decode speed: {on / off:.3f} (median of paired rounds "
        f"{statistics.median(paired):.3f})"
    )


if __name__ == "__main__":
    main()
