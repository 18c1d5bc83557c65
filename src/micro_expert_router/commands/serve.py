"""``mer serve``: the OpenAI-compatible HTTP server (``server/``) on uvicorn."""

from __future__ import annotations

import argparse
import sys

from .engine_options import add_engine_arguments, load_engine

HELP = "serve a model over an OpenAI-compatible HTTP API, with a live page of the expert cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--max-batch", type=int, default=8,
                   help="requests decoded together in one step")  # fmt: skip
    p.add_argument("--max-queue", type=int, default=16,
                   help="requests waiting beyond the batch; more get 429 with Retry-After")
    p.add_argument("--model-name", default=None,
                   help="the id /v1/models reports (default: the model folder's name, or "
                   "'demo' for the bundled demo)")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    try:
        import uvicorn

        from ..server import create_app
    except ModuleNotFoundError as e:
        raise ConfigError(f"`mer serve` needs the serve extra ({e.name} is missing): "
                          "pip install 'micro-expert-router[serve]'") from None  # fmt: skip
    if args.max_batch < 1 or args.max_queue < 0:
        raise ConfigError("--max-batch must be >= 1 and --max-queue >= 0")
    with load_engine(args) as engine:
        name = args.model_name or ("demo" if args.model is None else None)
        app = create_app(engine, max_batch=args.max_batch, max_queue=args.max_queue,
                         model_name=name)  # fmt: skip
        print(f"mer serve: {engine.path} on http://{args.host}:{args.port}/v1 "
              f"(live cache page: http://{args.host}:{args.port}/)", file=sys.stderr)
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                    timeout_graceful_shutdown=3)  # fmt: skip
    return 0
