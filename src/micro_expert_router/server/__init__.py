"""``mer serve``: an OpenAI-compatible HTTP server over one engine, with batched decode across
requests and a live page of the expert cache.

- ``app``: the FastAPI routes (``/v1/completions``, ``/v1/chat/completions``, ``/v1/models``,
  ``/health``, ``/metrics``, the page at ``/`` and its data), errors in OpenAI's shape;
- ``scheduler``: the engine thread that admits requests and decodes them as one batch;
- ``schemas``: request validation and response objects;
- ``telemetry`` and ``metrics``: counters and residency for the page and Prometheus;
- ``text``: chat prompts and stop strings;
- ``static/index.html``: the page (plain HTML and JS, no build step, nothing fetched from outside).

Importing this package needs the ``serve`` extra (FastAPI, uvicorn, sse-starlette,
prometheus-client). See ``docs/server.md``.
"""

from __future__ import annotations

from .app import create_app
from .scheduler import Done, Failed, Overloaded, Params, Scheduler, Token

__all__ = ["create_app", "Scheduler", "Params", "Token", "Done", "Failed", "Overloaded"]
