"""Small types shared by several parts of the engine.

Only plain records live here (no behaviour), so that ``kernels``, ``store``, ``io``, ``cache``,
``predict``, ``plan`` and ``model`` can all import them without importing each other.
"""

from __future__ import annotations

ExpertId = tuple[int, int]
"""``(layer_idx, expert_idx)``: the unit of caching, prediction and I/O."""

