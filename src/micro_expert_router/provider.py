"""Expert providers: where the MoE block gets expert weights from.

The MoE block never knows whether an expert's bytes were resident, cached or just read from disk.
It calls ``provider.acquire(layer, expert_ids)``, a context manager that yields one
``ExpertHandle`` per requested expert (in request order) and releases whatever the handles hold
(pool slots, pins) when the block is done, on success, error or cancellation alike. A handle yields
the expert's weights as format views, segment by segment in group order; a streaming handle may
block in ``segments()`` until a read completes, which is how compute on a cached top segment
overlaps the read of the bottom one.

This module holds the protocol, the shared counters and ``ResidentProvider`` (all experts packed
in RAM). The streaming provider lives in ``streaming.py``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Protocol

import torch

from .kernels import ExpertFormat


@dataclass
class ProviderStats:
    """Cumulative counters; the engine reports per-step differences."""

    experts_needed: int = 0
    hits: int = 0
    misses: int = 0  # cache misses, including those a prefetch had already read or started
    bytes_read: int = 0  # all bytes read from disk (demand and prefetch)
    io_wait_s: float = 0.0
    prefetch_issued: int = 0
    prefetch_hits: int = 0  # misses served by a prefetch (not exposed as demand reads)
    prefetch_wasted: int = 0  # prefetches dropped unused
    prefetch_bytes: int = 0

    def snapshot(self) -> ProviderStats:
        return ProviderStats(**{f.name: getattr(self, f.name) for f in fields(self)})

    def minus(self, other: ProviderStats) -> ProviderStats:
        return ProviderStats(
            **{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)}
        )


class ExpertHandle(Protocol):
    # True if the first segment (the whole expert, or a split expert's cached top) is in RAM:
    # the MoE block computes these first, while the other experts' reads are on the disk
    resident: bool

    def segments(self) -> Iterator[object]:
        """Format views of the expert's segments, in group order (may wait on reads)."""
        ...


class ExpertProvider(Protocol):
    format: ExpertFormat
    group: int  # neurons per group in the bundled layout
    stats: ProviderStats

    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Sequence[ExpertHandle]]:
        """Context manager: handles for ``experts`` of ``layer``, released on exit."""
        ...

    def begin_step(self, sequences: int = 1) -> None:
        """A new forward step (one token, or one prefill batch; ``sequences`` > 1: a batched
        decode step of that many sequences) starts: the cache's clock."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class ResidentHandle:
    view: object
    resident: bool = True

    def segments(self) -> Iterator[object]:
        yield self.view


class ResidentProvider:
    """Every expert packed in RAM in the bundled layout (the reference provider)."""

    def __init__(
        self,
        fmt: ExpertFormat,
        hidden: int,
        group: int,
        packed: dict[tuple[int, int], torch.Tensor],
    ) -> None:
        self.format = fmt
        self.group = group
        self.stats = ProviderStats()
        self._packed = packed  # keep the buffers alive: views alias them
        self._views = {k: fmt.view(buf, hidden, group) for k, buf in packed.items()}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() for b in self._packed.values())

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Sequence[ExpertHandle]]:
        self.stats.experts_needed += len(experts)
        self.stats.hits += len(experts)
        yield [ResidentHandle(self._views[(layer, e)]) for e in experts]

    def resident_views(self, layer: int, experts: Sequence[int]) -> list[object]:
        """Every expert's view (all are resident), counted like ``acquire``."""
        self.stats.experts_needed += len(experts)
        self.stats.hits += len(experts)
        return [self._views[(layer, e)] for e in experts]

    def begin_step(self, sequences: int = 1) -> None:
        pass

    def close(self) -> None:
        self._views.clear()
        self._packed.clear()
