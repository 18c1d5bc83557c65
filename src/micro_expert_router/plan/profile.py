"""Glue between the engine and the planner: measure a store's latency profile on this machine,
build each layer's hit-rate curve by replaying a routing trace, and plan.

``plan/`` is pure (no I/O, no torch); this module does the measuring. Measurements:

- disk: the engine's ``DirectReader`` reading distinct expert extents one at a time with
  ``O_DIRECT`` (cold; the page cache is bypassed), the engine's demand pattern: bandwidth =
  bytes / time; per-read latency from 4 KiB reads at random offsets.
- compute: with every expert resident, per MoE layer the time of attention + router for one decode
  token (``dense_s``) and of one routed expert for one token (``expert_s``), medians of repeats;
  the embedding + final norm + LM head as ``overhead_s``.
- hit curves: for C = 0 .. experts, the trace replayed with every layer given a cache of C tops
  under the policy (``sim.simulate`` with per-layer budgets), per-layer hit rates.
- prefetch accuracy (with ``--prefetch``): the trace replayed through the prefetch controller
  with an empty cache, per layer the share of routed experts it had issued
  (``prefetch_accuracy``); 0 without prefetch.
"""

from __future__ import annotations

import random
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from ..io import ALIGN, BufferPool, DirectReader, align_up
from ..store import Store
from ..trace import Trace, read_trace
from . import LayerProfile, Plan, PlanResult, Profile, plan_cache, predict


def measure_disk(store: Store, reads: int = 16, seed: int = 0) -> tuple[float, float]:
    """(bandwidth bytes/s, per-read latency s) reading this store's extents like the engine:
    latency from 4 KiB reads at random offsets, bandwidth from whole extents read one at a time
    with that latency taken out (the latency model adds it back per read)."""
    rng = random.Random(seed)
    entries = rng.sample(sorted(store.experts.values(), key=lambda e: (e.layer, e.expert)),
                         min(reads, len(store.experts)))  # fmt: skip
    pool = BufferPool(1, align_up(store.expert_bytes), name="profile")
    with DirectReader() as reader, pool.lease() as lease:
        lat = []
        for e in entries:
            off = e.offset + ALIGN * rng.randrange(max(e.length // ALIGN, 1))
            t0 = time.perf_counter()
            reader.read(e.file, off, ALIGN, lease)
            lat.append(time.perf_counter() - t0)
        latency = statistics.median(lat)
        total, t0 = 0, time.perf_counter()
        for e in entries:
            reader.read(e.file, e.offset, e.length, lease)
            total += e.length
        elapsed = time.perf_counter() - t0
    transfer = max(elapsed - latency * len(entries), 0.25 * elapsed)
    return total / transfer, latency


def measure_compute(
    store_path: Path, repeats: int = 7, context: int = 32, dtype: str = "float32",
    threads: int | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Per MoE layer: dense (attention + router) and one-expert time for one decode token,
    with ``threads`` compute threads (use the setting the runs will use)."""
    from ..engine import load
    from ..kernels import expert_forward
    from ..kernels.dense import embedding, linear

    with load(store_path, dtype=dtype, threads=threads) as engine:
        m, a = engine.model, engine.args
        kv = m.new_cache()
        m.forward(torch.arange(context) % a.vocab_size, kv)  # a context; caches every expert
        x = torch.randn(1, a.hidden_size, generator=torch.Generator().manual_seed(0)).to(m.dtype)
        dense, expert = {}, {}
        for i in range(a.n_layers):
            if not a.moe_layers[i]:
                continue

            def dense_once(i=i) -> None:
                m.attention(i, x, kv, context - 1)  # rewrites the last position: same shapes
                m.route(i, x)

            dense[i] = _median_time(dense_once, repeats)
            with m.provider.acquire(i, [0]) as (h,):
                segs = list(h.segments())
                expert[i] = _median_time(
                    lambda segs=segs: expert_forward(m.provider.format, x, segs), repeats
                )
        tokens = torch.tensor([1])

        def head_once() -> None:  # plain or quantized dense weights (kernels/dense.py)
            h = embedding(tokens, m.w["model.embed_tokens.weight"], m.dtype)
            linear(h, m.lm_head)

        overhead = _median_time(head_once, repeats)
        # Calibrate: a real decode step with every needed expert resident also pays the MoE
        # block's bookkeeping (grouping tokens, the provider, accumulation). Spread what the
        # step costs beyond the parts timed above over the layers, in proportion to dense time.
        step = _resident_step_s(engine, repeats)
        k = a.top_k
        parts = overhead + sum(dense.values()) + k * sum(expert.values())
        scale = max(step - overhead - k * sum(expert.values()), 0.0) / max(sum(dense.values()),
                                                                           1e-12)  # fmt: skip
        if step > parts:
            dense = {i: v * scale for i, v in dense.items()}
    return {"dense_s": dense, "expert_s": expert, "overhead_s": overhead}


def _resident_step_s(engine, repeats: int) -> float:
    """Median decode-step time with every expert the steps need already resident."""
    times = []
    steps = engine.generate(list(range(1, 65)), 8 + 3 * repeats, temperature=1.0, seed=0,
                            stop_at_eos=False)  # fmt: skip
    for i, s in enumerate(steps):
        if i >= 8 and s.misses == 0:
            times.append(s.step_s)
    if not times:
        raise ConfigError("could not time a decode step with every expert resident")
    return statistics.median(times)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm up
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def hit_curves(trace: Trace, layers: list[int], n_experts: int, policy: str = "lcp",
               warmup: int = 0) -> dict[int, tuple[float, ...]]:  # fmt: skip
    """Per layer, the hit rate with C = 0 .. n_experts cached tops (per-layer caches)."""
    from ..sim import Replay

    if list(trace.layers) != layers:
        raise ConfigError(f"the trace's MoE layers {list(trace.layers)} are not the store's "
                          f"{layers}: record the trace with this model")  # fmt: skip
    if trace.num_experts != n_experts:
        raise ConfigError(f"the trace has {trace.num_experts} experts per layer, the store "
                          f"{n_experts}")  # fmt: skip
    replay = Replay(trace)  # the trace is prepared once for every capacity
    curves: dict[int, list[float]] = {layer: [0.0] for layer in layers}
    for c in range(1, n_experts + 1):
        r = replay.run(policy, {layer: c for layer in layers}, expert_bytes=1, warmup=warmup)
        for layer in layers:
            curves[layer].append(float(r.per_layer_hit_rate.get(layer, 0.0)))
    return {layer: tuple(v) for layer, v in curves.items()}


def prefetch_accuracy(trace: Trace, predictors: str, store_path: str | Path | None = None,
                      warmup: int = 0) -> dict[int, float]:  # fmt: skip
    """Per MoE layer, the latency model's ``accuracy``: the share of the layer's routed experts
    that the prefetch controller (``predictors``, e.g. ``"s,l,m"``) had issued for it, replaying
    ``trace`` with an empty cache (every routed expert a miss, so the share does not depend on
    the cache) and at most ``top_k`` reads per layer, as the model assumes. ``m`` needs the
    store's gates and a trace recorded with hidden states."""
    from ..predict import parse_predictors
    from ..sim.prefetch import PrefetchReplay, gates_from_store

    names = {n for n, _ in parse_predictors(predictors)}
    gates = gates_from_store(store_path) if "m" in names and store_path is not None else None
    r = PrefetchReplay(trace).run("lru", 0, predictors=predictors, warmup=warmup,
                                  staging_slots=trace.top_k, gates=gates)  # fmt: skip
    out = {}
    for layer in trace.layers:
        s = r.scores.get(layer, {}).get("issued")
        out[layer] = s.covered / s.misses if s is not None and s.misses else 0.0
    return out


def build_profile(store_path: str | Path, trace_path: str | Path, policy: str = "lcp",
                  warmup: int = 0, accuracy: dict[int, float] | None = None,
                  dtype: str = "float32", threads: int | None = None,
                  prefetch: str = "off") -> Profile:  # fmt: skip
    """Measure and replay a store's profile. ``accuracy`` per layer is given, or replayed from
    the trace for the ``prefetch`` predictors (``prefetch_accuracy``), or 0 (no prefetch)."""
    store = Store.open(store_path)
    a = store.args
    layers = [i for i in range(a.n_layers) if a.moe_layers[i]]
    trace = read_trace(trace_path, num_experts=a.n_experts)
    curves = hit_curves(trace, layers, a.n_experts, policy, warmup)
    if accuracy is None and prefetch.strip().lower() != "off":
        accuracy = prefetch_accuracy(trace, prefetch, store_path, warmup)
    bandwidth, latency = measure_disk(store)
    comp = measure_compute(Path(store_path), dtype=dtype, threads=threads)
    accuracy = accuracy or {}
    lps = tuple(LayerProfile(expert_bytes=store.expert_bytes, top_k=a.top_k,
                             dense_s=comp["dense_s"][i], expert_s=comp["expert_s"][i],
                             hit_curve=curves[i], accuracy=accuracy.get(i, 0.0))
                for i in layers)  # fmt: skip
    return Profile(lps, bandwidth_bps=bandwidth, read_latency_s=latency,
                   overhead_s=comp["overhead_s"], entry_align=ALIGN)  # fmt: skip


def make_plan(profile: Profile, store: Store, budget_bytes: int,
              theta_grid: int | None = None) -> tuple[PlanResult, Plan]:  # fmt: skip
    """The planner's plan and, for comparison, whole-expert caching with an even split."""
    a = store.args
    layers = [i for i in range(a.n_layers) if a.moe_layers[i]]
    n_groups = a.expert_inter // store.group
    grid = theta_grid or n_groups
    if n_groups % grid:
        raise ConfigError(f"--theta-grid {grid} must divide the store's {n_groups} neuron groups")
    result = plan_cache(profile, budget_bytes, layers=layers, theta_grid=grid)
    baseline = Plan.uniform(layers, budget_bytes, grid, grid)
    baseline = Plan(baseline.total_bytes, grid, baseline.layers,
                    predicted_s_per_token=predict(profile, baseline).s_per_token)  # fmt: skip
    return result, baseline
