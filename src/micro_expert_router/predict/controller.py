"""The prefetch controller: ranks the predictors' guesses into a budget-cut list of prefetch
reads, and scores each predictor online so it stops where it does not pay. Pure: no I/O, no
threads, no torch. Positions and predictors: ``predictors.py``.

The controller (``PrefetchController``) asks each issuing predictor for its candidates: its
``per_predictor`` best experts that are neither resident nor in flight. It calibrates each
predictor's scores by its recent record in that layer (``q = min(1, score x (hits + 1) /
(claimed + 1))``, claimed = the sum of the scores of its past candidates), ranks the union by the
highest ``q`` any issuing predictor gives (predictors learn from the same history, so agreement
is not independent evidence), drops reads with ``q < min_use``, and cuts the rest to what the
disk can deliver before the target runs and to the free staging slots. Prefetch never evicts:
the caller reads into staging slots outside the cache and admits an expert into the cache (under
its policy) only when it is used.

Online scoring (``ScoringRule``): per layer and predictor, over its last ``window`` evaluated
targets, the sums of candidates, hits (candidates routed at the target), hits expected of a
random guess (candidates x demand misses / non-resident experts) and the best possible hits
(min(candidates, misses)). Skill = (hits - chance) / (best - chance): 0 for a random guesser, 1
for a perfect one. Once the window holds ``min_candidates`` candidates, a predictor that is
``on`` with skill below ``min_skill`` goes ``off`` in that layer: it is no longer asked there.
After ``probe_every x backoff`` targets of that layer it is ``probe``d: it predicts and is scored
for ``probe_len`` targets without issuing; if it then pays it is ``on`` again (backoff back to
1), otherwise ``off`` with the backoff doubled (up to ``max_backoff``). A probe that gathers too
few candidates to judge ends ``on``: a predictor that proposes nothing costs nothing. Precision
and recall per layer and predictor are reported by ``scores()``.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..types import ExpertId
from .predictors import OFF, ON, PROBE, Layout, Predictor, _positive, _whole


@dataclass(frozen=True)
class ScoringRule:
    """When a predictor stops issuing in a layer and when it is probed again (module doc)."""

    window: int = 32  # evaluated targets kept per layer and predictor
    min_candidates: int = 16  # judge only once the window holds this many candidates
    min_skill: float = 0.1  # (hits - chance) / (perfect - chance): 0 for a random guesser
    min_use: float = 0.05  # a read is issued only if its calibrated chance of use is this
    probe_every: int = 32  # targets of the layer an off predictor waits (x backoff)
    probe_len: int = 16  # targets a probe lasts (predicts and is scored, does not issue)
    max_backoff: int = 8

    def __post_init__(self) -> None:
        for f in ("window", "min_candidates", "probe_every", "probe_len", "max_backoff"):
            _positive(f"scoring rule {f}", getattr(self, f))
        if not (0.0 <= self.min_use <= 1.0 and -1.0 <= self.min_skill <= 1.0):
            raise ConfigError("scoring rule: min_use must be in [0, 1], min_skill in [-1, 1]")


class _Gate:
    """One predictor's standing in one layer: its state, and sums over its recent evaluations
    of candidates ``c``, hits ``h``, hits expected by chance ``x``, the best possible hits
    ``b`` and the score it claimed ``s``."""

    __slots__ = ("state", "evals", "sums", "wait", "backoff", "probed")

    def __init__(self) -> None:
        self.state, self.wait, self.backoff, self.probed = ON, 0, 1, 0
        self.clear()

    def clear(self) -> None:
        self.evals: deque[tuple[float, ...]] = deque()
        self.sums = [0.0] * 5  # c, h, x, b, s

    def add(self, row: tuple[float, ...], window: int) -> None:
        self.evals.append(row)
        sums = self.sums
        for i, v in enumerate(row):
            sums[i] += v
        if len(self.evals) > window:
            for i, v in enumerate(self.evals.popleft()):
                sums[i] -= v

    def pays(self, rule: ScoringRule) -> bool | None:
        """None until the window holds ``min_candidates``; then whether it beats chance."""
        c, h, x, b, _ = self.sums
        if c < rule.min_candidates:
            return None
        room = b - x  # hits a perfect predictor has over chance
        return room < 1e-9 or (h - x) >= rule.min_skill * room - 1e-9

    @property
    def calibration(self) -> float:
        """Hits per unit of claimed score, recently (smoothed: 1 with no record)."""
        _, h, _, _, s = self.sums
        return (h + 1.0) / (s + 1.0)

    def judge(self, rule: ScoringRule) -> None:
        """After an evaluation: the state transitions of the module doc."""
        if self.state == ON:
            if self.pays(rule) is False:
                self.turn_off(rule)
        elif self.state == PROBE:
            self.probed += 1
            if self.probed >= rule.probe_len:
                verdict = self.pays(rule)
                if verdict is False:
                    self.backoff = min(2 * self.backoff, rule.max_backoff)
                    self.turn_off(rule)
                else:
                    self.state, self.backoff = ON, 1

    def turn_off(self, rule: ScoringRule) -> None:
        self.state, self.wait = OFF, rule.probe_every * self.backoff
        self.clear()


@dataclass(frozen=True)
class PredictorScore:
    """Counts of one predictor (or of ``union`` / ``issued``) in one layer: its candidate
    lists (best non-resident experts) against what the target then routed."""

    targets: int  # targets it made a candidate list for
    issuing: int  # of which it was on (its candidates could be issued)
    candidates: int
    hits: int  # candidates routed at the target
    misses: int  # demand misses at those targets (routed, not resident)
    covered: int  # misses among its candidates

    @property
    def precision(self) -> float:
        return self.hits / self.candidates if self.candidates else 0.0

    @property
    def recall(self) -> float:
        return self.covered / self.misses if self.misses else 0.0

    def as_dict(self) -> dict[str, Any]:
        return dict(asdict(self), precision=self.precision, recall=self.recall)


@dataclass(frozen=True)
class Prefetch:
    """What to read now: ``keys`` in priority order, for the layer run at ``target``."""

    target: tuple[int, int]  # (step, layer)
    keys: tuple[ExpertId, ...]


def window_budget(bandwidth: float, seconds: float) -> int:
    """Bytes the disk delivers in ``seconds`` at ``bandwidth`` bytes/s: the prefetch budget of
    one issue window (the time until the target layer runs)."""
    if not (bandwidth >= 0 and seconds >= 0 and math.isfinite(bandwidth * seconds)):
        raise ConfigError(f"bandwidth and time must be finite and >= 0: {bandwidth}, {seconds}")
    return int(bandwidth * seconds)


class PrefetchController:
    """Turns predictions into prefetch requests and scores the predictors online.

    Per MoE layer run, call ``observe`` when the router has chosen (before the cache lookups,
    with ``resident`` the cache), then ``plan`` right away, so the reads overlap this layer's
    compute (this layer's experts go in ``in_flight``: they are about to be resident). ``plan``
    returns the reads for the position ``lookahead`` ahead; the caller issues them at prefetch
    priority into staging slots. With ``audit``, off
    predictors are still asked (not issued, not judged) so ``scores`` covers every predictor at
    every target, for reports."""

    def __init__(
        self,
        predictors: Sequence[Predictor],
        layers: Sequence[int],
        num_experts: int,
        top_k: int,
        *,
        lookahead: int = 1,
        per_predictor: int | None = None,
        rule: ScoringRule | None = None,
        audit: bool = False,
    ) -> None:
        self.layout = Layout(layers, num_experts, top_k)
        names = [p.name for p in predictors]
        if len(set(names)) != len(names) or {"union", "issued"} & set(names):
            raise ConfigError(f"predictor names must be distinct and not union/issued: {names}")
        if not _whole(lookahead) or not 1 <= lookahead <= self.layout.n:
            raise ConfigError(f"lookahead must be an int in [1, {self.layout.n}] (MoE layers), "
                              f"not {lookahead!r}")  # fmt: skip
        self.per_predictor = self.layout.top_k if per_predictor is None else per_predictor
        _positive("per_predictor", self.per_predictor)
        self.predictors = list(predictors)
        self.lookahead, self.rule, self.audit = int(lookahead), rule or ScoringRule(), audit
        self.gates = {(l, n): _Gate() for l in self.layout.layers for n in names}
        self._pending: dict[int, dict[str, tuple[list[int], float, str]]] = {}  # by target
        self._keys = [[(l, e) for e in range(num_experts)] for l in self.layout.layers]
        self._last = -1
        self.reset_scores()

    # -- reports -------------------------------------------------------------------------------
    def reset_scores(self) -> None:
        self._tally: dict[tuple[int, str], list[int]] = {}

    def scores(self) -> dict[int, dict[str, PredictorScore]]:
        """Per layer, per predictor (and ``union``, ``issued``), since ``reset_scores``."""
        out: dict[int, dict[str, PredictorScore]] = {}
        for (l, n), v in sorted(self._tally.items(), key=lambda kv: self.layout.index[kv[0][0]]):
            out.setdefault(l, {})[n] = PredictorScore(*v)
        return out

    def states(self) -> dict[tuple[int, str], str]:
        """(layer, predictor) -> on, off or probe."""
        return {k: g.state for k, g in self.gates.items()}

    def drop_pending(self) -> None:
        """Forget the predictions awaiting their targets (the caller stops calling for a while;
        those targets will run unobserved)."""
        self._pending.clear()

    # -- the per-layer protocol ----------------------------------------------------------------
    def observe(
        self,
        step: int,
        layer: int,
        experts: Sequence[int],
        hidden: np.ndarray | None = None,
        *,
        resident: Container[ExpertId] = (),
    ) -> None:
        """``layer`` of ``step`` routed to ``experts``; ``resident`` is the cache before this
        layer's lookups (it tells demand misses from hits)."""
        p = self.layout.pos(step, layer)
        x = self.layout.experts(experts).tolist()
        if p <= self._last:
            self._pending.clear()  # a new sequence: old targets will not run
        self._last = p
        pending = self._pending.pop(p, None)
        if pending:
            self._score(layer, x, pending, resident)
        for pr in self.predictors:
            pr.observe(step, layer, experts, hidden)

    def _score(self, layer: int, experts: list[int], pending, resident) -> None:
        needed = set(experts)
        misses = {e for e in needed if (layer, e) not in resident}
        everyone = self._keys[self.layout.index[layer]]
        nonres = len(everyone) - sum(map(resident.__contains__, everyone))
        chance = len(misses) / nonres if nonres else 0.0
        for name, (cands, claimed, state) in pending.items():
            h = sum(e in needed for e in cands)
            cov = sum(e in misses for e in cands)
            t = self._tally.setdefault((layer, name), [0] * 6)
            t[0] += 1
            t[1] += state == ON
            t[2] += len(cands)
            t[3] += h
            t[4] += len(misses)
            t[5] += cov
            g = self.gates.get((layer, name))  # None for union and issued
            if g is not None and state in (ON, PROBE):
                if g.state == state:
                    c = len(cands)
                    row = (c, h, c * chance, min(c, len(misses)), claimed)
                    g.add(row, self.rule.window)
                    g.judge(self.rule)

    def plan(
        self,
        step: int,
        layer: int,
        *,
        resident: Container[ExpertId],
        in_flight: Container[ExpertId] = (),
        budget_bytes: int | None = None,
        expert_bytes: int = 1,
        free_slots: int,
    ) -> Prefetch:
        """The prefetches to issue after ``layer`` of ``step`` was observed: at most
        ``free_slots`` staging slots and ``budget_bytes`` (None: no disk limit) of
        ``expert_bytes`` each, never a resident or in-flight expert, best first."""
        if not _whole(free_slots) or free_slots < 0:
            raise ConfigError(f"free staging slots must be an int >= 0, not {free_slots!r}")
        _positive("expert_bytes", expert_bytes)
        n_max = int(free_slots)
        if budget_bytes is not None:
            if not _whole(budget_bytes) or budget_bytes < 0:
                raise ConfigError(f"prefetch budget must be bytes >= 0, not {budget_bytes!r}")
            n_max = min(n_max, int(budget_bytes) // int(expert_bytes))
        target = self.layout.pos(step, layer) + self.lookahead
        t_step, t_layer = self.layout.at(target)
        lists: dict[str, tuple[list[int], float, str]] = {}
        combined: dict[int, float] = {}
        for pr in self.predictors:
            g = self.gates[(t_layer, pr.name)]
            if g.state == OFF:
                g.wait -= 1
                if g.wait <= 0:
                    g.state, g.probed = PROBE, 0
                    g.clear()
                elif not self.audit:
                    continue
            scores = pr.predict(t_layer, t_step)
            cands: list[int] = []
            claimed = 0.0
            cal = g.calibration if g.state == ON else 0.0
            # best first; a stable sort keeps the predictor's order among equal scores
            for key in sorted(scores, key=scores.__getitem__, reverse=True):
                if key in resident or key in in_flight:
                    continue
                e, s = key[1], scores[key]
                cands.append(e)
                claimed += s
                if cal:  # the most confident issuing predictor, calibrated, ranks e
                    combined[e] = max(combined.get(e, 0.0), min(1.0, cal * s))
                if len(cands) == self.per_predictor:
                    break
            lists[pr.name] = (cands, claimed, g.state)
        floor = self.rule.min_use
        union = sorted((e for e in combined if combined[e] >= floor),
                       key=lambda e: (-combined[e], e))  # fmt: skip
        issued = union[:n_max]
        lists["union"] = (union, 0.0, ON)
        lists["issued"] = (issued, 0.0, ON)
        self._pending[target] = lists
        return Prefetch((t_step, t_layer), tuple((t_layer, e) for e in issued))
