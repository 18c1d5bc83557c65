"""Replay routing traces through the expert cache: hit rates of policies at a budget, and sweeps.

This module owns the replay convention (docs/simulator.md) and nothing else: residency, counting
and eviction are the very ``ExpertCache`` and policy classes the engine runs (``cache.py``), so a
trace recorded from a generation replays to the engine's hit and miss counts. Per forward step
(one decode token, or one prefill batch) the replay does what the engine's MoE block does:

- ``begin_token()`` once, then for each MoE layer in model order: the distinct experts the step's
  tokens routed to, in ascending id order, are all looked up, then each miss is admitted in that
  order with the layer's experts protected (never the victim while the layer computes);
- the trace's rank order inside a layer is not used. It would not change a result anyway
  (policies rank by step and key), except in a layer whose own experts overflow its budget,
  where the first admitted stay: hence the engine's order.

Counting starts at the first step whose first token index is ``>= warmup`` (the cache is warm,
not empty, at that point). Every expert is charged the same ``expert_bytes``; a budget is one
total (one cache over all (layer, expert) keys, the convention of BrianBoitano/nvmoe's simulator)
or a per-layer plan ``{layer: bytes}``. Bytes read per token count every miss as one whole
expert read, admitted or not.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..cache import ExpertCache, FutureIndex, Key, Policy, make_policy, parse_policy_spec
from ..errors import ConfigError, DependencyError
from ..trace import Trace

DEFAULT_SWEEP_FRACTIONS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.75)


@dataclass(frozen=True)
class Step:
    """The requests of one forward step: per MoE layer, its distinct keys in ascending order."""

    first_token: int
    tokens: int
    groups: tuple[tuple[Key, ...], ...]


def replay_steps(trace: Trace) -> list[Step]:
    """The request sequence the engine would issue for ``trace``, step by step."""
    steps = []
    layers = trace.layers
    for start, end in trace.step_bounds():
        ex = trace.experts[start:end]  # [n, L, K]
        if end - start == 1:
            rows = [sorted(r) for r in ex[0].tolist()]
        else:
            rows = [sorted(set(ex[:, j, :].ravel().tolist())) for j in range(len(layers))]
        groups = tuple(tuple((l, e) for e in row) for l, row in zip(layers, rows, strict=True))
        steps.append(Step(start, end - start, groups))
    return steps


def experts_for_fraction(trace: Trace, fraction: float) -> int:
    """``floor(fraction x layers x experts)``, the capacity convention of the upstream
    simulator (a hair of slack so that 0.29 x 100 is 29, not 28)."""
    if not (isinstance(fraction, int | float) and 0.0 <= fraction <= 1.0):
        raise ConfigError(f"cache fraction must be in [0, 1], not {fraction!r}")
    return math.floor(fraction * trace.num_layers * trace.num_experts + 1e-9)


@dataclass(frozen=True)
class SimResult:
    """What one replay measured (counted tokens only)."""

    policy: str
    budget_bytes: int | Mapping[int, int]
    expert_bytes: int | None  # None: sizes unknown, budgets count experts
    capacity_experts: int | None  # total experts the budget holds
    tokens: int
    steps: int
    warmup: int
    requests: int
    hits: int
    misses: int
    evictions: int
    refused: int
    per_layer_hit_rate: Mapping[int, float] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0

    @property
    def misses_per_token(self) -> float:
        return self.misses / self.tokens if self.tokens else 0.0

    @property
    def bytes_read_per_token(self) -> float | None:
        return None if self.expert_bytes is None else self.misses_per_token * self.expert_bytes

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(hit_rate=self.hit_rate, misses_per_token=self.misses_per_token,
                 bytes_read_per_token=self.bytes_read_per_token)  # fmt: skip
        d["per_layer_hit_rate"] = {str(k): v for k, v in self.per_layer_hit_rate.items()}
        if isinstance(self.budget_bytes, Mapping):
            d["budget_bytes"] = {str(k): v for k, v in self.budget_bytes.items()}
        return d


class Replay:
    """A trace prepared for replay (its request sequence, and for OPT its future), run at any
    number of policies and budgets."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.steps = replay_steps(trace)
        self._future: FutureIndex | None = None

    @property
    def future(self) -> FutureIndex:
        if self._future is None:
            self._future = FutureIndex([k for g in s.groups for k in g] for s in self.steps)
        return self._future

    def _factory(self, policy: str) -> Callable[[], Policy]:
        name, params = parse_policy_spec(policy)
        if name == "opt":
            params.setdefault("future", self.future)
        make_policy(name, **params)  # checks the parameters now, not per layer
        return lambda: make_policy(name, **params)

    def run(
        self,
        policy: str,
        budget_bytes: int | Mapping[int, int],
        *,
        expert_bytes: int | None = None,
        warmup: int = 0,
    ) -> SimResult:
        """Replay through ``policy`` (a registry spec such as ``"lcp:rho=0.5"``) under
        ``budget_bytes``; with ``expert_bytes`` None every expert weighs 1 and the budget counts
        experts."""
        trace, size = self.trace, expert_bytes or 1
        if expert_bytes is not None and (not isinstance(expert_bytes, int) or expert_bytes <= 0):
            raise ConfigError(f"expert size must be a positive number of bytes, not {expert_bytes}")
        if isinstance(budget_bytes, Mapping):
            missing = sorted(set(trace.layers) - {int(k) for k in budget_bytes})
            if missing:
                raise ConfigError(f"the per-layer budget has no entry for layers {missing}")
        if not isinstance(warmup, int) or warmup < 0:
            raise ConfigError(f"warmup must be a whole number of tokens >= 0, not {warmup!r}")
        start = next((i for i, s in enumerate(self.steps) if s.first_token >= warmup), None)
        if start is None:
            where = trace.path or "the trace"
            raise ConfigError(f"a warmup of {warmup} tokens leaves nothing to count in {where} "
                              f"({trace.num_tokens} tokens); lower --warmup")  # fmt: skip
        cache = ExpertCache(budget_bytes, self._factory(policy))
        t0 = time.perf_counter()
        lookup, admit, begin = cache.lookup, cache.admit, cache.begin_token
        for i, step in enumerate(self.steps):
            if i == start:
                cache.reset_stats()
            begin()
            for keys in step.groups:
                missed = [k for k in keys if lookup(k) is None]
                if missed:
                    protected = frozenset(keys)
                    for k in missed:
                        admit(k, True, size, protected)
        seconds = time.perf_counter() - t0
        st = cache.stats()
        if isinstance(budget_bytes, Mapping):
            capacity = sum(b // size for b in budget_bytes.values())
        else:
            capacity = budget_bytes // size
        return SimResult(
            policy=policy,
            budget_bytes=dict(budget_bytes) if isinstance(budget_bytes, Mapping) else budget_bytes,
            expert_bytes=expert_bytes,
            capacity_experts=capacity,
            tokens=sum(s.tokens for s in self.steps[start:]),
            steps=len(self.steps) - start,
            warmup=warmup,
            requests=st.requests,
            hits=st.hits,
            misses=st.misses,
            evictions=st.evictions,
            refused=st.refused,
            per_layer_hit_rate=st.layer_hit_rate(),
            seconds=seconds,
        )


def simulate(
    trace: Trace,
    policy: str,
    budget_bytes: int | Mapping[int, int],
    *,
    expert_bytes: int | None = None,
    warmup: int = 0,
) -> SimResult:
    """One replay; see ``Replay.run``."""
    return Replay(trace).run(policy, budget_bytes, expert_bytes=expert_bytes, warmup=warmup)


def sweep(
    trace: Trace,
    policies: Sequence[str],
    fractions: Iterable[float],
    *,
    expert_bytes: int | None = None,
    warmup: int = 0,
    progress: bool = False,
) -> list[tuple[float, SimResult]]:
    """Every policy at every cache fraction (one global cache), as (fraction, result)."""
    from tqdm import tqdm

    replay = Replay(trace)
    jobs = [(p, f) for f in fractions for p in policies]
    out = []
    for p, f in tqdm(jobs, desc="sweep", disable=not progress, leave=False):
        budget = experts_for_fraction(trace, f) * (expert_bytes or 1)
        out.append((f, replay.run(p, budget, expert_bytes=expert_bytes, warmup=warmup)))
    return out


SWEEP_COLUMNS = (
    "policy", "fraction", "capacity_experts", "budget_bytes", "tokens", "requests",
    "hits", "misses", "hit_rate", "misses_per_token", "bytes_read_per_token",
)  # fmt: skip


def write_sweep_csv(rows: Sequence[tuple[float, SimResult]], path: Path) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(SWEEP_COLUMNS)
        for f, r in rows:
            d = r.as_dict()
            w.writerow([r.policy, f] + [d[c] for c in SWEEP_COLUMNS[2:]])


def plot_sweep(rows: Sequence[tuple[float, SimResult]], path: Path, title: str) -> None:
    """Hit rate against cache size, one line per policy, OPT drawn as the upper bound.

    ``DependencyError`` when matplotlib (a runtime dependency) cannot be imported."""
    try:
        import matplotlib
    except ImportError as e:
        raise DependencyError(
            f"plotting needs matplotlib, which cannot be imported ({e}): pip install matplotlib"
        ) from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    policies = list(dict.fromkeys(r.policy for _, r in rows))
    for p in policies:
        pts = sorted((f, r.hit_rate) for f, r in rows if r.policy == p)
        xs, ys = [100 * f for f, _ in pts], [100 * h for _, h in pts]
        if p.split(":")[0] == "opt":
            ax.plot(xs, ys, "k--", lw=2.2, label=f"{p} (Belady bound)")
        else:
            ax.plot(xs, ys, marker="o", ms=3.5, lw=1.5, label=p)
    ax.set_xlabel("cache size, % of all experts")
    ax.set_ylabel("hit rate, %")
    ax.set_ylim(0, 100)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
