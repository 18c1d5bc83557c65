"""MXFP4 experts (GPT-OSS): decode GB/s of the native kernel against DRAM read bandwidth.

Runs ``experts_forward`` on the ``mxfp4`` format, ``--k`` experts per call (the engine's decode
path for the K experts of a layer: ``mxfp4.cpp`` on the bytes in place) with one token, over
enough distinct experts (>= --rotate-mb) that the weights stream from DRAM. GB/s = the experts'
bytes (blocks, scales, biases, padding) / time. The DRAM read reference (``torch.sum`` over
1 GiB of float32, the same thread count) is measured in the same rounds; every round runs both
once (ABAB...), ratios are paired per round.

    python bench/mxfp4_kernel.py [--hidden 2880] [--inter 2880] [--threads 2] [--rounds 5]

Lines: one per trial (round, activations: bf16 = int8 kernel, f32 = float kernel), then per
activation dtype the median ratio; the last line is the bf16 (decode mode) ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from micro_expert_router.kernels import choose_group, get_format
from micro_expert_router.kernels.experts import experts_forward
from micro_expert_router.kernels.mxfp4 import RawExpert, available


def random_expert(d: int, inter: int, seed: int) -> RawExpert:
    g = torch.Generator().manual_seed(seed)

    def blocks(rows: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        b = torch.randint(0, 256, (rows, k // 32, 16), generator=g, dtype=torch.uint8)
        return b, torch.randint(118, 124, (rows, k // 32), generator=g, dtype=torch.uint8)

    gb, gs = blocks(2 * inter, d)
    db, ds = blocks(d, inter)
    return RawExpert(
        gb, gs, db, ds, torch.randn(2 * inter, generator=g), torch.randn(d, generator=g)
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=2880)  # GPT-OSS 20B/120B
    p.add_argument("--inter", type=int, default=2880)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rotate-mb", type=int, default=512)
    p.add_argument("--k", type=int, default=4, help="experts per call (GPT-OSS routes 4)")
    a = p.parse_args()
    if not available():
        raise SystemExit("the native MXFP4 kernel is not available (compiler, AVX2)")
    torch.set_num_threads(a.threads)
    fmt = get_format("mxfp4")
    group = choose_group(fmt, a.inter)
    one = fmt.pack_raw(random_expert(a.hidden, a.inter, 0), group)
    count = max(2, -(-(a.rotate_mb << 20) // one.numel()))
    count = -(-count // a.k) * a.k  # whole calls
    bufs = [one] + [
        fmt.pack_raw(random_expert(a.hidden, a.inter, s), group) for s in range(1, count)
    ]
    views = [fmt.view(b, a.hidden, group) for b in bufs]
    big = torch.ones(1 << 28)  # 1 GiB of float32
    print(f"D={a.hidden} I={a.inter} g={group}: {count} experts x {one.numel() / 1e6:.2f} MB, "
          f"{a.k} per call, {a.threads} threads")  # fmt: skip
    ratios: dict[str, list[float]] = {"bf16": [], "f32": []}
    for r in range(a.rounds):
        t = time.perf_counter()
        big.sum()
        dram = big.numel() * 4 / (time.perf_counter() - t) / 1e9
        for name, dtype in (("bf16", torch.bfloat16), ("f32", torch.float32)):
            x = torch.randn(1, a.hidden).to(dtype)
            experts_forward(fmt, x, views[: a.k])  # warm: the activation path and the op
            t = time.perf_counter()
            for c in range(0, count, a.k):
                experts_forward(fmt, x, views[c : c + a.k])
            gbs = one.numel() * count / (time.perf_counter() - t) / 1e9
            ratios[name].append(gbs / dram)
            print(f"round {r} {name}: kernel {gbs:.2f} GB/s, DRAM read {dram:.2f} GB/s, "
                  f"ratio {gbs / dram:.3f}")  # fmt: skip
    for name in ("f32", "bf16"):
        v = ratios[name]
        print(f"{name} activations: kernel / DRAM = {statistics.median(v):.3f} "
              f"[{min(v):.3f}-{max(v):.3f}] over {len(v)} rounds")  # fmt: skip


if __name__ == "__main__":
    main()
