"""The HTTP surface: an OpenAI-compatible API, health and Prometheus metrics, and the live cache
page, over one ``Scheduler``.

Handlers validate and tokenize on the event loop, hand generations to the scheduler, and turn its
events into JSON responses or SSE ``data:`` chunks ending in ``[DONE]``. Every client error gets
an OpenAI-style body ``{"error": {"message", "type", "param", "code"}}`` with a 4xx status; a full
queue answers 429 and a stopped engine 503, both with ``Retry-After``. A client that disconnects
cancels its generation, which frees its KV cache at the scheduler's next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.resources import files
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException

from ..engine import Engine
from ..errors import MERError
from . import schemas as S
from .metrics import registry
from .scheduler import Done, Overloaded, Params, Scheduler, Token
from .text import chat_prompt

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
PAGE_PUSH_S = 1.0  # the live page's SSE period
DISCONNECT_CHECK_S = 0.5  # how often a non-streamed request looks for its client having left


class ClientError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 code: str | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def _error(status: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None, code: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:  # fmt: skip
    return JSONResponse(S.error(message, kind, param, code), status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return "the request body is not valid JSON", None
    parts, param, seen = [], None, set()
    for e in errs:
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        # pydantic names the union member it tried ("str", "list[int]"): not a field
        loc = [x for x in loc if "[" not in x and x not in {"str", "int", "float", "bool"}]
        name = ".".join(loc) or None
        if name in seen:  # a union reports each member it tried: the first says enough
            continue
        seen.add(name)
        param = param or name
        msg = e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{name}: {msg}" if name else msg)
    return "; ".join(parts), param


def create_app(engine: Engine, max_batch: int = 8, max_queue: int = 16,
               model_name: str | None = None) -> FastAPI:  # fmt: skip
    """The app; its lifespan starts and stops the scheduler's engine thread."""
    sched = Scheduler(engine, max_batch=max_batch, max_queue=max_queue)
    name = model_name or engine.path.name
    context = engine.config.max_context
    metrics = registry(sched.telemetry)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sched.start()
        try:
            yield
        finally:
            await asyncio.to_thread(sched.stop)

    app = FastAPI(title="Micro-Expert-Router", lifespan=lifespan)
    app.state.scheduler = sched

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return _error(400, message, param=param)

    @app.exception_handler(ClientError)
    async def _client(request: Request, exc: ClientError) -> JSONResponse:
        return _error(exc.status, str(exc), param=exc.param, code=exc.code)

    @app.exception_handler(Overloaded)
    async def _busy(request: Request, exc: Overloaded) -> JSONResponse:
        kind = "rate_limit_exceeded" if exc.status == 429 else "service_unavailable"
        return _error(exc.status, str(exc), kind, code=kind,
                      headers={"Retry-After": str(exc.retry_after)})  # fmt: skip

    @app.exception_handler(_ClientGone)
    async def _gone(request: Request, exc: _ClientGone) -> JSONResponse:
        return _error(499, "the client closed the request", code="client_closed_request")

    @app.exception_handler(_EngineFailed)
    async def _failed(request: Request, exc: _EngineFailed) -> JSONResponse:
        return _error(500, str(exc), "server_error")

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        return _error(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    # -- shared steps ----------------------------------------------------------------------
    def encode(prompt: str | list[int]) -> list[int]:
        try:
            return engine.encode(prompt)
        except MERError as e:
            raise ClientError(str(e), param="prompt") from None

    def params(body: S._Sampling, ids: list[int], max_tokens: int | None, default: int,
               extra_stops: list[str] = (), what: str = "prompt") -> Params:  # fmt: skip
        if len(ids) >= context:
            raise ClientError(f"the {what} has {len(ids)} tokens; this server's context is "
                              f"{context} tokens", param=what, code="context_length_exceeded")
        n = max_tokens if max_tokens is not None else default
        if len(ids) + n > context:
            raise ClientError(f"prompt ({len(ids)} tokens) + max_tokens ({n}) exceeds the context "
                              f"of {context} tokens", param="max_tokens",
                              code="context_length_exceeded")  # fmt: skip
        return Params(max_tokens=n, temperature=body.temperature, top_p=body.top_p,
                      top_k=body.top_k, seed=body.seed,
                      stop=tuple(body.stops() + list(extra_stops)),
                      stop_at_eos=not body.ignore_eos)  # fmt: skip

    def submit(ids: list[int], p: Params):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def sink(event) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, event)

        return sched.submit(ids, p, sink), queue

    async def collect(request: Request, req, queue: asyncio.Queue) -> tuple[str, Done]:
        """Wait for a whole generation, cancelling it if the client goes away."""
        text, checked = [], time.monotonic()
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(queue.get(), timeout=DISCONNECT_CHECK_S)
                except TimeoutError:
                    ev = None
                if time.monotonic() - checked >= DISCONNECT_CHECK_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        raise _ClientGone
                if ev is None:
                    continue
                if isinstance(ev, Token):
                    text.append(ev.text)
                elif isinstance(ev, Done):
                    return "".join(text), ev
                else:
                    raise _EngineFailed(ev.message)
        except BaseException:
            sched.cancel(req)
            raise

    def stream(req, queue: asyncio.Queue, chunk, final, include_usage: bool, head=()):
        """SSE events from a generation: ``head`` objects, ``chunk(text)`` per piece,
        ``final(done, include_usage)`` objects last, then ``[DONE]``."""

        async def events() -> AsyncIterator[dict[str, str]]:
            done = False
            try:
                for obj in head:
                    yield {"data": json.dumps(obj)}
                while True:
                    ev = await queue.get()
                    if isinstance(ev, Token):
                        yield {"data": json.dumps(chunk(ev.text))}
                    elif isinstance(ev, Done):
                        done = True
                        for obj in final(ev, include_usage):
                            yield {"data": json.dumps(obj)}
                        yield {"data": "[DONE]"}
                        return
                    else:
                        done = True
                        yield {"data": json.dumps(S.error(ev.message, "server_error"))}
                        return
            finally:
                if not done:
                    sched.cancel(req)

        return EventSourceResponse(events(), ping=15)

    # -- routes ----------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> dict[str, Any]:
        pool = getattr(engine.provider, "pool", None)
        return {"status": "ok" if sched.running else "stopped", **sched.counts(),
                "max_batch": sched.max_batch, "max_queue": sched.max_queue,
                "pool_free": pool.free_count if pool is not None else None,
                "pool_total": pool.total if pool is not None else None}  # fmt: skip

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created,
                                            "owned_by": "micro-expert-router"}]}  # fmt: skip

    @app.post("/v1/completions")
    async def completions(body: S.CompletionRequest, request: Request):
        try:
            prompt = body.prompt_value()
        except ValueError as e:
            raise ClientError(str(e), param="prompt") from None
        ids = encode(prompt)
        p = params(body, ids, body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS)
        req, queue = submit(ids, p)
        rid = S.new_id("cmpl")
        if body.stream:

            def final(d: Done, include_usage: bool):
                yield S.completion(rid, name, "", d.finish_reason, None, chunk=True)
                if include_usage:
                    c = S.completion(rid, name, "", None, S.usage(d.prompt_tokens,
                                     d.completion_tokens), chunk=True)  # fmt: skip
                    c["choices"] = []
                    yield c

            return stream(req, queue, lambda t: S.completion(rid, name, t, None, None, chunk=True),
                          final, body.include_usage())  # fmt: skip
        text, d = await collect(request, req, queue)
        return S.completion(rid, name, text, d.finish_reason,
                            S.usage(d.prompt_tokens, d.completion_tokens))  # fmt: skip

    @app.post("/v1/chat/completions")
    async def chat_completions(body: S.ChatRequest, request: Request):
        if engine.tokenizer is None:
            raise ClientError("this model has no tokenizer, so chat is not available")
        try:
            text, stops = chat_prompt(engine.tokenizer, body.template_messages())
        except MERError as e:
            raise ClientError(str(e), param="messages") from None
        ids = encode(text)
        limit = body.max_completion_tokens or body.max_tokens
        p = params(body, ids, limit, max(context - len(ids), 1), stops, what="messages")
        req, queue = submit(ids, p)
        rid = S.new_id("chatcmpl")
        if body.stream:
            usage_null = {"usage": None} if body.include_usage() else {}

            def chunk(t: str) -> dict[str, Any]:
                return {**S.chat_chunk(rid, name, {"content": t}, None), **usage_null}

            def final(d: Done, include_usage: bool):
                yield {**S.chat_chunk(rid, name, {}, d.finish_reason), **usage_null}
                if include_usage:
                    yield S.chat_chunk(rid, name, None, None,
                                       S.usage(d.prompt_tokens, d.completion_tokens))  # fmt: skip

            first = {**S.chat_chunk(rid, name, {"role": "assistant", "content": ""}, None),
                     **usage_null}  # fmt: skip
            return stream(req, queue, chunk, final, body.include_usage(), head=[first])
        out, d = await collect(request, req, queue)
        return S.chat(rid, name, out, d.finish_reason, S.usage(d.prompt_tokens,
                                                               d.completion_tokens))

    page = files(__package__).joinpath("static/index.html").read_text()

    @app.get("/", response_class=HTMLResponse)
    async def index() -> str:
        return page

    @app.get("/api/cache")
    async def cache_view() -> dict[str, Any]:
        return {**sched.telemetry.view(), "model": name}

    @app.get("/api/cache/events")
    async def cache_events(request: Request) -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            while not await request.is_disconnected():
                yield {"data": json.dumps({**sched.telemetry.view(), "model": name})}
                await asyncio.sleep(PAGE_PUSH_S)

        return EventSourceResponse(events(), ping=15)

    return app


class _ClientGone(Exception):
    """The client of a non-streamed request disconnected: its generation is cancelled."""


class _EngineFailed(Exception):
    """The engine failed a generation (a read error, an exhausted pool): a 500 for the client."""
