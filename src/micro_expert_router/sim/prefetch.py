"""Replay a routing trace through a cache policy with the prefetch controller.

This module owns the prefetch replay convention; residency and counting are ``sim/replay.py``'s (the
same request sequence, ``replay_steps``, the same ``ExpertCache`` and policies, the same warmup
and budget conventions), prediction and ranking are ``predict/``'s. Per MoE layer run:

1. the controller observes the routing (``resident`` = the cache before the lookups);
2. every distinct expert is looked up (sim/replay.py's order); a miss whose expert sits in a staging
   slot is *covered* (a prefetch hit), the other misses are *exposed* (the compute waits); this
   layer's staging slots are freed (used ones are adopted by the demand miss, the others were
   wasted reads), so staging holds at most ``lookahead`` windows of reads;
3. the controller plans the target ``lookahead`` positions ahead, as the engine does once the
   router has run (before this layer's admissions; its experts count as in flight): at most
   ``window_bytes`` (what the disk reads while one layer computes; None: no limit) and the free
   staging slots; its reads land in staging slots;
4. misses are admitted as in sim/replay.py, covered ones included (a used prefetch enters the cache
   under the policy, like any read).

The cache sees exactly the calls it sees without prefetch, so the resident set and the hit and
miss counts equal sim/replay.py's: prefetch never evicts, and exposed misses <= misses. Prefetch
reads are counted when their target runs (issued = used + wasted), inside the counted steps;
reads for targets past the end of the trace are not counted. Staging slots are memory outside the
cache budget: ``staging_slots x expert_bytes``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..cache import ExpertCache, make_policy, parse_policy_spec
from ..errors import ConfigError, StoreError
from ..predict import (
    PredictorScore,
    PrefetchController,
    ScoringRule,
    make_predictor,
    parse_predictors,
)
from ..trace import Trace
from .replay import Replay, replay_steps


@dataclass(frozen=True)
class PrefetchResult:
    """What one prefetch replay measured (counted steps only)."""

    policy: str
    predictors: tuple[str, ...]
    capacity_experts: int
    expert_bytes: int | None  # None: sizes unknown, bytes count experts
    window_bytes: int | None  # prefetch budget per layer window; None: unlimited
    staging_slots: int
    lookahead: int
    tokens: int
    steps: int
    warmup: int
    requests: int
    hits: int
    misses: int  # demand misses, the same as without prefetch
    covered: int  # misses whose expert a prefetch had staged
    issued: int  # prefetch reads whose target ran
    max_staged: int  # most staging slots ever in use
    scores: Mapping[int, Mapping[str, PredictorScore]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def exposed(self) -> int:
        return self.misses - self.covered

    @property
    def wasted(self) -> int:
        return self.issued - self.covered

    def _per_token(self, n: int) -> float:
        return n / self.tokens if self.tokens else 0.0

    @property
    def misses_per_token(self) -> float:
        return self._per_token(self.misses)

    @property
    def exposed_misses_per_token(self) -> float:
        return self._per_token(self.exposed)

    @property
    def prefetch_bytes_per_token(self) -> float:
        """Bytes prefetch read per token, used and wasted (experts if sizes are unknown)."""
        return self._per_token(self.issued) * (self.expert_bytes or 1)

    @property
    def wasted_bytes_per_token(self) -> float:
        return self._per_token(self.wasted) * (self.expert_bytes or 1)

    @property
    def staging_bytes(self) -> int:
        return self.staging_slots * (self.expert_bytes or 1)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["scores"] = {str(l): {n: s.as_dict() for n, s in per.items()}
                       for l, per in self.scores.items()}  # fmt: skip
        for k in DERIVED:
            d[k] = getattr(self, k)
        return d


DERIVED = (
    "exposed", "wasted", "misses_per_token", "exposed_misses_per_token",
    "prefetch_bytes_per_token", "wasted_bytes_per_token", "staging_bytes",
)  # fmt: skip
COUNTS = ("targets", "issuing", "candidates", "hits", "misses", "covered")


def gates_from_store(path: str | Path) -> dict[int, np.ndarray]:
    """The router gate weights ``{layer: [E, D] float32}`` of a store's MoE layers."""
    import torch

    from ..store import Store

    store = Store.open(path)
    a = store.args
    dense = store.load_dense(torch.float32)
    out = {}
    for i, moe in enumerate(a.moe_layers):
        if moe:
            name = f"model.layers.{i}.{a.spec.moe_prefix}.gate.weight"
            if name not in dense:
                raise StoreError(f"{store.dense_file}: router gate {name} is missing; reconvert")
            out[i] = dense[name].numpy()
    return out


def _check_trace_for(names: Sequence[str], trace: Trace, gates: Mapping[int, Any] | None) -> None:
    if "m" not in names:
        return
    where = trace.path or "the trace"
    if trace.hidden_file is None:
        raise ConfigError(f"predictor m needs hidden states, and {where} has none: record the "
                          "trace with --trace-hidden, or drop m")  # fmt: skip
    if gates is None:
        raise ConfigError("predictor m needs the router gates: pass the store the trace was "
                          "recorded from (gates_from_store)")  # fmt: skip


class PrefetchReplay:
    """A trace prepared for prefetch replays (its request sequence, its baseline replays)."""

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.steps = replay_steps(trace)
        self.baseline = Replay(trace)  # the same policies without prefetch, OPT included

    def run(
        self,
        policy: str,
        budget_bytes: int | Mapping[int, int],
        *,
        predictors: str | Sequence[str] = "s,l",
        expert_bytes: int | None = None,
        warmup: int = 0,
        window_bytes: int | None = None,
        staging_slots: int | None = None,
        lookahead: int = 1,
        per_predictor: int | None = None,
        rule: ScoringRule | None = None,
        gates: Mapping[int, Any] | None = None,
        on_step: Callable[[int, ExpertCache, frozenset], None] | None = None,
    ) -> PrefetchResult:
        """Replay with prefetch. ``predictors`` is a spec (``"s,l:window=64"``) or a list of
        names; ``staging_slots`` defaults to ``2 x top_k x lookahead``; with ``expert_bytes``
        None each expert weighs 1 and the budgets count experts. ``on_step(i, cache, staged)``
        is called after each step (for tests)."""
        trace, size = self.trace, expert_bytes or 1
        spec = predictors if isinstance(predictors, str) else ",".join(predictors)
        parsed = parse_predictors(spec)
        names = tuple(n for n, _ in parsed)
        _check_trace_for(names, trace, gates)
        if staging_slots is None:
            staging_slots = 2 * trace.top_k * lookahead
        if not isinstance(staging_slots, int) or staging_slots < 0:
            raise ConfigError(f"staging slots must be an int >= 0, not {staging_slots!r}")
        shape = (trace.layers, trace.num_experts, trace.top_k)
        preds = [
            make_predictor(n, *shape, lookahead=lookahead, gates=gates, **p) for n, p in parsed
        ]
        ctl = PrefetchController(preds, *shape,
                                 lookahead=lookahead, per_predictor=per_predictor, rule=rule,
                                 audit=True)  # fmt: skip
        # the cache, its policy, the warmup rule and the budget checks are sim/replay.py's
        probe = self.baseline.run(policy, budget_bytes, expert_bytes=expert_bytes, warmup=warmup)
        name, params = parse_policy_spec(policy)
        if name == "opt":
            params.setdefault("future", self.baseline.future)
        cache = ExpertCache(budget_bytes, lambda: make_policy(name, **params))
        start = next(i for i, s in enumerate(self.steps) if s.first_token >= warmup)
        hidden = trace.hidden_states() if "m" in names else None
        layers = trace.layers
        staged: dict[int, set[int]] = {}  # target layer -> staged experts
        n_staged = max_staged = covered = issued = 0
        lookup, admit, plan, observe = cache.lookup, cache.admit, ctl.plan, ctl.observe
        t0 = time.perf_counter()
        for i, step in enumerate(self.steps):
            counting = i >= start
            if i == start:
                cache.reset_stats()
                ctl.reset_scores()
            cache.begin_token()
            for j, keys in enumerate(step.groups):
                layer = layers[j]
                h = None
                if hidden is not None:
                    h = hidden[step.first_token : step.first_token + step.tokens, j]  # [T, D]
                observe(i, layer, [k[1] for k in keys], h, resident=cache)
                missed = [k for k in keys if lookup(k) is None]
                mine = staged.pop(layer, set())
                n_staged -= len(mine)
                if counting:
                    covered += sum(k[1] in mine for k in missed)
                    issued += len(mine)
                # plan now, as the engine does when the router has run: this layer's experts
                # count as in flight (they are about to be resident)
                in_flight = {(l, e) for l, s in staged.items() for e in s}
                in_flight.update(keys)
                pf = plan(i, layer, resident=cache, in_flight=in_flight, budget_bytes=window_bytes,
                          expert_bytes=size, free_slots=staging_slots - n_staged)  # fmt: skip
                if pf.keys:
                    staged.setdefault(pf.target[1], set()).update(k[1] for k in pf.keys)
                    n_staged += len(pf.keys)
                    max_staged = max(max_staged, n_staged)
                if missed:
                    protected = frozenset(keys)
                    for k in missed:
                        admit(k, True, size, protected)
            if on_step is not None:
                on_step(i, cache, frozenset((l, e) for l, s in staged.items() for e in s))
        seconds = time.perf_counter() - t0
        st = cache.stats()
        if (st.hits, st.misses) != (probe.hits, probe.misses):
            raise RuntimeError("the prefetch replay's cache diverged from sim/replay.py's: a bug")
        return PrefetchResult(
            policy=policy, predictors=names, capacity_experts=probe.capacity_experts or 0,
            expert_bytes=expert_bytes, window_bytes=window_bytes, staging_slots=staging_slots,
            lookahead=lookahead, tokens=probe.tokens, steps=probe.steps, warmup=warmup,
            requests=st.requests, hits=st.hits, misses=st.misses, covered=covered,
            issued=issued, max_staged=max_staged, scores=ctl.scores(), seconds=seconds,
        )  # fmt: skip

    def compare(self, policy: str, budget_bytes: int | Mapping[int, int], **kw: Any) -> dict:
        """One prefetch replay next to the same policy without prefetch and OPT without
        prefetch: a JSON-ready dict (``exposed_misses_per_token``, ``prefetch_bytes_per_token``,
        ``misses_per_token`` (no prefetch), ``opt_misses_per_token``, ``per_layer``...)."""
        r = self.run(policy, budget_bytes, **kw)
        eb, warmup = kw.get("expert_bytes"), kw.get("warmup", 0)
        opt = self.baseline.run("opt", budget_bytes, expert_bytes=eb, warmup=warmup)
        return summary(r, opt.misses_per_token)


def summary(r: PrefetchResult, opt_misses_per_token: float | None = None) -> dict[str, Any]:
    """The fields ``mer sim --predictors --json`` reports, from one result."""
    union = _sum_scores(r, "issued")
    return {
        "policy": r.policy,
        "predictors": list(r.predictors),
        "capacity_experts": r.capacity_experts,
        "window_bytes": r.window_bytes,
        "staging_slots": r.staging_slots,
        "staging_bytes": r.staging_bytes,
        "lookahead": r.lookahead,
        "tokens": r.tokens,
        "misses_per_token": r.misses_per_token,
        "exposed_misses_per_token": r.exposed_misses_per_token,
        "opt_misses_per_token": opt_misses_per_token,
        "prefetch_bytes_per_token": r.prefetch_bytes_per_token,
        "wasted_prefetch_bytes_per_token": r.wasted_bytes_per_token,
        "prefetch_precision": union.precision,
        "miss_coverage": r.covered / r.misses if r.misses else 0.0,
        "per_predictor": {n: _sum_scores(r, n).as_dict() for n in (*r.predictors, "issued")},
        "per_layer": {
            str(l): {n: s.as_dict() for n, s in per.items()} for l, per in r.scores.items()
        },  # fmt: skip
        "seconds": r.seconds,
    }


def _sum_scores(r: PrefetchResult, name: str) -> PredictorScore:
    """One predictor's counts over all layers."""
    rows = [per[name] for per in r.scores.values() if name in per]
    return PredictorScore(*(sum(getattr(s, f) for s in rows) for f in COUNTS))


def simulate_prefetch(
    trace: Trace, policy: str, budget_bytes: int | Mapping[int, int], **kw: Any
) -> PrefetchResult:
    """One prefetch replay; see ``PrefetchReplay.run``."""
    return PrefetchReplay(trace).run(policy, budget_bytes, **kw)
