"""``mer serve``: an OpenAI-compatible HTTP server over one engine, with batched decode across
requests and a live page of the expert cache.

- ``app``: the FastAPI routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
  ``/health``, ``/metrics``, the page at ``/`` and its data), errors in OpenAI's shape;
- ``scheduler``: the engine thread that admits requests and decodes them as one batch;
- ``schemas``: request validation and response objects;
- ``telemetry`` and ``metrics``: counters and residency for the page and Prometheus;
- ``text``: chat prompts and stop strings;
- ``static/index.html``: the page (plain HTML and JS, no build step, nothing fetched from outside).

``app`` and ``metrics`` need the ``serve`` extra (FastAPI, uvicorn, sse-starlette,
prometheus-client); the names below load on first use, so ``text`` and ``scheduler`` (used by
``mer chat`` and the benchmarks) import without it. See ``docs/server.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {"create_app": "app", "Scheduler": "scheduler", "Params": "scheduler",
          "Token": "scheduler", "Done": "scheduler", "Failed": "scheduler",
          "Overloaded": "scheduler"}  # fmt: skip

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
