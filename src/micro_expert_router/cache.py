"""Expert residency under a hard byte budget; policies rank victims.

``ExpertCache`` owns which experts (or expert segments) are resident, their bytes, and the
hit/miss/eviction counters; it does no I/O. The engine stores opaque values in it (buffer leases)
and is told through ``on_evict`` when one leaves, so it can release it. A ``Policy`` only ranks
victims: it hears about inserts, hits and evictions and names a victim outside a protected set.
Policies are small classes in the ``POLICIES`` registry; the simulator and the engine use the
same ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Protocol

from .errors import ConfigError

Key = Hashable


class Policy(Protocol):
    def on_insert(self, key: Key, t: int) -> None: ...

    def on_hit(self, key: Key, t: int) -> None: ...

    def on_evict(self, key: Key) -> None: ...

    def victim(self, protected: Iterable[Key]) -> Key | None:
        """The entry to evict next, never one in ``protected``; None if every entry is."""
        ...


class LRU:
    """Least recently used: evict the entry whose last insert or hit is oldest."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def on_insert(self, key: Key, t: int) -> None:
        self._order[key] = None

    def on_hit(self, key: Key, t: int) -> None:
        self._order.move_to_end(key)

    def on_evict(self, key: Key) -> None:
        del self._order[key]

    def victim(self, protected: Iterable[Key]) -> Key | None:
        protected = set(protected)
        return next((k for k in self._order if k not in protected), None)


POLICIES: dict[str, Callable[..., Policy]] = {"lru": LRU}


def make_policy(name: str, **params: Any) -> Policy:
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ConfigError(
            f"unknown cache policy {name!r}; known: {', '.join(sorted(POLICIES))}"
        ) from None
    try:
        return cls(**params)
    except TypeError as e:
        raise ConfigError(f"bad parameters for cache policy {name!r}: {e}") from None


class ExpertCache:
    """Resident entries under ``budget_bytes`` (a hard limit), ranked by a policy."""

    def __init__(
        self,
        budget_bytes: int,
        policy: str | Policy = "lru",
        on_evict: Callable[[Key, Any], None] | None = None,
    ) -> None:
        if budget_bytes < 0:
            raise ConfigError("cache budget must be >= 0 bytes")
        self.budget_bytes = budget_bytes
        self.policy = make_policy(policy) if isinstance(policy, str) else policy
        self.on_evict = on_evict
        self._entries: dict[Key, tuple[Any, int]] = {}
        self.used_bytes = 0
        self.t = 0
        self.hits = self.misses = self.evictions = self.admitted = self.refused = 0

    def __contains__(self, key: Key) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def begin_token(self) -> None:
        self.t += 1

    def lookup(self, key: Key) -> Any | None:
        """The resident value of ``key`` (counted as a hit) or None (counted as a miss)."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.policy.on_hit(key, self.t)
        return entry[0]

    def admit(self, key: Key, value: Any, nbytes: int, protected: Iterable[Key] = ()) -> bool:
        """Make ``key`` resident, evicting unprotected entries as needed. Refuses (returns
        False, evicting nothing) if it cannot fit without evicting a protected entry."""
        if key in self._entries:
            raise ValueError(f"{key!r} is already resident")
        if nbytes > self.budget_bytes:
            self.refused += 1
            return False
        protected = set(protected)
        victims, free = [], self.budget_bytes - self.used_bytes
        order = _VictimOrder(self.policy, protected)
        while free < nbytes:
            v = order.next()
            if v is None:
                self.refused += 1
                return False
            victims.append(v)
            free += self._entries[v][1]
        for v in victims:
            self._evict(v)
        self._entries[key] = (value, nbytes)
        self.used_bytes += nbytes
        self.policy.on_insert(key, self.t)
        self.admitted += 1
        return True

    def _evict(self, key: Key) -> None:
        value, nbytes = self._entries.pop(key)
        self.used_bytes -= nbytes
        self.policy.on_evict(key)
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key, value)

    def clear(self) -> None:
        for key in list(self._entries):
            self._evict(key)


class _VictimOrder:
    """Successive victims without evicting yet: each named victim joins the protected set."""

    def __init__(self, policy: Policy, protected: set[Key]) -> None:
        self.policy = policy
        self.protected = protected

    def next(self) -> Key | None:
        v = self.policy.victim(self.protected)
        if v is not None:
            self.protected.add(v)
        return v
