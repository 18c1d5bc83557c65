"""DirectReader: O_DIRECT ``preadv`` into pool slots from a small thread pool, returning futures.

The reader reads bytes and nothing else: which expert, where it lives and what the bytes mean
belong to the store and the cache. ``submit(file, offset, length, lease)`` reads the 4096-aligned
range around ``[offset, offset + length)`` into the lease's slot and returns a
``concurrent.futures.Future`` whose result (a ``ReadResult``) says where the requested bytes
start inside the slot. Large reads are cut into ``chunk_bytes`` pieces read in parallel.

Priority: every chunk goes through one heap ordered by (priority, arrival), and each worker takes
the best chunk when it becomes free, so a ``DEMAND`` read that arrives after queued ``PREFETCH``
chunks is the next thing read (a chunk already in the kernel is not interrupted). ``PREFETCH``
chunks use only the disk's idle time: one starts only while no ``DEMAND`` chunk is in the kernel,
and at most ``prefetch_chunks`` at once, so a demand read that arrives finds at most that many
prefetch chunks ahead of it on the disk (a worker that finds the disk busy parks the chunk; it is
taken up again when the demand reads end).

Ownership: the caller owns the lease. ``submit`` adds one reference for the read itself and drops
it when the future is done (result, error, or cancelled before it started), so the caller may
release its own reference at any time without the slot being reused while a read still writes
into it. ``Future.cancel()`` succeeds only before the first chunk starts.

Fallback: if a file refuses O_DIRECT (``EINVAL`` at open or at the first read, e.g. tmpfs), the
reader reads it with buffered ``preadv`` followed by ``posix_fadvise(DONTNEED)`` (so the page cache
is not filled with expert bytes) and logs one warning per reader.

Errors: short reads are continued; ``EIO``/``EINTR``/``EAGAIN`` are retried ``retries`` times with
exponential backoff and then raised as ``ReadError`` naming file and offset; a file that ends
before the requested bytes raises ``ReadError`` naming file, offset, expected and actual length.
"""

from __future__ import annotations

import errno
import heapq
import itertools
import logging
import os
import threading
import time
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import IntEnum
from typing import TYPE_CHECKING, NamedTuple

from ..errors import BudgetError, ReadError
from .pool import ALIGN, Lease, align_down, align_up

if TYPE_CHECKING:
    import numpy as np
    import torch

log = logging.getLogger(__name__)

DEFAULT_THREADS = 4
# 1 MiB: a 3.5 MB expert is 4 chunks on the 4 threads, so it lands in about a quarter of one
# read's latency (docs/memory.md, "Out-of-core defaults"; was 4 MiB)
DEFAULT_CHUNK_BYTES = 2**20
# prefetch chunks are smaller: a demand read that arrives waits for at most one of them
DEFAULT_PREFETCH_CHUNK_BYTES = 2**20
DEFAULT_RETRIES = 3
DEFAULT_BACKOFF_S = 0.002
_RETRYABLE = (errno.EIO, errno.EINTR, errno.EAGAIN)


class Priority(IntEnum):
    DEMAND = 0  # the compute thread is waiting for it
    PREFETCH = 1  # speculative: may wait behind every demand read


DEMAND = Priority.DEMAND
PREFETCH = Priority.PREFETCH


class ReadResult(NamedTuple):
    """A finished read: the requested bytes are ``lease`` slot bytes ``[start, start + length)``."""

    file: str
    offset: int
    length: int
    lease: Lease
    start: int

    def memoryview(self) -> memoryview:
        return self.lease.memoryview(self.length, self.start)

    def numpy(self) -> np.ndarray:
        return self.lease.numpy(self.length, self.start)

    def torch(self) -> torch.Tensor:
        return self.lease.torch(self.length, self.start)


class ReaderStats(NamedTuple):
    reads: int  # requests completed successfully
    chunks: int  # preadv chunks completed
    bytes_read: int  # bytes transferred from the file (aligned ranges, so >= requested bytes)
    read_s: float  # thread-seconds spent inside preadv, summed over workers
    retries: int  # EIO/EINTR/EAGAIN or no-progress retries
    busy_s: float = 0.0  # wall seconds with at least one chunk in the kernel

    @property
    def busy_bps(self) -> float | None:
        """Bytes per second while the disk was busy (None before any read)."""
        return self.bytes_read / self.busy_s if self.busy_s > 0 else None


@dataclass
class _File:
    path: str
    fd: int
    direct: bool
    extra_fds: list[int] = field(default_factory=list)  # direct fds replaced by a fallback


@dataclass
class _Request:
    file: _File
    offset: int
    length: int
    lease: Lease
    dest: int  # slot offset of the aligned range
    aligned: int  # file offset of the aligned range
    future: Future
    remaining: int
    chunk: int  # bytes per chunk
    started: bool = False
    cancelled: bool = False
    error: BaseException | None = None


class DirectReader:
    """Reads file ranges into pool slots with O_DIRECT from ``threads`` worker threads."""

    def __init__(
        self,
        threads: int = DEFAULT_THREADS,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        retries: int = DEFAULT_RETRIES,
        backoff_s: float = DEFAULT_BACKOFF_S,
        direct: bool = True,
        prefetch_chunks: int = 1,
        prefetch_chunk_bytes: int = DEFAULT_PREFETCH_CHUNK_BYTES,
    ) -> None:
        if threads < 1 or chunk_bytes < ALIGN or retries < 0:
            raise BudgetError(
                f"DirectReader needs threads >= 1, chunk_bytes >= {ALIGN} and retries >= 0 "
                f"(got {threads}, {chunk_bytes}, {retries})"
            )
        self.threads = threads
        self.chunk_bytes = align_up(chunk_bytes)
        self.retries = retries
        self.backoff_s = backoff_s
        self.direct = direct
        self.prefetch_chunks = max(1, prefetch_chunks)
        self.prefetch_chunk_bytes = min(
            self.chunk_bytes, align_up(max(ALIGN, prefetch_chunk_bytes))
        )
        self._lock = threading.RLock()  # heap, files, request state, counters
        self._running = [0, 0]  # chunks in the kernel, by priority
        self._parked = 0  # drain calls that left a prefetch chunk queued (disk busy)
        self._live: dict[int, _Request] = {}  # id(future) -> request, until it finishes
        self._busy_since = 0.0
        self._heap: list[tuple[int, int, int, _Request]] = []
        self._seq = itertools.count()
        self._files: dict[str, _File] = {}
        self._warned = False
        self._closed = False
        self._counts = [0, 0, 0, 0.0, 0, 0.0]  # as ReaderStats
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="mer-io")
        # Closes the files if the reader is dropped without close() (close() is still the rule).
        self._close_files = weakref.finalize(self, _close_files, self._files)

    # -- public API -------------------------------------------------------------------------

    def submit(
        self,
        file: str | os.PathLike,
        offset: int,
        length: int,
        lease: Lease,
        *,
        priority: Priority = DEMAND,
        dest: int = 0,
    ) -> Future:
        """Read ``length`` bytes at ``offset`` of ``file`` into ``lease`` (slot offset ``dest``).

        Returns a ``Future[ReadResult]``. ``dest`` must be a multiple of 4096; the aligned range
        ``[align_down(offset), align_up(offset + length))`` must fit in the slot after ``dest``.
        """
        path = os.fspath(file)
        if offset < 0 or length < 1:
            raise ReadError(f"bad read of {path}: offset {offset}, length {length}")
        a0, a1 = align_down(offset), align_up(offset + length)
        if dest % ALIGN or dest < 0 or dest + (a1 - a0) > lease.nbytes:
            raise BudgetError(
                f"read of {path} at offset {offset} needs {a1 - a0} aligned bytes at slot "
                f"offset {dest}, but the slot holds {lease.nbytes} bytes: raise the pool's "
                "slot_bytes to the largest extent (+ 8 KiB for alignment)"
            )
        with self._lock:
            if self._closed:
                raise RuntimeError("DirectReader.submit() after close()")
            f = self._open(path)
            lease.retain()  # the read's own reference, dropped when the future is done
            fut: Future = Future()
            fut.add_done_callback(lambda _f: lease.release())
            chunk = self.prefetch_chunk_bytes if priority == PREFETCH else self.chunk_bytes
            n = -(-(a1 - a0) // chunk)
            req = _Request(f, offset, length, lease, dest, a0, fut, remaining=n, chunk=chunk)
            self._live[id(fut)] = req
            for k in range(n):
                heapq.heappush(self._heap, (int(priority), next(self._seq), k, req))
        for _ in range(n):
            self._executor.submit(self._drain)
        return fut

    def abort(self, fut: Future) -> None:
        """Give up on a read: cancel it if it has not started, else skip its chunks that have
        not started; the future then ends with ``ReadError`` once the chunks in the kernel are
        done (and only then drops its reference to the slot). For prefetches nobody needs."""
        if fut.cancel():
            return
        with self._lock:
            req = self._live.get(id(fut))
            if req is not None and req.error is None:
                req.error = ReadError(f"read of {req.file.path} at offset {req.offset} aborted")

    def promote(self, fut: Future) -> None:
        """Raise a queued read to ``DEMAND`` priority (a prefetch that a demand miss now needs):
        its chunks not yet started go ahead of every prefetch chunk."""
        with self._lock:
            req = self._live.get(id(fut))
            if req is None:
                return
            self._heap = [(DEMAND, *e[1:]) if e[3] is req else e for e in self._heap]
            heapq.heapify(self._heap)
            unpark, self._parked = self._parked, 0
        for _ in range(unpark):
            self._executor.submit(self._drain)

    def read(self, file: str | os.PathLike, offset: int, length: int, lease: Lease) -> ReadResult:
        """Blocking ``submit(...).result()`` at demand priority."""
        return self.submit(file, offset, length, lease).result()

    @property
    def stats(self) -> ReaderStats:
        with self._lock:
            return ReaderStats(*self._counts)

    @property
    def fallback_files(self) -> list[str]:
        """Files being read without O_DIRECT."""
        with self._lock:
            return [f.path for f in self._files.values() if not f.direct]

    def close(self) -> None:
        """Cancel reads that have not started, wait for running ones, close every file."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            keep = [e for e in self._heap if e[3].started]
            dropped = {id(e[3]): e[3] for e in self._heap if not e[3].started}
            self._heap = keep
            heapq.heapify(self._heap)
            parked, self._parked = self._parked, 0  # closing: parked chunks run now
        for _ in range(parked):
            self._executor.submit(self._drain)
        for req in dropped.values():
            req.future.cancel()
        self._executor.shutdown(wait=True)
        with self._lock:
            self._close_files()

    def __enter__(self) -> DirectReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _open(self, path: str) -> _File:
        f = self._files.get(path)
        if f is not None:
            return f
        flags = os.O_RDONLY | os.O_CLOEXEC
        try:
            if self.direct:
                try:
                    f = _File(path, os.open(path, flags | os.O_DIRECT), True)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    f = _File(path, os.open(path, flags), False)
                    self._say_fallback(path, "open with O_DIRECT returned EINVAL")
            else:
                f = _File(path, os.open(path, flags), False)
        except OSError as e:
            raise ReadError(f"cannot open {path} for reading: {e.strerror}") from e
        self._files[path] = f
        return f

    def _say_fallback(self, path: str, why: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "O_DIRECT is not supported for %s (%s): reading with buffered preadv and "
                "posix_fadvise(DONTNEED) instead, which costs more CPU; put the store on a "
                "filesystem with O_DIRECT support (ext4, xfs) for full speed. "
                "(Said once per reader.)",
                path,
                why,
            )

    def _fall_back(self, f: _File) -> None:
        with self._lock:
            if f.direct:
                f.extra_fds.append(f.fd)
                f.fd = os.open(f.path, os.O_RDONLY | os.O_CLOEXEC)
                f.direct = False
                self._say_fallback(f.path, "a read with O_DIRECT returned EINVAL")

    def _drain(self) -> None:
        """Run the best queued chunk (one call per pushed chunk, from a worker thread)."""
        with self._lock:
            if not self._heap:
                return
            prio = self._heap[0][0]
            running = self._running
            if (
                prio == PREFETCH
                and not self._closed
                and (running[DEMAND] or running[PREFETCH] >= self.prefetch_chunks)
            ):
                self._parked += 1  # taken up again when the disk is free of demand reads
                return
            _, _, k, req = heapq.heappop(self._heap)
            if not req.started:
                req.started = True
                req.cancelled = not req.future.set_running_or_notify_cancel()
            skip = req.cancelled or req.error is not None
            if not skip:
                if not running[0] + running[1]:
                    self._busy_since = time.perf_counter()
                running[prio] += 1
        err: BaseException | None = None
        if not skip:
            try:
                self._read_chunk(req, k)
            except BaseException as e:  # delivered through the future
                err = e
        unpark = 0
        with self._lock:
            if not skip:
                running[prio] -= 1
                if not running[0] + running[1]:
                    self._counts[5] += time.perf_counter() - self._busy_since
                if not running[DEMAND] and self._parked:
                    unpark, self._parked = self._parked, 0
            if err is not None and req.error is None:
                req.error = err
            req.remaining -= 1
            finished = req.remaining == 0 and not req.cancelled
            if req.remaining == 0:
                self._live.pop(id(req.future), None)
            if finished and req.error is None:
                self._counts[0] += 1
        for _ in range(unpark):
            self._executor.submit(self._drain)
        if finished:  # only now: no chunk writes into the slot any more
            if req.error is not None:
                req.future.set_exception(req.error)
            else:
                start = req.dest + req.offset - req.aligned
                req.future.set_result(
                    ReadResult(req.file.path, req.offset, req.length, req.lease, start)
                )

    def _read_chunk(self, req: _Request, k: int) -> None:
        lo = k * req.chunk  # offset inside the aligned range
        want = min(req.chunk, align_up(req.offset + req.length) - req.aligned - lo)
        pos = req.aligned + lo
        buf = req.lease.memoryview(want, req.dest + lo)
        f = req.file
        got = attempts = 0
        while got < want:
            fd, direct = f.fd, f.direct
            t0 = time.perf_counter()
            try:
                n = os.preadv(fd, [buf[got:]], pos + got)
            except OSError as e:
                if e.errno == errno.EINVAL and direct:
                    self._fall_back(f)
                    continue
                if e.errno in _RETRYABLE and attempts < self.retries:
                    attempts += 1
                    self._count(retries=1)
                    time.sleep(self.backoff_s * 2 ** (attempts - 1))
                    continue
                raise ReadError(
                    f"reading {f.path} at offset {pos + got} ({want - got} bytes) failed after "
                    f"{attempts} retries: {e.strerror or e}; check the disk (dmesg) and the file"
                ) from e
            finally:
                self._count(read_s=time.perf_counter() - t0)
            if n == 0:
                break  # end of file
            if direct and n < want - got and n % ALIGN:
                # O_DIRECT returns an unaligned count only at end of file; otherwise re-read
                # from the last aligned byte so the next offset stays aligned.
                if pos + got + n >= os.fstat(fd).st_size:
                    got += n
                    break
                n = align_down(n)
            if n == 0:
                attempts += 1
                self._count(retries=1)
                if attempts > self.retries:
                    raise ReadError(f"reading {f.path} at offset {pos + got}: no progress")
                continue
            got += n
        if not f.direct:
            os.posix_fadvise(f.fd, pos, got, os.POSIX_FADV_DONTNEED)
        self._count(chunks=1, nbytes=got)
        need = min(want, req.offset + req.length - pos)  # requested bytes in this chunk
        if got < need:
            size = os.fstat(f.fd).st_size
            raise ReadError(
                f"{f.path} is truncated: expected {req.length} bytes at offset {req.offset} "
                f"(up to byte {req.offset + req.length}), but the file is {size} bytes long, "
                f"so only {max(0, size - req.offset)} are there; re-create or re-convert it"
            )

    def _count(
        self, chunks: int = 0, nbytes: int = 0, read_s: float = 0.0, retries: int = 0
    ) -> None:
        with self._lock:
            c = self._counts
            c[1] += chunks
            c[2] += nbytes
            c[3] += read_s
            c[4] += retries


def _close_files(files: dict[str, _File]) -> None:
    for f in files.values():
        for fd in [f.fd, *f.extra_fds]:
            os.close(fd)
    files.clear()
