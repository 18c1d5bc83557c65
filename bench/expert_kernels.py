"""Expert decode kernels: GB/s of the fused q4/q8 SwiGLU op against DRAM read bandwidth.

One call is one decode step of one olmoe-like MoE layer: ``experts_forward`` (the engine's path,
kernels/experts.py) on 8 experts of D = 2048, I = 1024 at T tokens (1 by default). The experts
rotate over distinct copies (>= --rotate-mb in all) so their bytes stream from DRAM, not L3.
GB/s = the experts' bytes (codes and scales) / time. Each round measures, at the same thread
count and in this order: the DRAM read reference (``torch.sum`` over --dram-mb of float32, read
once), then per format the int8-activation kernel (the default, ``int8_activations``) and the
float32-activation kernel it replaced. Figures are the median and [min-max] over rounds; ratios
are paired per round.

    python bench/expert_kernels.py [--formats q4,q8] [--threads 2] [--tokens 1] [--rounds 5]
                                   [--rotate-mb 512] [--dram-mb 1024]

Lines: one per round; per (format, T) a summary with the ratio to DRAM and the speedup over
the float32 path; last, the lowest ratio (kernel GB/s / DRAM read GB/s) over formats at T = 1.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from micro_expert_router.kernels import native
from micro_expert_router.kernels.experts import experts_forward
from micro_expert_router.kernels.formats import FORMATS, choose_group

D, I, TOP_K = 2048, 1024, 8


def stats(v: list[float], nd: int = 2) -> str:
    return f"{statistics.median(v):.{nd}f} [{min(v):.{nd}f}-{max(v):.{nd}f}]"


def expert_sets(name: str, rotate_bytes: int, d: int, i: int) -> list[list[object]]:
    """Sets of TOP_K expert views, distinct buffers, >= rotate_bytes in all (8 packed experts,
    cloned: the values do not change the speed)."""
    fmt = FORMATS[name]
    group = choose_group(fmt, i)
    g = torch.Generator().manual_seed(0)
    bufs = [fmt.pack(torch.randn(i, d, generator=g) * d**-0.5,
                     torch.randn(i, d, generator=g) * d**-0.5,
                     torch.randn(d, i, generator=g) * i**-0.5, group)
            for _ in range(TOP_K)]  # fmt: skip
    n_sets = max(2, -(-rotate_bytes // sum(b.numel() for b in bufs)))
    return [[fmt.view(b.clone(), d, group) for b in bufs] for _ in range(n_sets)]


def kernel_gbs(name: str, sets: list[list[object]], x: torch.Tensor, int8: bool) -> float:
    fmt = FORMATS[name]
    keep = fmt.int8_activations
    fmt.int8_activations = int8  # type: ignore[misc]  # the instance's choice, restored below
    try:
        experts_forward(fmt, x, sets[-1])  # warm: scratch and thread pool
        t = time.perf_counter()
        for views in sets:
            experts_forward(fmt, x, views)
        dt = time.perf_counter() - t
    finally:
        fmt.int8_activations = keep  # type: ignore[misc]
    return sum(v.buf.numel() for s in sets for v in s) / dt / 1e9  # type: ignore[attr-defined]


def dram_read(a: torch.Tensor) -> float:
    t = time.perf_counter()
    a.sum()
    return a.numel() * 4 / (time.perf_counter() - t) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--formats", default="q4,q8")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tokens", default="1", help="T list, e.g. 1,4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rotate-mb", type=int, default=512, help=">= 8x L3")
    p.add_argument("--dram-mb", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=D, help="D (small values: a quick check)")
    p.add_argument("--inter", type=int, default=I, help="I, the expert FFN size")
    args = p.parse_args()
    if not native.available():
        raise SystemExit(f"the native expert kernels are not available: {native.INFO.reason}")
    torch.set_num_threads(args.threads)
    fmts = args.formats.split(",")
    tokens = [int(t) for t in args.tokens.split(",")]
    print(f"native: {native.INFO.path}; avx512 {native.has_avx512()}, avx2 "
          f"{native.has_avx2_fma()}; threads {args.threads}; {TOP_K} experts of D={args.hidden}, "
          f"I={args.inter} per call")  # fmt: skip
    sets = {f: expert_sets(f, args.rotate_mb << 20, args.hidden, args.inter) for f in fmts}
    a = torch.ones(args.dram_mb << 18)  # float32
    g = torch.Generator().manual_seed(1)
    xs = {t: torch.randn(t, args.hidden, generator=g) for t in tokens}
    res: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        rd = dram_read(a)
        res.setdefault(("dram",), []).append(rd)
        line = [f"round {r}: DRAM read {rd:.1f} GB/s"]
        for f in fmts:
            for t in tokens:
                for int8 in (True, False):
                    gbs = kernel_gbs(f, sets[f], xs[t], int8)
                    res.setdefault((f, t, int8), []).append(gbs)
                    line.append(f"{f} T={t} {'int8' if int8 else 'f32'} {gbs:.1f}")
        print(", ".join(line), flush=True)
    d = res[("dram",)]
    print(f"DRAM read (torch.sum over {args.dram_mb} MiB, {args.threads} threads): "
          f"{stats(d, 1)} GB/s")  # fmt: skip
    worst = []
    for f in fmts:
        for t in tokens:
            i8, fl = res[(f, t, True)], res[(f, t, False)]
            ratio = [u / v for u, v in zip(i8, d, strict=True)]
            speedup = [u / v for u, v in zip(i8, fl, strict=True)]
            if t == 1:
                worst.append((statistics.median(ratio), f))
            print(f"{f} T={t}: int8 {stats(i8, 1)} GB/s, f32 {stats(fl, 1)} GB/s; int8 / DRAM "
                  f"read {stats(ratio)}; int8 / f32 speedup {stats(speedup)}")  # fmt: skip
    if worst:
        lo = min(worst)
        print(f"expert decode ratio (int8 kernel GB/s / DRAM read GB/s, T=1, {args.threads} "
              f"threads), lowest median: {lo[0]:.2f} ({lo[1]})")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
