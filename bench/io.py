"""Reader throughput on a cold file: DirectReader loading "experts" vs dd iflag=direct, ABAB.

A file of random bytes (default 4 GiB) is created once under --dir and laid out as back-to-back
expert extents (default ~12 MiB, each starting on a 4096-byte boundary, length not a multiple of
4096). Trial A reads every extent once in random order the way the engine does: one extent per
pool slot, --inflight reads outstanding, waiting on the oldest future and releasing its lease
before submitting the next. Trial B is `dd if=FILE iflag=direct bs=4M of=/dev/null` over the
same file. Both bypass the page cache (O_DIRECT), so no drop_caches is needed; read_ahead_kb is
recorded anyway. Prints one line per trial, medians and spread, and the ratio ours/dd last.

    python bench/io.py [--dir D] [--size-gib 4] [--rounds 5] [--threads T] [--chunk-mib C]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from collections import deque
from pathlib import Path

import numpy as np

from micro_expert_router.io import (
    ALIGN,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_THREADS,
    BufferPool,
    DirectReader,
    align_up,
)

REPO = Path(__file__).resolve().parent.parent


def make_file(path: Path, size: int) -> None:
    if path.exists() and path.stat().st_size == size:
        return
    print(f"creating {path} ({size / 2**30:.1f} GiB of random bytes), once")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    rng = np.random.default_rng(0)
    block = 64 * 2**20
    with open(tmp, "wb") as f:
        for done in range(0, size, block):
            f.write(rng.bytes(min(block, size - done)))
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    os.replace(tmp, path)


def read_ahead_kb(path: Path) -> str:
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (base / "queue/read_ahead_kb", base / "../queue/read_ahead_kb"):
        if q.exists():
            return q.read_text().strip()
    return "unknown"


def extents(size: int, expert_bytes: int) -> list[tuple[int, int]]:
    step = align_up(expert_bytes)
    return [(off, expert_bytes) for off in range(0, size - expert_bytes + 1, step)]


def trial_ours(path: Path, exts, reader: DirectReader, pool: BufferPool, inflight: int) -> int:
    todo = deque(exts)
    pending: deque = deque()
    total = 0
    while todo or pending:
        while todo and len(pending) < inflight:
            off, n = todo.popleft()
            lease = pool.lease()
            pending.append((reader.submit(path, off, n, lease), lease))
        fut, lease = pending.popleft()
        try:
            total += fut.result().length  # the compute thread waits on the oldest expert
        finally:
            lease.release()
    return total


def trial_dd(path: Path) -> int:
    cmd = ["dd", f"if={path}", "iflag=direct", "bs=4M", "of=/dev/null"]
    subprocess.run(cmd, check=True, capture_output=True)
    return path.stat().st_size


def spread(xs: list[float]) -> str:
    return f"median {statistics.median(xs):.3f} GB/s, min {min(xs):.3f}, max {max(xs):.3f}"


def main() -> int:
    default_dir = os.environ.get("TMPDIR") or str(REPO / ".bench-data")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=default_dir, help=f"data folder (default {default_dir})")
    ap.add_argument("--size-gib", type=float, default=4.0)
    ap.add_argument("--expert-bytes", type=int, default=12 * 2**20 + 3 * ALIGN - 100)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--inflight", type=int, default=4, help="expert reads in flight")
    ap.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    ap.add_argument("--chunk-mib", type=float, default=DEFAULT_CHUNK_BYTES / 2**20)
    ap.add_argument("--json", default=str(REPO / "bench/results/io.jsonl"))
    args = ap.parse_args()

    size = align_up(int(args.size_gib * 2**30))
    path = Path(args.dir) / f"io-{size}.bin"
    make_file(path, size)
    exts = extents(size, args.expert_bytes)
    chunk = int(args.chunk_mib * 2**20)
    ra = read_ahead_kb(path)
    print(
        f"file {path} ({size / 1e9:.2f} GB), {len(exts)} extents of {args.expert_bytes} bytes, "
        f"threads {args.threads}, chunk {chunk / 2**20:g} MiB, inflight {args.inflight}, "
        f"read_ahead_kb {ra}"
    )
    pool = BufferPool(args.inflight, args.expert_bytes + 2 * ALIGN, name="bench")
    rng = random.Random(0)
    ours: list[float] = []
    dd: list[float] = []
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    with DirectReader(threads=args.threads, chunk_bytes=chunk) as reader, open(out, "a") as log:
        warned = False
        for r in range(args.rounds):
            for name, fn in (("ours", None), ("dd", trial_dd)):
                t0 = time.perf_counter()
                if fn is None:
                    order = exts[:]
                    rng.shuffle(order)
                    nbytes = trial_ours(path, order, reader, pool, args.inflight)
                    # the reader learns that O_DIRECT is refused only when it opens the file
                    if reader.fallback_files and not warned:
                        warned = True
                        print(f"WARNING: O_DIRECT refused on {path}; 'ours' measures the "
                              "buffered fallback")  # fmt: skip
                else:
                    nbytes = fn(path)
                dt = time.perf_counter() - t0
                gbs = nbytes / dt / 1e9
                (ours if fn is None else dd).append(gbs)
                print(
                    f"round {r + 1} {name:4s} {gbs:.3f} GB/s ({nbytes / 1e9:.2f} GB in {dt:.2f} s)"
                )
                rec = dict(bench="io", trial=name, round=r + 1, gbs=gbs, bytes=nbytes, s=dt)
                rec.update(threads=args.threads, chunk=chunk, inflight=args.inflight)
                rec.update(expert_bytes=args.expert_bytes, read_ahead_kb=ra)
                log.write(json.dumps(rec) + "\n")
    paired = [a / b for a, b in zip(ours, dd, strict=True)]
    print(f"ours: {spread(ours)}")
    print(f"dd:   {spread(dd)}")
    print(f"paired ratios: {' '.join(f'{x:.3f}' for x in paired)}")
    ratio = statistics.median(ours) / statistics.median(dd)
    print(
        f"ratio ours/dd {ratio:.3f} (median of paired rounds {statistics.median(paired):.3f}, "
        f"range {min(paired):.3f}-{max(paired):.3f}, {args.rounds} ABAB rounds)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
