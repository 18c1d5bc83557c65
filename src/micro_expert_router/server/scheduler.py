"""The batching scheduler: one engine thread owns the model and steps every running request
together.

Requests wait in a bounded queue. At each step boundary the engine thread admits waiting requests
into the batch (up to ``max_batch``), runs each newcomer's prompt through ``Transformer.forward``
(its prefill, which samples its first token), then decodes one token for every running request
with one ``Transformer.forward_batch`` call, so each MoE layer reads the union of the batch's
experts once. A request leaves the batch when it finishes (end of sequence, a stop string,
``max_tokens``) or is cancelled; its KV cache is dropped at that step boundary. Over capacity,
``submit`` raises ``Overloaded`` at once rather than queueing without bound.

Results go back through a ``sink`` callable per request (``Token``, ``Done`` and ``Failed``
events), called on the engine thread; the HTTP layer hands them to its event loop. The engine
thread never blocks on a client. Telemetry (``telemetry.py``) is refreshed from this thread, so
it reads the provider and the cache without racing a step.
"""

from __future__ import annotations

import gc
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from ..engine import Engine
from ..errors import MERError
from ..model import KVCache
from ..sampling import sample
from .telemetry import Telemetry
from .text import StopMatcher

log = logging.getLogger("micro_expert_router.server")


class Overloaded(MERError):
    """The queue is full (429) or the scheduler is not running (503)."""

    def __init__(self, message: str, status: int, retry_after: int) -> None:
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True


@dataclass(frozen=True)
class Token:
    text: str  # may be empty (a partial character, or text held back by a stop string)


@dataclass(frozen=True)
class Done:
    finish_reason: str  # "stop" | "length"
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class Failed:
    message: str


Event = Token | Done | Failed


@dataclass(eq=False)
class Request:
    """One generation. Fields below ``sink`` belong to the engine thread."""

    rid: int
    ids: list[int]
    params: Params
    sink: Callable[[Event], None]
    cancelled: bool = False
    kv: KVCache | None = None
    last: int = 0  # the token to feed at the next decode step
    generated: int = 0
    gen: torch.Generator | None = None
    decoder: object = None
    stops: StopMatcher = field(default_factory=lambda: StopMatcher(()))


@dataclass
class StepRecord:
    """One decode step of the batch (the bench and /metrics read these)."""

    batch: int
    seconds: float  # forward_batch, sampling and handing each request its token
    experts_needed: int  # summed over MoE layers: the union of the batch's experts, per layer
    bytes_read: int
    cpu_seconds: float = 0.0  # process CPU time over the step (every thread: compute, I/O)


class Scheduler:
    def __init__(self, engine: Engine, max_batch: int = 8, max_queue: int = 16,
                 retry_after_s: int = 1) -> None:  # fmt: skip
        if max_batch < 1 or max_queue < 0:
            raise MERError("max_batch must be >= 1 and max_queue >= 0")
        self.engine = engine
        self.model = engine.model
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self._cond = threading.Condition()
        self._waiting: deque[Request] = deque()
        self._active: list[Request] = []  # engine thread only
        self._n_active = 0  # len(_active), readable from any thread
        self._kv_bytes = 0
        self._ids = itertools.count(1)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps: deque[StepRecord] = deque(maxlen=4096)
        self.finished = 0
        eos = set(engine.args.eos_token_ids)
        tok = engine.tokenizer
        if tok is not None and tok.eos_token_id is not None:
            eos.add(tok.eos_token_id)
        self.eos = eos
        self.telemetry = Telemetry(self)

    # -- any thread ------------------------------------------------------------------------
    def start(self) -> Scheduler:
        # The loaded model (tens of thousands of weight views and tensors) lives as long as the
        # server: keep it out of the cyclic collector's scans, whose full passes over it took
        # 0.3-0.5 s in the middle of decode steps (olmoe-like, measured under load).
        gc.freeze()
        self._thread = threading.Thread(target=self._loop, name="mer-engine", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Fail what is waiting or running, and end the engine thread."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    def submit(self, ids: Sequence[int], params: Params, sink: Callable[[Event], None]) -> Request:
        """Queue a generation; raises ``Overloaded`` if the queue is full or the engine stops."""
        req = Request(next(self._ids), list(ids), params, sink)
        with self._cond:
            if not self.running:
                raise Overloaded("the engine is not running", 503, self.retry_after_s)
            free = self.max_batch - self._n_active
            if len(self._waiting) >= self.max_queue + max(free, 0):
                raise Overloaded(
                    f"the server is at capacity ({self.max_batch} running, {self.max_queue} "
                    "queued): retry later", 429, self.retry_after_s,
                )  # fmt: skip
            self._waiting.append(req)
            self._cond.notify_all()
        return req

    def cancel(self, req: Request) -> None:
        """Drop ``req``: at once if it is waiting, at the next step boundary if it runs."""
        with self._cond:
            req.cancelled = True
            try:
                self._waiting.remove(req)
            except ValueError:
                pass
            self._cond.notify_all()

    def counts(self) -> dict[str, int]:
        with self._cond:
            return {"queued": len(self._waiting), "running": self._n_active,
                    "kv_bytes": self._kv_bytes, "finished": self.finished}  # fmt: skip

    # -- the engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        self.model.on_route.append(self.telemetry.on_route)
        try:
            while True:
                with self._cond:
                    while not self._waiting and not self._active and not self._stopping:
                        if not self._cond.wait(timeout=self.telemetry.interval_s):
                            self.telemetry.refresh()  # idle: rates decay to zero
                    if self._stopping:
                        break
                    self._active = [r for r in self._active if not self._drop_if_cancelled(r)]
                    joining = []
                    while self._waiting and len(self._active) + len(joining) < self.max_batch:
                        joining.append(self._waiting.popleft())
                    self._n_active = len(self._active) + len(joining)
                for req in joining:
                    self._prefill(req)
                self._decode()
                self.telemetry.maybe_refresh()
        finally:
            self.model.on_route.remove(self.telemetry.on_route)
            with self._cond:
                for req in [*self._waiting, *self._active]:
                    self._finish(req, Failed("the server is shutting down"))
                self._waiting.clear()

    def _drop_if_cancelled(self, req: Request) -> bool:
        if req.cancelled:
            self._release(req)
        return req.cancelled

    def _release(self, req: Request) -> None:
        if req.kv is not None:
            self._kv_bytes -= _kv_nbytes(req.kv)
            req.kv = None
        req.decoder = None

    def _finish(self, req: Request, event: Event) -> None:
        """Send the last event and free the request's KV (caller holds the lock or is alone)."""
        self._release(req)
        if req in self._active:
            self._active.remove(req)
        self._n_active = len(self._active)
        self.finished += 1
        _deliver(req, event)

    def _prefill(self, req: Request) -> None:
        p, e = req.params, self.engine
        if req.cancelled:
            with self._cond:
                self._n_active -= 1
            return
        try:
            kv = self.model.new_cache(len(req.ids) + p.max_tokens)
            with self._cond:
                req.kv = kv
                self._kv_bytes += _kv_nbytes(kv)
                self._active.append(req)
            req.gen = torch.Generator().manual_seed(p.seed) if p.seed is not None else None
            req.decoder = e.tokenizer.stream() if e.tokenizer is not None else None
            req.stops = StopMatcher(p.stop)
            logits = self.model.forward(torch.tensor(req.ids), kv, last_only=True)[-1]  # [V]
            self._advance(req, sample(logits, p.temperature, p.top_p, p.top_k, req.gen))
        except Exception as exc:  # noqa: BLE001 - the request fails, the server goes on
            self._fail([req], exc)

    def _decode(self) -> None:
        batch = [r for r in self._active if not r.cancelled]
        if not batch:
            return
        stats = self.model.provider.stats
        before = stats.snapshot()
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            logits = self.model.forward_batch([r.last for r in batch], [r.kv for r in batch])
        except Exception as exc:  # noqa: BLE001 - the batch's KV is now inconsistent: fail it
            self._fail(batch, exc)
            return
        for b, req in enumerate(batch):  # logits [B, V]
            p = req.params
            self._advance(req, sample(logits[b], p.temperature, p.top_p, p.top_k, req.gen))
        d = stats.minus(before)  # the step's time includes sampling and sending the tokens
        self.steps.append(StepRecord(len(batch), time.perf_counter() - t0, d.experts_needed,
                                     d.bytes_read, time.process_time() - c0))  # fmt: skip

    def _advance(self, req: Request, token: int) -> None:
        """Account one sampled token of ``req``: emit its text, finish it if it is done."""
        req.generated += 1
        req.last = token
        self.telemetry.tokens += 1
        text = ""
        tok = self.engine.tokenizer
        if req.decoder is not None:
            try:
                text = req.decoder.step(tok.tok, token) or ""
            except Exception:  # noqa: BLE001 - a token the decoder cannot place (a bare id)
                text = ""
        out, stopped = req.stops.feed(text)
        finish = None
        if stopped or (req.params.stop_at_eos and token in self.eos):
            finish = "stop"
        elif req.generated >= req.params.max_tokens:
            finish = "length"
        if finish is not None and not stopped:
            out += req.stops.flush()
        if out:
            _deliver(req, Token(out))
        if finish is not None:
            with self._cond:
                self._finish(req, Done(finish, len(req.ids), req.generated))

    def _fail(self, reqs: list[Request], exc: Exception) -> None:
        if isinstance(exc, MERError):
            message = str(exc)
        else:
            log.exception("generation failed")
            message = f"internal error: {type(exc).__name__}: {exc}"
        with self._cond:
            for req in reqs:
                self._finish(req, Failed(message))


def _kv_nbytes(kv: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in (*kv.k, *kv.v))


def _deliver(req: Request, event: Event) -> None:
    try:
        req.sink(event)
    except Exception:  # noqa: BLE001 - a client gone away must not stop the engine
        log.debug("request %d: event dropped", req.rid, exc_info=True)
