"""Trace-driven simulators: ``replay.py`` replays a routing trace through the expert cache under
a policy (hits, misses, bytes; the OPT bound), ``prefetch.py`` adds the prefetch controller and
staging slots on top of it. Both are pure Python over traces; ``mer sim`` runs them.
"""

from .replay import (
    DEFAULT_SWEEP_FRACTIONS,
    SWEEP_COLUMNS,
    Replay,
    SimResult,
    Step,
    experts_for_fraction,
    plot_sweep,
    replay_steps,
    simulate,
    sweep,
    write_sweep_csv,
)

__all__ = [
    "DEFAULT_SWEEP_FRACTIONS", "SWEEP_COLUMNS", "Replay", "SimResult", "Step",
    "experts_for_fraction", "plot_sweep", "replay_steps", "simulate", "sweep", "write_sweep_csv",
]  # fmt: skip
