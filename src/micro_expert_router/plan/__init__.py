"""MoEpic's planner on the RAM/SSD tiers: a latency model and per-layer budget/split choice.

``schema`` holds the ``Plan`` record and its JSON; ``latency`` the profile records and the
predicted timeline of a plan; ``planner`` the divide-and-conquer, fixed-point search and its
brute-force reference: pure functions, no I/O, no torch. ``profile`` (import it by name; it
is not loaded here) measures a store's disk and compute on this machine, builds hit-rate curves
from a routing trace and calls the planner. See ``docs/planner.md``.
"""

from __future__ import annotations

from .latency import (
    LayerProfile,
    LayerTime,
    Profile,
    Timeline,
    cached_count,
    curve_from_function,
    entry_bytes,
    predict,
    top_bytes,
)
from .planner import PlanResult, brute_force, plan_cache
from .schema import LayerPlan, Plan

__all__ = [
    "LayerPlan",
    "LayerProfile",
    "LayerTime",
    "Plan",
    "PlanResult",
    "Profile",
    "Timeline",
    "brute_force",
    "cached_count",
    "curve_from_function",
    "entry_bytes",
    "plan_cache",
    "predict",
    "top_bytes",
]
