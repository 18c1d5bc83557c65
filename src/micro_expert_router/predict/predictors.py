"""Routing predictors and the prefetch controller that turns their guesses into reads.

This module owns guessing which experts the coming MoE layers will route to, and ranking those
guesses into a budget-cut list of prefetch requests, with online scoring that stops a predictor
where it does not pay. It leaves residency to the cache and its policy (``cache.py``), the reads
and the staging slots to the caller (the streaming provider, or ``sim/prefetch.py``), and the
clock to the caller too: it is told which step and layer ran. Pure: no I/O, no threads, no torch.

Positions. Inside a forward step the MoE layers run in model order; flattening gives positions
``p = step * L + j`` (``j`` the layer's index in ``layers``). Predictors and the controller see
positions in increasing order; a position that does not increase starts a new sequence (a new
generation): short-term history is dropped, learned statistics are kept. A *target* is a future
position, ``lookahead`` positions after the one just observed (1: the next MoE layer; after the
last layer, the first layer of the next step).

Predictors (``PREDICTORS``), each ``observe`` what was routed and ``predict`` a target:

- ``s`` ``MarkovLayers``: a sparse 2nd-order Markov chain along the layers: the two conditioning
  observations are the routed sets at positions ``target - lookahead - 1`` and
  ``target - lookahead`` (with lookahead 1, the two previous MoE layers of the same token, or
  across the step boundary the last layers of the previous token). Each pair (a, b), ``a`` from
  the first set and ``b`` from the second, is one context; a context's row counts which experts
  followed it. A prediction pools the rows of all the pairs present: ``score(c) = sum counts[c]
  / sum totals``, the pooled estimate of P(c routed | context).
- ``t`` ``MarkovTokens``: the same chain along the tokens: the same layer in the previous two
  steps.
- ``l`` ``LocalityMonitor``: per layer, the fraction of the last ``window`` steps that used each
  expert.
- ``m`` ``NeuralSpeculator``: the target layer's router gate applied to the router input of the
  layer just observed (``softmax(h @ W_gate[target].T)``), same step only; no learned model ships.

Markov rows live in one table per predictor with at most ``max_states`` rows (least recently
updated rows recycled eighth by eighth) and exponential decay with ``half_life`` steps, applied
lazily by growing the increment, so memory is bounded and old habits fade.

Scores are in [0, 1], meant as "the chance this expert is routed at the target" (S, T, L are
estimates of exactly that; M reports ``min(1, K * p)`` with ``p`` the gate probability, which is
``K/E``, the chance rate, for a flat router).

Related work: predicting experts from intermediate results (ProMoE, arXiv:2410.22134) and the
next layer's gate on the current hidden state (AdapMoE, github.com/PKU-SEC-Lab/AdapMoE).

Legend: L MoE layers, E experts per layer, K top-k, D hidden size, T tokens of a step,
R table rows, C context pairs.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from ..errors import ConfigError
from ..types import ExpertId

ON, OFF, PROBE = "on", "off", "probe"


class Predictor(Protocol):
    """What the controller asks of a predictor."""

    name: str

    def observe(
        self, step: int, layer: int, experts: Sequence[int], hidden: np.ndarray | None = None
    ) -> None:
        """``layer`` of forward ``step`` routed to ``experts`` (distinct ids; for a prefill
        step, the union over its tokens); ``hidden`` is that layer's router input, [D] or
        [T, D], if known."""
        ...

    def predict(self, layer: int, step: int) -> dict[ExpertId, float]:
        """Scores in [0, 1] for experts of ``layer`` at forward ``step`` (a future position);
        experts left out score 0. Empty when the predictor cannot say."""
        ...


# -- shared helpers --------------------------------------------------------------------------
class Layout:
    """The MoE layers in model order and the flattened position of (step, layer)."""

    def __init__(self, layers: Sequence[int], num_experts: int, top_k: int) -> None:
        try:
            self.layers = tuple(int(x) for x in layers)
        except (TypeError, ValueError):
            raise ConfigError(f"MoE layer ids must be ints, not {layers!r}") from None
        if not self.layers or len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"MoE layer ids must be a non-empty list without repeats: {layers}")
        if not _whole(num_experts) or num_experts < 1:
            raise ConfigError(f"experts per layer must be a positive int, not {num_experts!r}")
        if not _whole(top_k) or not 1 <= top_k <= num_experts:
            raise ConfigError(f"top-k must be an int in [1, {num_experts}], not {top_k!r}")
        self.num_experts, self.top_k = int(num_experts), int(top_k)
        self.n = len(self.layers)
        self.index = {l: j for j, l in enumerate(self.layers)}

    def pos(self, step: int, layer: int) -> int:
        j = self.index.get(layer)
        if j is None:
            raise ConfigError(f"layer {layer!r} is not one of the MoE layers {self.layers}")
        return int(step) * self.n + j

    def at(self, pos: int) -> tuple[int, int]:
        """(step, layer) of a position."""
        step, j = divmod(pos, self.n)
        return step, self.layers[j]

    def experts(self, experts: Any) -> np.ndarray:
        """Distinct expert ids, ascending, checked against E."""
        a = np.asarray(experts.cpu() if hasattr(experts, "cpu") else experts)
        if a.size and not np.issubdtype(a.dtype, np.integer):
            raise ConfigError(f"expert ids must be ints, not {a.dtype} ({experts!r})")
        ids = sorted(set(a.ravel().tolist()))
        if ids and (ids[0] < 0 or ids[-1] >= self.num_experts):
            raise ConfigError(f"expert ids {ids} outside [0, {self.num_experts})")
        return np.array(ids, dtype=np.int64)


def _whole(x: Any) -> bool:
    return isinstance(x, int | np.integer) and not isinstance(x, bool)


def _positive(what: str, x: Any, kind: type = int) -> None:
    ok = _whole(x) if kind is int else isinstance(x, int | float) and not isinstance(x, bool)
    if not ok or not x > 0 or not math.isfinite(x):
        raise ConfigError(f"{what} must be a positive {kind.__name__}, not {x!r}")


def _f32(x: Any) -> np.ndarray:
    """A float32 numpy array from an array-like or a torch tensor of any float dtype (bf16
    included), without importing torch."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def _as_dict(layer: int, s: np.ndarray) -> dict[ExpertId, float]:
    nz = np.flatnonzero(s > 0)
    return dict(zip([(layer, e) for e in nz.tolist()], s[nz].tolist(), strict=True))


# -- S and T: sparse 2nd-order Markov chains ---------------------------------------------------
class _CountTable:
    """Rows of decayed counts keyed by ints, at most ``max_rows`` of them.

    ``counts[r, c]`` and ``totals[r]`` are scaled by a shared factor: each step multiplies the
    increment by ``2 ** (1 / half_life)`` instead of decaying every row, and all rows are
    divided back when the increment passes 2**32. Full, the table frees the least recently
    updated eighth of its rows (never a row being updated)."""

    def __init__(self, width: int, max_rows: int, half_life: float) -> None:
        self.counts = np.zeros((max_rows, width), np.float32)  # [R, E]
        self.totals = np.zeros(max_rows, np.float32)  # [R], summed like counts: ratios exact
        self.used = np.zeros(max_rows, np.int64)  # [R] step of the last update
        self.keys = np.full(max_rows, -1, np.int64)  # [R] the key of each row, -1 if free
        self.row: dict[int, int] = {}
        self.free = list(range(max_rows - 1, -1, -1))
        self.rate = 2.0 ** (1.0 / half_life)
        self.inc = 1.0
        self.clock = 0

    @property
    def nbytes(self) -> int:
        arrays = (self.counts, self.totals, self.used, self.keys)
        return sum(a.nbytes for a in arrays)

    def tick(self) -> None:
        self.clock += 1
        self.inc *= self.rate
        if self.inc > 2.0**32:
            self.counts /= np.float32(self.inc)
            self.totals /= np.float32(self.inc)
            self.inc = 1.0

    def rows(self, keys: list[int]) -> list[int]:
        get = self.row.get
        return [r for r in map(get, keys) if r is not None]

    def _evict(self, keep: list[int]) -> None:
        used = self.used.copy()
        used[keep] = np.iinfo(np.int64).max
        n = max(1, len(self.keys) // 8)
        for r in np.argpartition(used, n - 1)[:n].tolist():
            if used[r] == np.iinfo(np.int64).max:
                continue
            del self.row[int(self.keys[r])]
            self.keys[r] = -1
            self.counts[r] = 0
            self.totals[r] = 0
            self.free.append(r)

    def add(self, keys: list[int], cols: np.ndarray) -> None:
        found = list(map(self.row.get, keys))
        rows = [r for r in found if r is not None]
        missing = []
        if len(rows) < len(keys):
            missing = [k for k, r in zip(keys, found, strict=True) if r is None]
        for k in missing:
            if not self.free:
                self._evict(rows)
                if not self.free:  # every row is being updated: skip the rest
                    break
            r = self.free.pop()
            self.row[k] = r
            self.keys[r] = k
            rows.append(r)
        if not rows:
            return
        idx = np.asarray(rows)
        self.counts[idx[:, None], cols[None, :]] += np.float32(self.inc)  # distinct (r, c)
        self.totals[idx] += np.float32(self.inc)
        self.used[idx] = self.clock


class SparseMarkov:
    """A 2nd-order Markov chain over expert ids, contexts at fixed offsets before the target
    (``offsets = (far, near)`` positions). See the module docstring for what ``MarkovLayers``
    and ``MarkovTokens`` condition on. Sets wider than ``max_context`` (prefill unions) are not
    learned from and break the context they fall in."""

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        *,
        offsets: tuple[int, int],
        half_life: float = 512.0,
        max_states: int = 32768,
        max_context: int | None = None,
        name: str = "s",
    ) -> None:
        self.layout = Layout(layers, num_experts, top_k)
        far, near = offsets
        if not (_whole(far) and _whole(near) and far > near >= 1):
            raise ConfigError(f"{name}: context offsets must be ints far > near >= 1: {offsets}")
        _positive(f"{name}: half_life", half_life, float)
        _positive(f"{name}: max_states", max_states)
        self.max_context = 2 * self.layout.top_k if max_context is None else max_context
        _positive(f"{name}: max_context", self.max_context)
        self.name, self.far, self.near = name, int(far), int(near)
        self.half_life, self.max_states = float(half_life), int(max_states)
        self.table = _CountTable(num_experts, int(max_states), float(half_life))
        self.history: dict[int, np.ndarray | None] = {}  # recent positions -> routed set
        self.last = -1
        self.last_step: int | None = None
        e = self.layout.num_experts
        self._stride = (e * e, e)

    @property
    def nbytes(self) -> int:
        """Bytes of the count table (fixed at construction: the memory bound)."""
        return self.table.nbytes

    def _keys(self, j: int, a: np.ndarray, b: np.ndarray) -> list[int]:
        ee, e = self._stride
        return (j * ee + a[:, None] * e + b[None, :]).ravel().tolist()  # [C]

    def observe(
        self, step: int, layer: int, experts: Sequence[int], hidden: np.ndarray | None = None
    ) -> None:
        p = self.layout.pos(step, layer)
        if p <= self.last:
            self.history.clear()  # a new sequence
        if step != self.last_step:
            self.table.tick()
            self.last_step = step
        x = self.layout.experts(experts)
        if len(x) > self.max_context:
            x = None
        a, b = self.history.get(p - self.far), self.history.get(p - self.near)
        if x is not None and a is not None and b is not None and len(x):
            self.table.add(self._keys(self.layout.index[layer], a, b), x)
        self.history[p] = x
        while next(iter(self.history)) <= p - self.far:  # positions were inserted in order
            del self.history[next(iter(self.history))]
        self.last = p

    def predict(self, layer: int, step: int) -> dict[ExpertId, float]:
        p = self.layout.pos(step, layer)
        if p <= self.last or p - self.near > self.last:
            return {}
        a, b = self.history.get(p - self.far), self.history.get(p - self.near)
        if a is None or b is None:
            return {}
        rows = self.table.rows(self._keys(self.layout.index[layer], a, b))
        if not rows:
            return {}
        t = self.table
        s = t.counts[rows].sum(0, dtype=np.float64) / t.totals[rows].sum(dtype=np.float64)  # [E]
        return _as_dict(layer, np.minimum(s, 1.0))


class MarkovLayers(SparseMarkov):
    """S: the two positions just before ``target - lookahead + 1`` condition the target (with
    lookahead 1: the previous two MoE layers of the same token)."""

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        *,
        lookahead: int = 1,
        half_life: float = 512.0,
        max_states: int = 32768,
        max_context: int | None = None,
        name: str = "s",
    ) -> None:
        _positive(f"{name}: lookahead", lookahead)
        super().__init__(layers, num_experts, top_k, offsets=(lookahead + 1, lookahead),
                         half_life=half_life, max_states=max_states, max_context=max_context,
                         name=name)  # fmt: skip


class MarkovTokens(SparseMarkov):
    """T: the same layer in the previous two forward steps conditions the target."""

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        *,
        half_life: float = 512.0,
        max_states: int = 32768,
        max_context: int | None = None,
        name: str = "t",
    ) -> None:
        n = len(layers)
        super().__init__(layers, num_experts, top_k, offsets=(2 * n, n), half_life=half_life,
                         max_states=max_states, max_context=max_context, name=name)  # fmt: skip


# -- L: recent use -----------------------------------------------------------------------------
class LocalityMonitor:
    """L: per layer, score = the fraction of the last ``window`` steps that used the expert."""

    def __init__(
        self, layers: Sequence[int], num_experts: int, top_k: int, *, window: int = 32,
        name: str = "l",
    ) -> None:  # fmt: skip
        self.layout = Layout(layers, num_experts, top_k)
        _positive(f"{name}: window", window)
        self.name, self.window = name, int(window)
        self.counts = np.zeros((self.layout.n, num_experts), np.int32)  # [L, E]
        self.recent: list[deque[np.ndarray]] = [deque() for _ in self.layout.layers]

    def observe(
        self, step: int, layer: int, experts: Sequence[int], hidden: np.ndarray | None = None
    ) -> None:
        j = self.layout.pos(0, layer)
        x = self.layout.experts(experts)
        q = self.recent[j]
        q.append(x)
        self.counts[j, x] += 1
        if len(q) > self.window:
            self.counts[j, q.popleft()] -= 1

    def predict(self, layer: int, step: int) -> dict[ExpertId, float]:
        j = self.layout.pos(0, layer)
        n = len(self.recent[j])
        return _as_dict(layer, self.counts[j] / n) if n else {}


# -- M: the next gate on the current hidden state -------------------------------------------------
def gate_probs(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The router's probabilities ``softmax(h @ w.T)``: h [T, D], w [E, D] -> [T, E]."""
    z = h.astype(np.float32) @ w.T  # [T, E]
    z -= z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    return z / z.sum(axis=1, keepdims=True)


class NeuralSpeculator:
    """M: ``gates[layer]`` ([E, D], the router weight) of the target layer applied to the router
    input of the layer just observed, for targets later in the same step. Scores the ``top_n``
    experts (default 2K) by ``min(1, K * p)``, ``p`` the gate probability (the max over the
    step's tokens in a prefill). Hidden states are needed; without them it says nothing."""

    def __init__(
        self,
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        *,
        gates: Mapping[int, Any] | None = None,
        top_n: int | None = None,
        name: str = "m",
    ) -> None:
        self.layout = Layout(layers, num_experts, top_k)
        if gates is None:
            raise ConfigError(f"{name}: the neural speculator needs the router gate weights "
                              "(load them from the store's dense weights)")  # fmt: skip
        self.top_n = 2 * self.layout.top_k if top_n is None else top_n
        _positive(f"{name}: top_n", self.top_n)
        self.name = name
        self.gates: dict[int, np.ndarray] = {}
        dims = set()
        for l in self.layout.layers[1:]:
            if l not in gates:
                raise ConfigError(f"{name}: no gate weight for MoE layer {l}")
            w = np.ascontiguousarray(_f32(gates[l]))
            if w.ndim != 2 or w.shape[0] != num_experts or not np.isfinite(w).all():
                raise ConfigError(f"{name}: the gate of layer {l} must be a finite "
                                  f"[{num_experts}, D] array, got {w.shape}")  # fmt: skip
            dims.add(w.shape[1])
            self.gates[l] = w
        if len(dims) > 1:
            raise ConfigError(f"{name}: gates disagree on the hidden size: {sorted(dims)}")
        self.hidden_size = dims.pop() if dims else None
        self._h: np.ndarray | None = None
        self._last = (-1, -1)  # (step, layer index)

    def observe(
        self, step: int, layer: int, experts: Sequence[int], hidden: np.ndarray | None = None
    ) -> None:
        self._last = (int(step), self.layout.pos(0, layer))
        if hidden is None:
            self._h = None
            return
        h = _f32(hidden)
        h = h[None] if h.ndim == 1 else h
        if h.ndim != 2 or (self.hidden_size is not None and h.shape[1] != self.hidden_size):
            raise ConfigError(
                f"{self.name}: hidden state of layer {layer} has shape {np.shape(hidden)}, "
                f"the gates expect D={self.hidden_size}"
            )
        self._h = h

    def predict(self, layer: int, step: int) -> dict[ExpertId, float]:
        j = self.layout.pos(0, layer)
        if self._h is None or (step, j) <= self._last or step != self._last[0]:
            return {}
        p = gate_probs(self._h, self.gates[layer]).max(axis=0)  # [E]
        top = np.argsort(-p, kind="stable")[: self.top_n]
        k = self.layout.top_k
        return {(layer, int(e)): min(1.0, k * float(p[e])) for e in top.tolist()}


PREDICTORS: dict[str, Callable[..., Predictor]] = {
    "s": MarkovLayers,
    "t": MarkovTokens,
    "l": LocalityMonitor,
    "m": NeuralSpeculator,
}


def parse_predictors(spec: str) -> list[tuple[str, dict[str, Any]]]:
    """``"s,l:window=64,m"`` -> [(name, params), ...]; an item ``k=v`` after ``name:k=v`` adds a
    parameter to that predictor (``"s:half_life=128,max_states=4096,l"``)."""
    from ..cache import parse_value

    out: list[tuple[str, dict[str, Any]]] = []
    for item in filter(None, (x.strip() for x in spec.split(","))):
        name, colon, rest = item.partition(":")
        if "=" in name and not colon:
            if not out:
                raise ConfigError(f"predictor parameter {item!r} in {spec!r} names no predictor")
            name, rest = "", item
        elif name not in PREDICTORS:
            raise ConfigError(f"unknown predictor {name!r} in {spec!r}; known: "
                              f"{', '.join(PREDICTORS)}")  # fmt: skip
        else:
            out.append((name, {}))
        if rest:
            k, eq, v = rest.partition("=")
            if not eq or not k.strip():
                raise ConfigError(f"bad predictor parameter {rest!r} in {spec!r}; write k=v")
            out[-1][1][k.strip()] = parse_value(v.strip())
    names = [n for n, _ in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"predictor list {spec!r} names one predictor twice")
    return out


def make_predictor(
    name: str,
    layers: Sequence[int],
    num_experts: int,
    top_k: int,
    *,
    lookahead: int = 1,
    gates: Mapping[int, Any] | None = None,
    **params: Any,
) -> Predictor:
    """A predictor from the registry; ``lookahead`` goes to S, ``gates`` to M."""
    if name not in PREDICTORS:
        raise ConfigError(f"unknown predictor {name!r}; known: {', '.join(PREDICTORS)}")
    if name == "s":
        params["lookahead"] = lookahead
    if name == "m":
        params["gates"] = gates
    try:
        return PREDICTORS[name](layers, num_experts, top_k, **params)
    except TypeError as e:
        raise ConfigError(f"predictor {name!r}: {e}") from None
