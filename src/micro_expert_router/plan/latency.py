"""The latency model: predicted time per output token of a split-expert cache configuration.

Setting: batch-size-1 decode on a CPU with one disk. Every MoE layer ``l`` runs its dense part
(attention, router, shared experts: ``dense_s``), then its ``top_k`` experts. A layer's cache
holds the top segments (``theta`` of the neurons, a byte prefix) of ``C_l`` experts; a hit reads
only the bottom segment and computes the resident top while it reads, a miss reads the whole
expert. A predictor, run on layer ``l``'s MoE input, prefetches the experts of layer ``l + 1``
while layer ``l`` computes; a fraction ``accuracy`` of them are the right ones. One disk queue
serves every read of the token, so a layer's reads delay the next layer's prefetch: that is
what couples the layers and what the planner (``planner.py``) searches over.

The model is a fluid timeline over expected values: per layer, expected bytes and read counts
(from the hit rate ``h_l(C_l)`` and the accuracy ``p_l``), then a disk recurrence and a two-stage
(disk, then CPU) pipeline bound for the layer's expert phase. The formulas are written out, in
the same order and names as ``_step`` below, in ``docs/planner.md``. MoEpic (arXiv:2509.08342)
states the mechanism but not its model; this one is ours (see the doc's "known vs ours").

Pure functions over frozen records; ``numpy`` only so that one layer can be evaluated for all
of its (budget, theta) options at once. Legend: O options of one layer (a flat array); every
``_Costs`` field is a scalar or an ``[O]`` array, and scalars broadcast.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields, replace

import numpy as np

from ..errors import ConfigError
from .schema import Plan


@dataclass(frozen=True)
class LayerProfile:
    """What the model needs to know about one MoE layer, measured or replayed.

    ``hit_curve[C]`` is the layer's hit rate with ``C`` cached top segments (C = 0 .. experts;
    from replaying a routing trace under the cache policy); ``accuracy`` is the fraction of the
    layer's routed experts that the previous layer's prediction prefetched (0: no prefetch).
    """

    expert_bytes: int  # S_e, one whole expert
    top_k: int  # experts per token
    dense_s: float  # A_l: attention, router, shared experts of one token
    expert_s: float  # X_l: one whole routed expert for one token
    hit_curve: tuple[float, ...]
    accuracy: float = 0.0  # p_l

    def __post_init__(self) -> None:
        if isinstance(self.hit_curve, list | np.ndarray):
            object.__setattr__(self, "hit_curve", tuple(float(h) for h in self.hit_curve))
        for name in ("expert_bytes", "top_k"):  # numpy integers are fine too
            v = getattr(self, name)
            if isinstance(v, numbers.Integral) and not isinstance(v, bool):
                object.__setattr__(self, name, int(v))
        _check_layer(self)

    @property
    def n_experts(self) -> int:
        return len(self.hit_curve) - 1


@dataclass(frozen=True)
class Profile:
    """The layers (MoE layers in model order) and the one disk they share.

    A cached top segment of ``t`` bytes costs ``align_up(t, entry_align) + entry_extra`` bytes of
    budget (defaults: exactly ``t``), so ``C_l = floor(M_l / entry)``; set these to the engine's
    slot accounting. ``overhead_s`` is per-token time outside the layers (embedding, head).
    """

    layers: tuple[LayerProfile, ...]
    bandwidth_bps: float  # B
    read_latency_s: float = 0.0  # r, per read request
    overhead_s: float = 0.0
    entry_align: int = 1
    entry_extra: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        if not all(isinstance(lp, LayerProfile) for lp in self.layers):
            raise ConfigError("Profile.layers must be LayerProfile records")
        if not self.layers:
            raise ConfigError("a latency profile needs at least one MoE layer")
        if not _pos(self.bandwidth_bps):
            raise ConfigError(f"disk bandwidth must be > 0 bytes/s, not {self.bandwidth_bps!r}")
        for name in ("read_latency_s", "overhead_s"):
            if not _nonneg(getattr(self, name)):
                raise ConfigError(f"{name} must be a number >= 0, not {getattr(self, name)!r}")
        a, x = self.entry_align, self.entry_extra
        if not (isinstance(a, int) and isinstance(x, int)) or a < 1 or x < 0:
            raise ConfigError("entry_align must be >= 1 and entry_extra >= 0 (whole bytes)")

    def with_accuracy(self, accuracy: Sequence[float]) -> Profile:
        """The same profile with each layer's prefetch ``accuracy`` (one per layer, in order)."""
        if len(accuracy) != len(self.layers):
            raise ConfigError(f"{len(accuracy)} accuracies for {len(self.layers)} layers")
        lps = tuple(replace(lp, accuracy=float(p)) for lp, p in zip(self.layers, accuracy,
                                                                    strict=True))  # fmt: skip
        return replace(self, layers=lps)

    def to_json(self) -> str:
        """The profile as JSON text (measurements kept beside a plan, to re-predict later)."""
        doc = asdict(self)
        doc["format"] = "mer-latency-profile"
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "profile") -> Profile:
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e})") from None
        if not isinstance(doc, dict) or doc.pop("format", None) != "mer-latency-profile":
            raise ConfigError(
                f'{where}: not a latency profile (no "format": "mer-latency-profile")'
            )
        names = {f.name for f in fields(LayerProfile)}
        try:
            rows = doc.pop("layers")
            if not isinstance(rows, list) or not all(
                isinstance(r, dict) and set(r) == names for r in rows
            ):
                raise TypeError(f"each layer must have the keys {sorted(names)}")
            layers = tuple(LayerProfile(**{**r, "hit_curve": tuple(r["hit_curve"])}) for r in rows)
            return cls(layers, **doc)
        except (KeyError, TypeError) as e:
            raise ConfigError(f"{where}: malformed latency profile ({e})") from None
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _pos(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v > 0


def _nonneg(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v) and v >= 0


def _check_layer(lp: LayerProfile) -> None:
    if not isinstance(lp.expert_bytes, int) or lp.expert_bytes <= 0:
        raise ConfigError(f"expert_bytes must be a whole number > 0, not {lp.expert_bytes!r}")
    if not isinstance(lp.top_k, int) or lp.top_k < 1:
        raise ConfigError(f"top_k must be a whole number >= 1, not {lp.top_k!r}")
    for name in ("dense_s", "expert_s"):
        if not _nonneg(getattr(lp, name)):
            raise ConfigError(f"{name} must be a time >= 0 s, not {getattr(lp, name)!r}")
    if not _nonneg(lp.accuracy) or lp.accuracy > 1:
        raise ConfigError(f"predictor accuracy must be in [0, 1], not {lp.accuracy!r}")
    c = lp.hit_curve
    if not isinstance(c, tuple) or len(c) < 2 or not all(_nonneg(h) and h <= 1 for h in c):
        raise ConfigError("hit_curve must be a tuple of hit rates in [0, 1] for C = 0 .. experts")
    if c[0] != 0:
        raise ConfigError(f"hit_curve[0] is {c[0]}: with no cached expert the hit rate is 0")
    if lp.top_k > len(c) - 1:
        raise ConfigError(f"top_k {lp.top_k} exceeds the {len(c) - 1} experts of the hit curve")


def curve_from_function(fn: Callable[[int], float], n_experts: int) -> tuple[float, ...]:
    """Tabulate a hit-rate function ``fn(C)`` for C = 0 .. ``n_experts`` (``fn(0)`` must be 0)."""
    return tuple(float(fn(c)) for c in range(n_experts + 1))


def top_bytes(expert_bytes: int, theta_steps: int, grid: int) -> int:
    """Bytes of the top segment ``theta = theta_steps / grid`` of one expert (rounded up)."""
    return -(-expert_bytes * theta_steps // grid)


def entry_bytes(profile: Profile, layer: int, theta_steps: int, grid: int) -> int:
    """Budget bytes one cached top segment of ``layer`` costs (0 when theta is 0)."""
    t = top_bytes(profile.layers[layer].expert_bytes, theta_steps, grid)
    if t == 0:
        return 0
    a = profile.entry_align
    return -(-t // a) * a + profile.entry_extra


def cached_count(
    profile: Profile, layer: int, budget_bytes: int, theta_steps: int, grid: int
) -> int:
    """``C_l = floor(M_l / entry)``, capped at the layer's expert count; 0 when theta is 0."""
    e = entry_bytes(profile, layer, theta_steps, grid)
    n = profile.layers[layer].n_experts
    return 0 if e == 0 else min(budget_bytes // e, n)


@dataclass(frozen=True)
class _Costs:
    """One layer's per-token constants for one option or an ``[O]`` array of options."""

    dense: float  # A
    work: float  # k X: all expert compute of the layer
    p: float  # useful share of the prefetch
    t_pre: np.ndarray  # disk time of the prefetch issued for this layer
    t_dem: np.ndarray  # disk time of its demand reads
    a: np.ndarray  # disk time of one read piece
    b: np.ndarray  # compute of one read piece
    chi: np.ndarray  # k chi: compute that needs read bytes
    # for the breakdown only
    cached: np.ndarray
    hit: np.ndarray
    beta: np.ndarray  # expected bytes read per routed expert

    def take(self, i: int) -> _Costs:
        """Option ``i`` of an ``[O]`` array of options, as scalars."""
        arrays = ("t_pre", "t_dem", "a", "b", "chi", "cached", "hit", "beta")
        kw = {f: getattr(self, f)[i] for f in arrays}
        return _Costs(self.dense, self.work, self.p, **kw)


def layer_costs(
    profile: Profile, layer: int, budget_bytes: np.ndarray, theta_steps: np.ndarray, grid: int
) -> _Costs:
    """The constants of ``layer`` for (budget, theta) options; arrays broadcast together."""
    lp = profile.layers[layer]
    B, r = profile.bandwidth_bps, profile.read_latency_s
    S, k, X, p = lp.expert_bytes, lp.top_k, lp.expert_s, lp.accuracy
    budget, steps = np.broadcast_arrays(np.asarray(budget_bytes), np.asarray(theta_steps))
    entry = np.array([entry_bytes(profile, layer, int(j), grid) for j in range(grid + 1)])
    top = np.array([top_bytes(S, int(j), grid) for j in range(grid + 1)])[steps]
    e = entry[steps]
    cached = np.where(e > 0, np.minimum(budget // np.maximum(e, 1), lp.n_experts), 0)
    h = np.asarray(lp.hit_curve, dtype=np.float64)[cached]
    beta = (1 - h) * S + h * (S - top)  # bytes read per routed expert
    pi = (1 - h) + h * (top < S)  # reads per routed expert (a whole top is no read)
    chi = X * beta / S  # compute per routed expert that waits on read bytes
    has = pi > 0
    safe = np.where(has, pi, 1.0)
    a = np.where(has, r + beta / safe / B, 0.0)
    b = np.where(has, chi / safe, 0.0)
    per_expert = pi * r + beta / B
    t_pre = (k * per_expert) if p > 0 else np.zeros_like(per_expert)
    t_dem = k * (1 - p) * per_expert
    return _Costs(lp.dense_s, k * X, p, t_pre, t_dem, a, b, k * chi, cached, h, beta)


def _step(E0, R0, c: _Costs):
    """One layer of the timeline from (E0: previous layer's end, R0: disk free after it).

    Returns (ps, L, G, R, E, f): prefetch start and end, router done, this layer's reads done,
    layer end, and the fraction of the prefetch done at G. Works on scalars and arrays.
    """
    ps = R0  # the prefetch for this layer queues behind the previous layer's reads
    L = ps + c.t_pre
    G = E0 + c.dense
    f = np.where(c.t_pre > 0, np.clip((G - ps) / np.where(c.t_pre > 0, c.t_pre, 1.0), 0, 1), 1.0)
    R = G + c.p * np.maximum(L - G, 0.0) + c.t_dem  # wrong prefetches not begun by G are dropped
    late = (1 - f) * c.p + (1 - c.p)  # share of the read pieces that land after G
    E = np.maximum(
        G + c.work,  # the CPU never idles
        np.maximum(
            G + np.minimum(c.a, R - G) + c.chi * late,  # it idles until the first piece
            R + c.b,
        ),  # the last piece is computed after it lands
    )
    return ps, L, G, R, E, f


@dataclass(frozen=True)
class LayerTime:
    """One layer of a predicted token: times (s from the token's start), bytes, and breakdown."""

    layer: int
    start_s: float
    router_s: float  # G: dense part done, routing known
    prefetch_start_s: float
    prefetch_done_s: float  # L
    reads_done_s: float  # R
    end_s: float  # E
    compute_s: float  # dense + all expert compute
    stall_s: float  # exposed I/O wait: end - start - compute
    cached: int  # C_l
    hit_rate: float
    prefetch_bytes: float  # issued for this layer during the previous one
    useful_prefetch_bytes: float  # the right ones among them
    wasted_bytes: float  # wrong prefetches read before they were known wrong
    demand_bytes: float

    @property
    def read_bytes(self) -> float:
        return self.useful_prefetch_bytes + self.wasted_bytes + self.demand_bytes


@dataclass(frozen=True)
class Timeline:
    """The predicted token: per-layer breakdown and the time per output token."""

    layers: tuple[LayerTime, ...]
    s_per_token: float

    @property
    def stall_s(self) -> float:
        return sum(t.stall_s for t in self.layers)

    @property
    def compute_s(self) -> float:
        return sum(t.compute_s for t in self.layers)

    @property
    def read_bytes(self) -> float:
        return sum(t.read_bytes for t in self.layers)


def predict(profile: Profile, plan: Plan) -> Timeline:
    """Predicted time per output token of ``plan`` on ``profile``, with the per-layer breakdown."""
    if len(plan.layers) != len(profile.layers):
        raise ConfigError(
            f"the plan has {len(plan.layers)} layers but the profile has {len(profile.layers)}; "
            "plan and profile are for different models"
        )
    E0 = R0 = 0.0
    out = []
    for l, lp in enumerate(plan.layers):
        c = layer_costs(
            profile, l, np.asarray(lp.budget_bytes), np.asarray(lp.theta_steps), plan.theta_grid
        )
        ps, L, G, R, E, f = (float(v) for v in _step(E0, R0, c))
        k, p, beta = profile.layers[l].top_k, c.p, float(c.beta)
        pre = k * beta if p > 0 else 0.0
        out.append(
            LayerTime(
                layer=lp.layer,
                start_s=E0,
                router_s=G,
                prefetch_start_s=ps,
                prefetch_done_s=L,
                reads_done_s=R,
                end_s=E,
                compute_s=float(c.dense + c.work),
                stall_s=max(0.0, E - E0 - c.dense - c.work),
                cached=int(c.cached),
                hit_rate=float(c.hit),
                prefetch_bytes=pre,
                useful_prefetch_bytes=p * pre,
                wasted_bytes=(1 - p) * pre * f,
                demand_bytes=k * (1 - p) * beta,
            )
        )
        E0, R0 = E, R
    return Timeline(tuple(out), E0 + profile.overhead_s)
