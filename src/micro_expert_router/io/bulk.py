"""Reading a file's byte ranges into pre-allocated (anonymous) tensors with the ``DirectReader``.

Used for the dense weights of a store: they are read once at load into ordinary process memory
(``torch.empty``), never mapped, so no page of them can be evicted under a memory cgroup and
faulted in again during decode (docs/memory.md, "No evictable pages").

O_DIRECT needs 4096-aligned file offsets and buffers, which tensors inside a safetensors file do
not have, so the file span is read in aligned windows of ``window_bytes`` into a small
``BufferPool`` (``slots`` windows in flight: the reader's threads keep several requests queued on
the disk) and each window is copied into the ranges it overlaps. Peak memory is the destinations
plus ``slots x window_bytes``; nothing is held twice. A file that refuses O_DIRECT is read with
buffered reads by the reader's own fallback (then dropped from the page cache).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, wait

import torch

from .pool import BufferPool, align_down, align_up
from .reader import DirectReader

DEFAULT_WINDOW_BYTES = 8 * 2**20
DEFAULT_SLOTS = 4
# a bulk load streams large windows, so its own reader keeps 4 MiB chunks (the expert reader's
# default is 1 MiB for the latency of one expert read, which a bulk load does not wait on)
BULK_CHUNK_BYTES = 4 * 2**20


def read_ranges(
    path: str | os.PathLike,
    ranges: Sequence[tuple[int, torch.Tensor]],
    on_done: Callable[[int], None] | None = None,
    reader: DirectReader | None = None,
    window_bytes: int = DEFAULT_WINDOW_BYTES,
    slots: int = DEFAULT_SLOTS,
) -> int:
    """Fill each ``(file_offset, dest)`` of ``ranges`` (``dest`` a contiguous tensor; its
    ``nbytes`` are read) from ``path``. ``on_done(i)`` is called once range ``i`` is complete,
    in order of the ranges' ends, so a caller can convert or repack each tensor while the next
    ones are still being read. Ranges may come in any order but must not overlap. Returns the
    bytes read from the file. A reader is made (and closed) when none is given."""
    order = sorted(range(len(ranges)), key=lambda i: ranges[i][0])
    live = [i for i in order if ranges[i][1].nbytes]  # empty ranges are done at once
    for a, b in zip(live, live[1:], strict=False):
        if ranges[a][0] + ranges[a][1].nbytes > ranges[b][0]:
            raise ValueError(f"read_ranges: ranges at {ranges[a][0]} and {ranges[b][0]} overlap")
    for i in order:
        if not ranges[i][1].nbytes and on_done is not None:
            on_done(i)
    if not live:
        return 0
    lo = align_down(ranges[live[0]][0])
    hi = max(ranges[i][0] + ranges[i][1].nbytes for i in live)  # the last byte wanted
    window = align_up(min(window_bytes, hi - lo))  # each window starts aligned
    own = reader is None
    reader = reader or DirectReader(chunk_bytes=BULK_CHUNK_BYTES)
    pool = BufferPool(max(1, slots), window, name="bulk-read")
    # numpy views: a plain single-threaded memcpy (torch's copy_ runs an OpenMP region per
    # call, which stalls on a busy machine)
    views = {i: ranges[i][1].view(-1).view(torch.uint8).numpy() for i in live}  # [nbytes] each
    ends = sorted(live, key=lambda i: ranges[i][0] + ranges[i][1].nbytes)
    inflight: deque[tuple[int, object, Future]] = deque()
    starts = iter(range(lo, hi, window))
    read = 0
    first = 0  # index into `live` of the first range not yet wholly behind the windows done
    finished = 0  # index into `ends`
    try:
        while True:
            while len(inflight) < pool.total:
                w0 = next(starts, None)
                if w0 is None:
                    break
                lease = pool.lease()
                try:
                    fut = reader.submit(path, w0, min(window, hi - w0), lease)
                except BaseException:
                    lease.release()
                    raise
                inflight.append((w0, lease, fut))
            if not inflight:
                break
            w0, lease, fut = inflight.popleft()
            try:
                res = fut.result()
                src = res.numpy()  # [bytes of this window]
                w1 = w0 + res.length
                read += res.length
                for i in live[first:]:
                    off, dst = ranges[i][0], views[i]
                    if off >= w1:
                        break
                    a, b = max(off, w0), min(off + dst.size, w1)
                    if a < b:
                        dst[a - off : b - off] = src[a - w0 : b - w0]
                while first < len(live) and _end(ranges, views, live[first]) <= w1:
                    first += 1
            finally:
                src = res = None  # no view of the slot outlives its lease
                lease.release()
            while finished < len(ends) and _end(ranges, views, ends[finished]) <= w1:
                if on_done is not None:
                    on_done(ends[finished])
                finished += 1
    finally:
        for _, lease, fut in inflight:  # an error: no slot is left leased, no read left running
            if not fut.cancel():
                wait([fut])
            lease.release()
        if own:
            reader.close()
        pool.close()
    return read


def _end(ranges: Sequence[tuple[int, torch.Tensor]], views: dict, i: int) -> int:
    return ranges[i][0] + views[i].size
