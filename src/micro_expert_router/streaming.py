"""The streaming expert provider: experts read from an expert store on demand, under a cache.

``StreamingProvider`` joins the parts: the ``ExpertCache`` decides residency under the byte budget
(policy from the registry), the ``BufferPool`` holds every byte (cached experts keep their slot;
staging slots carry reads in flight), and the ``DirectReader`` fills slots with O_DIRECT reads.
For one MoE layer it looks every needed expert up in the cache, starts reads for the misses (at
most ``window`` ahead of the expert being computed, so a prefill that needs every expert still
runs in bounded memory), and hands out handles whose ``segments()`` wait for their read. After an
expert is computed its slot is offered to the cache; if the cache declines, the slot goes back to
the pool. Every path out of ``acquire`` (success, error, an abandoned generator) releases what it
holds, and the reader keeps its own reference to a slot until its read ends.

Memory: ``pool = (cache slots + window + 1) x slot_bytes``, with ``slot_bytes`` the expert extent
rounded up to 4096 plus 4096 for reads that start mid-page. See ``docs/streaming.md``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from .cache import ExpertCache
from .config import EngineConfig
from .errors import StoreError
from .io import ALIGN, DEMAND, BufferPool, DirectReader, Lease, align_up
from .io.reader import DEFAULT_THREADS
from .provider import ProviderStats
from .store import Store
from .store.format import checksum

DEFAULT_WINDOW = 4  # reads in flight ahead of the expert being computed


class _Handle:
    def __init__(self, owner: _LayerFetch, index: int) -> None:
        self.owner = owner
        self.index = index

    def segments(self) -> Iterator[object]:
        yield self.owner.view(self.index)


class _LayerFetch:
    """The experts of one ``acquire`` call: leases, reads in flight, views."""

    def __init__(self, provider: StreamingProvider, layer: int, experts: Sequence[int]) -> None:
        self.p = provider
        self.layer = layer
        self.keys = [(layer, e) for e in experts]
        self.leases: list[Lease | None] = [None] * len(experts)
        self.futures: list[Future | None] = [None] * len(experts)
        self.hit = [False] * len(experts)
        self.submitted = 0
        self.done_upto = 0  # experts [0, done_upto) are finished and their leases settled
        self.protected = set(self.keys)  # never evicted while this layer runs
        cache = provider.cache
        for i, key in enumerate(self.keys):
            lease = cache.lookup(key)
            if lease is not None:
                self.hit[i] = True
                self.leases[i] = lease.retain()
        provider.stats.hits += sum(self.hit)
        provider.stats.misses += len(experts) - sum(self.hit)

    def _submit_upto(self, upto: int) -> None:
        p = self.p
        while self.submitted < min(upto, len(self.keys)):
            i = self.submitted
            self.submitted += 1
            if self.hit[i]:
                continue
            entry = p.store.experts[self.keys[i]]
            lease = p.pool.lease()
            self.leases[i] = lease
            self.futures[i] = p.reader.submit(entry.file, entry.offset, entry.length, lease,
                                              priority=DEMAND)  # fmt: skip
            p.stats.bytes_read += entry.length

    def _settle(self, i: int) -> None:
        """Expert ``i`` is finished: offer a completed read's slot to the cache, else release."""
        lease, self.leases[i] = self.leases[i], None
        if lease is None:
            return
        fut = self.futures[i]
        if fut is not None and not fut.done():
            fut.cancel()  # not started: never runs; started: the reader holds its own reference
        complete = (
            fut is not None and fut.done() and not fut.cancelled() and fut.exception() is None
        )
        if complete and self.p.cache.admit(self.keys[i], lease, self.p.slot_bytes, self.protected):
            return  # the cache now owns our reference
        lease.release()

    def _settle_before(self, index: int) -> None:
        while self.done_upto < index:
            self._settle(self.done_upto)
            self.done_upto += 1

    def view(self, index: int) -> object:
        p = self.p
        self._settle_before(index)
        self._submit_upto(index + 1 + p.window)
        lease = self.leases[index]
        entry = p.store.experts[self.keys[index]]
        if self.hit[index]:
            buf = lease.torch(entry.length, p.cached_start[self.keys[index]])
        else:
            t0 = time.perf_counter()
            result = self.futures[index].result()
            p.stats.io_wait_s += time.perf_counter() - t0
            buf = result.torch()
            p.cached_start[self.keys[index]] = result.start
            if p.verify and self.keys[index] not in p.verified:
                if checksum(result.memoryview()) != entry.xxh3:
                    raise StoreError(f"{entry.file}: expert {self.keys[index]} at offset "
                                     f"{entry.offset} fails its checksum: the store is corrupt; "
                                     "run `mer verify` and reconvert")  # fmt: skip
                p.verified.add(self.keys[index])
        return p.store.format.view(buf, p.store.args.hidden_size, p.store.group)

    def close(self) -> None:
        self._settle_before(len(self.keys))


class StreamingProvider:
    def __init__(
        self,
        store: Store,
        cache_bytes: int | None,
        io_threads: int | None = None,
        policy: str = "lru",
        window: int = DEFAULT_WINDOW,
        verify: bool = False,
    ) -> None:
        self.store = store
        self.format = store.format
        self.group = store.group
        self.stats = ProviderStats()
        self.window = window
        self.verify = verify
        self.verified: set[tuple[int, int]] = set()
        self.slot_bytes = align_up(store.expert_bytes) + ALIGN
        n_experts = len(store.experts)
        budget = n_experts * self.slot_bytes if cache_bytes is None else cache_bytes
        cache_slots = min(budget // self.slot_bytes, n_experts)
        self.cache_bytes = cache_slots * self.slot_bytes
        self.cache = ExpertCache(self.cache_bytes, policy=policy, on_evict=self._evicted)
        self.pool = BufferPool(cache_slots + window + 1, self.slot_bytes, name="experts")
        self.reader = DirectReader(threads=io_threads or DEFAULT_THREADS)
        self.cached_start: dict[tuple[int, int], int] = {}

    def _evicted(self, key: tuple[int, int], lease: Lease) -> None:
        lease.release()

    def begin_step(self) -> None:
        self.cache.begin_token()

    @contextmanager
    def acquire(self, layer: int, experts: Sequence[int]) -> Iterator[Sequence[_Handle]]:
        self.stats.experts_needed += len(experts)
        fetch = _LayerFetch(self, layer, experts)
        try:
            fetch._submit_upto(1 + self.window)
            yield [_Handle(fetch, i) for i in range(len(experts))]
        finally:
            fetch.close()

    def close(self) -> None:
        self.cache.clear()
        self.reader.close()


def load_store(path: Path, config: EngineConfig):
    """An ``Engine`` over an expert store: dense weights in RAM, experts streamed."""
    from .engine import TORCH_DTYPES, Engine
    from .model import Transformer
    from .tokenizer import Tokenizer

    store = Store.open(path)
    dtype = TORCH_DTYPES[config.dtype]
    dense = store.load_dense(dtype)
    provider = StreamingProvider(store, config.cache_bytes, config.io_threads, config.policy,
                                 verify=config.verify)  # fmt: skip
    model = Transformer(store.args, dense, provider, dtype, config.max_context)
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return Engine(store.args, model, tokenizer, config, path)
