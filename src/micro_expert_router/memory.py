"""The memory limit and how the engine splits it: fixed costs first, the rest to the expert cache.

This module owns three things:

- ``parse_size``: ``2.5G``, ``1800M``, ``512MiB``, ``1.5e9`` or a plain byte count -> bytes.
  Suffixes K/M/G/T are decimal (1e3 ...), KiB/MiB/GiB/TiB (or Ki/Mi/Gi/Ti) binary.
- ``default_limit``: the limit when none is given: the memory cgroup's limit of this process
  (v1: ``memory.limit_in_bytes``; v2: ``memory.max``; the smallest along the path up to the
  root of the hierarchy), else ``MEM_AVAILABLE_FRACTION`` x ``MemAvailable``.
- ``split``: a ``MemorySplit`` of the limit into the engine's fixed costs, measured or computed
  from what is loaded, and the expert cache that gets the rest:

  - dense: the bytes of the loaded dense tensors (``kernels.dense.nbytes``, each tensor once,
    so a tied lm_head is not counted twice), plus the RoPE tables;
  - kv: per layer one K and one V tensor ``[Hk, max_context, Dh]`` in the KV dtype;
  - pool staging: the buffer pool's slots that are not cache (``window + 1`` demand-read slots,
    the prefetch slots, and a split layer's top-pool read slots);
  - runtime: this process's resident set (``VmRSS``) measured when loading starts (Python,
    torch, the tokenizer, anything the caller holds), plus ``SCRATCH_BYTES`` for the forward
    pass's activations and the allocator's slack, plus ``PAGE_CACHE_BYTES`` for the file
    pages a memory cgroup charges beside the anonymous memory: library code the first steps
    fault in after load starts, the page cache of files read (Python modules, the manifest,
    the tokenizer) and the page tables of the pool. VmRSS includes shared library pages,
    which a cgroup is charged for only if this process faulted them in first (as after a
    cache drop): an upper bound.

  ``cache = limit - (dense + kv + pool staging + runtime)``. If that is negative the load fails
  with a ``BudgetError`` naming every cost. If every expert fits, every expert is cached. An
  explicit ``cache_bytes`` wins over the limit (the split still reports the figures).

Other processes in the same cgroup are not accounted: the limit is this process's to use.
See docs/memory.md.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import BudgetError, ConfigError

MEM_AVAILABLE_FRACTION = 0.8  # share of MemAvailable taken when no cgroup limit applies
SCRATCH_BYTES = 96 * 2**20  # activations of a step (prompts of a few hundred tokens), slack
# File pages beside the RSS at load: measured on the olmoe-like store in a cgroup-v1 group
# (bench/vs_llamacpp.py --limit 0.83x): RssFile grows 69 -> 83 MiB from load start to decode,
# about 55 MiB of unmapped page cache (modules, manifest), 6 MiB of page tables for 3 GB. With
# the pool populated up front (io/pool.py) and no room left for them, the decode's library code
# was evicted and faulted back (1,558 major faults in a 32-token run against 89 with room).
PAGE_CACHE_BYTES = 64 * 2**20
RUNTIME_EXTRA = SCRATCH_BYTES + PAGE_CACHE_BYTES  # added to the RSS measured at load start
_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}  # fmt: skip
CGROUP_ROOT = Path("/sys/fs/cgroup")


def parse_size(value: int | float | str, what: str = "memory limit") -> int:
    """Bytes from an int, or a string like ``"2.5G"``, ``"1800M"``, ``"512MiB"``."""
    if isinstance(value, bool):
        raise ConfigError(f"{what} must be a size, not {value!r}")
    if isinstance(value, int | float):
        n = float(value)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", str(value))
        unit = m.group(2).lower() if m else None
        if m is None or unit not in _UNITS:
            raise ConfigError(
                f"{what} {value!r} is not a size: give bytes or a number with K/M/G/T "
                "(decimal) or KiB/MiB/GiB/TiB, e.g. 2.5G or 1800M"
            )
        n = float(m.group(1)) * _UNITS[unit]
    if not n > 0 or n != n or n == float("inf"):
        raise ConfigError(f"{what} must be a positive size, not {value!r}")
    return int(n)


def _meminfo(key: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def process_rss() -> int:
    """This process's resident set size in bytes (0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _read_limit(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text in ("", "max"):
        return None
    try:
        return int(text)
    except ValueError:
        return None


def cgroup_limit(
    proc_cgroup: Path = Path("/proc/self/cgroup"), root: Path = CGROUP_ROOT
) -> tuple[int, str] | None:
    """(limit bytes, where it was read) of this process's memory cgroup, or None if unlimited.

    v1: the ``memory`` controller's hierarchy, ``memory.limit_in_bytes``; v2: the unified
    hierarchy, ``memory.max``. The smallest limit on the path from the process's group up to the
    hierarchy's root counts (a parent's limit binds its children). Values of at least the
    machine's RAM mean no limit."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    total = _meminfo("MemTotal") or 2**62
    candidates: list[tuple[Path, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        rel = rel.lstrip("/")
        if "memory" in controllers.split(","):
            candidates.append((root / "memory", rel))
        elif controllers == "":
            for base in (root, root / "unified"):
                if (base / "cgroup.controllers").is_file():
                    candidates.append((base, rel))
                    break
    best: tuple[int, str] | None = None
    for base, rel in candidates:
        name = "memory.max" if (base / "cgroup.controllers").is_file() else "memory.limit_in_bytes"
        d = base / rel
        if not d.is_dir():  # a namespaced view: our group is the mount's root
            d = base
        while True:
            limit = _read_limit(d / name)
            if limit is not None and limit < total and (best is None or limit < best[0]):
                best = (limit, str(d / name))
            if d == base or base not in d.parents:
                break
            d = d.parent
    return best


def default_limit() -> tuple[int, str]:
    """(bytes, source) of the limit used when none is given."""
    cg = cgroup_limit()
    if cg is not None:
        return cg[0], f"cgroup {cg[1]}"
    avail = _meminfo("MemAvailable")
    if avail is None:
        raise ConfigError("cannot read MemAvailable from /proc/meminfo and no cgroup limit "
                          "applies: give memory_limit (--memory-limit) or cache_bytes")  # fmt: skip
    return int(avail * MEM_AVAILABLE_FRACTION), f"{MEM_AVAILABLE_FRACTION:g} x MemAvailable"


def resolve_limit(memory_limit: int | str | None) -> tuple[int, str]:
    if memory_limit is None:
        return default_limit()
    return parse_size(memory_limit), "memory_limit"


def dense_bytes(dense: dict[str, Any], extra: tuple[Any, ...] = ()) -> int:
    """Bytes of the loaded dense weights (each object once) and of ``extra`` tensors."""
    from .kernels.dense import nbytes

    seen: dict[int, int] = {}
    for w in list(dense.values()) + list(extra):
        seen.setdefault(id(w), nbytes(w))
    return sum(seen.values())


def kv_bytes(args: Any, max_context: int, element_size: int) -> int:
    """The KV cache at ``max_context`` tokens: K and V of every layer, or MLA's latent
    (``ModelArgs.kv_bytes_per_token``)."""
    return max_context * args.kv_bytes_per_token(element_size)


@dataclass(frozen=True)
class MemorySplit:
    """How the limit is shared out. All figures in bytes."""

    limit: int
    limit_source: str  # "memory_limit", "cgroup <file>", "0.8 x MemAvailable"
    dense: int
    kv: int
    pool_staging: int
    runtime: int  # RSS at load start + RUNTIME_EXTRA
    cache: int  # the expert cache's budget
    experts_total: int  # bytes of every expert as the cache would hold them
    cache_source: str  # "limit" | "all experts fit" | "cache_bytes" | "plan"

    @property
    def fixed(self) -> int:
        return self.dense + self.kv + self.pool_staging + self.runtime

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fixed"] = self.fixed
        return d

    def line(self) -> str:
        mb = 1e6
        return (f"memory limit {self.limit / mb:.0f} MB ({self.limit_source}): dense "
                f"{self.dense / mb:.0f} + KV {self.kv / mb:.0f} + pool staging "
                f"{self.pool_staging / mb:.0f} + runtime {self.runtime / mb:.0f} MB; expert "
                f"cache {self.cache / mb:.0f} MB of {self.experts_total / mb:.0f} MB "
                f"({self.cache_source})")  # fmt: skip


def split(
    limit: tuple[int, str], *, dense: int, kv: int, pool_staging: int, runtime_rss: int,
    experts_total: int, cache_bytes: int | None = None, enforce: bool = True,
) -> MemorySplit:  # fmt: skip
    """Share ``limit`` out (see the module docstring). ``enforce=False`` reports without
    failing (a checkpoint folder whose limit was not asked for)."""
    lim, source = limit
    runtime = runtime_rss + RUNTIME_EXTRA
    fixed = dense + kv + pool_staging + runtime
    free = lim - fixed
    if cache_bytes is not None:
        cache, why = min(cache_bytes, experts_total), "cache_bytes"
    elif free >= experts_total:
        cache, why = experts_total, "all experts fit"
    else:
        cache, why = max(free, 0), "limit"
    if enforce and free < 0 and cache_bytes is None:
        mb = 1e6
        raise BudgetError(
            f"the fixed costs alone exceed the memory limit of {lim / mb:.0f} MB ({source}): "
            f"dense weights {dense / mb:.0f} MB + KV cache at max_context {kv / mb:.0f} MB + "
            f"buffer-pool staging slots {pool_staging / mb:.0f} MB + runtime "
            f"{runtime / mb:.0f} MB (process RSS at load {runtime_rss / mb:.0f} MB + scratch "
            f"{SCRATCH_BYTES / mb:.0f} MB + page cache {PAGE_CACHE_BYTES / mb:.0f} MB) = "
            f"{fixed / mb:.0f} MB; raise the limit, lower "
            f"max_context, or use a smaller dtype (e.g. --dtype bfloat16)"
        )
    return MemorySplit(lim, source, dense, kv, pool_staging, runtime, cache, experts_total, why)


def scale_budgets(budgets: dict[int, int], total: int) -> dict[int, int]:
    """Per-layer budgets scaled down in proportion so they sum to at most ``total``."""
    have = sum(budgets.values())
    if have <= total or have == 0:
        return dict(budgets)
    return {layer: int(b * total / have) for layer, b in budgets.items()}



def store_split(
    store: Any, config: Any, dense: dict[str, Any], kv_element_size: int, runtime_rss: int,
    split_ratio: float | dict[int, float], window: int, prefetch_slots: int,
    plan_budgets: dict[int, int] | None = None,
) -> MemorySplit:  # fmt: skip
    """The split for a store about to be streamed (``StreamingProvider``'s slot arithmetic:
    whole experts live in read slots of ``align_up(expert_bytes)``; a split layer's cached tops
    in slots of ``align_up(top bytes)``, each top pool with ``window + 1`` read slots)."""
    from .io import align_up

    a = store.args
    layers = [i for i in range(a.n_layers) if a.moe_layers[i]]
    n_groups = a.expert_inter // store.group
    per_group = store.format.group_nbytes(a.hidden_size, store.group)
    slot = align_up(store.expert_bytes)
    entry: dict[int, int] = {}
    for layer in layers:
        theta = split_ratio[layer] if isinstance(split_ratio, dict) else split_ratio
        k = round(float(theta) * n_groups)
        entry[layer] = slot if k == n_groups else (align_up(k * per_group) if k else 0)
    experts_total = sum(a.n_experts * e for e in entry.values())
    staging = (window + 1 + prefetch_slots) * slot
    staging += sum((window + 1) * size for size in {e for e in entry.values() if e and e != slot})
    rope = 2 * config.max_context * a.head_dim * 4  # cos and sin tables (float32 at most)
    out = split(resolve_limit(config.memory_limit), dense=dense_bytes(dense) + rope,
                kv=kv_bytes(a, config.max_context, kv_element_size), pool_staging=staging,
                runtime_rss=runtime_rss, experts_total=experts_total,
                cache_bytes=config.cache_bytes)  # fmt: skip
    if plan_budgets is not None:
        total = min(sum(plan_budgets.values()), out.cache)
        out = MemorySplit(**{**asdict(out), "cache": total, "cache_source": "plan"})
    return out
