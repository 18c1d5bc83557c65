"""Prediction-driven prefetch in the live engine.

``Prefetcher`` is a routing callback (``Transformer.on_route``): after each MoE layer's router has
run and its demand reads are queued, it shows the routing to the ``PrefetchController``
(``predict/``: Markov S, locality L, neural speculator M with online scoring) and hands the
controller's plan to ``StreamingProvider.prefetch``, which reads into staging slots outside the
cache budget at prefetch priority and never evicts. See docs/prefetch.md.
"""

from __future__ import annotations

import time

from .errors import ConfigError
from .model import Routing
from .predict import (
    PrefetchController,
    ScoringRule,
    make_predictor,
    parse_predictors,
    window_budget,
)

# until the reader has measured the disk: a conservative NVMe figure (docs/io.md)
DEFAULT_BANDWIDTH_BPS = 1.0e9
PERIOD_EMA = 0.2  # weight of the newest layer period in its running mean
# A read is issued only if its calibrated chance of use is this high. The simulator's default
# (0.05) counts exposed misses with a free disk; in the engine a wrong read takes disk time that
# demand reads need. Widened demo store, ABAB (bench/prefetch_e2e.py): on/off 0.89 at 0.05,
# 1.10 at 0.3, 1.07 at 0.5.
ENGINE_MIN_USE = 0.3
PAY_WINDOW = 64  # MoE layers over which the prefetcher weighs what it saved against its cost
MAX_BACKOFF = 8  # a prefetcher that does not pay pauses PAY_WINDOW x (1, 2, 4, 8) layers


class Prefetcher:
    def __init__(self, model, spec: str) -> None:
        a = model.args
        self.provider = model.provider
        if not hasattr(self.provider, "prefetch"):
            raise ConfigError("prefetching needs an expert store (experts on disk); a checkpoint "
                              "folder is fully resident")  # fmt: skip
        self.layers = [i for i in range(a.n_layers) if a.moe_layers[i]]
        gates = {i: model.w[f"model.layers.{i}.{a.spec.moe_prefix}.gate.weight"]
                 for i in self.layers}  # fmt: skip
        preds = [make_predictor(name, self.layers, a.n_experts, a.top_k,
                                gates=gates if name == "m" else None, **params)
                 for name, params in parse_predictors(spec)]  # fmt: skip
        self.controller = PrefetchController(preds, self.layers, a.n_experts, a.top_k,
                                             rule=ScoringRule(min_use=ENGINE_MIN_USE))  # fmt: skip
        self.step = -1
        self.period_s: float | None = None  # running mean of the time between MoE layers
        self._last_t: float | None = None
        # does it pay? per window: the controller's own time against the demand reads it saved
        self.paused = 0  # layers left to sit out
        self.backoff = 1
        self.pauses = 0  # how often it stood down (reported in tests and benches)
        self._calls = 0
        self._cost_s = 0.0
        self._hits0 = self.provider.stats.prefetch_hits

    def budget_bytes(self, demand_bytes: int) -> int:
        """What the disk can read for the next layer before its router runs: the measured
        busy bandwidth times one layer period, less this layer's demand reads (queued first)."""
        now = time.perf_counter()
        if self._last_t is not None:
            dt = now - self._last_t
            self.period_s = dt if self.period_s is None else (
                (1 - PERIOD_EMA) * self.period_s + PERIOD_EMA * dt)  # fmt: skip
        self._last_t = now
        if self.period_s is None:
            return 0
        bw = self.provider.reader.stats.busy_bps or DEFAULT_BANDWIDTH_BPS
        return max(0, window_budget(bw, self.period_s) - demand_bytes)

    def _judge(self) -> None:
        """End of a window: stand down if the reads it saved took less time than it cost.

        A prefetch hit saves at most one demand read of ``expert_bytes`` at the measured
        bandwidth; when experts are small and decode is compute-bound that is less than the
        predictors' Python time, and prefetching only slows decode down."""
        p = self.provider
        bw = p.reader.stats.busy_bps or DEFAULT_BANDWIDTH_BPS
        saved = (p.stats.prefetch_hits - self._hits0) * p.store.expert_bytes / bw
        if saved < self._cost_s:
            self.paused = PAY_WINDOW * self.backoff
            self.backoff = min(2 * self.backoff, MAX_BACKOFF)
            self.pauses += 1
            self.controller.drop_pending()
        else:
            self.backoff = 1
        self._calls, self._cost_s, self._hits0 = 0, 0.0, p.stats.prefetch_hits

    def __call__(self, r: Routing) -> None:
        p = self.provider
        if r.layer == self.layers[0]:
            self.step += 1
        if self.paused:
            self.paused -= 1
            self._last_t = None  # the period is measured again on resuming
            if not self.paused:
                self._hits0 = p.stats.prefetch_hits  # hits while paused are not its own
            return
        t0 = time.perf_counter()
        self._prefetch(r)
        self._cost_s += time.perf_counter() - t0
        self._calls += 1
        if self._calls == PAY_WINDOW:
            self._judge()

    def _prefetch(self, r: Routing) -> None:
        p = self.provider
        experts = sorted(set(r.experts.flatten().tolist()))
        keys = [(r.layer, e) for e in experts]
        misses = sum(k not in p.cache and k not in p.staged for k in keys)
        budget = self.budget_bytes(misses * p.store.expert_bytes)
        self.controller.observe(self.step, r.layer, experts, r.hidden, resident=p.cache)
        plan = self.controller.plan(
            self.step, r.layer, resident=p.cache, in_flight=set(p.staged) | set(keys),
            budget_bytes=budget, expert_bytes=p.store.expert_bytes,
            free_slots=max(p.prefetch_slots - len(p.staged), 0),
        )  # fmt: skip
        if plan.keys:
            p.prefetch(list(plan.keys))
