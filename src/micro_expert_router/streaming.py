"""The streaming expert provider: experts read from an expert store on demand, under a cache.

``StreamingProvider`` joins the parts: the ``ExpertCache`` decides residency under the byte budget
(policy from the registry), the ``BufferPool`` holds every byte (cached experts keep their slot;
staging slots carry reads in flight), and the ``DirectReader`` fills slots with O_DIRECT reads.
For one MoE layer it looks every needed expert up in the cache, starts reads for the misses in
expert order (holding at most ``window + 1`` read slots, so a prefill that needs every expert
still runs in bounded memory), and hands out handles whose ``segments()`` wait for their read.
The MoE block computes the resident handles first (whole cached experts and cached tops) while
the reads run, then the rest in expert order. After an expert is computed its slot is offered to
the cache; if the cache declines, the slot goes back to the pool. Every path out of
``acquire`` (success, error, an abandoned generator) releases what it holds, and the reader
keeps its own reference to a slot until its read ends.

Memory: ``pool = (cache slots + window + 1) x slot_bytes``, with ``slot_bytes`` the expert extent
rounded up to 4096 (extents start on 4096 bytes, so every read fits); split layers add top pools of
``(cached tops + window + 1) x top slot``. See ``docs/streaming.md``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, wait
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import NamedTuple

import torch

from .cache import ExpertCache
from .config import EngineConfig
from .errors import ConfigError, StoreError
from .io import (
    DEFAULT_LEASE_TIMEOUT_S,
    DEMAND,
    PREFETCH,
    BufferPool,
    DirectReader,
    Lease,
    align_up,
)
from .io.reader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS
from .provider import ProviderStats
from .store import Store
from .store.format import checksum

DEFAULT_WINDOW = 4  # reads in flight ahead of the expert being computed
_NOT_RESIDENT = torch.empty(0, dtype=torch.uint8)  # resident_table's entry for a miss


class _Cached(NamedTuple):
    """A cache entry: the slot holding the expert (or its top segment) and its format view."""

    lease: Lease
    view: object


class _Handle:
    def __init__(self, owner: _LayerFetch, index: int) -> None:
        self.owner = owner
        self.index = index
        # a cache hit: its first segment (the whole expert, or its top) is there without a read
        self.resident = owner.cached[index] is not None

    def segments(self) -> Iterator[object]:
        return self.owner.segments(self.index)

    def landed(self) -> bool:
        """A miss read whole whose read has completed: its one view is there without a wait."""
        return self.owner.landed(self.index)


class _LayerFetch:
    """The experts of one ``acquire`` call: cached leases, reads in flight, views."""

    def __init__(self, provider: StreamingProvider, layer: int, experts: Sequence[int]) -> None:
        self.p = provider
        self.layer = layer
        self.k = provider.top_groups.get(layer, 0)  # cached top groups of this layer
        self.top_bytes = provider.top_bytes.get(layer, 0)
        self.split = 0 < self.k < provider.n_groups
        n = len(experts)
        self.keys = [(layer, e) for e in experts]
        self.protected = set(self.keys)  # never evicted while this layer runs
        self.cached: list[Lease | None] = [None] * n  # our reference to a cached entry
        self.views: list[object] = [None] * n  # its format view, built once at admission
        self.staging: list[Lease | None] = [None] * n  # our reference to a read slot
        self.futures: list[Future | None] = [None] * n
        # a split miss reads its top straight into a top-pool slot, the cache entry to be
        self.tops: list[Lease | None] = [None] * n
        self.top_futures: list[Future | None] = [None] * n
        self.submitted = 0
        self.reading = 0  # read slots our demand reads hold (in flight, or not yet settled)
        self.demand = [False] * n  # expert i's slot came from our own read (not a prefetch)
        self.settled = [False] * n  # finished: leases released, a completed miss offered
        for i, key in enumerate(self.keys):
            entry = provider.cache.lookup(key)
            if entry is not None:
                self.cached[i] = entry.lease.retain()
                self.views[i] = entry.view
            elif key in provider.staged:  # a prefetch already read (or is reading) it
                self.staging[i], self.futures[i] = provider.staged.pop(key)
                provider.reader.promote(self.futures[i])  # needed now: demand priority
                provider.stats.prefetch_hits += 1
        hits = sum(c is not None for c in self.cached)
        provider.stats.hits += hits
        provider.stats.misses += n - hits

    def _read(self, i: int, offset: int, length: int) -> None:
        """Start the demand read of expert ``i``'s ``[offset, offset + length)`` into a read
        slot. The slot is ours (``staging[i]``) as soon as it is leased, so ``_settle`` gives it
        back whatever fails next (the lease waits and times out, ``submit`` refuses the read)."""
        p = self.p
        entry = p.store.experts[self.keys[i]]
        self.staging[i] = p.pool.lease(p.lease_timeout_s)
        self.futures[i] = p.reader.submit(entry.file, offset, length, self.staging[i],
                                          priority=DEMAND)  # fmt: skip
        self.reading += 1
        self.demand[i] = True
        p.stats.bytes_read += length

    def submit_more(self) -> None:
        """Start the next reads, in expert order, while fewer than ``window + 1`` read slots
        are held (the staging slots the pool reserves for demand reads)."""
        while self.submitted < len(self.keys) and self.reading <= self.p.window:
            i = self.submitted
            self.submitted += 1
            entry = self.p.store.experts[self.keys[i]]
            if self.staging[i] is not None:
                continue  # adopted from a prefetch
            if self.cached[i] is None:
                top = None
                pool = self.p.top_pools.get(align_up(self.top_bytes))  # none: no cache room
                if self.split and not self.p.verify and pool is not None:  # verify: whole reads
                    top = pool.try_lease()
                if top is None:
                    self._read(i, entry.offset, entry.length)  # miss: the whole extent
                    continue
                # miss of a split expert: top and bottom as two reads, the top into its
                # cache slot (no copy at admission), the bottom into a read slot
                self.tops[i] = top
                self.top_futures[i] = self.p.reader.submit(
                    entry.file, entry.offset, self.top_bytes, top, priority=DEMAND
                )
                self.p.stats.bytes_read += self.top_bytes
                self._read(i, entry.offset + self.top_bytes, entry.length - self.top_bytes)
            elif self.split:
                self._read(i, entry.offset + self.top_bytes, entry.length - self.top_bytes)

    def landed(self, i: int) -> bool:
        f = self.futures[i]
        return (self.cached[i] is None and self.tops[i] is None and not self.settled[i]
                and f is not None and f.done())  # fmt: skip

    def _wait(self, i: int, top: bool = False):
        self.submit_more()
        if i >= self.submitted:  # the caller finishes experts in order, so this cannot happen
            raise RuntimeError(
                f"expert {self.keys[i]} waited on before its read was started; "
                "finish experts in request order after the resident ones"
            )
        t0 = time.perf_counter()
        result = (self.top_futures if top else self.futures)[i].result()
        self.p.stats.io_wait_s += time.perf_counter() - t0
        return result

    def segments(self, i: int) -> Iterator[object]:
        """Views of expert ``i`` in group order; on a split hit the cached top comes first, so
        its compute runs while the bottom segment is still being read. When the caller asks
        for the next view after the last, the expert is finished and settled at once."""
        p = self.p
        key, entry = self.keys[i], p.store.experts[self.keys[i]]
        view = p.store.format.view
        d, g = p.store.args.hidden_size, p.store.group
        if self.cached[i] is not None:
            yield self.views[i]  # the whole expert, or its top segment
            if self.split:
                yield view(self._wait(i).torch(), d, g)
            self._settle(i)
            return
        self.submit_more()
        if self.tops[i] is not None:  # a split miss read as top + bottom
            self.views[i] = view(self._wait(i, top=True).torch(), d, g)
            yield self.views[i]
            yield view(self._wait(i).torch(), d, g)
            self._settle(i)
            return
        result = self._wait(i)
        if p.verify and key not in p.verified:
            if checksum(result.memoryview()) != entry.xxh3:
                raise StoreError(
                    f"{entry.file}: expert {key} at offset {entry.offset} fails its "
                    "checksum: the store is corrupt; run `mer verify` and reconvert"
                )
            p.verified.add(key)
        self.views[i] = view(result.torch(), d, g)
        yield self.views[i]
        self._settle(i)

    def _settle(self, i: int) -> None:
        """Expert ``i`` is finished: offer a completed miss that was computed (its view built,
        so its bytes passed ``verify``) to the cache, release the rest. A read that was never
        submitted has no future; its slot is simply released."""
        if self.settled[i]:
            return
        self.settled[i] = True
        cached, self.cached[i] = self.cached[i], None
        if cached is not None:
            cached.release()
        top, self.tops[i] = self.tops[i], None
        lease, self.staging[i] = self.staging[i], None
        if top is not None:
            self._settle_split_miss(i, top, lease)
            return
        if lease is None:
            return
        self.reading -= self.demand[i]
        fut, view = self.futures[i], self.views[i]
        try:
            if _completed(fut) and cached is None and self.k and view is not None:
                self.p.offer(self.keys[i], lease, fut.result(), self.top_bytes, self.protected,
                             view)  # fmt: skip
        finally:  # an interrupt while waiting for the read must not lose the slot
            lease.release()

    def _settle_split_miss(self, i: int, top: Lease, bottom: Lease | None) -> None:
        """Admit the top slot of a split miss if both its reads completed and it was computed;
        release both slots (the bottom one may never have been leased)."""
        self.reading -= self.demand[i]
        try:
            reads = [f for f in (self.top_futures[i], self.futures[i]) if f is not None]
            done = [_completed(f) for f in reads]  # every read settles, whatever the others did
            if len(done) == 2 and all(done) and self.views[i] is not None:
                pool = self.p.top_pools[align_up(self.top_bytes)]
                entry = _Cached(top.retain(), self.views[i])
                if not self.p.cache.admit(self.keys[i], entry, pool.slot_bytes, self.protected,
                                          self.p.keep_rule()):  # fmt: skip
                    top.release()
        finally:
            top.release()
            if bottom is not None:
                bottom.release()

    def close(self) -> None:
        """Settle whatever the caller did not finish (an error, an abandoned generator). Every
        expert is settled even if one raises (a KeyboardInterrupt while waiting on a read);
        the first exception is raised after."""
        first: BaseException | None = None
        for i in range(len(self.keys)):
            try:
                self._settle(i)
            except BaseException as e:
                first = first or e
        if first is not None:
            raise first


def _completed(fut: Future | None) -> bool:
    """Settle a read: cancel it if it has not started; if it runs (only on error or abandon
    paths), wait for it, so every slot is back in the pool when the layer is left. ``True`` if
    it delivered its bytes; ``False`` for a read that was never submitted (``None``)."""
    if fut is None:
        return False
    if not fut.done() and not fut.cancel():
        wait([fut])
    return not fut.cancelled() and fut.exception() is None


def _per_layer(value, layers: list[int], name: str) -> dict[int, float]:
    if isinstance(value, Mapping):
        missing = [layer for layer in layers if layer not in value]
        if missing:
            raise ConfigError(f"{name} gives no value for MoE layer(s) {missing}")
        return {layer: float(value[layer]) for layer in layers}
    return {layer: float(value) for layer in layers}


class StreamingProvider:
    """Experts of ``store`` streamed under ``cache_bytes`` (one budget) or ``layer_budgets``
    (bytes per layer, e.g. from a plan), caching the top ``split`` fraction of each expert
    (a float, or per layer; 1.0 = whole experts, 0 = pure streaming)."""

    def __init__(
        self,
        store: Store,
        cache_bytes: int | None,
        io_threads: int | None = None,
        policy: str | None = None,  # None: the engine's default (EngineConfig.cache_policy)
        window: int = DEFAULT_WINDOW,
        verify: bool = False,
        split: float | Mapping[int, float] = 1.0,
        layer_budgets: Mapping[int, int] | None = None,
        prefetch_slots: int = 0,
        io_chunk_bytes: int | None = None,
    ) -> None:
        a = store.args
        self.store = store
        policy = policy or EngineConfig().cache_policy
        self.format = store.format
        self.group = store.group
        self.stats = ProviderStats()
        self.window = window
        self.verify = verify
        self.lease_timeout_s: float | None = DEFAULT_LEASE_TIMEOUT_S  # a demand read's wait
        self.verified: set[tuple[int, int]] = set()
        self.n_groups = a.expert_inter // store.group
        per_group = store.format.group_nbytes(a.hidden_size, store.group)
        layers = [layer for layer in range(a.n_layers) if a.moe_layers[layer]]
        thetas = _per_layer(split, layers, "split")
        self.top_groups, self.top_bytes, self.thetas = {}, {}, thetas
        for layer, theta in thetas.items():
            k = round(theta * self.n_groups)
            if not 0.0 <= theta <= 1.0 or abs(k / self.n_groups - theta) > 1e-9:
                raise ConfigError(f"split ratio {theta} of layer {layer} is not a multiple of "
                                  f"1/{self.n_groups} in [0, 1] (this store cuts experts into "
                                  f"{self.n_groups} groups)")  # fmt: skip
            self.top_groups[layer], self.top_bytes[layer] = k, k * per_group
        # Read slots: extents start on 4096 bytes, so a whole read needs align_up(S) and a
        # bottom-segment read [top, S) needs align_up(S) - align_down(top) <= align_up(S).
        self.slot_bytes = align_up(store.expert_bytes)
        # Cached entries of a layer live in slots of its top size: whole experts keep their read
        # slot (zero copy); split layers copy the top into a slot of a smaller pool.
        entry_bytes = {
            layer: self.slot_bytes if k == self.n_groups else align_up(self.top_bytes[layer])
            for layer, k in self.top_groups.items()
            if k
        }
        slots: dict[int, int] = {}  # entry size -> number of cache slots of that size
        if layer_budgets is not None:  # a plan: each layer its own budget (and policy instance)
            per_layer = {}
            for layer in layers:
                size = entry_bytes.get(layer, 0)
                n = min(int(layer_budgets.get(layer, 0)) // size, a.n_experts) if size else 0
                per_layer[layer] = n * size
                if n:
                    slots[size] = slots.get(size, 0) + n
            self.cache = ExpertCache(per_layer, policy=policy, on_evict=self._evicted)
            self.cache_bytes = sum(per_layer.values())
        else:  # one global budget
            if cache_bytes is None:  # room for every expert (or top) of every layer
                for size in entry_bytes.values():
                    slots[size] = slots.get(size, 0) + a.n_experts
            elif entry_bytes:
                sizes = set(entry_bytes.values())
                if len(sizes) > 1:
                    raise ConfigError("per-layer split ratios need per-layer budgets (a plan)")
                size = sizes.pop()
                slots[size] = min(cache_bytes // size, a.n_experts * len(entry_bytes))
            self.cache_bytes = sum(size * n for size, n in slots.items())
            self.cache = ExpertCache(self.cache_bytes, policy=policy, on_evict=self._evicted)
        slots = {size: n for size, n in slots.items() if n}
        self.cache_slots = sum(slots.values())  # entries the cache can hold
        # What each step uses, for the rule against thrashing (``keep_rule``)
        self._step = 0
        self._last_use: dict[tuple[int, int], int] = {}  # key -> the last step that used it
        self._working = self._working_prev = 0  # distinct keys used this step, the one before
        self._batch = False  # this step decodes several sequences (``begin_step``)
        staging = window + 1
        self.prefetch_slots = prefetch_slots
        self.staged: dict[tuple[int, int], tuple[Lease, Future]] = {}  # prefetched, not yet used
        self._tables: dict[int, tuple] = {}  # layer -> (cache version, table, a view)
        self.pool = BufferPool(slots.pop(self.slot_bytes, 0) + staging + prefetch_slots,
                               self.slot_bytes, name="experts")  # fmt: skip
        # split pools: the cache's slots, plus one per demand read in flight (a split miss reads
        # its top straight into the slot it will be cached in)
        self.top_pools = {size: BufferPool(n + staging, size, name=f"expert-tops-{size}")
                          for size, n in slots.items()}  # fmt: skip
        self.reader = DirectReader(threads=io_threads or DEFAULT_THREADS,
                                   chunk_bytes=io_chunk_bytes or DEFAULT_CHUNK_BYTES)

    @property
    def pool_bytes(self) -> int:
        return self.pool.nbytes + sum(p.nbytes for p in self.top_pools.values())

    def offer(self, key: tuple[int, int], lease: Lease, result, top_bytes: int,
              protected: set, whole_view: object) -> None:  # fmt: skip
        """A finished miss: admit the expert (or its top segment) to the cache if it wants it.
        ``whole_view`` is the view already built over the read slot."""
        if top_bytes == self.store.expert_bytes:
            entry = _Cached(lease.retain(), whole_view)
            if self.cache.admit(key, entry, self.slot_bytes, protected, self.keep_rule()):
                return
            lease.release()
            return
        pool = self.top_pools.get(align_up(top_bytes))  # None: no cache room for tops
        top = pool.try_lease() if pool is not None else None
        if top is None:
            return
        top.numpy(top_bytes)[:] = result.numpy()[:top_bytes]
        v = self.format.view(top.torch(top_bytes), self.store.args.hidden_size, self.group)
        if not self.cache.admit(key, _Cached(top, v), pool.slot_bytes, protected,
                                self.keep_rule()):  # fmt: skip
            top.release()

    def _evicted(self, key: tuple[int, int], entry: _Cached) -> None:
        entry.lease.release()

    def prefetch(self, keys: Sequence[tuple[int, int]]) -> int:
        """Start reading ``keys`` (best first) ahead of need, at prefetch priority. Never evicts:
        a prefetched expert waits in a staging slot and enters the cache only if it is used.
        Stops at the first key that finds no slot free beyond the demand reserve; returns how
        many reads were started."""
        started = 0
        for key in keys:
            if key in self.staged or key in self.cache or key not in self.store.experts:
                continue
            if self.pool.free_count <= self.window + 1:  # keep demand's slots free
                break
            lease = self.pool.try_lease()
            if lease is None:
                break
            e = self.store.experts[key]
            self.staged[key] = (lease, self.reader.submit(e.file, e.offset, e.length, lease,
                                                          priority=PREFETCH))  # fmt: skip
            self.stats.prefetch_issued += 1
            self.stats.prefetch_bytes += e.length
            self.stats.bytes_read += e.length
            started += 1
        return started

    def drop_prefetches(self, layer: int | None = None, wait_reads: bool = False) -> None:
        """Release unused prefetches (of ``layer``, or all): their target has run without them.
        A read not yet started is cancelled, a running one aborted after its current chunk;
        its slot comes back to the pool when that chunk ends (the reader holds its own
        reference), so nobody waits for a read nobody needs, unless ``wait_reads``."""
        for key in [k for k in self.staged if layer is None or k[0] == layer]:
            lease, fut = self.staged.pop(key)
            self.reader.abort(fut)
            if wait_reads:
                wait([fut])
            lease.release()
            self.stats.prefetch_wasted += 1

    def begin_step(self, sequences: int = 1) -> None:
        self.cache.begin_token()
        self._batch = sequences > 1
        self._step += 1
        self._working_prev, self._working = self._working, 0

    def _used(self, keys: Sequence[tuple[int, int]]) -> None:
        step, last = self._step, self._last_use
        for k in keys:
            if last.get(k) != step:
                last[k] = step
                self._working += 1

    def keep_rule(self):
        """The rule against thrashing, or None when it is off. When a batched step uses more
        experts than the cache holds (the union of its sequences, all layers), LRU evicts for
        each miss the expert a later layer of the same step (or the next step) needs: every
        lookup misses. Then a miss may only evict an entry that neither this step nor the one
        before used; otherwise it is computed from its read slot and not admitted, so the
        cache keeps serving the hits the steps repeat. Off for one sequence (decode or prefill:
        the policy alone decides, as the simulator replays it), for per-layer budgets (plans),
        and while a step's experts fit."""
        if not self._batch or self.cache.plan is not None:
            return None
        if max(self._working, self._working_prev) <= self.cache_slots:
            return None
        last, recent = self._last_use, self._step - 1
        return lambda key: last.get(key, -1) >= recent

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Sequence[_Handle]]:
        self.stats.experts_needed += len(experts)
        fetch = _LayerFetch(self, layer, experts)
        self._used(fetch.keys)
        try:
            fetch.submit_more()
            yield [_Handle(fetch, i) for i in range(len(experts))]
        finally:
            fetch.close()
            self.drop_prefetches(layer)

    def resident_views(self, layer: int, experts: Sequence[int]) -> list[object] | None:
        """The views of ``experts`` when every one is whole in the cache (the resident decode
        step), counted as hits like ``acquire``; ``None`` otherwise (the caller uses
        ``acquire``). No lease is taken: an entry is only evicted by an admission, and
        admissions happen in ``acquire``'s settling, on this thread, not while the caller
        computes with these views (prefetch reads into staging slots and never evicts)."""
        if 0 < self.top_groups.get(layer, 0) < self.n_groups:
            return None  # split experts: the bottoms are read, not cached
        cache = self.cache
        keys = [(layer, e) for e in experts]
        if not all(k in cache for k in keys):
            return None
        views = self._count_hits(keys)
        if self.staged:
            self.drop_prefetches(layer)
        return views

    def _count_hits(self, keys: list[tuple[int, int]]) -> list[object]:
        """Resident ``keys`` used by a step: hits in the stats, the cache and its policy."""
        self.stats.experts_needed += len(keys)
        self.stats.hits += len(keys)
        self._used(keys)
        return [self.cache.lookup(k).view for k in keys]  # counted, and the policy hears of it

    def resident_table(self, layer: int) -> tuple[list[torch.Tensor], object] | None:
        """Every expert of ``layer`` as its whole buffer in the cache, or an empty tensor where
        it is not resident: the table the one-call decode layer picks its experts from
        (``DecodeBlock.layer``), with one resident expert's view (its shape) or None; ``None``
        for split layers and while prefetches are staged (``resident_views`` then drops them).
        Rebuilt when the cache's entries changed."""
        if 0 < self.top_groups.get(layer, 0) < self.n_groups or self.staged:
            return None
        version, table, view = self._tables.get(layer, (-1, None, None))
        if version != self.cache.version:
            peek, table, view = self.cache.peek, [], None
            for e in range(self.store.args.n_experts):
                entry = peek((layer, e))
                table.append(_NOT_RESIDENT if entry is None else entry.view.buf)
                view = view if entry is None else entry.view
            self._tables[layer] = (self.cache.version, table, view)
        return table, view

    def count_resident(self, layer: int, experts: Sequence[int]) -> None:
        """Count a step's use of ``experts`` the one-call decode layer took from
        ``resident_table``: as ``resident_views`` counts them."""
        self._count_hits([(layer, e) for e in experts])

    def preload(self, progress: bool = False) -> int:
        """Read every expert once, layer by layer, through the normal miss path, so the cache
        holds what its budget allows before the first token (a warm start; with the default
        budget, every expert). Counters are restored afterwards. Returns the bytes read."""
        from tqdm import tqdm

        before = self.stats.snapshot()
        a = self.store.args
        layers = [layer for layer in range(a.n_layers) if a.moe_layers[layer]]
        for layer in tqdm(layers, desc="loading experts", unit="layer", disable=not progress):
            with self.acquire(layer, range(a.n_experts)) as handles:
                for h in handles:
                    for _ in h.segments():
                        pass
        read = self.stats.bytes_read - before.bytes_read
        self._last_use.clear()  # a warm start, not a step: the rule against thrashing forgets it
        self._working = 0
        for f in fields(before):  # in place: callers may hold the stats object
            setattr(self.stats, f.name, getattr(before, f.name))
        return read

    def close(self) -> None:
        self.drop_prefetches(wait_reads=True)
        self.cache.clear()
        self.reader.close()
        # the pools are populated (io/pool.py): unmap them now, not at garbage collection, so
        # a closed engine gives its memory back before the next one measures its RSS
        for pool in (self.pool, *self.top_pools.values()):
            pool.close()


def read_plan(path: str | Path, store: Store):
    """A plan file, validated against the store's MoE layers."""
    from .plan import Plan

    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the plan file ({e.strerror})") from None
    a = store.args
    layers = [layer for layer in range(a.n_layers) if a.moe_layers[layer]]
    return Plan.from_json(text, layers=layers, where=str(path))


def load_store(path: Path, config: EngineConfig):
    """An ``Engine`` over an expert store: dense weights in RAM, experts streamed."""
    from .engine import TORCH_DTYPES, Engine, kv_dtype
    from .memory import process_rss, scale_budgets, store_split
    from .models import transformer
    from .tokenizer import Tokenizer

    rss = process_rss()  # the runtime's share of the memory limit, before anything is loaded
    store = Store.open(path)
    dtype = TORCH_DTYPES[config.dtype]
    dense = store.load_dense(dtype)
    split, layer_budgets = config.split, None
    if config.plan is not None:
        plan = read_plan(config.plan, store)
        split, layer_budgets = plan.thetas(), plan.budgets()
    prefetch = config.prefetch.strip().lower()
    slots = config.prefetch_slots
    if prefetch != "off" and slots == 0:
        slots = 2 * store.args.top_k
    kvd = kv_dtype(config, dense)
    memory = store_split(store, config, dense, kvd.itemsize, rss, split, DEFAULT_WINDOW, slots,
                         layer_budgets)  # fmt: skip
    if layer_budgets is not None:
        layer_budgets = scale_budgets(layer_budgets, memory.cache)
    cache_bytes = None if memory.cache_source == "all experts fit" else memory.cache
    provider = StreamingProvider(store, cache_bytes, config.io_threads, config.cache_policy,
                                 verify=config.verify, split=split, layer_budgets=layer_budgets,
                                 prefetch_slots=slots, io_chunk_bytes=config.io_chunk_bytes)
    try:  # the provider owns threads, files and pools: closed if the engine is never built
        model = transformer(store.args, dense, provider, dtype, config.max_context, kvd)
        if prefetch != "off":
            from .prefetcher import Prefetcher

            model.on_route.append(Prefetcher(model, prefetch))
        tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
        engine = Engine(store.args, model, tokenizer, config, path)
        engine.memory = memory
        return engine
    except BaseException:
        provider.close()
        raise
