"""I/O: the aligned ``BufferPool`` of leased slots and the ``DirectReader`` that fills them.

``pool`` owns memory (slots, leases, refcounts, the leak check); ``reader`` owns reading bytes
(O_DIRECT ``preadv`` from a thread pool, buffered fallback, retries, priorities); ``bulk`` reads
a file's byte ranges into pre-allocated tensors with the reader (the dense weights at load, so
they live in anonymous memory). Which expert to read and where it lives belong to ``store`` and
``cache``. Design and measured figures: ``docs/io.md``.
"""

from __future__ import annotations

from .pool import (
    ALIGN,
    DEFAULT_LEASE_TIMEOUT_S,
    BufferPool,
    Lease,
    LeaseError,
    align_down,
    align_up,
    leak_report,
    live_pools,
)
from .reader import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_THREADS,
    DEMAND,
    PREFETCH,
    DirectReader,
    Priority,
    ReaderStats,
    ReadResult,
)

__all__ = [
    "ALIGN",
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_LEASE_TIMEOUT_S",
    "DEFAULT_THREADS",
    "DEMAND",
    "PREFETCH",
    "BufferPool",
    "DirectReader",
    "Lease",
    "LeaseError",
    "Priority",
    "ReadResult",
    "ReaderStats",
    "align_down",
    "align_up",
    "leak_report",
    "live_pools",
]
