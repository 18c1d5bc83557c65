"""Decode attention per layer against the memory bound: time for one query per head over a KV
cache of S positions, next to the KV bytes / DRAM bandwidth measured in the same run.

  python bench/attention.py [--heads 16 --kv-heads 16 --head-dim 128] [--threads 2]

Shapes default to the olmoe-like model (16 heads of 128, multi-head). For each context S in
``--contexts`` and each KV dtype, the layer's whole cache (capacity 4096, as a long-context
engine holds it) is touched once per call; a set of ``--layers`` caches is rotated so the bytes
come from DRAM, not the last-level cache. Also times SDPA on the same data (the path decode used
before). DRAM bandwidth: ``torch.sum`` over 1 GiB, median of 5, alternating with the kernel
(ABAB). Prints one line per (dtype, S) and the worst ratio last.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from micro_expert_router.kernels.attention import available, decode_attention


def dram_gbs(buf: torch.Tensor) -> float:
    t0 = time.perf_counter()
    buf.sum()
    return buf.numel() * buf.element_size() / (time.perf_counter() - t0) / 1e9


def timed(fn, reps: int) -> float:
    t0 = time.perf_counter()
    for i in range(reps):
        fn(i)
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--contexts", default="32,512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="caches rotated per call")
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"native kernel: {available()}, threads {a.threads}")
    big = torch.ones(1 << 28)  # 1 GiB of float32
    h, hk, dh, cap = a.heads, a.kv_heads, a.head_dim, 4096
    q = torch.randn(h, dh)
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float32):
        ks = [torch.randn(hk, cap, dh).to(dtype) for _ in range(a.layers)]
        vs = [torch.randn(hk, cap, dh).to(dtype) for _ in range(a.layers)]
        for s in map(int, a.contexts.split(",")):
            kv_bytes = 2 * hk * s * dh * ks[0].element_size()
            reps = max(8, min(400, int(4e8 / kv_bytes)))

            def kern(i, s=s, ks=ks, vs=vs):
                decode_attention(q, ks[i % a.layers], vs[i % a.layers], s, dh**-0.5)

            qd = q.to(dtype)[:, None]  # [H, 1, Dh]

            def sdpa(i, s=s, ks=ks, vs=vs, qd=qd):
                k, v = ks[i % a.layers][:, :s], vs[i % a.layers][:, :s]
                F.scaled_dot_product_attention(qd, k, v, scale=dh**-0.5, enable_gqa=h != hk)

            kern(0)
            sdpa(0)
            t_k, t_s, bw = [], [], []
            for _ in range(a.rounds):
                bw.append(dram_gbs(big))
                t_k.append(timed(kern, reps))
                t_s.append(timed(sdpa, max(4, reps // 4)))
            tk, ts, b = statistics.median(t_k), statistics.median(t_s), statistics.median(bw)
            bound = kv_bytes / (b * 1e9)
            worst = max(worst, tk / bound)
            print(f"{str(dtype)[6:]:>8} S={s:5d}: {tk * 1e6:8.1f} us/layer  SDPA {ts * 1e6:8.1f} us"
                  f"  KV {kv_bytes / 1e6:6.2f} MB / DRAM {b:5.1f} GB/s = {bound * 1e6:7.1f} us"
                  f"  -> {tk / bound:5.2f}x the bound")  # fmt: skip
    print(f"worst time / (KV bytes / DRAM bandwidth): {worst:.2f}")


if __name__ == "__main__":
    main()
