"""The adaptive planner: each MoE layer's cache budget and split ratio under one total budget.

MoEpic (arXiv:2509.08342) chooses per-layer budgets and split ratios "by a divide-and-conquer
algorithm based on fixed-point iteration"; its details are not public. This module implements
one reading of that sentence (``docs/planner.md`` gives the argument):

- **Grids.** A layer's option is (budget ``i * q``, theta ``j / theta_grid``) with ``q = total //
  quanta``, ``i = 0 .. quanta`` and ``j = 0 .. theta_grid``; a plan uses at most ``quanta``
  quanta in all. Finite grids make every loop below terminate.
- **Windows (fixed point).** The current configuration fixes, through the timeline
  (``latency.py``), every layer's windows: when its prefetch may start, when its router is done,
  when the disk is free for the next layer. Each layer's options are priced against them:
  ``delta_l(o)`` is the predicted time per token with layer ``l`` alone switched to option
  ``o``, all other layers as they are, minus the current time (exact for one layer at a time).
- **Divide and conquer (budget split).** ``F_l(i) = min_j delta_l(i, j)``; the layer range is
  halved recursively and each range's best cost for every budget ``b`` is the min-plus merge of
  its halves, ``F(b) = min_s F_left(s) + F_right(b - s)``; the root's best budget (at most
  ``quanta``) is split back down. This is the optimal budget split for the windows held fixed.
- **Iterate.** The new configuration changes the windows; recompute and repeat until no layer's
  choice changes (converged) or ``max_iter`` rounds. A proposal that does not lower the
  predicted time (the layers interacted more than the fixed windows assumed) is not taken, and
  neither is an empty one before one more check: the best joint change of any two layers (each
  budget within ``pair_reach`` quanta of its current one, any thetas), exact, because the
  layers' coupling is what fixed windows miss. When that does not improve either, the
  configuration is a fixed point (converged). Predicted time strictly falls every round, so
  the loop ends even without the cap.

``brute_force`` is the slow reference: every feasible combination on the same grids.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ..errors import ConfigError
from .latency import Profile, Timeline, _Costs, _step, layer_costs, predict
from .schema import LayerPlan, Plan

_REL = 1e-9  # improvements smaller than this fraction of the time per token are noise


@dataclass(frozen=True)
class PlanResult:
    """A plan with its predicted timeline and how the search ended."""

    plan: Plan
    timeline: Timeline
    converged: bool  # a fixed point was reached (False: stopped at max_iter)
    iterations: int  # rounds of the fixed-point iteration
    history: tuple[float, ...]  # predicted s/token after each round (starting point first)

    @property
    def s_per_token(self) -> float:
        return self.timeline.s_per_token


def _grid(profile: Profile, total_bytes: int, quanta: int, theta_grid: int):
    if not isinstance(total_bytes, int) or total_bytes < 0:
        raise ConfigError(
            f"the total cache budget must be a whole number of bytes >= 0, not {total_bytes!r}"
        )
    if not all(isinstance(v, int) and v >= 1 for v in (quanta, theta_grid)):
        raise ConfigError("budget quanta and theta grid must be whole numbers >= 1")
    q = total_bytes // quanta
    Q = quanta if q > 0 else 0
    i = np.arange(Q + 1)[:, None]
    j = np.arange(theta_grid + 1)[None, :]
    costs = []
    for l in range(len(profile.layers)):
        c = layer_costs(profile, l, i * q, j, theta_grid)
        costs.append(_flat(c))
    return q, Q, costs


def _flat(c: _Costs) -> _Costs:
    f = {
        n: np.ravel(getattr(c, n))
        for n in ("t_pre", "t_dem", "a", "b", "chi", "cached", "hit", "beta")
    }
    return _Costs(c.dense, c.work, c.p, **f)


def _make_plan(profile, layers, total_bytes, grid, q, cfg, G1) -> tuple[Plan, Timeline]:
    pairs = zip(layers, cfg, strict=True)
    lps = tuple(LayerPlan(l, int(o // G1) * q, int(o % G1)) for l, o in pairs)
    tl = predict(profile, Plan(total_bytes, grid, lps))
    return Plan(total_bytes, grid, lps, float(tl.s_per_token)), tl


def _time(profile: Profile, costs: Sequence[_Costs], cfg: Sequence[int]) -> float:
    E = R = 0.0
    for c, o in zip(costs, cfg, strict=True):
        *_, R, E, _f = _step(E, R, c.take(o))
    return float(E) + profile.overhead_s


def _marginals(profile, costs, cfg):
    """``delta[l][o]``: time per token with layer ``l`` alone on option ``o``, minus now."""
    n = len(costs)
    fixed = [c.take(o) for c, o in zip(costs, cfg, strict=True)]
    prefix = [(0.0, 0.0)]
    for c in fixed:
        *_, R, E, _f = _step(prefix[-1][0], prefix[-1][1], c)
        prefix.append((float(E), float(R)))
    now = prefix[-1][0] + profile.overhead_s
    out = []
    for l in range(n):
        E, R = prefix[l]
        *_, R, E, _f = _step(E, R, costs[l])
        for m in range(l + 1, n):
            *_, R, E, _f = _step(E, R, fixed[m])
        out.append(E + profile.overhead_s - now)
    return out, now


def _allocate(F: np.ndarray) -> list[int]:
    """Budget quanta per layer minimising ``sum_l F[l, i_l]`` s.t. ``sum_l i_l <= Q``.

    Divide and conquer over the layer range: a range's table is the min-plus merge of its two
    halves' tables; the root's best total is then split back down the same tree.
    """
    n, Q1 = F.shape
    splits: dict[tuple[int, int], np.ndarray] = {}

    def table(lo: int, hi: int) -> np.ndarray:
        if hi - lo == 1:
            return F[lo]
        mid = (lo + hi) // 2
        left, right = table(lo, mid), table(mid, hi)
        best = np.empty(Q1)
        arg = np.empty(Q1, dtype=np.int64)
        for b in range(Q1):
            v = left[: b + 1] + right[b::-1]  # s = 0..b gets left[s] + right[b - s]
            arg[b] = int(np.argmin(v))
            best[b] = v[arg[b]]
        splits[(lo, hi)] = arg
        return best

    root = table(0, n)
    alloc = [0] * n

    def assign(lo: int, hi: int, b: int) -> None:
        if hi - lo == 1:
            alloc[lo] = b
            return
        mid = (lo + hi) // 2
        s = int(splits[(lo, hi)][b])
        assign(lo, mid, s)
        assign(mid, hi, b - s)

    assign(0, n, int(np.argmin(root)))
    return alloc


def _propose(deltas, cfg, Q, G1, tol) -> list[int]:
    """The divide-and-conquer step: best joint choice for the current windows held fixed."""
    F, J = [], []
    for d, o in zip(deltas, cfg, strict=True):
        d = d.copy()
        d[np.arange(d.size) != o] += tol  # a switch must gain more than noise
        d = d.reshape(Q + 1, G1)
        J.append(np.argmin(d, axis=1))
        F.append(d[np.arange(Q + 1), J[-1]])
    alloc = _allocate(np.array(F))
    return [i * G1 + int(J[l][i]) for l, i in enumerate(alloc)]


def _pair_moves(profile, costs, cfg, Q, G1, reach, now, tol):
    """The best joint change of two layers (each budget within ``reach`` quanta, any theta)."""
    n = len(cfg)
    fixed = [c.take(o) for c, o in zip(costs, cfg, strict=True)]
    prefix = [(0.0, 0.0)]
    for c in fixed:
        *_, R, E, _f = _step(prefix[-1][0], prefix[-1][1], c)
        prefix.append((float(E), float(R)))
    used = sum(o // G1 for o in cfg)
    best, best_t = None, now - tol
    j = np.arange(G1)
    for a in range(n):
        ia = cfg[a] // G1
        for b in range(a + 1, n):
            ib = cfg[b] // G1
            free = Q - used + ia + ib  # quanta the two layers may share
            da = np.arange(max(0, ia - reach), min(Q, ia + reach) + 1)
            db = np.arange(max(0, ib - reach), min(Q, ib + reach) + 1)
            ii, kk = np.meshgrid(da, db, indexing="ij")
            ok = (ii + kk) <= free
            ii, kk = ii[ok], kk[ok]
            shape = (ii.size, G1, G1)  # [pairs of budgets, theta of a, theta of b]
            oa = np.broadcast_to((ii[:, None] * G1 + j)[:, :, None], shape).ravel()
            ob = np.broadcast_to((kk[:, None] * G1 + j)[:, None, :], shape).ravel()
            E, R = prefix[a]
            *_, R, E, _f = _step(E, R, costs[a].take(oa))
            for m in range(a + 1, n):
                c = costs[b].take(ob) if m == b else fixed[m]
                *_, R, E, _f = _step(E, R, c)
            t = E + profile.overhead_s
            k = int(np.argmin(t))
            if t[k] < best_t:
                best, best_t = list(cfg), float(t[k])
                best[a], best[b] = int(oa[k]), int(ob[k])
    return best, best_t


def plan_cache(
    profile: Profile,
    total_bytes: int,
    *,
    layers: Sequence[int] | None = None,
    theta_grid: int = 8,
    quanta: int = 256,
    max_iter: int = 32,
    pair_reach: int = 2,
    start: Plan | None = None,
) -> PlanResult:
    """Per-layer budgets and split ratios minimising predicted time per token (module doc).

    ``layers`` are the model layer ids of ``profile.layers`` (default 0 .. n-1). ``start`` is
    the first configuration (default: the total split evenly, whole experts, theta = 1); it must
    lie on the grids.
    """
    n = len(profile.layers)
    layers = tuple(range(n)) if layers is None else tuple(layers)
    if len(layers) != n:
        raise ConfigError(f"{len(layers)} layer ids for a profile of {n} layers")
    q, Q, costs = _grid(profile, total_bytes, quanta, theta_grid)
    G1 = theta_grid + 1
    cfg = [(Q // n) * G1 + theta_grid] * n if start is None else _on_grid(start, q, Q, G1)
    now = _time(profile, costs, cfg)
    history = [now]
    converged = False
    it = 0
    while it < max_iter:
        it += 1
        deltas, now = _marginals(profile, costs, cfg)
        tol = _REL * max(now, 1e-30)
        prop = _propose(deltas, cfg, Q, G1, tol)
        t = _time(profile, costs, prop) if prop != cfg else now
        if t >= now - tol:  # nothing gained with the windows held fixed: joint pair changes
            prop, t = _pair_moves(profile, costs, cfg, Q, G1, pair_reach, now, tol)
            if prop is None:
                converged = True
                break
        cfg, now = prop, t
        history.append(now)
    plan, tl = _make_plan(profile, layers, total_bytes, theta_grid, q, cfg, G1)
    return PlanResult(plan, tl, converged, it, tuple(history))


def _on_grid(start: Plan, q: int, Q: int, G1: int) -> list[int]:
    cfg = []
    for lp in start.layers:
        i = lp.budget_bytes // q if q else 0
        if i * q != lp.budget_bytes or lp.theta_steps >= G1 or start.theta_grid != G1 - 1:
            raise ConfigError(f"start plan: layer {lp.layer} is not on the planner's grids")
        cfg.append(i * G1 + lp.theta_steps)
    if sum(o // G1 for o in cfg) > Q:
        raise ConfigError("start plan: budgets exceed the planner's total")
    return cfg


def brute_force(
    profile: Profile,
    total_bytes: int,
    *,
    layers: Sequence[int] | None = None,
    theta_grid: int = 4,
    quanta: int = 8,
    max_configs: int = 3_000_000,
) -> PlanResult:
    """The exact optimum on the grids by exhaustive search (the planner's slow reference)."""
    n = len(profile.layers)
    layers = tuple(range(n)) if layers is None else tuple(layers)
    q, Q, costs = _grid(profile, total_bytes, quanta, theta_grid)
    G1 = theta_grid + 1
    O = (Q + 1) * G1
    quanta_of = np.arange(O) // G1
    E = np.zeros(1)
    R = np.zeros(1)
    used = np.zeros(1, dtype=np.int64)
    picks = np.zeros((1, 0), dtype=np.int64)  # [N, layers so far]
    for l in range(n):
        if E.size * O > max_configs:
            raise ConfigError(
                f"brute force over {E.size * O} partial configurations exceeds max_configs="
                f"{max_configs}; use fewer layers or coarser grids"
            )
        parent = np.repeat(np.arange(E.size), O)
        opt = np.tile(np.arange(O), E.size)
        u = used[parent] + quanta_of[opt]
        keep = u <= Q
        parent, opt, used = parent[keep], opt[keep], u[keep]
        *_, R, E, _f = _step(E[parent], R[parent], costs[l].take(opt))
        picks = np.concatenate([picks[parent], opt[:, None]], axis=1)
    best = int(np.argmin(E))
    plan, tl = _make_plan(profile, layers, total_bytes, theta_grid, q, picks[best].tolist(), G1)
    return PlanResult(plan, tl, True, 0, (float(E[best]) + profile.overhead_s,))
