"""Quantized dense weights: decode GEMV GB/s against DRAM read bandwidth, the native-vs-GEMM
crossover in T, and the fused multi-expert decode op against one call per expert.

Decode (T = 1) runs ``DenseWeight.linear`` (the engine's path: the native GEMV of
``kernels/native_dense.cpp``) over enough distinct copies of each matrix (>= --rotate-mb) that
the weights stream from DRAM. GB/s = the matrix's bytes (scales included) / time. The DRAM read
reference (``torch.sum`` over 1 GiB of float32) and a copy (``Tensor.copy_``, read + write bytes)
are measured in the same rounds, at the same thread count. Every round runs every measurement
once, in the same order (ABAB...); figures are the median and [min-max] over rounds, ratios are
paired per round.

    python bench/dense_kernels.py [--shapes 2048x2048,50304x2048] [--formats q8,q4,q4b]
                                  [--threads 1,2] [--rounds 5]

q4b is q4 repacked in RAM in the expert kernel's row blocks (``dense_quant.Q4Blocked``), which
is what the model runs q4 matrices with where it can; q4 is the row-major GEMV as stored.

Lines: one per trial; per (threads, format, shape) a ratio line; the crossover table
(tokens/s of the native GEMV and of dequantize + GEMM per T); the fused experts line; last, the
lowest decode ratio over every shape, format and thread count.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from micro_expert_router.kernels import native
from micro_expert_router.kernels.dense_quant import DENSE_FORMATS


def stats(v: list[float], nd: int = 2) -> str:
    return f"{statistics.median(v):.{nd}f} [{min(v):.{nd}f}-{max(v):.{nd}f}]"


def dram(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    t = time.perf_counter()
    a.sum()
    rd = a.numel() * 4 / (time.perf_counter() - t) / 1e9
    t = time.perf_counter()
    b.copy_(a)
    return rd, 2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9


def copies(fmt: str, n: int, k: int, rotate_bytes: int):
    """Distinct copies of one matrix: q8, q4 (row-major, as stored) or q4b (q4 repacked in the
    expert kernel's row blocks, ``Q4Blocked``: what the model runs its q4 matrices with)."""
    g = torch.Generator().manual_seed(n + k)
    base = "q4" if fmt == "q4b" else fmt
    w = DENSE_FORMATS[base].quantize(torch.randn(n, k, generator=g) * k**-0.5)
    count = max(2, -(-rotate_bytes // w.nbytes))
    cls = type(w)
    out = [cls(*(t.clone() for t in w.parts().values())) for _ in range(count)]
    if fmt == "q4b":
        out = [c.blocked() for c in out]
        if None in out:
            raise SystemExit("q4b: the q4 expert kernel cannot run here (see Q4Dense.blocked)")
    return out


def gemv_gbs(ws, x: torch.Tensor) -> float:
    t = time.perf_counter()
    for w in ws:
        w.linear(x)
    return ws[0].nbytes * len(ws) / (time.perf_counter() - t) / 1e9


def tokens_per_s(w, x: torch.Tensor, gemm: bool, reps: int) -> float:
    run = (lambda: w.native_linear(x)) if not gemm else (lambda: w.gemm(x))
    run()
    t = time.perf_counter()
    for _ in range(reps):
        run()
    return x.shape[0] * reps / (time.perf_counter() - t)


def fused_experts(rounds: int) -> None:
    """8 olmoe-like experts (D 2048, I 1024) on one token: fused call vs 8 calls."""
    from micro_expert_router.kernels.experts import experts_forward
    from micro_expert_router.kernels.formats import FORMATS, choose_group, expert_forward

    for name in ("q8", "q4"):
        fmt = FORMATS[name]
        group = choose_group(fmt, 1024)
        g = torch.Generator().manual_seed(1)
        sets = []
        for _ in range(8):  # 8 sets of 8 experts: 64 distinct experts, out of L3
            bufs = [fmt.pack(torch.randn(1024, 2048, generator=g) * 0.02,
                             torch.randn(1024, 2048, generator=g) * 0.02,
                             torch.randn(2048, 1024, generator=g) * 0.03, group)
                    for _ in range(8)]  # fmt: skip
            sets.append([fmt.view(b, 2048, group) for b in bufs])
        x = torch.randn(1, 2048)
        fz, sp = [], []
        for _ in range(rounds):
            for fused, acc in ((True, fz), (False, sp)):
                t = time.perf_counter()
                for views in sets:
                    if fused:
                        experts_forward(fmt, x, views)
                    else:
                        for v in views:
                            expert_forward(fmt, x, [v])
                acc.append((time.perf_counter() - t) / len(sets) * 1e3)
        path = "native" if native.available() else "torch ops (no AVX-512: no fused native path)"
        print(f"experts {name} 8 x 2048x1024, T=1, {path}: fused {stats(fz)} ms, 8 calls "
              f"{stats(sp)} ms, speedup "
              f"{stats([s / f for s, f in zip(sp, fz, strict=True)])}")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2048x2048,50304x2048", help="NxK list")
    p.add_argument("--formats", default="q8,q4,q4b", help="q8, q4 (row-major), q4b (row blocks)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rotate-mb", type=int, default=256, help=">= 4x L3")
    p.add_argument("--dram-mb", type=int, default=1024)
    p.add_argument("--crossover", default="1,2,4,8,16,32,64,128", help="T list ('' to skip)")
    p.add_argument("--no-experts", action="store_true")
    args = p.parse_args()
    print(f"native dense GEMV: {native.dense_available()} ({native.INFO.reason or 'AVX2'}); "
          f"cpu threads {os.cpu_count()}")  # fmt: skip
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    fmts = args.formats.split(",")
    threads = [int(t) for t in args.threads.split(",")]
    a = torch.ones(args.dram_mb * 2**18)
    b = torch.empty_like(a)
    mats = {(f, n, k): copies(f, n, k, args.rotate_mb << 20) for f in fmts for n, k in shapes}
    x = torch.randn(1, max(k for _, k in shapes))
    res: dict[tuple, list[float]] = {}
    for r in range(args.rounds):
        for th in threads:
            torch.set_num_threads(th)
            rd, cp = dram(a, b)
            res.setdefault(("dram", th), []).append(rd)
            res.setdefault(("copy", th), []).append(cp)
            line = [f"round {r} threads {th}: DRAM read {rd:.1f} GB/s, copy {cp:.1f}"]
            for (f, n, k), ws in mats.items():
                gbs = gemv_gbs(ws, x[:, :k])
                res.setdefault((f, n, k, th), []).append(gbs)
                line.append(f"{f} {n}x{k} {gbs:.1f}")
            print(", ".join(line), flush=True)
    worst = []
    for th in threads:
        d = res[("dram", th)]
        print(f"threads {th}: DRAM read (torch.sum {args.dram_mb} MiB) {stats(d, 1)} GB/s, "
              f"copy {stats(res[('copy', th)], 1)} GB/s")  # fmt: skip
        for f, n, k in mats:
            g = res[(f, n, k, th)]
            ratios = [u / v for u, v in zip(g, d, strict=True)]
            worst.append((statistics.median(ratios), f"{f} {n}x{k} threads {th}"))
            print(f"{f} {n}x{k} threads {th}: {stats(g, 1)} GB/s, ratio to DRAM read "
                  f"{stats(ratios)}")  # fmt: skip
    if args.crossover:
        torch.set_num_threads(max(threads))
        for f in fmts:
            w = mats[(f, 2048, 2048)][0] if (f, 2048, 2048) in mats else next(
                v[0] for key, v in mats.items() if key[0] == f)  # fmt: skip
            cells = []
            for t in (int(v) for v in args.crossover.split(",")):
                xt = torch.randn(t, w.shape[1])
                reps = max(2, 64 // t)
                nat = statistics.median(tokens_per_s(w, xt, False, reps) for _ in range(3))
                gem = statistics.median(tokens_per_s(w, xt, True, reps) for _ in range(3))
                cells.append(f"T={t} native {nat:.0f} gemm {gem:.0f}")
            print(f"crossover {f} {w.shape[0]}x{w.shape[1]} threads {max(threads)} (tokens/s; "
                  f"native_below={w.native_below}): " + "; ".join(cells))  # fmt: skip
    if not args.no_experts:
        fused_experts(args.rounds)
    lo = min(worst)
    print(f"dense decode ratio (GEMV GB/s / DRAM read GB/s), lowest median: {lo[0]:.2f} "
          f"({lo[1]})")  # fmt: skip


if __name__ == "__main__":
    main()
