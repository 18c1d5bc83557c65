"""Where a batched decode step goes: ``Transformer.forward_batch`` on B sequences against one
sequence's ``forward``, and the top ops of the batch step under ``torch.profiler``.

Each sequence gets a random prompt of --prompt ids, then --warmup batch steps; the batch step and
the single step (sequence 0 alone) are timed over --steps steps each, then --profile-steps batch
steps run under the profiler. Resident stores preload every expert first.

    python bench/batch_profile.py STORE [--batch 8] [--threads 2] [--steps 4]

Last lines: ms per batch step and per single step, their ratio, and the profiler's table (self
CPU time per op over the profiled steps).
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import micro_expert_router as mer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("store")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=32, help="prompt ids per sequence")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--profile-steps", type=int, default=2)
    ap.add_argument("--rows", type=int, default=12, help="ops in the profiler's table")
    args = ap.parse_args()
    if args.batch < 1 or args.steps < 1:
        raise SystemExit("--batch and --steps must be at least 1")
    torch.set_num_threads(args.threads)
    with mer.load(args.store) as eng:
        eng.preload()
        m = eng.model
        g = torch.Generator().manual_seed(0)
        vocab = eng.args.vocab_size
        n = args.prompt + args.warmup + 2 * args.steps + args.profile_steps + 1
        caches = [m.new_cache(n) for _ in range(args.batch)]
        for kv in caches:
            m.forward(torch.randint(0, vocab, (args.prompt,), generator=g), kv, last_only=True)
        toks = [int(t) for t in torch.randint(0, vocab, (args.batch,), generator=g)]
        for _ in range(args.warmup):
            m.forward_batch(toks, caches)
        t = time.perf_counter()
        for _ in range(args.steps):
            m.forward_batch(toks, caches)
        batch_ms = (time.perf_counter() - t) / args.steps * 1e3
        t = time.perf_counter()
        for _ in range(args.steps):
            m.forward(torch.tensor([toks[0]]), caches[0])
        single_ms = (time.perf_counter() - t) / args.steps * 1e3
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                m.forward_batch(toks, caches)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    print(f"batch step (B={args.batch}) {batch_ms:.1f} ms, single step {single_ms:.1f} ms: "
          f"a batch step costs {batch_ms / single_ms:.2f}x a single one for {args.batch} tokens "
          f"({args.profile_steps} steps profiled above)")  # fmt: skip


if __name__ == "__main__":
    main()
