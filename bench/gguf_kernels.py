"""GGUF expert decode kernels: GB/s of one token through a ``gguf:`` expert against DRAM read
bandwidth, measured in the same rounds.

Decode runs the engine's path, ``expert_forward(fmt, x, [view])`` with T = 1 and bfloat16
activations (``--dtype``; bf16 is the engine's fast mode, where the native types use int8
activations; float32 mode keeps float32 activations): the native block kernels of
``kernels/ggml_native.cpp`` for Q4_0, Q8_0, MXFP4, Q4_K, Q5_K and Q6_K, the dequantize + torch
path for the other types, rotating over enough distinct copies of the
expert (>= --rotate-mb) that its bytes come from DRAM, not L3. GB/s = expert bytes (GGUF blocks,
headers included) / time. The DRAM reference is a ``torch.sum`` over a 1 GiB float32 tensor.
Every round runs every measurement once, in the same order (ABAB); ratios are paired per round.

    python bench/gguf_kernels.py [--shape 2048x768] [--types q4_k/q4_k/q6_k,q6_k/q6_k/q6_k]
                                 [--rounds 7] [--threads 2]

One line per round, then per type set the median [min-max] ratio decode GB/s / DRAM GB/s; the
last line is the lowest ratio over the type sets (the acceptance bar is >= 0.7 for Q4_K and
Q6_K).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from micro_expert_router.kernels import ggml_native  # noqa: E402
from micro_expert_router.kernels.formats import choose_group, expert_forward  # noqa: E402
from micro_expert_router.kernels.ggml_formats import GGUFExperts  # noqa: E402


def dram_read_gbs(a: torch.Tensor) -> float:
    t = time.perf_counter()
    a.sum()
    return a.numel() * a.element_size() / (time.perf_counter() - t) / 1e9


def build(types: tuple[str, str, str], d: int, i: int, rotate_bytes: int):
    from gguf_models import quantize  # test helper: K-quant blocks by round-to-nearest

    g = torch.Generator().manual_seed(0)
    mats = [torch.randn(s, generator=g).numpy() * 0.05 for s in ((i, d), (i, d), (d, i))]
    raws = [quantize(m, t)[0].tobytes() for m, t in zip(mats, types, strict=True)]
    fmt = GGUFExperts(tuple((t,) for t in types))  # type: ignore[arg-type]
    group = choose_group(fmt, i)
    buf = fmt.pack_blocks(tuple(raws), types, d, i, group)
    copies = max(2, -(-rotate_bytes // buf.numel()))
    return fmt, [fmt.view(buf.clone(), d, group) for _ in range(copies)], buf.numel()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shape", default="2048x768", help="DxI of one expert (Qwen3-30B-A3B)")
    p.add_argument("--types", default="q4_k/q4_k/q6_k,q6_k/q6_k/q6_k,q4_k/q4_k/q4_k")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rotate-mb", type=int, default=256)
    p.add_argument("--reps", type=int, default=20, help="expert calls per measurement")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--json", default=None, help="append JSON lines here")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    d, i = (int(v) for v in a.shape.split("x"))
    print(f"native: {ggml_native.available()} {ggml_native.INFO.reason}", flush=True)
    sets = [tuple(s.upper().split("/")) for s in a.types.split(",")]
    built = {s: build(s, d, i, a.rotate_mb << 20) for s in sets}  # type: ignore[misc]
    big = torch.ones(1 << 28)  # 1 GiB
    x = torch.randn(1, d).to(getattr(torch, a.dtype))
    ratios: dict[tuple, list[float]] = {s: [] for s in sets}
    for r in range(a.rounds):
        dram = dram_read_gbs(big)
        row = {"round": r, "dram_gbs": dram}
        for s, (fmt, views, nbytes) in built.items():
            expert_forward(fmt, x, [views[0]])  # warm
            t = time.perf_counter()
            for k in range(a.reps):
                expert_forward(fmt, x, [views[k % len(views)]])
            gbs = nbytes * a.reps / (time.perf_counter() - t) / 1e9
            ratios[s].append(gbs / dram)
            row["/".join(s)] = gbs
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items()), flush=True)  # fmt: skip
        if a.json:
            with open(a.json, "a") as f:
                f.write(json.dumps(row) + "\n")
    lows = []
    for s, rs in ratios.items():
        med = statistics.median(rs)
        lows.append(med)
        print(f"ratio {'/'.join(s)} decode/DRAM: {med:.2f} [{min(rs):.2f}-{max(rs):.2f}]")
    print(f"ratio lowest decode/DRAM over type sets (bar >= 0.7): {min(lows):.2f}")


if __name__ == "__main__":
    main()
