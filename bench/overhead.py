"""Per-token overhead of a resident decode step: the share of wall time spent outside compute ops
(Python, dispatch, bookkeeping), and where the step's time goes.

  python bench/overhead.py STORE [--threads 2] [-n 32] [--context 200]

The store's experts are preloaded (resident). A decode step's wall time is measured without any
profiler over ``-n`` random-id tokens; then the same number of steps runs under
``torch.profiler`` and the time inside the top-level ops (the native kernels and torch ops the
forward pass calls, with their own children) is summed. Overhead = 1 - op time / profiled wall
time, per token. The profiler's own bookkeeping between ops lands in the overhead, so the figure
is an upper bound; 1 - op time / unprofiled step time (the profiler's cost taken out, assuming the
ops themselves take as long without it) is printed beside it as the estimate. Prints the top
ops and the overhead line last.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

import micro_expert_router as mer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("store")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--context", type=int, default=200, help="tokens in the KV cache first")
    ap.add_argument("--option", action="append", default=[], help="extra load option k=v")
    a = ap.parse_args()
    opts = dict(kv.split("=", 1) for kv in a.option)
    eng = mer.load(a.store, threads=a.threads, **opts)
    eng.preload()
    m = eng.model
    rng = random.Random(1)
    vocab = eng.args.vocab_size
    kv = m.new_cache(a.context + 2 * a.n + 8)
    with torch.inference_mode():
        m.forward(torch.tensor([rng.randrange(vocab) for _ in range(a.context)]), kv)
        for _ in range(4):
            m.forward(torch.tensor([rng.randrange(vocab)]), kv, last_only=True)
        t0 = time.perf_counter()
        for _ in range(a.n):
            m.forward(torch.tensor([rng.randrange(vocab)]), kv, last_only=True)
        wall = (time.perf_counter() - t0) / a.n
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
    print(f"decode step {wall * 1e3:.2f} ms ({1 / wall:.2f} tok/s) at context {a.context}; "
          f"profiled {wall_prof * 1e3:.2f} ms, of which ops {op_time * 1e3:.2f} ms; "
          f"overhead {1 - op_time / wall_prof:.1%} of the profiled step (upper bound), "
          f"{max(0.0, 1 - op_time / wall):.1%} of the unprofiled one")  # fmt: skip


if __name__ == "__main__":
    main()
