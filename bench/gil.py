"""Does the q4 expert kernel release the GIL? (docs/quantization.md, "GIL").

A pure-Python counting loop runs for ``--seconds`` alone, then again while another thread runs
``expert_forward`` back to back on a q4 expert (``--shape DxI``, 1 torch thread, one token). If
the op holds the GIL, the loop's rate drops towards half or less; if it releases it, the loop
keeps nearly its solo rate (on a machine with a core to spare). ABAB rounds; one line per trial,
the ratio (with op / alone, median) last.

    python bench/gil.py [--shape 2048x5632] [--seconds 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from micro_expert_router.kernels import FORMATS, choose_group, expert_forward


def count_for(seconds: float) -> float:
    """Increments per second of a pure-Python loop."""
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(1000):
            n += 1
    return n / seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="2048x5632", help="hidden x intermediate")
    ap.add_argument("--seconds", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    d, i = (int(x) for x in args.shape.split("x"))
    torch.set_num_threads(1)
    fmt = FORMATS["q4"]
    g = choose_group(fmt, i)
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(i, d, generator=gen) * d**-0.5, torch.randn(i, d, generator=gen) * d**-0.5,
         torch.randn(d, i, generator=gen) * i**-0.5]  # fmt: skip
    buf = fmt.pack(*w, g)
    view = fmt.view(buf, d, g)
    x = torch.randn(1, d, generator=gen)  # [1, D]
    print(f"q4 expert {d}x{i}: {buf.numel() / 1e6:.1f} MB, groups of {g}")
    ratios = []
    for r in range(args.rounds):
        alone = count_for(args.seconds)
        stop, calls = threading.Event(), [0]

        def run_op(stop: threading.Event = stop, calls: list[int] = calls) -> None:
            while not stop.is_set():
                expert_forward(fmt, x, [view])
                calls[0] += 1

        t = threading.Thread(target=run_op)
        t.start()
        try:
            shared = count_for(args.seconds)
        finally:
            stop.set()
            t.join()
        ratios.append(shared / alone)
        print(f"round {r + 1}: loop alone {alone / 1e6:.2f} M/s, with the op running "
              f"{shared / 1e6:.2f} M/s ({calls[0] / args.seconds:.0f} expert calls/s): "
              f"{shared / alone:.1%} of solo")  # fmt: skip
    print(f"ratio with op / alone (median of {args.rounds}): {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
