"""Micro-Expert-Router: run Mixture-of-Experts models larger than RAM on a CPU.

The router and dense weights stay in RAM; expert FFN weights are read on demand from an on-disk
expert store into a pool of aligned buffers, under a byte-budgeted cache. See ``docs/``.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__", "load", "Engine"]


def __getattr__(name: str):
    # Lazy, so that ``import micro_expert_router`` (and ``mer --help``) does not import torch.
    if name in ("load", "Engine"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(name)
