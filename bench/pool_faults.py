"""What a miss costs when its slot was never touched: O_DIRECT reads of experts into fresh memory
of each kind (docs/memory.md, "Where a limited decode's time went").

  python bench/pool_faults.py --store /tmp/peers/models/olmoe-like-q4 --reads 24 --rounds 2

Each round and kind: a new region of ``--reads`` expert slots, then one ``preadv`` of a
different expert (never read before in this run) into each slot. Kinds: ``shared`` (Python's
default ``mmap(-1, n)``: shmem, lazy), ``private`` (``MAP_PRIVATE``, lazy), and ``pool`` (the
engine's ``BufferPool``: private and populated up front). Prints one line per round and kind
(median wall ms per read, mean CPU ms per read) and a final ratio line, lazy shared / pool.
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import resource
import statistics
import time

from micro_expert_router.io import BufferPool, align_down, align_up
from micro_expert_router.store import Store


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--reads", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    st = Store.open(a.store)
    keys = list(st.experts)
    random.Random(3).shuffle(keys)
    slot = align_up(st.expert_bytes) + 4096
    fds: dict[str, int] = {}
    k, res = 0, {}
    for r in range(a.rounds):
        for kind in ("shared", "private", "pool"):
            pool = BufferPool(a.reads, slot, name="bench") if kind == "pool" else None
            region = (
                None
                if pool
                else mmap.mmap(
                    -1,
                    a.reads * slot,
                    flags=(mmap.MAP_SHARED if kind == "shared" else mmap.MAP_PRIVATE)
                    | mmap.MAP_ANONYMOUS,
                )
            )
            view = pool._view if pool else memoryview(region)
            wall, cpus = [], []
            for i in range(a.reads):
                e = st.experts[keys[k % len(keys)]]
                k += 1
                if e.file not in fds:
                    fds[e.file] = os.open(e.file, os.O_RDONLY | os.O_DIRECT)
                fd = fds[e.file]
                a0 = align_down(e.offset)
                n = align_up(e.offset + e.length) - a0
                c, t = cpu(), time.perf_counter()
                os.preadv(fd, [view[i * slot : i * slot + n]], a0)
                wall.append(time.perf_counter() - t)
                cpus.append(cpu() - c)
            del view
            if pool:
                pool.close()
            else:
                region.close()
            res.setdefault(kind, []).append(statistics.median(wall))
            print(
                f"round {r} {kind:8s}: {st.expert_bytes / 1e6:.2f} MB read into a fresh slot: "
                f"median {1e3 * statistics.median(wall):.2f} ms, CPU "
                f"{1e3 * statistics.mean(cpus):.2f} ms",
                flush=True,
            )
    for fd in fds.values():
        os.close(fd)
    med = {kind: statistics.median(v) for kind, v in res.items()}
    print(
        f"ratio lazy shared / populated pool {med['shared'] / med['pool']:.2f}, lazy private / "
        f"pool {med['private'] / med['pool']:.2f} (median read time)"
    )


if __name__ == "__main__":
    main()
