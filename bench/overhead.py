"""Per-token overhead of a resident decode step: the share of wall time spent outside compute ops
(Python, dispatch, bookkeeping), and where the step's time goes.

  python bench/overhead.py STORE [--threads 2] [-n 32] [--context 200]

The store's experts are preloaded (resident). A decode step's wall time is measured without any
profiler over ``-n`` random-id tokens; then the same number of steps runs under
``torch.profiler`` and the time inside the top-level ops (the native kernels and torch ops the
forward pass calls, with their own children) is summed. Overhead = 1 - op time / profiled wall
time, per token. The profiler's own bookkeeping between ops lands in the overhead, so the figure
is an upper bound. Unprofiled and profiled steps are different steps, and on a noisy VM their
times differ by more than the overhead, so the figure the overhead line gives is measured a third
way, in the same steps: every op of the engine's native libraries (``torch.ops.mer``,
``torch.ops.mer_attn``: the kernels, which hold the torch ops they call) is wrapped with a
``perf_counter`` pair, and overhead = 1 - time inside them / wall time of those steps. What is
left is Python, the torch ops called from Python (allocation, views, the residual add) and the
wrappers' own few microseconds per call; the Python-to-C++ dispatch of the native ops themselves
is inside the wrapped time. ``--rounds`` repeats the timed and wrapped passes alternately (ABAB)
and prints each. Prints the top ops and the overhead line last.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import micro_expert_router as mer


def steps(m, kv, rng: random.Random, vocab: int, n: int) -> float:
    """Seconds per decode step over ``n`` random-id tokens."""
    t0 = time.perf_counter()
    for _ in range(n):
        m.forward(torch.tensor([rng.randrange(vocab)]), kv, last_only=True)
    return (time.perf_counter() - t0) / n


def wrapped_steps(m, kv, rng: random.Random, vocab: int, n: int) -> tuple[float, float]:
    """Seconds per step, and of them seconds inside the engine's native ops, in the same steps:
    each op the namespaces have resolved so far (the warm-up steps resolved every one the step
    calls) is replaced by a timing wrapper for these steps only."""
    inside = [0.0]

    def timed(op):
        def call(*args, **kwargs):
            t = time.perf_counter()
            try:
                return op(*args, **kwargs)
            finally:
                inside[0] += time.perf_counter() - t

        return call

    saved = []
    for ns in (torch.ops.mer, torch.ops.mer_attn):
        for name, op in list(vars(ns).items()):
            if isinstance(op, torch._ops.OpOverloadPacket):
                saved.append((ns, name, op))
                setattr(ns, name, timed(op))
    try:
        wall = steps(m, kv, rng, vocab, n)
    finally:
        for ns, name, op in saved:
            setattr(ns, name, op)
    return wall, inside[0] / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("store")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--context", type=int, default=200, help="tokens in the KV cache first")
    ap.add_argument("--option", action="append", default=[], help="extra load option k=v")
    ap.add_argument("--rounds", type=int, default=3, help="timed / wrapped passes (ABAB)")
    a = ap.parse_args()
    opts = dict(kv.split("=", 1) for kv in a.option)
    eng = mer.load(a.store, threads=a.threads, **opts)
    eng.preload()
    m = eng.model
    rng = random.Random(1)
    vocab = eng.args.vocab_size
    kv = m.new_cache(a.context + (2 * a.rounds + 1) * a.n + 8)
    with torch.inference_mode():
        m.forward(torch.tensor([rng.randrange(vocab) for _ in range(a.context)]), kv)
        for _ in range(4):
            m.forward(torch.tensor([rng.randrange(vocab)]), kv, last_only=True)
        walls, shares = [], []
        for r in range(a.rounds):
            walls.append(steps(m, kv, rng, vocab, a.n))
            wrapped, inside = wrapped_steps(m, kv, rng, vocab, a.n)
            shares.append(1 - inside / wrapped)
            print(f"round {r}: step {walls[-1] * 1e3:.2f} ms unwrapped, {wrapped * 1e3:.2f} ms "
                  f"wrapped, of which native ops {inside * 1e3:.2f} ms: outside {shares[-1]:.1%}")
        wall = statistics.median(walls)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(a.n):
                m.forward(torch.tensor([rng.randrange(vocab)]), kv, last_only=True)
            wall_prof = (time.perf_counter() - t0) / a.n
    # top-level ops only: an op whose interval lies inside another op's is that op's child
    events = sorted((e for e in prof.events() if e.device_type.name == "CPU"),
                    key=lambda e: (e.thread, e.time_range.start))  # fmt: skip
    top: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    end: dict[int, float] = {}
    for e in events:
        if e.time_range.start < end.get(e.thread, -1):
            continue  # nested inside the previous top-level op of this thread
        end[e.thread] = e.time_range.end
        top[e.name] += e.time_range.elapsed_us() / 1e6
        calls[e.name] += 1
    op_time = sum(top.values()) / a.n
    print(f"{'op':<40} {'ms/token':>9} {'calls/token':>12}")
    for name, t in sorted(top.items(), key=lambda kv: -kv[1])[:15]:
        print(f"{name:<40} {t / a.n * 1e3:9.3f} {calls[name] / a.n:12.1f}")
    print(f"profiled step {wall_prof * 1e3:.2f} ms, of which top-level ops {op_time * 1e3:.2f} ms: "
          f"outside them {1 - op_time / wall_prof:.1%} (profiler's bookkeeping included)")
    print(f"decode step {wall * 1e3:.2f} ms ({1 / wall:.2f} tok/s) at context {a.context}; "
          f"overhead (outside the native ops, same steps) {statistics.median(shares):.1%} "
          f"[{min(shares):.1%}-{max(shares):.1%}] over {a.rounds} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
