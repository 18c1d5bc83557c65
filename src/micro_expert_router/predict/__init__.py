"""Routing predictors (``predictors.py``: which experts the coming MoE layers will route to) and
the prefetch controller (``controller.py``: their guesses ranked into a budget-cut list of reads,
with online scoring that stops a predictor where it does not pay). Pure: no I/O, no threads, no
torch. The live engine's side is ``prefetcher.py``; the simulator's is ``sim/prefetch.py``.
"""

from .controller import (
    PredictorScore,
    Prefetch,
    PrefetchController,
    ScoringRule,
    window_budget,
)
from .predictors import (
    OFF,
    ON,
    PREDICTORS,
    PROBE,
    Layout,
    LocalityMonitor,
    MarkovLayers,
    MarkovTokens,
    NeuralSpeculator,
    Predictor,
    gate_probs,
    make_predictor,
    parse_predictors,
)

__all__ = [
    "OFF", "ON", "PREDICTORS", "PROBE", "Layout", "LocalityMonitor", "MarkovLayers",
    "MarkovTokens", "NeuralSpeculator", "Prefetch", "PrefetchController", "Predictor",
    "PredictorScore", "ScoringRule", "gate_probs", "make_predictor", "parse_predictors",
    "window_budget",
]  # fmt: skip
