"""Single-read latency and CPU cost of the reader (docs/io.md: "single-expert latency", "CPU
cost per GB").

On the file ``bench/io.py`` creates (or any file), for each ``threads x chunk`` configuration:

- latency: one expert extent read with nothing else in flight, ``--reads`` extents at random,
  median and range (O_DIRECT, so cold);
- CPU: every extent read once with ``--inflight`` in flight, the process's CPU time (user +
  system, all threads) divided by the GB read.

One line per configuration and trial; the last line is the ratio of the CPU cost of the first
configuration to the last.

    python bench/io_cost.py [--dir D] [--size-gib 4] [--configs 4x4,4x1] [--reads 20]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import time
from pathlib import Path

from micro_expert_router.io import ALIGN, BufferPool, DirectReader

REPO = Path(__file__).resolve().parent.parent


def load_io_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_io", REPO / "bench/io.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cpu_s() -> float:
    """This process's CPU seconds, user + system, every thread (microsecond resolution)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> int:
    io_bench = load_io_bench()  # its data file and extent layout, so the figures compare
    default_dir = os.environ.get("TMPDIR") or str(REPO / ".bench-data")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=default_dir)
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--expert-bytes", type=int, default=12 * 2**20 + 3 * ALIGN - 100)
    ap.add_argument("--configs", default="4x4,4x1", help="threads x chunk MiB, comma-separated")
    ap.add_argument("--reads", type=int, default=20, help="single reads timed per configuration")
    ap.add_argument("--inflight", type=int, default=4)
    ap.add_argument("--json", default=str(REPO / "bench/results/io_cost.jsonl"))
    args = ap.parse_args()
    size = io_bench.align_up(int(args.size_gib * 2**30))
    path = Path(args.dir) / f"io-{size}.bin"
    io_bench.make_file(path, size)
    exts = io_bench.extents(size, args.expert_bytes)
    pool = BufferPool(args.inflight, args.expert_bytes + 2 * ALIGN, name="bench")
    rng = random.Random(0)
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    cost = []
    with open(out, "a") as log:
        for cfg in args.configs.split(","):
            threads, chunk_mib = cfg.split("x")
            chunk = int(float(chunk_mib) * 2**20)
            with DirectReader(threads=int(threads), chunk_bytes=chunk) as reader:
                lat = []
                for off, n in rng.sample(exts, min(args.reads, len(exts))):
                    with pool.lease() as lease:
                        t0 = time.perf_counter()
                        reader.read(path, off, n, lease)
                        lat.append(time.perf_counter() - t0)
                order = exts[:]
                rng.shuffle(order)
                c0, t0 = cpu_s(), time.perf_counter()
                nbytes = io_bench.trial_ours(path, order, reader, pool, args.inflight)
                cpu, wall = cpu_s() - c0, time.perf_counter() - t0
            s_per_gb = cpu / (nbytes / 1e9)
            cost.append(s_per_gb)
            print(f"{threads} threads x {chunk_mib} MiB: single read median "
                  f"{statistics.median(lat) * 1e3:.1f} ms ({min(lat) * 1e3:.1f}-"
                  f"{max(lat) * 1e3:.1f}, {len(lat)} reads of {args.expert_bytes} bytes); CPU "
                  f"{s_per_gb:.3f} s/GB ({nbytes / 1e9:.2f} GB at "
                  f"{nbytes / wall / 1e9:.2f} GB/s)")  # fmt: skip
            log.write(json.dumps(dict(bench="io_cost", threads=int(threads), chunk=chunk,
                                      latency_s=lat, cpu_s_per_gb=s_per_gb)) + "\n")  # fmt: skip
    print(f"ratio CPU s/GB first/last configuration: {cost[0] / cost[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
