"""Decode time per token with 1 and 2 compute threads, optionally beside busy processes
(docs/streaming.md, "Threads": 284 vs 56 ms per token on a shared 2-core machine).

The bundled demo store with every expert cached (no disk reads after the first token), greedy
decode of ``--tokens`` tokens; trials alternate 1 and 2 torch threads (ABAB). ``--busy N`` starts
N pure-Python busy-loop processes for the whole run, the "other process using both cores" of the
doc. Prints one line per trial (median decode ms/token) and the ratio 2 threads / 1 thread last.

    python bench/threads.py [--tokens 32] [--rounds 3] [--busy 2]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

import torch

import micro_expert_router as mer
from micro_expert_router.demo.store import demo_store_path

BUSY = "while True: pass"


def decode_ms(engine, tokens: int) -> float:
    steps = list(engine.generate(list(range(1, 17)), tokens, temperature=0, stop_at_eos=False))
    return statistics.median(s.step_s for s in steps[1:]) * 1e3  # decode steps only


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the run")
    args = ap.parse_args()
    busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
    try:
        with mer.load(demo_store_path()) as engine:  # every expert cached
            decode_ms(engine, 4)  # warm: the first token reads every expert it needs
            ms: dict[int, list[float]] = {1: [], 2: []}
            for r in range(args.rounds):
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    ms[threads].append(decode_ms(engine, args.tokens))
                    print(f"round {r + 1} threads {threads}: {ms[threads][-1]:.1f} ms/token "
                          f"(median of {args.tokens - 1} decode steps, {args.busy} busy "
                          "processes)")  # fmt: skip
    finally:
        for p in busy:
            p.kill()
            p.wait()
    one, two = statistics.median(ms[1]), statistics.median(ms[2])
    print(f"ratio 2 threads / 1 thread: {two / one:.3f} ({two:.1f} vs {one:.1f} ms/token)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
