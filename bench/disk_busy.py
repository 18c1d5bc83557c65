"""Is the disk kept busy when it is the bottleneck? (issue 13, points 5 and 6)

In one run, per trial:

1. the O_DIRECT bandwidth of the store's expert file, with the engine's own ``DirectReader``:
   ``--bw-mib`` MiB in reads of ``--bw-read-mib`` at random aligned offsets, ``2 x threads``
   reads queued (the best the reader gets from this disk);
2. a disk-bound decode: the store loaded with ``memory_limit = --limit`` (default 0.3 x the
   store, so the expert cache holds a fraction of the working set), the page cache dropped
   first (as root), a short prompt, then ``-n`` decode steps fed ``Random(1)`` ids (the same
   routing whatever the numerics). Its figure is ``bytes read / (decode time x bandwidth)``:
   1.0 means the disk streamed at full speed for the whole decode. The reader's own busy time
   splits the gap in two: the fraction of the decode with no read in the kernel (``idle``:
   compute or Python between reads) and the rate while busy against the bandwidth (``depth``:
   too few reads queued at once);
3. with ``--prompt-tokens P`` (e.g. 512), a cold out-of-core prefill of P random ids in one
   step on a fresh engine: prompt tok/s against the disk bound (``P / (bytes read /
   bandwidth)``: what the same bytes allow at disk speed) and against the compute bound
   (``--resident-prompt-tps``, the same prompt resident, when given: the prefill cannot beat
   either, so the figure that counts is ``tok/s / min(disk bound, compute bound)``).

Each engine run is a child process of its own. One JSON line per trial, then a final ratio line
(medians). For the lead, on an idle machine:

    python bench/disk_busy.py --store /tmp/peers/models/olmoe-like-q4 --trials 3 -n 32
    python bench/disk_busy.py --store /tmp/peers/models/olmoe-like-q4 --trials 1 -n 8 \\
        --prompt-tokens 512 --limit 0.3x

``uptime`` is recorded with every trial: other load on the machine distorts both figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from collections import deque
from pathlib import Path

import torch

import micro_expert_router as mer
from micro_expert_router.io import BufferPool, DirectReader, align_down
from micro_expert_router.io.reader import DEFAULT_THREADS
from micro_expert_router.store import Store


def uptime() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    subprocess.run(["sync"], check=False)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def read_ahead_kb(path: Path) -> str:
    dev = os.stat(path).st_dev
    base = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (base / "queue/read_ahead_kb", base / "../queue/read_ahead_kb"):
        if q.exists():
            return q.read_text().strip()
    return "?"


def bandwidth(file: str, total: int, read_bytes: int, threads: int, seed: int) -> float:
    """Bytes per second of O_DIRECT reads of ``read_bytes`` at random aligned offsets."""
    size = os.stat(file).st_size
    read_bytes = min(read_bytes, align_down(size))
    n = max(1, total // read_bytes)
    rng = random.Random(seed)
    offsets = [align_down(rng.randrange(0, size - read_bytes + 1)) for _ in range(n)]
    depth = 2 * threads
    pool = BufferPool(depth, read_bytes, name="bw")
    reader = DirectReader(threads=threads)
    q: deque = deque()
    got = 0
    try:
        t0 = time.perf_counter()
        for off in offsets:
            if len(q) == depth:
                lease, fut = q.popleft()
                got += fut.result().length
                lease.release()
            lease = pool.lease()
            q.append((lease, reader.submit(file, off, read_bytes, lease)))
        while q:
            lease, fut = q.popleft()
            got += fut.result().length
            lease.release()
        dt = time.perf_counter() - t0
    finally:
        reader.close()
        pool.close()
    return got / dt


def ids(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def load(a: argparse.Namespace, limit: int | None, context: int):
    opts = json.loads(a.options)
    if limit is None:  # resident: every expert cached, whatever budget the options name
        opts = {k: v for k, v in opts.items() if k not in ("cache_bytes", "plan")}
    if a.router:
        opts["router"] = a.router
    return mer.load(a.store, memory_limit=limit, max_context=context, threads=a.threads,
                    io_threads=a.io_threads, prefetch=a.prefetch, **opts)  # fmt: skip


def decode_trial(a: argparse.Namespace, limit: int, bw: float) -> dict:
    eng = load(a, limit, 8 + a.n + 1)
    try:
        model, reader = eng.model, eng.provider.reader
        vocab = eng.args.vocab_size
        kv = model.new_cache(8 + a.n + 1)
        with torch.inference_mode():
            model.forward(torch.tensor(ids(a.seed, 8, vocab)), kv, last_only=True)
            r0, s0 = reader.stats, eng.provider.stats.snapshot()
            t0 = time.perf_counter()
            for tok in ids(a.seed + 1, a.n, vocab):
                model.forward(torch.tensor([tok]), kv, last_only=True)
            dt = time.perf_counter() - t0
        r1, d = reader.stats, eng.provider.stats.minus(s0)
        nbytes, busy = r1.bytes_read - r0.bytes_read, r1.busy_s - r0.busy_s
        return {"decode_tps": a.n / dt, "decode_s": dt, "bytes_read": nbytes,
                "hit_rate": d.hits / max(d.experts_needed, 1), "io_wait_s": d.io_wait_s,
                "cache_mb": eng.memory.cache / 2**20 if eng.memory else None,
                "busy_frac": busy / dt, "busy_rate_vs_bw": nbytes / busy / bw if busy else 0.0,
                "disk_busy": nbytes / (dt * bw)}  # fmt: skip
    finally:
        eng.close()


def resident_prompt_tps(a: argparse.Namespace) -> float:
    """The compute bound: the same prefill with every expert preloaded (no memory limit)."""
    p = a.prompt_tokens
    eng = load(a, None, p + 1)
    try:
        eng.preload()
        kv = eng.model.new_cache(p + 1)
        with torch.inference_mode():
            t0 = time.perf_counter()
            eng.model.forward(torch.tensor(ids(a.seed, p, eng.args.vocab_size)), kv,
                              last_only=True)  # fmt: skip
            return p / (time.perf_counter() - t0)
    finally:
        eng.close()


def prefill_trial(a: argparse.Namespace, limit: int, bw: float) -> dict:
    p = a.prompt_tokens
    eng = load(a, limit, p + 1)
    try:
        model, reader = eng.model, eng.provider.reader
        kv = model.new_cache(p + 1)
        r0 = reader.stats
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.forward(torch.tensor(ids(a.seed, p, eng.args.vocab_size)), kv, last_only=True)
            dt = time.perf_counter() - t0
        r1 = reader.stats
        nbytes = r1.bytes_read - r0.bytes_read
        experts = Store.open(a.store).total_expert_bytes
        disk_tps = p / (nbytes / bw) if nbytes else float("inf")
        out = {"prompt_tokens": p, "prompt_tps": p / dt, "prompt_s": dt, "bytes_read": nbytes,
               "reads_per_expert_byte": nbytes / experts, "disk_bound_tps": disk_tps,
               "vs_disk_bound": p / dt / disk_tps,
               "busy_frac": (r1.busy_s - r0.busy_s) / dt}  # fmt: skip
        if a.resident_prompt_tps:
            out["vs_min_bound"] = p / dt / min(disk_tps, a.resident_prompt_tps)
        return out
    finally:
        eng.close()


CHILDREN = {"decode": lambda a, limit, bw: decode_trial(a, limit, bw),
            "prefill": lambda a, limit, bw: prefill_trial(a, limit, bw),
            "resident": lambda a, limit, bw: {"tps": resident_prompt_tps(a)}}  # fmt: skip


def in_child(a: argparse.Namespace, kind: str, limit: int, bw: float) -> dict:
    """One engine run in a fresh child process: a process that loaded an engine before keeps
    memory that the next engine's split would count as its runtime."""
    job = json.dumps({"kind": kind, "limit": limit, "bw": bw,
                      "resident_prompt_tps": a.resident_prompt_tps})  # fmt: skip
    r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", job],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"the {kind} run failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--limit", default="0.3x",
                    help="memory_limit: bytes (K/M/G) or a multiple of the store's size")
    ap.add_argument("-n", type=int, default=32, help="decode steps")
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads")
    ap.add_argument("--io-threads", type=int, default=None)
    ap.add_argument("--prefetch", default="off")
    ap.add_argument("--router", default=None, help="trace:FILE or markov:FILE (docs/router.md)")
    ap.add_argument("--options", default="{}", help="more engine options, as JSON")
    ap.add_argument("--bw-mib", type=int, default=1024, help="MiB read to measure bandwidth")
    ap.add_argument("--bw-read-mib", type=int, default=16, help="size of each bandwidth read")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="also time a cold out-of-core prefill of this many tokens")
    ap.add_argument("--resident-prompt-tps", type=float, default=None,
                    help="prompt tok/s of the same prefill resident (the compute bound); "
                    "with --measure-resident, measured in this run (needs RAM for every expert)")
    ap.add_argument("--measure-resident", action="store_true")
    ap.add_argument("--no-decode", action="store_true", help="only the prefill trial")
    ap.add_argument("--no-drop", action="store_true", help="leave the page cache alone")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child is not None:
        job = json.loads(a.child)
        a.resident_prompt_tps = job["resident_prompt_tps"]
        print(json.dumps(CHILDREN[job["kind"]](a, job["limit"], job["bw"])), flush=True)
        return 0
    store = Store.open(a.store)
    size = store.total_expert_bytes + store.dense_file.stat().st_size
    s = a.limit
    if s.endswith("x"):
        limit = int(float(s[:-1]) * size)
    else:
        mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1].upper(), 1)
        limit = int(float(s.rstrip("KMGkmg")) * mult)
    file = max({e.file for e in store.experts.values()}, key=lambda f: os.stat(f).st_size)
    threads = a.io_threads or DEFAULT_THREADS
    busy, pre = [], []
    for trial in range(a.trials):
        dropped = not a.no_drop and drop_caches()
        bw = bandwidth(file, a.bw_mib << 20, a.bw_read_mib << 20, threads, a.seed + trial)
        row = {"trial": trial, "limit_bytes": limit, "bw_mb_s": bw / 1e6,
               "read_ahead_kb": read_ahead_kb(Path(file)), "caches_dropped": dropped}  # fmt: skip
        if not a.no_decode:
            dropped = not a.no_drop and drop_caches()
            row.update(in_child(a, "decode", limit, bw))
            # measured again after the decode and the higher figure kept: on a VM the host's
            # cache can serve the decode's hot extents faster than the first measurement
            after = bandwidth(file, a.bw_mib << 20, a.bw_read_mib << 20, threads, a.seed + trial)
            row["bw_after_mb_s"] = after / 1e6
            if after > bw:
                row["disk_busy"] = row["bytes_read"] / (row["decode_s"] * after)
                row["busy_rate_vs_bw"] *= bw / after
            busy.append((row["disk_busy"], row["busy_frac"]))
        if a.prompt_tokens and a.measure_resident:
            a.resident_prompt_tps = in_child(a, "resident", limit, bw)["tps"]
            row["resident_prompt_tps"] = a.resident_prompt_tps
        if a.prompt_tokens:
            dropped = not a.no_drop and drop_caches()
            row["prefill"] = in_child(a, "prefill", limit, bw)
            pre.append(row["prefill"])
        row["loadavg"] = uptime()
        print(json.dumps(row), flush=True)
    parts = []
    if busy:
        parts.append(f"disk busy during decode (bytes / (time x O_DIRECT bw)): median "
                     f"{statistics.median(b for b, _ in busy):.2f} over {len(busy)} trial(s), "
                     f"target >= 0.85 (reads in the kernel "
                     f"{statistics.median(f for _, f in busy):.0%} of the time)")
    if pre:
        parts.append(f"prefill {a.prompt_tokens} tok: prompt tok/s / disk bound median "
                     f"{statistics.median(p['vs_disk_bound'] for p in pre):.2f}")
        if a.resident_prompt_tps:
            parts.append(f"/ min(disk, compute) bound median "
                         f"{statistics.median(p['vs_min_bound'] for p in pre):.2f} (target >= 0.9)")
    print("ratio: " + "; ".join(parts) + f" | loadavg {uptime()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
