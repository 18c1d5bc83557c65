"""Expert residency under a hard byte budget; policies rank victims.

``ExpertCache`` owns which experts (or expert segments) are resident, their bytes, and the
hit/miss/eviction counters; it does no I/O. The engine stores opaque values in it (buffer leases)
and is told through ``on_evict`` when one leaves, so it can release it; the simulator stores
``True``. A ``Policy`` only ranks: it hears about requests, inserts and evictions, names a victim
outside an excluded set, and may decline to admit (only the offline OPT does). Policies are small
classes in the ``POLICIES`` registry; the simulator (``sim/replay.py``) and the engine use the
same ones.

Conventions every policy follows (docs/simulator.md):

- Keys are tuples of ints whose first item is the layer, e.g. ``ExpertId = (layer, expert)``;
  keys must be mutually orderable, because the key is the last tie-break.
- The clock ``t`` counts forward steps (``begin_token``: one per decode token, one per prefill
  batch). Policies rank by ``t`` and the key, never by the order of requests inside a step, so a
  layer's experts may be looked up and admitted in any order (the engine looks all up, then
  admits; a replay may interleave) and the outcome is the same, unless the layer's own experts
  overflow the budget (then the first admitted stay).
- Every request is reported (``on_hit`` or ``on_miss``), also for keys that are then not
  admitted; activation counts (LFU, LCP) count requests and survive eviction by default.

References: Belady, "A study of replacement algorithms for a virtual-storage computer" (1966);
MoEpic, arXiv:2509.08342 (the LCP priority).
"""

from __future__ import annotations

import heapq
import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Container, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .errors import ConfigError

Key = Hashable  # in practice a tuple of ints, layer first


class Policy(Protocol):
    """What the cache asks of a policy. ``t`` is the cache's step clock."""

    def on_hit(self, key: Key, t: int) -> None:
        """A resident ``key`` was requested."""
        ...

    def on_miss(self, key: Key, t: int) -> None:
        """A non-resident ``key`` was requested (it may be admitted next, or not)."""
        ...

    def on_insert(self, key: Key, t: int) -> None:
        """``key`` became resident."""
        ...

    def on_evict(self, key: Key) -> None:
        """``key`` stopped being resident."""
        ...

    def victim(self, exclude: Container[Key]) -> Key | None:
        """The resident entry to evict next, never one in ``exclude``; None if all are."""
        ...

    def admits(self, key: Key, victims: Sequence[Key]) -> bool:
        """Whether to admit ``key`` at the price of evicting ``victims``."""
        ...


class _LazyHeap:
    """A min-heap of (priority, key) with O(log n) updates: stale entries (whose priority object
    is no longer the key's current one) are skipped on read, and the heap is rebuilt when they
    outnumber the live ones. Priorities of different keys must never compare equal."""

    def __init__(self) -> None:
        self._heap: list[tuple[Any, Key]] = []
        self._prio: dict[Key, Any] = {}

    def set(self, key: Key, prio: Any) -> None:
        self._prio[key] = prio
        heapq.heappush(self._heap, (prio, key))
        if len(self._heap) > 2 * len(self._prio) + 64:
            self._heap = list(zip(self._prio.values(), self._prio, strict=True))  # C speed
            heapq.heapify(self._heap)

    def discard(self, key: Key) -> None:
        self._prio.pop(key, None)

    def __contains__(self, key: Key) -> bool:
        return key in self._prio

    def min(self, exclude: Container[Key]) -> Key | None:
        h, held, found = self._heap, [], None
        while h:
            prio, key = h[0]
            if self._prio.get(key) is not prio:
                heapq.heappop(h)  # stale
            elif key in exclude:
                held.append(heapq.heappop(h))
            else:
                found = key
                break
        for item in held:
            heapq.heappush(h, item)
        return found


class _HeapPolicy:
    """What the online policies share: entries ranked in a lazy heap, the lowest evicted first,
    every miss admitted. Subclasses rank keys with ``self._heap.set``."""

    def __init__(self) -> None:
        self._heap = _LazyHeap()

    def on_evict(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, exclude: Container[Key]) -> Key | None:
        return self._heap.min(exclude)

    def admits(self, key: Key, victims: Sequence[Key]) -> bool:
        return True


class LRU(_HeapPolicy):
    """Least recently used: evict the entry whose last request is oldest (ties: smaller key)."""

    def __init__(self) -> None:
        self._last: dict[Key, int] = {}
        super().__init__()

    def on_hit(self, key: Key, t: int) -> None:
        self._last[key] = t
        self._heap.set(key, (t, key))

    def on_miss(self, key: Key, t: int) -> None:
        self._last[key] = t

    def on_insert(self, key: Key, t: int) -> None:
        self._heap.set(key, (self._last.setdefault(key, t), key))


class LFU(_HeapPolicy):
    """Least frequently used: evict the entry with the fewest requests; among equal counts the
    least recently requested, then the smaller key. With ``persistent`` (default) a key's count
    covers every request since the run began, resident or not; otherwise it restarts at 1 each
    time the key is admitted."""

    def __init__(self, persistent: bool = True) -> None:
        if not isinstance(persistent, bool):
            raise ConfigError(f"lfu: persistent must be true or false, not {persistent!r}")
        self.persistent = persistent
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        super().__init__()

    def _prio(self, key: Key) -> tuple:
        return (self._count[key], self._last[key], key)

    def on_hit(self, key: Key, t: int) -> None:
        self._count[key] += 1
        self._last[key] = t
        self._heap.set(key, self._prio(key))

    def on_miss(self, key: Key, t: int) -> None:
        self._count[key] = self._count.get(key, 0) + 1 if self.persistent else 1
        self._last[key] = t

    def on_insert(self, key: Key, t: int) -> None:
        self._count.setdefault(key, 1)
        self._last.setdefault(key, t)
        self._heap.set(key, self._prio(key))

    def on_evict(self, key: Key) -> None:
        super().on_evict(key)
        if not self.persistent:
            del self._count[key], self._last[key]


_LCP_GRID = 2**20  # LCP compares s on a grid of 2**-20 steps (about 1e-6)


class LCP(_HeapPolicy):
    """MoEpic's least cache priority: ``P = mu * rho**(nu / omega)``, ``mu`` the key's request
    count (persistent), ``nu = t - last`` the steps since its last request; lowest P evicted.

    ``log P = log mu + (last - t) * ln(1/rho) / omega``. The ``t`` term is shared by every entry,
    so the order is that of ``s = last + omega * log(mu) / ln(1/rho)`` (in steps), which changes
    only when an entry is requested: a heap with lazy invalidation. ``s`` is compared on a grid of
    2**-20 steps so that ties in exact arithmetic (mu doubled = 64 steps more recent, at the
    defaults) stay ties in floating point; ties go to the least recent request, then the smaller
    key."""

    def __init__(self, rho: float = 0.25, omega: float = 128.0) -> None:
        if not (isinstance(rho, int | float) and 0.0 < rho < 1.0):
            raise ConfigError(f"lcp: rho must be a number in (0, 1), not {rho!r}")
        if not (isinstance(omega, int | float) and omega > 0 and math.isfinite(omega)):
            raise ConfigError(f"lcp: omega must be a positive number, not {omega!r}")
        self.rho, self.omega = float(rho), float(omega)
        self._steps_per_e = self.omega / math.log(1.0 / self.rho)  # s gained per unit of log mu
        self._mu: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        super().__init__()

    def _prio(self, key: Key) -> tuple:
        last = self._last[key]
        s = last + self._steps_per_e * math.log(self._mu[key])
        return (math.floor(s * _LCP_GRID + 0.5), last, key)

    def _request(self, key: Key, t: int) -> None:
        self._mu[key] = self._mu.get(key, 0) + 1
        self._last[key] = t

    def on_hit(self, key: Key, t: int) -> None:
        self._request(key, t)
        self._heap.set(key, self._prio(key))

    def on_miss(self, key: Key, t: int) -> None:
        self._request(key, t)

    def on_insert(self, key: Key, t: int) -> None:
        if key not in self._mu:
            self._request(key, t)
        self._heap.set(key, self._prio(key))


class FutureIndex:
    """For each key, the moments it will be requested, from the list of steps the cache will see
    (each an iterable of keys). A moment is ``step * stride + layer``: layers run in ascending
    order inside a step, and a layer's keys are requested together. Shared by OPT instances."""

    def __init__(self, steps: Iterable[Iterable[Key]]) -> None:
        pairs: dict[Key, list[tuple[int, int]]] = {}
        for n, keys in enumerate(steps):
            for key in keys:
                pairs.setdefault(key, []).append((n, key[0]))
        stride = 1 + max((key[0] for key in pairs), default=0)
        self.moments = {k: [n * stride + l for n, l in v] for k, v in pairs.items()}
        self.rank = {k: i for i, k in enumerate(sorted(pairs))}


_NEVER = float("inf")


class _Ahead:
    """A key's requests still to come, ordered so that the smaller is the better victim: the key
    whose next request is later; if two keys are next requested together (same step and layer),
    the one whose following request is later, and so on; never again before all, the larger key
    first among those. Compared lazily, element by element, so a heap stays O(log n)."""

    __slots__ = ("moments", "i", "rank")

    def __init__(self, moments: list[int], i: int, rank: int) -> None:
        self.moments, self.i, self.rank = moments, i, rank

    def __lt__(self, other: _Ahead) -> bool:
        a, b, i, j = self.moments, other.moments, self.i, other.i
        while True:
            x = a[i] if i < len(a) else _NEVER
            y = b[j] if j < len(b) else _NEVER
            if x != y:
                return x > y
            if x == _NEVER:
                return self.rank > other.rank
            i, j = i + 1, j + 1


class OPT:
    """Belady's MIN, the offline bound: evict the entry whose next request is farthest (ties
    between keys requested together are broken by their following requests, see ``_Ahead``).
    With ``bypass`` (default) a key that would itself be the best victim is not admitted, which
    makes this the bound for caches that may stream an expert without keeping it; it is then
    at least as good as every online policy (tested on random traces). ``future`` is the list
    of steps the cache will see, or a ``FutureIndex``; each request of a key advances it."""

    def __init__(self, future: Iterable[Iterable[Key]] | FutureIndex, bypass: bool = True) -> None:
        if not isinstance(bypass, bool):
            raise ConfigError(f"opt: bypass must be true or false, not {bypass!r}")
        self.index = future if isinstance(future, FutureIndex) else FutureIndex(future)
        self.bypass = bypass
        self._seen: dict[Key, int] = {}
        self._heap = _LazyHeap()

    def _ahead(self, key: Key) -> _Ahead:
        return _Ahead(self.index.moments.get(key, []), self._seen.get(key, 0),
                      self.index.rank.get(key, -1))  # fmt: skip

    def _request(self, key: Key) -> None:
        n = self._seen.get(key, 0)
        if n >= len(self.index.moments.get(key, ())):
            raise ConfigError(
                f"opt: {key!r} was requested {n + 1} times but its future lists it {n} times; "
                "build OPT from the same steps the cache replays"
            )
        self._seen[key] = n + 1

    def on_hit(self, key: Key, t: int) -> None:
        self._request(key)
        self._heap.set(key, self._ahead(key))

    def on_miss(self, key: Key, t: int) -> None:
        self._request(key)

    def on_insert(self, key: Key, t: int) -> None:
        self._heap.set(key, self._ahead(key))

    def on_evict(self, key: Key) -> None:
        self._heap.discard(key)

    def victim(self, exclude: Container[Key]) -> Key | None:
        return self._heap.min(exclude)

    def admits(self, key: Key, victims: Sequence[Key]) -> bool:
        if not self.bypass:
            return True
        mine = self._ahead(key)
        return all(self._ahead(v) < mine for v in victims)


POLICIES: dict[str, Callable[..., Policy]] = {"lru": LRU, "lfu": LFU, "lcp": LCP, "opt": OPT}


def _check_params(name: str, params: Mapping[str, Any], complete: bool = True) -> None:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown cache policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
    sig = inspect.signature(cls)
    unknown = sorted(set(params) - set(sig.parameters))
    if unknown:
        accepted = ", ".join(sig.parameters) or "none"
        raise ConfigError(
            f"cache policy {name!r} has no parameter {', '.join(unknown)}; accepted: {accepted}"
        )
    missing = [p.name for p in sig.parameters.values() if p.default is p.empty]
    missing = [p for p in missing if p not in params]
    if missing and complete:
        why = " (it is offline: only the simulator knows the future)" if name == "opt" else ""
        raise ConfigError(f"cache policy {name!r} needs {', '.join(missing)}{why}")


def make_policy(name: str, **params: Any) -> Policy:
    """A new policy instance from the registry; ConfigError for unknown names or parameters."""
    _check_params(name, params)
    return POLICIES[name](**params)


def parse_policy_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"lcp"`` or ``"lcp:rho=0.5,omega=64"`` -> name and parameters (numbers, true/false)."""
    name, _, rest = spec.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        k, eq, v = item.partition("=")
        if not eq or not k.strip():
            raise ConfigError(f"bad policy parameter {item!r} in {spec!r}; write name=value")
        params[k.strip()] = parse_value(v.strip())
    _check_params(name.strip(), params, complete=False)
    return name.strip(), params


def parse_value(v: str) -> Any:
    """A policy parameter value from text: true/false, an int, a float, else the string."""
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for conv in (int, float):
        try:
            return conv(v)
        except ValueError:
            pass
    return v


def policy_factory(policy: str | Callable[[], Policy], **params: Any) -> Callable[[], Policy]:
    """A zero-argument callable making fresh policies: from a spec string (checked now) or as
    given. The cache makes one policy per budget partition (one, or one per layer)."""
    if not isinstance(policy, str):
        if params:
            raise ConfigError("policy parameters go with a policy name, not a factory")
        return policy
    name, spec_params = parse_policy_spec(policy)
    merged = {**spec_params, **params}
    make_policy(name, **merged)  # bad values fail now, not at the first request of a layer
    return lambda: POLICIES[name](**merged)


@dataclass(frozen=True)
class CacheStats:
    """Counters since the cache was made or ``reset_stats`` was called."""

    hits: int
    misses: int
    admitted: int
    bytes_admitted: int
    evictions: int
    bytes_evicted: int
    refused: int
    layer_hits: Mapping[int, int] = field(default_factory=dict)
    layer_misses: Mapping[int, int] = field(default_factory=dict)

    @property
    def requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    def layer_hit_rate(self) -> dict[int, float]:
        layers = sorted(set(self.layer_hits) | set(self.layer_misses))
        out = {}
        for l in layers:
            h, m = self.layer_hits.get(l, 0), self.layer_misses.get(l, 0)
            out[l] = h / (h + m) if h + m else 0.0
        return out


class _Part:
    """One budget partition: all keys (global budget) or one layer's (a plan)."""

    __slots__ = ("budget", "used", "policy")

    def __init__(self, budget: int, policy: Policy) -> None:
        self.budget, self.used, self.policy = budget, 0, policy


def _check_budget(what: str, b: Any) -> int:
    if isinstance(b, bool) or not isinstance(b, int) or b < 0:
        raise ConfigError(f"{what} must be a whole number of bytes >= 0, not {b!r}")
    return b


def _layer_id(l: Any) -> int:
    try:
        return int(l)
    except (TypeError, ValueError):
        raise ConfigError(f"a per-layer budget names layer {l!r}; layers are ints") from None


class ExpertCache:
    """Resident entries under a hard byte budget, ranked by a policy.

    ``budget_bytes`` is one global budget, or a plan ``{layer: bytes}`` giving each layer its own
    budget and its own policy instance (layers absent from the plan get 0 bytes). ``policy`` is a
    registry spec (``"lru"``, ``"lcp:rho=0.5"``), a zero-argument factory, or (global budget only)
    a policy instance. ``on_evict(key, value)`` is called for every entry the policy evicts and
    for every entry ``clear`` drops.
    """

    def __init__(
        self,
        budget_bytes: int | Mapping[int, int],
        policy: str | Callable[[], Policy] | Policy = "lru",
        on_evict: Callable[[Key, Any], None] | None = None,
    ) -> None:
        if hasattr(policy, "victim") and not isinstance(policy, type):
            if isinstance(budget_bytes, Mapping):
                raise ConfigError("a per-layer budget needs a policy name or factory, not one "
                                  "policy instance")  # fmt: skip
            instance = policy
            self._new_policy: Callable[[], Policy] = lambda: instance
        else:
            self._new_policy = policy_factory(policy)
        self.on_evict = on_evict
        if isinstance(budget_bytes, Mapping):
            self.plan: dict[int, int] | None = {
                _layer_id(l): _check_budget(f"the budget of layer {l}", b)
                for l, b in budget_bytes.items()
            }
            self._parts: dict[Any, _Part] = {}
            self.budget_bytes = sum(self.plan.values())
        else:
            self.plan = None
            self.budget_bytes = _check_budget("the cache budget", budget_bytes)
            self._parts = {None: _Part(self.budget_bytes, self._new_policy())}
        self._single = self._parts[None] if self.plan is None else None
        self._entries: dict[Key, tuple[Any, int]] = {}
        self.used_bytes = 0
        self.t = 0
        self.version = 0  # changes whenever the set of resident entries does
        self.reset_stats()

    # -- state -----------------------------------------------------------------------------
    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> list[Key]:
        return list(self._entries)

    def peek(self, key: Key) -> Any | None:
        """The resident value of ``key`` or None, without counting or telling the policy."""
        entry = self._entries.get(key)
        return None if entry is None else entry[0]

    def _part(self, key: Key) -> _Part:
        if self.plan is None:
            return self._parts[None]
        layer = key[0]
        part = self._parts.get(layer)
        if part is None:
            part = self._parts[layer] = _Part(self.plan.get(layer, 0), self._new_policy())
        return part

    # -- counters --------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.hits = self.misses = self.admitted = self.bytes_admitted = 0
        self.evictions = self.bytes_evicted = self.refused = 0
        self._layer_hits: defaultdict[int, int] = defaultdict(int)
        self._layer_misses: defaultdict[int, int] = defaultdict(int)

    def stats(self) -> CacheStats:
        return CacheStats(self.hits, self.misses, self.admitted, self.bytes_admitted,
                          self.evictions, self.bytes_evicted, self.refused,
                          dict(self._layer_hits), dict(self._layer_misses))  # fmt: skip

    # -- the protocol the engine and the simulator drive -----------------------------------
    def begin_token(self, steps: int = 1) -> int:
        """Advance the clock by one forward step (a decode token or a prefill batch)."""
        self.t += steps
        return self.t

    def lookup(self, key: Key) -> Any | None:
        """The resident value of ``key`` (a hit) or None (a miss); both are counted."""
        entry = self._entries.get(key)
        policy = (self._single or self._part(key)).policy
        if entry is None:
            self.misses += 1
            self._layer_misses[key[0]] += 1
            policy.on_miss(key, self.t)
            return None
        self.hits += 1
        self._layer_hits[key[0]] += 1
        policy.on_hit(key, self.t)
        return entry[0]

    def admit(self, key: Key, value: Any, nbytes: int, protected: Iterable[Key] = (),
              keep: Callable[[Key], bool] | None = None) -> bool:  # fmt: skip
        """Make ``key`` resident with ``value`` (not None) charged ``nbytes``, evicting what the
        policy names. Returns False, evicting nothing, if the entry is larger than its budget,
        if it cannot fit without evicting a key in ``protected`` (the experts the current layer
        is computing with) or a victim for which ``keep`` is true (the engine's rule against
        thrashing: docs/server.md), or if the policy declines it."""
        if key in self._entries:
            raise ValueError(f"{key!r} is already resident")
        if value is None:
            raise ValueError("cache values must not be None (None means a miss)")
        if type(nbytes) is not int or nbytes <= 0:
            raise ValueError(f"nbytes must be a positive int, not {nbytes!r}")
        part = self._single or self._part(key)
        if nbytes > part.budget:
            self.refused += 1
            return False
        victims: list[Key] = []
        free = part.budget - part.used
        if free < nbytes:
            # ``key`` is not resident, so the policy cannot name it; a set is built only when
            # a second victim is needed (entries of different sizes).
            exclude = protected if isinstance(protected, set | frozenset) else set(protected)
            while free < nbytes:
                v = part.policy.victim(exclude)
                if v is None or (keep is not None and keep(v)):
                    self.refused += 1
                    return False
                entry = self._entries.get(v)
                if entry is None or v in exclude or (self.plan is not None and v[0] != key[0]):
                    raise RuntimeError(f"policy {type(part.policy).__name__} named {v!r}, "
                                       "which is not an evictable entry here")  # fmt: skip
                victims.append(v)
                free += entry[1]
                if free < nbytes:
                    exclude = set(exclude) | set(victims)
        if not part.policy.admits(key, victims):
            self.refused += 1
            return False
        evicted = []
        for v in victims:
            v_value, v_bytes = self._entries.pop(v)
            part.used -= v_bytes
            self.used_bytes -= v_bytes
            part.policy.on_evict(v)
            self.evictions += 1
            self.bytes_evicted += v_bytes
            evicted.append((v, v_value))
        self._entries[key] = (value, nbytes)
        part.used += nbytes
        self.used_bytes += nbytes
        part.policy.on_insert(key, self.t)
        self.version += 1
        self.admitted += 1
        self.bytes_admitted += nbytes
        if self.on_evict is not None:
            for v, v_value in evicted:
                self.on_evict(v, v_value)
        return True

    def clear(self) -> None:
        """Drop every entry (calling ``on_evict`` for each); not counted as evictions."""
        entries, self._entries = self._entries, {}
        self.version += 1
        for key in entries:
            self._part(key).policy.on_evict(key)
        for part in self._parts.values():
            part.used = 0
        self.used_bytes = 0
        if self.on_evict is not None:
            for key, (value, _) in entries.items():
                self.on_evict(key, value)
