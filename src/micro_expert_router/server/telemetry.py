"""What the live page and ``/metrics`` show: snapshots of the engine's counters and the expert
cache's residency, and rates between snapshots.

The engine thread takes every snapshot (``refresh``, at most ``interval_s`` apart, and while
idle), so reading the provider, its cache and the pool never races a step; HTTP handlers only read
the finished, immutable snapshots. Per-layer hits, misses and prefetch hits are the provider's
counters attributed to the layer whose routing callback saw them change (the provider counts a
layer's lookups inside ``acquire``, before the callbacks run). Per-layer bytes are the bytes that
layer's lookups needed from disk: a miss reads the whole extent, a hit on a split expert reads
its bottom segment (``docs/streaming.md``).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..model import Routing
    from .scheduler import Scheduler

RATE_WINDOW_S = 5.0  # rates are taken over the snapshots of about the last 5 seconds


@dataclass(frozen=True)
class Snapshot:
    t: float
    tokens: int  # sampled tokens, all requests (prefill's first token included)
    decode_steps: int
    queued: int
    running: int
    finished: int
    kv_bytes: int
    hits: int
    misses: int
    bytes_read: int
    io_wait_s: float
    prefetch_hits: int
    prefetch_issued: int
    layers: list[int]  # the MoE layers, rows of the arrays below
    layer_hits: np.ndarray  # [L] cumulative
    layer_misses: np.ndarray  # [L]
    layer_prefetch_hits: np.ndarray  # [L]
    layer_bytes: np.ndarray  # [L] bytes needed from disk
    uses: np.ndarray  # [L, E] cumulative activations per expert
    resident: np.ndarray  # [L, E] bool: in the cache (or resident) now
    pool_free: int | None
    pool_total: int | None
    cache_used: int | None
    cache_budget: int | None
    union_per_layer: float  # mean experts per MoE layer of the recent decode steps
    batch: float  # mean batch size of the recent decode steps


class Telemetry:
    interval_s = 0.25

    def __init__(self, scheduler: Scheduler) -> None:
        self.s = scheduler
        model = scheduler.model
        a = model.args
        self.layers = [i for i in range(a.n_layers) if a.moe_layers[i]]
        self.row = {layer: j for j, layer in enumerate(self.layers)}
        n, e = len(self.layers), a.n_experts
        self.n_experts = e
        self.tokens = 0
        self._hits = np.zeros(n, np.int64)
        self._misses = np.zeros(n, np.int64)
        self._pf = np.zeros(n, np.int64)
        self._bytes = np.zeros(n, np.int64)
        self._uses = np.zeros((n, e), np.int64)
        p = model.provider
        self._last = (p.stats.hits, p.stats.misses, p.stats.prefetch_hits)
        store = getattr(p, "store", None)
        self.expert_bytes = store.expert_bytes if store is not None else 0
        tops = getattr(p, "top_bytes", {})
        self.bottom_bytes = {layer: self.expert_bytes - tops.get(layer, self.expert_bytes)
                             for layer in self.layers}  # fmt: skip
        self._lock = threading.Condition()
        self._history: deque[Snapshot] = deque()
        self._next = 0.0
        self.refresh()

    # -- engine thread ---------------------------------------------------------------------
    def on_route(self, r: Routing) -> None:
        """A routing callback (``Transformer.on_route``): this layer's lookups just happened."""
        j = self.row[r.layer]
        st = self.s.model.provider.stats
        now = (st.hits, st.misses, st.prefetch_hits)
        h, m, pf = (a - b for a, b in zip(now, self._last, strict=True))
        self._last = now
        self._hits[j] += h
        self._misses[j] += m
        self._pf[j] += pf
        self._bytes[j] += m * self.expert_bytes + h * self.bottom_bytes[r.layer]
        self._uses[j] += np.bincount(r.experts.reshape(-1).numpy(), minlength=self.n_experts)

    def maybe_refresh(self) -> None:
        if time.monotonic() >= self._next:
            self.refresh()

    def refresh(self) -> None:
        now = time.monotonic()
        self._next = now + self.interval_s
        p = self.s.model.provider
        st = p.stats
        resident = np.zeros_like(self._uses, dtype=bool)
        cache = getattr(p, "cache", None)
        if cache is None:
            resident[:] = True  # every expert packed in RAM
        else:
            for layer, e in cache.keys():
                if layer in self.row:
                    resident[self.row[layer], e] = True
        pool = getattr(p, "pool", None)
        recent = list(self.s.steps)[-64:]
        moe = max(len(self.layers), 1)
        counts = self.s.counts()
        snap = Snapshot(
            t=now, tokens=self.tokens, decode_steps=len(self.s.steps), queued=counts["queued"],
            running=counts["running"], finished=counts["finished"], kv_bytes=counts["kv_bytes"],
            hits=st.hits, misses=st.misses, bytes_read=st.bytes_read, io_wait_s=st.io_wait_s,
            prefetch_hits=st.prefetch_hits, prefetch_issued=st.prefetch_issued,
            layers=self.layers, layer_hits=self._hits.copy(), layer_misses=self._misses.copy(),
            layer_prefetch_hits=self._pf.copy(), layer_bytes=self._bytes.copy(),
            uses=self._uses.copy(), resident=resident,
            pool_free=pool.free_count if pool is not None else None,
            pool_total=pool.total if pool is not None else None,
            cache_used=cache.used_bytes if cache is not None else None,
            cache_budget=cache.budget_bytes if cache is not None else None,
            union_per_layer=(sum(r.experts_needed for r in recent) / len(recent) / moe
                             if recent else 0.0),
            batch=sum(r.batch for r in recent) / len(recent) if recent else 0.0,
        )  # fmt: skip
        with self._lock:
            self._history.append(snap)
            while len(self._history) > 2 and now - self._history[1].t >= RATE_WINDOW_S:
                self._history.popleft()
            self._lock.notify_all()

    # -- any thread ------------------------------------------------------------------------
    def latest(self) -> tuple[Snapshot, Snapshot]:
        """The newest snapshot and the oldest one of the rate window."""
        with self._lock:
            return self._history[-1], self._history[0]

    def wait_newer(self, t: float, timeout: float = 10.0) -> bool:
        """Wait for a snapshot taken after ``t`` (``time.monotonic()``); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: self._history[-1].t > t, timeout)

    def view(self) -> dict[str, Any]:
        """The page's JSON: residency, per-expert use over the window, per-layer rates."""
        new, old = self.latest()
        dt = max(new.t - old.t, 1e-9)

        def rate(a, b):
            return ((a - b) / dt).tolist() if isinstance(a, np.ndarray) else (a - b) / dt

        return {
            "layers": new.layers,
            "experts": self.n_experts,
            "resident": new.resident.astype(int).tolist(),
            "uses_per_s": rate(new.uses, old.uses),
            "layer": {
                "hits_per_s": rate(new.layer_hits, old.layer_hits),
                "misses_per_s": rate(new.layer_misses, old.layer_misses),
                "bytes_per_s": rate(new.layer_bytes, old.layer_bytes),
                "prefetch_hits_per_s": rate(new.layer_prefetch_hits, old.layer_prefetch_hits),
                "prefetch_hits": new.layer_prefetch_hits.tolist(),
                "hit_rate": _ratio(new.layer_hits, new.layer_misses).tolist(),
            },
            "total": {
                "tokens_per_s": rate(new.tokens, old.tokens),
                "hits_per_s": rate(new.hits, old.hits),
                "misses_per_s": rate(new.misses, old.misses),
                "bytes_read_per_s": rate(new.bytes_read, old.bytes_read),
                "prefetch_hits_per_s": rate(new.prefetch_hits, old.prefetch_hits),
                "io_wait_frac": rate(new.io_wait_s, old.io_wait_s),
                "bytes_read": new.bytes_read,
                "prefetch_hits": new.prefetch_hits,
                "hit_rate": new.hits / max(new.hits + new.misses, 1),
                "queued": new.queued,
                "running": new.running,
                "kv_bytes": new.kv_bytes,
                "pool_free": new.pool_free,
                "pool_total": new.pool_total,
                "cache_used": new.cache_used,
                "cache_budget": new.cache_budget,
                "union_per_layer": new.union_per_layer,
                "batch": new.batch,
            },
            "window_s": dt,
        }


def _ratio(h: np.ndarray, m: np.ndarray) -> np.ndarray:
    n = h + m
    return np.where(n > 0, h / np.maximum(n, 1), 0.0)
