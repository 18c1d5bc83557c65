"""The plan record: each MoE layer's cache budget and split ratio, and its JSON file.

A ``Plan`` is what ``mer plan`` writes and what ``load(..., plan=...)``, ``mer generate --plan``
and ``mer sim --plan`` read: for every MoE layer (by its model layer index) the bytes its cache
may hold and the split ratio theta, the fraction of each expert's intermediate neurons kept
resident (the top segment, a byte prefix in the bundled layout). Theta lives on a grid of
``theta_grid`` steps (``theta = j / theta_grid``): experts are stored as groups of neurons, so a
grid that divides the group count makes every top segment a whole number of groups.

This module owns the record, its validation and its JSON text; it does no I/O (the caller reads
and writes the file and passes its name as ``where`` for messages). See ``docs/planner.md``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError

FORMAT = "mer-plan"
VERSION = 1
_TOL = 1e-9  # how far a JSON theta may sit from its grid point (float round-off only)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return (isinstance(v, int | float) and not isinstance(v, bool)) and math.isfinite(v)


@dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's cache: ``budget_bytes`` of top segments, each ``theta`` of an expert."""

    layer: int  # model layer index (the first item of the cache key)
    budget_bytes: int
    theta_steps: int  # theta = theta_steps / Plan.theta_grid

    def theta(self, grid: int) -> float:
        return self.theta_steps / grid

    def top_groups(self, grid: int, n_groups: int) -> int:
        """Neuron groups in the top segment of an expert stored as ``n_groups`` groups."""
        if (self.theta_steps * n_groups) % grid:
            raise ConfigError(
                f"layer {self.layer}: theta {self.theta_steps}/{grid} is not a whole number of "
                f"the store's {n_groups} neuron groups; re-plan with a theta grid that divides "
                f"{n_groups} (`mer plan --theta-grid`)"
            )
        return self.theta_steps * n_groups // grid


@dataclass(frozen=True)
class Plan:
    """Per-layer budgets and split ratios under one total. Validated on construction."""

    total_bytes: int
    theta_grid: int
    layers: tuple[LayerPlan, ...]
    predicted_s_per_token: float | None = None  # the latency model's figure, if planned

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def budget_bytes(self) -> int:
        return sum(lp.budget_bytes for lp in self.layers)

    def budgets(self) -> dict[int, int]:
        """``{layer: bytes}``, the per-layer budget ``ExpertCache`` takes."""
        return {lp.layer: lp.budget_bytes for lp in self.layers}

    def thetas(self) -> dict[int, float]:
        return {lp.layer: lp.theta(self.theta_grid) for lp in self.layers}

    def check_layers(self, layers: Sequence[int], where: str = "plan") -> None:
        """Raise ``ConfigError`` unless the plan covers exactly these MoE ``layers``, in order."""
        have = [lp.layer for lp in self.layers]
        if have != list(layers):
            raise ConfigError(
                f"{where}: the plan has {len(have)} MoE layers {_short(have)} but the model has "
                f"{len(layers)} MoE layers {_short(list(layers))}; it was planned for another "
                "model: run `mer plan` on this store"
            )

    @classmethod
    def uniform(
        cls, layers: Sequence[int], total_bytes: int, theta_steps: int, theta_grid: int = 8
    ) -> Plan:
        """The same budget (``total // n``) and theta for every layer: the baseline."""
        n = len(layers)
        each = total_bytes // n if n else 0
        lps = tuple(LayerPlan(l, each, theta_steps) for l in layers)
        return cls(total_bytes, theta_grid, lps)

    def to_json(self) -> str:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "total_bytes": self.total_bytes,
            "theta_grid": self.theta_grid,
            "predicted_s_per_token": self.predicted_s_per_token,
            "layers": [
                {
                    "layer": lp.layer,
                    "budget_bytes": lp.budget_bytes,
                    "theta": lp.theta(self.theta_grid),
                }
                for lp in self.layers
            ],
        }
        return json.dumps(doc, indent=1) + "\n"

    @classmethod
    def from_json(cls, text: str, layers: Sequence[int] | None = None, where: str = "plan") -> Plan:
        """Parse and validate a plan file's text; ``layers`` are the model's MoE layer ids."""
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"{where}: not valid JSON ({e}); write it with `mer plan`") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ConfigError(
                f'{where}: not a plan file (no "format": "{FORMAT}"); write it with `mer plan`'
            )
        if doc.get("version") != VERSION:
            raise ConfigError(
                f"{where}: plan version {doc.get('version')!r}, this engine reads "
                f"version {VERSION}; re-run `mer plan`"
            )
        known = {
            "format",
            "version",
            "total_bytes",
            "theta_grid",
            "predicted_s_per_token",
            "layers",
        }
        if extra := sorted(set(doc) - known):
            raise ConfigError(f"{where}: unknown keys {extra}; this is not a plan `mer plan` wrote")
        total, grid = doc.get("total_bytes"), doc.get("theta_grid")
        pred = doc.get("predicted_s_per_token")
        if not _is_int(total) or total < 0:
            raise ConfigError(f'{where}: "total_bytes" must be a whole number >= 0, not {total!r}')
        if not _is_int(grid) or grid < 1:
            raise ConfigError(f'{where}: "theta_grid" must be a whole number >= 1, not {grid!r}')
        if pred is not None and (not _is_num(pred) or pred < 0):
            raise ConfigError(f'{where}: "predicted_s_per_token" must be a number >= 0 or null')
        rows = doc.get("layers")
        if not isinstance(rows, list):
            raise ConfigError(f'{where}: "layers" must be a list of per-layer entries')
        lps = []
        for i, row in enumerate(rows):
            lps.append(_layer_from_json(row, i, grid, where))
        plan = _build(total, grid, tuple(lps), pred, where)
        if layers is not None:
            plan.check_layers(layers, where)
        return plan


def _layer_from_json(row: object, i: int, grid: int, where: str) -> LayerPlan:
    at = f"{where}: layers[{i}]"
    if not isinstance(row, dict) or set(row) != {"layer", "budget_bytes", "theta"}:
        raise ConfigError(f'{at} must be {{"layer", "budget_bytes", "theta"}}, not {row!r}')
    layer, budget, theta = row["layer"], row["budget_bytes"], row["theta"]
    if not _is_int(layer) or not _is_int(budget):
        raise ConfigError(f'{at}: "layer" and "budget_bytes" must be whole numbers')
    if not _is_num(theta) or not 0 <= theta <= 1:
        raise ConfigError(f"{at}: theta {theta!r} is not a number in [0, 1]")
    steps = round(theta * grid)
    if abs(theta * grid - steps) > _TOL * grid:
        raise ConfigError(
            f"{at}: theta {theta!r} is not on the grid of multiples of 1/{grid}; re-run `mer plan`"
        )
    return LayerPlan(layer, budget, steps)


def _build(total, grid, lps, pred, where) -> Plan:
    try:
        return Plan(total, grid, lps, pred)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def _validate(p: Plan) -> None:
    if not _is_int(p.total_bytes) or p.total_bytes < 0:
        raise ConfigError(f"total_bytes must be a whole number >= 0, not {p.total_bytes!r}")
    if not _is_int(p.theta_grid) or p.theta_grid < 1:
        raise ConfigError(f"theta_grid must be a whole number >= 1, not {p.theta_grid!r}")
    if not p.layers:
        raise ConfigError("the plan has no layers")
    prev = -1
    for lp in p.layers:
        if not _is_int(lp.layer) or lp.layer <= prev:
            raise ConfigError(
                f"layer ids must be whole numbers >= 0 in increasing order; "
                f"{lp.layer!r} follows {prev}"
            )
        prev = lp.layer
        if not _is_int(lp.budget_bytes) or lp.budget_bytes < 0:
            raise ConfigError(f"layer {lp.layer}: budget_bytes {lp.budget_bytes!r} must be >= 0")
        if not _is_int(lp.theta_steps) or not 0 <= lp.theta_steps <= p.theta_grid:
            raise ConfigError(
                f"layer {lp.layer}: theta {lp.theta_steps!r}/{p.theta_grid} is off the grid [0, 1]"
            )
    used = p.budget_bytes
    if used > p.total_bytes:
        raise ConfigError(
            f"the layer budgets add up to {used} bytes, more than the stated total "
            f"{p.total_bytes}; lower them or re-run `mer plan`"
        )


def _short(xs: list[int]) -> str:
    return str(xs) if len(xs) <= 8 else f"[{xs[0]}, {xs[1]}, ..., {xs[-1]}]"
