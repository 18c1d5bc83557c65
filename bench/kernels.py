"""Expert kernel throughput: decode GB/s per format against DRAM read bandwidth, prefill tokens/s.

Decode (one token) runs through the real path, ``expert_forward(fmt, x, [fmt.view(buf)])`` with
float32 activations, rotating over enough distinct copies of each expert (>= --rotate-mb) that
weights stream from DRAM rather than L3. GB/s = expert bytes (scales included) / time. The DRAM
read reference is a ``torch.sum`` over a 1 GiB float32 tensor, measured in the same rounds.
Every round runs every measurement once, in the same order (ABAB...); the summary gives the
median and the min-max spread over rounds, and ratios are paired per round.

Variants: ``q4`` and ``q8`` take the engine's path (the native kernel of ``kernels/native.cpp``
for decode when it is available, else torch's ops); ``q4:torch`` / ``q8:torch`` force torch's
int4/int8 ops (the fallback path); ``q4/1grp`` and ``q8/1grp`` are the formats with a single group
per expert (to show per-group overhead); ``q4:fused`` / ``q4:deq`` force torch's fused int4
kernel or the dequantize-to-bf16 + F.linear path, and ``q4:native`` / ``q8:native`` the native
kernel at every T, for the prefill thresholds.

    python bench/kernels.py [--shapes 2048x1408,2048x5632] [--rounds 7] [--threads 2]

The last two lines are the q8 and q4 ratios (decode GB/s / DRAM read GB/s, median [min-max] of
the per-round ratios), each the lowest over the shapes; the q4 line is last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from micro_expert_router.kernels import native, quant  # noqa: F401  (registers q4, q8)
from micro_expert_router.kernels.formats import FORMATS, choose_group, expert_forward


def dram_read_gbs(a: torch.Tensor) -> float:
    t = time.perf_counter()
    a.sum()
    return a.numel() * a.element_size() / (time.perf_counter() - t) / 1e9


def variant(name: str):
    """(format object, single_group, prefill override) for a variant name."""
    base, _, mod = name.partition("/") if "/" in name else name.partition(":")
    fmt = type(FORMATS[base])()
    if mod in ("fused", "deq", "torch"):
        fmt.native = False  # instance override: torch's ops
    if mod in ("fused", "deq"):
        fmt.prefill_min_tokens = 1 if mod == "deq" else None
    if mod == "native":
        fmt.native_below = 1 << 30
    return fmt, mod == "1grp"


def path_of(fmt, tokens: int) -> str:
    """Which code computes this variant at ``tokens`` tokens."""
    if not getattr(fmt, "native", False):
        pre = getattr(fmt, "prefill_min_tokens", None)
        return "torch" if pre is None or tokens < pre or fmt.name not in ("q4", "q8") else "dense"
    if tokens < fmt.native_below and native.available():
        return "native"
    pre = fmt.prefill_min_tokens
    return "dense" if pre is not None and tokens >= pre else "torch"


def build(name: str, d: int, i: int, rotate_bytes: int, min_copies: int):
    """Distinct copies of one packed random expert, and the group size used."""
    fmt, single = variant(name)
    group = i if single else choose_group(fmt, i)
    g = torch.Generator().manual_seed(0)
    std = d**-0.5
    gate, up = (torch.randn(i, d, generator=g) * std for _ in range(2))
    down = torch.randn(d, i, generator=g) * i**-0.5
    buf = fmt.pack(gate, up, down, group)
    copies = max(min_copies, -(-rotate_bytes // buf.numel()))
    views = [fmt.view(buf.clone(), d, group) for _ in range(copies)]
    return fmt, views, buf.numel(), group


def time_per_expert(fmt, views, x: torch.Tensor) -> float:
    t = time.perf_counter()
    for w in views:
        expert_forward(fmt, x, [w])
    return (time.perf_counter() - t) / len(views)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="2048x1408,2048x5632", help="DxI list")
    p.add_argument("--decode", default="f32,bf16,q8,q4,q8:torch,q4:torch,q8/1grp,q4/1grp")
    p.add_argument("--prefill", default="bf16,q8,q8:fused,q8:deq,q4,q4:fused,q4:deq")
    p.add_argument("--tokens", default="8,64")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--rotate-mb", type=int, default=160, help=">= 4x L3 (32 MiB here)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--jsonl", default=None, help="append one JSON line per measurement")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    big = torch.rand(256 * 2**20)  # 1 GiB of float32: the DRAM read reference
    out = open(args.jsonl, "a") if args.jsonl else None
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    tokens = [int(t) for t in args.tokens.split(",")]
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    print(
        f"torch {torch.__version__}, {args.threads} threads of {os.cpu_count()} cores, load {load}"
    )
    omp = os.environ.get("OMP_WAIT_POLICY")
    print(f"q4 layout {quant.FORMATS['q4'].layout_tag()}; OMP_WAIT_POLICY={omp}")
    t0 = time.perf_counter()
    if native.available():
        built = native.INFO.build_seconds
        how = f"built in {built:.1f} s" if built is not None else "loaded from the cache"
        print(f"native kernels: {native.INFO.path} ({how}, {time.perf_counter() - t0:.1f} s)")
    else:
        print(f"native kernels not used: {native.INFO.reason}")
    ratios: dict[str, dict[str, list[float]]] = {"q8": {}, "q4": {}}
    for d, i in shapes:
        shape = f"{d}x{i}"
        dec = {n: build(n, d, i, args.rotate_mb << 20, 2) for n in args.decode.split(",")}
        pre = {n: build(n, d, i, 0, 2) for n in args.prefill.split(",")}
        for n, (fmt, views, nbytes, group) in dec.items():
            print(
                f"{shape} {n}: {nbytes / 1e6:.1f} MB/expert, g={group}, {len(views)} copies, "
                f"path {path_of(fmt, 1)}"
            )
        for n, (fmt, _, _, _) in pre.items():
            paths = ", ".join(f"T={t}: {path_of(fmt, t)}" for t in tokens)
            print(f"{shape} prefill {n}: {paths}")
        res: dict[str, list[float]] = {}
        x1 = torch.randn(1, d)
        for fmt, views, _, _ in dec.values():  # warm-up (allocator, first-touch)
            expert_forward(fmt, x1, [views[0]])
        for r in range(args.rounds):
            res.setdefault("dram", []).append(dram_read_gbs(big))
            line = [f"round {r} {shape} dram {res['dram'][-1]:.1f} GB/s"]
            for n, (fmt, views, nbytes, _) in dec.items():
                gbs = nbytes / time_per_expert(fmt, views, x1) / 1e9
                res.setdefault(n, []).append(gbs)
                line.append(f"{n} {gbs:.1f}")
            for t in tokens:
                xt = torch.randn(t, d)
                for n, (fmt, views, _, _) in pre.items():
                    tps = t / time_per_expert(fmt, views, xt)
                    res.setdefault(f"{n}@{t}", []).append(tps)
                    line.append(f"{n}@{t} {tps:.0f}tok/s")
            res.setdefault("dram2", []).append(dram_read_gbs(big))
            print(" | ".join(line), flush=True)
            if out:
                rec = {"shape": shape, "round": r, **{k: v[-1] for k, v in res.items()}}
                out.write(json.dumps(rec) + "\n")
        print(f"--- {shape}: median [min-max] over {args.rounds} rounds")
        dram = [(a + b) / 2 for a, b in zip(res.pop("dram"), res.pop("dram2"), strict=True)]
        print(f"{shape} DRAM read (torch.sum 1 GiB): {fmt_stats(dram)} GB/s")
        for k, v in res.items():
            unit = "tok/s per expert" if "@" in k else "GB/s decode"
            extra = ""
            if "@" not in k:
                ratio = [a / b for a, b in zip(v, dram, strict=True)]
                extra = f"  ratio to DRAM {fmt_stats(ratio, 2)}"
                if k in ratios:
                    ratios[k][shape] = ratio
            print(f"{shape} {k}: {fmt_stats(v)} {unit}{extra}")
    print(f"load average at the end: {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")
    for k in ("q8", "q4"):
        if not ratios[k]:
            continue
        worst = min(ratios[k], key=lambda s: statistics.median(ratios[k][s]))
        print(
            f"{k} ratio ({k} decode GB/s / DRAM read GB/s, {worst}): "
            f"{fmt_stats(ratios[k][worst], 2)}"
        )


def fmt_stats(v: list[float], nd: int = 1) -> str:
    return f"{statistics.median(v):.{nd}f} [{min(v):.{nd}f}-{max(v):.{nd}f}]"


if __name__ == "__main__":
    main()
