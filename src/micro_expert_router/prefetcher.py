"""Prediction-driven prefetch in the live engine.

``Prefetcher`` is a routing callback (``Transformer.on_route``): after each MoE layer's router has
run and its demand reads are queued, it shows the routing to the ``PrefetchController``
(``predict.py``: Markov S, locality L, neural speculator M with online scoring) and hands the
controller's plan to ``StreamingProvider.prefetch``, which reads into staging slots outside the
cache budget at prefetch priority and never evicts. See docs/prefetch.md.
"""

from __future__ import annotations

from .errors import ConfigError
from .model import Routing
from .predict import PrefetchController, make_predictor, parse_predictors


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
        self.controller = PrefetchController(preds, self.layers, a.n_experts, a.top_k)
        self.step = -1

    def __call__(self, r: Routing) -> None:
        p = self.provider
        if r.layer == self.layers[0]:
            self.step += 1
        experts = sorted(set(r.experts.flatten().tolist()))
        self.controller.observe(self.step, r.layer, experts, r.hidden, resident=p.cache)
        plan = self.controller.plan(
            self.step, r.layer, resident=p.cache,
            in_flight=set(p.staged) | {(r.layer, e) for e in experts},
            expert_bytes=p.slot_bytes, free_slots=max(p.prefetch_slots - len(p.staged), 0),
        )  # fmt: skip
        if plan.keys:
            p.prefetch(list(plan.keys))
