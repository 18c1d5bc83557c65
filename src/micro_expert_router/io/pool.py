"""BufferPool: one aligned, pre-allocated region cut into equal slots, leased with a refcount.

The pool owns memory and nothing else: it does not know what is read into a slot or why. A slot is
handed out as a ``Lease``; the lease starts with one reference (the caller's), ``retain()`` adds
one (for example the reader holds one while a read is writing into the slot) and ``release()``
drops one. The slot goes back to the pool when the last reference is dropped. Releasing a lease
that has no references left raises ``LeaseError``: a double release is a bug, never a silent
double free.

Ownership rule: whoever called ``lease()`` or ``retain()`` owns one reference and must release it,
preferably with ``with pool.lease() as lease:`` or in a ``finally``. Views (``memoryview``,
``numpy``, ``torch``) do not hold a reference: they are valid only while the lease is held. As a
safety net, a ``Lease`` that is garbage-collected while still holding references warns with a
``ResourceWarning`` and returns its slot; it is counted as *reclaimed* (``pool.reclaimed``), and
the leak check (``leak_report``) reports it like a lease that is still out, so tests catch both.

When every slot is busy, ``lease(timeout)`` waits on a condition variable and raises
``PoolTimeout`` naming the pool size and what to do. The region is an anonymous ``mmap``, so it is
page aligned (4096) and every slot is a multiple of 4096 bytes: exactly what ``O_DIRECT`` needs.

Memory kind: the region is *private* anonymous memory (``MAP_PRIVATE | MAP_ANONYMOUS``), not
Python's default shared mapping, which is shmem (counted as page cache in a memory cgroup,
``RssShmem``) and costs more per page fault. And it is *populated* when the pool is made
(``MADV_POPULATE_WRITE``, else ``MAP_POPULATE``): every page is allocated and zeroed up front,
in bulk. Left lazy, the first O_DIRECT read into each slot faulted its pages one by one inside
the read: on the olmoe-like store a 3.5 MB expert read into a fresh slot took 8-11 ms and
2.5-3.8 ms of CPU against 2.2-3.6 ms and 0.3-0.4 ms into a touched one, and a decode whose
cache was still growing paid that on every miss (docs/memory.md, "Where a limited decode's
time went"). The pool's bytes are counted against the memory limit in full anyway.
"""

from __future__ import annotations

import gc
import mmap
import threading
import time
import warnings
import weakref
from typing import TYPE_CHECKING

from ..errors import BudgetError, PoolTimeout

if TYPE_CHECKING:
    import numpy as np
    import torch

ALIGN = 4096
"""Byte alignment of the region, of every slot and of every O_DIRECT offset and length."""

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux >= 5.14
WAIT_SLICE_S = 0.1  # longest uninterrupted wait for a slot (Ctrl-C is seen between slices)
DEFAULT_LEASE_TIMEOUT_S = 30.0

_LIVE_POOLS: weakref.WeakSet[BufferPool] = weakref.WeakSet()
_RECLAIMED: list[str] = []  # one line per lease the gc returned, until leak_report() takes it


class LeaseError(RuntimeError):
    """A lease used after its last reference was released (a bug in the caller, not the user's)."""


def align_up(n: int, align: int = ALIGN) -> int:
    return -(-n // align) * align


def align_down(n: int, align: int = ALIGN) -> int:
    return n // align * align


class BufferPool:
    """``slots`` equal slots of ``slot_bytes`` (rounded up to 4096) in one anonymous mmap."""

    def __init__(self, slots: int, slot_bytes: int, name: str = "pool") -> None:
        if slots < 1 or slot_bytes < 1:
            raise BudgetError(
                f"buffer pool '{name}' needs at least one slot of at least one byte "
                f"(got {slots} slots of {slot_bytes} bytes)"
            )
        self.name = name
        self.total = slots
        self.slot_bytes = align_up(slot_bytes)
        try:
            self._region = _populated(slots * self.slot_bytes)
        except OSError as e:
            raise BudgetError(
                f"could not allocate buffer pool '{name}' of {slots} x {self.slot_bytes} bytes "
                f"({slots * self.slot_bytes / 2**20:.1f} MiB): {e.strerror}; use fewer or "
                "smaller slots"
            ) from e
        self._view = memoryview(self._region)
        self._cond = threading.Condition(threading.RLock())  # RLock: Lease.__del__ may re-enter
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out slot 0 first
        self._leased: set[int] = set()
        self._acknowledged: set[int] = set()  # leaks already reported by leak_report()
        self.reclaimed = 0  # leases returned by the garbage collector instead of release()
        _LIVE_POOLS.add(self)

    def __repr__(self) -> str:
        return (
            f"BufferPool({self.name!r}, {self.free_count}/{self.total} free, "
            f"{self.slot_bytes} bytes per slot)"
        )

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.total * self.slot_bytes

    def lease(self, timeout: float | None = DEFAULT_LEASE_TIMEOUT_S) -> Lease:
        """Take a free slot, waiting up to ``timeout`` seconds (None: forever) for one."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._free:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise PoolTimeout(
                        f"all {self.total} slots of buffer pool '{self.name}' "
                        f"({self.slot_bytes / 2**20:.1f} MiB each) stayed busy for {timeout} s: "
                        "raise the pool size (more slots) or lower the parallelism (fewer reads "
                        "in flight / fewer I/O threads), and check that every lease is released"
                    )
                # in slices: a Ctrl-C delivered to another thread (an I/O or OpenMP worker)
                # does not wake this one's lock wait, but is raised here at the next slice
                self._cond.wait(WAIT_SLICE_S if left is None else min(left, WAIT_SLICE_S))
            return self._take()

    def try_lease(self) -> Lease | None:
        """A free slot now, or None (never waits)."""
        with self._cond:
            return self._take() if self._free else None

    def close(self) -> None:
        """Unmap the region now rather than at garbage collection (a short-lived pool, such as
        the bounce buffers of a load). Only when every slot is free; a view still alive keeps
        the memory until it goes."""
        with self._cond:
            if self._leased or self._region.closed:
                return
            _LIVE_POOLS.discard(self)
            try:
                self._view.release()
                self._region.close()
            except BufferError:
                pass  # exported views: freed with the last of them

    def _take(self) -> Lease:
        index = self._free.pop()
        self._leased.add(index)
        return Lease(self, index)

    def _give_back(self, index: int, reclaimed: bool = False) -> None:
        with self._cond:
            self._leased.discard(index)
            self._acknowledged.discard(index)
            self._free.append(index)
            if reclaimed:
                self.reclaimed += 1
                _RECLAIMED.append(
                    f"buffer pool '{self.name}': a lease of slot {index} was never released "
                    "and was reclaimed by the garbage collector"
                )
            self._cond.notify()

    def _leak_lines(self) -> list[str]:
        with self._cond:
            lines = []
            new = self._leased - self._acknowledged
            if new:
                lines.append(
                    f"buffer pool '{self.name}': {len(self._leased)} of {self.total} slots still "
                    f"leased (slots {sorted(new)})"
                )
            self._acknowledged |= self._leased
            return lines


def _populated(nbytes: int) -> mmap.mmap:
    """Private anonymous memory with every page already faulted in (see the module docstring)."""
    private = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
    region = mmap.mmap(-1, nbytes, flags=private)
    try:
        region.madvise(MADV_POPULATE_WRITE)
        return region
    except (OSError, AttributeError):  # an older kernel (EINVAL) or a platform without madvise
        region.close()
    return mmap.mmap(-1, nbytes, flags=private | getattr(mmap, "MAP_POPULATE", 0))


class Lease:
    """One leased slot. Refcounted; a context manager whose exit drops one reference."""

    __slots__ = ("pool", "index", "nbytes", "_refs", "__weakref__")

    def __init__(self, pool: BufferPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.nbytes = pool.slot_bytes
        self._refs = 1

    def __repr__(self) -> str:
        return f"Lease(pool={self.pool.name!r}, slot={self.index}, refs={self._refs})"

    @property
    def refs(self) -> int:
        return self._refs

    @property
    def released(self) -> bool:
        return self._refs == 0

    def retain(self) -> Lease:
        """Add one reference (the new holder must ``release()`` it). Returns self."""
        with self.pool._cond:
            if self._refs <= 0:
                raise LeaseError(f"retain() on {self!r}, whose slot was already returned")
            self._refs += 1
        return self

    def release(self) -> None:
        """Drop one reference; the slot returns to the pool when the last one is dropped."""
        with self.pool._cond:
            if self._refs <= 0:
                raise LeaseError(
                    f"release() on {self!r}, whose slot was already returned: a double release"
                )
            self._refs -= 1
            if self._refs == 0:
                self.pool._give_back(self.index)

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        pool = getattr(self, "pool", None)
        if pool is None:  # __init__ never ran to the end
            return
        with pool._cond:  # the refcount is only ever read or written under the pool's lock
            if getattr(self, "_refs", 0) <= 0:
                return
            self._refs = 0
            pool._give_back(self.index, reclaimed=True)
        # warned only after the slot is back: a warnings filter that raises cannot lose it
        warnings.warn(
            f"a lease of slot {self.index} of buffer pool '{pool.name}' was "
            "garbage-collected without release(); the slot was returned to the pool",
            ResourceWarning,
            stacklevel=1,
        )

    # Zero-copy views of the slot. They do not keep the lease alive: use them only while held.

    def memoryview(self, length: int | None = None, offset: int = 0) -> memoryview:
        """Bytes ``[offset, offset + length)`` of the slot (length None: to the slot's end)."""
        if self._refs <= 0:
            raise LeaseError(f"view of {self!r}, whose slot was already returned")
        end = self.nbytes if length is None else offset + length
        if offset < 0 or end < offset or end > self.nbytes:
            raise LeaseError(
                f"view [{offset}, {end}) is outside the {self.nbytes}-byte slot of {self!r}"
            )
        base = self.index * self.nbytes
        return self.pool._view[base + offset : base + end]

    def numpy(self, length: int | None = None, offset: int = 0) -> np.ndarray:
        """A writable uint8 numpy array over the same bytes as ``memoryview``."""
        import numpy as np

        return np.frombuffer(self.memoryview(length, offset), dtype=np.uint8)

    def torch(self, length: int | None = None, offset: int = 0) -> torch.Tensor:
        """A uint8 torch tensor sharing the slot's memory (``torch.frombuffer``)."""
        import torch

        mv = self.memoryview(length, offset)
        if len(mv) == 0:  # frombuffer refuses empty buffers
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(mv, dtype=torch.uint8)


def leak_report(collect: bool = True) -> list[str]:
    """Slots still leased in live pools and leases reclaimed by the gc, one line each.

    Each problem is reported once: a slot already reported is not reported again while it stays
    leased, so one leaking test does not make every later test fail. With ``collect``, when some
    slot is out, ``gc.collect()`` runs first so that abandoned generators (their ``finally`` and
    ``with`` blocks) and leases dropped inside reference cycles are finalized; when every pool is
    whole the collection is skipped, which keeps the check nearly free.
    """
    pools = list(_LIVE_POOLS)
    if collect and any(p.free_count != p.total for p in pools):
        del pools
        gc.collect()
        pools = list(_LIVE_POOLS)
    lines = [line for pool in pools for line in pool._leak_lines()]
    lines += _RECLAIMED
    _RECLAIMED.clear()
    return lines


def live_pools() -> list[BufferPool]:
    return list(_LIVE_POOLS)
