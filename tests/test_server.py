"""``mer serve``: the OpenAI-compatible server on 127.0.0.1, driven by the real ``openai`` client
and by raw HTTP, against the bundled demo store streamed under a cache budget (so the buffer pool
is real): completions and chat, streamed and not, 8 concurrent streams equal to each prompt run
alone, a load test against a full queue, cancellation, malformed requests, metrics and the page's
data."""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import tempfile
import threading
import time
import weakref

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

import uvicorn  # noqa: E402

import micro_expert_router as mer  # noqa: E402
from micro_expert_router.demo.store import default_cache_bytes, demo_store_path  # noqa: E402
from micro_expert_router.io import leak_report  # noqa: E402
from micro_expert_router.server import create_app  # noqa: E402

CONTEXT = 256
PROMPTS = ["The secret of life is", "Never trust a man who", "The best things in life are",
           "If at first you don't succeed,", "Q: Why did the programmer quit his job?\nA:",
           "A fool and his money", "Love is", "There is no such thing as"]  # fmt: skip


class Served:
    """A uvicorn server in a thread, on a free port of 127.0.0.1."""

    def __init__(self, engine, **options) -> None:
        self.engine = engine
        self.app = create_app(engine, model_name="demo", **options)
        self.sched = self.app.state.scheduler
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                timeout_graceful_shutdown=2)  # fmt: skip
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def settle(self, timeout: float = 20.0) -> dict:
        """Wait until nothing runs or waits; the final /health."""
        deadline = time.monotonic() + timeout
        while True:
            h = httpx.get(self.url + "/health").json()
            if h["running"] == 0 and h["queued"] == 0:
                return h
            assert time.monotonic() < deadline, f"requests still running: {h}"
            time.sleep(0.05)


@pytest.fixture(autouse=True)
def no_leaked_slots(request):
    """Replaces conftest's check while the module's engine lives (its cached experts hold pool
    slots by design): after each test no request holds a slot or KV; the full leak report runs
    when the engine closes (``served``)."""
    yield
    if "served" in request.fixturenames:
        s = request.getfixturevalue("served")
        assert s.settle()["kv_bytes"] == 0 and pool_whole(s.engine)


@pytest.fixture(scope="module")
def store():
    return demo_store_path()


@pytest.fixture(scope="module")
def served(store):
    engine = mer.load(store, cache_bytes=default_cache_bytes(store), max_context=CONTEXT,
                      dtype="float32")  # fmt: skip
    s = Served(engine, max_batch=8, max_queue=16)
    yield s
    s.close()
    engine.close()
    assert leak_report() == []


@pytest.fixture(scope="module")
def alone(store):
    """Greedy text of each prompt run alone through ``Engine.generate`` (a second engine)."""
    out = {}
    with mer.load(store, max_context=CONTEXT, dtype="float32") as engine:
        for p in PROMPTS:
            out[p] = "".join(s.text for s in engine.generate(p, 24, temperature=0))
    return out


def pool_whole(engine) -> bool:
    """Every expert-pool slot is free or held by a cached expert (none by a request)."""
    p = engine.provider
    return p.pool.free_count + len(p.cache) == p.pool.total and not p.staged


def test_models_health_and_metrics(served):
    assert [m.id for m in served.client.models.list().data] == ["demo"]
    h = httpx.get(served.url + "/health").json()
    assert h["status"] == "ok" and h["max_batch"] == 8 and h["max_queue"] == 16
    served.client.completions.create(model="demo", prompt="Love is", max_tokens=4)
    assert served.sched.telemetry.wait_newer(time.monotonic())
    text = httpx.get(served.url + "/metrics").text
    for name in ("mer_tokens_total", "mer_tokens_per_second", "mer_queue_length",
                 "mer_bytes_read_total", "mer_io_wait_seconds_total", "mer_pool_free_slots",
                 'mer_layer_hit_rate{layer="3"}'):  # fmt: skip
        assert name in text, name


def test_completion_and_chat(served, alone):
    c = served.client
    p = PROMPTS[0]
    r = c.completions.create(model="demo", prompt=p, max_tokens=24, temperature=0)
    assert r.choices[0].text == alone[p]
    assert r.choices[0].finish_reason in ("stop", "length")
    n_prompt = len(served.engine.encode(p))
    assert r.usage.prompt_tokens == n_prompt and r.usage.completion_tokens <= 24
    assert r.usage.total_tokens == n_prompt + r.usage.completion_tokens
    chat = c.chat.completions.create(model="demo", max_tokens=16, temperature=0,
                                     messages=[{"role": "user", "content": "Why?"}])  # fmt: skip
    msg = chat.choices[0]
    assert msg.message.role == "assistant" and msg.finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens >= 1 and "\nQ:" not in msg.message.content


def test_streaming_equals_whole(served):
    c = served.client
    kw = dict(model="demo", max_tokens=20, temperature=0.8, seed=7)
    whole = c.completions.create(prompt=PROMPTS[1], **kw).choices[0].text
    chunks = list(c.completions.create(prompt=PROMPTS[1], stream=True,
                                       stream_options={"include_usage": True}, **kw))  # fmt: skip
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == whole
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] in ("stop", "length")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]
    whole = c.chat.completions.create(messages=msgs, **kw).choices[0].message.content
    chunks = list(c.chat.completions.create(messages=msgs, stream=True, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings(served):
    c = served.client
    full = c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    text = full.choices[0].text
    stop = text[5:8]
    r = c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=24, temperature=0,
                             stop=[stop])  # fmt: skip
    assert r.choices[0].text == text[: text.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(model="demo", prompt=PROMPTS[0], max_tokens=24,
                                    temperature=0, stop=stop, stream=True)  # fmt: skip
    assert "".join(ch.choices[0].text for ch in streamed) == text[: text.index(stop)]


def test_eight_concurrent_streams_equal_each_alone(served, alone):
    results: dict[str, str] = {}
    barrier = threading.Barrier(len(PROMPTS))
    steps_before = len(served.sched.steps)

    def one(p: str) -> None:
        barrier.wait()
        stream = served.client.completions.create(model="demo", prompt=p, max_tokens=24,
                                                  temperature=0, stream=True)  # fmt: skip
        results[p] = "".join(ch.choices[0].text for ch in stream)

    threads = [threading.Thread(target=one, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone
    steps = list(served.sched.steps)[steps_before:]
    assert max(s.batch for s in steps) >= 4  # they decoded together
    a = served.engine.args
    for s in steps:  # each layer read the union of the batch's experts, once
        assert s.experts_needed <= sum(a.moe_layers) * min(a.n_experts, s.batch * a.top_k)
    assert pool_whole(served.engine) and served.settle()["kv_bytes"] == 0


def test_load_64_against_queue_16(served):
    async def one(client: httpx.AsyncClient, i: int) -> httpx.Response:
        body = {"prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "ignore_eos": True,
                "temperature": 0.7, "seed": i, "stream": i % 2 == 1}  # fmt: skip
        return await client.post("/v1/completions", json=body)

    async def all64() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=served.url, timeout=120, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    responses = asyncio.run(all64())
    codes = [r.status_code for r in responses]
    assert set(codes) <= {200, 429, 503}, codes
    assert codes.count(200) >= 8 + 16 and 429 in codes
    for i, r in enumerate(responses):
        if r.status_code != 200:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["message"]
        elif i % 2 == 1:  # streamed: data chunks ending in [DONE]
            data = [ln[5:].strip() for ln in r.text.splitlines() if ln.startswith("data:")]
            assert data[-1] == "[DONE]" and json.loads(data[-2])["choices"][0]["finish_reason"]
        else:
            assert r.json()["usage"]["completion_tokens"] == 24
    h = served.settle()
    assert h["kv_bytes"] == 0 and pool_whole(served.engine)
    r = served.client.completions.create(model="demo", prompt="Love is", max_tokens=4)
    assert r.usage.completion_tokens >= 1


def test_cancel_mid_stream_frees_kv_and_slots(served):
    tokens_before = served.sched.telemetry.tokens
    body = {"prompt": PROMPTS[2], "max_tokens": 200, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=served.url, timeout=60) as client:
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            got = 0
            while got < 3:
                got += next(lines).startswith("data:")
            assert httpx.get(served.url + "/health").json()["kv_bytes"] > 0
            running = list(served.sched._active)  # a peek at the engine thread's batch
            kv = weakref.ref(running[0].kv.k[0])
    h = served.settle()
    assert h["kv_bytes"] == 0 and pool_whole(served.engine)
    assert served.sched.telemetry.tokens - tokens_before < 200  # it stopped early
    gc.collect()
    assert kv() is None  # nothing holds the cancelled request's KV tensors any more


def test_disconnect_cancels_a_whole_response(served, monkeypatch):
    # each decode step made to take 10 ms, so 200 tokens outlast the client's 1.5 s whatever
    # the machine's speed (the demo model alone decodes them in under a second on a fast CPU)
    step = served.engine.model.forward_batch

    def slow_step(*args, **kwargs):
        time.sleep(0.01)
        return step(*args, **kwargs)

    monkeypatch.setattr(served.engine.model, "forward_batch", slow_step)
    tokens_before = served.sched.telemetry.tokens
    body = {"prompt": PROMPTS[3], "max_tokens": 200, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/completions", json=body, timeout=1.5)
    h = served.settle()
    assert h["kv_bytes"] == 0 and pool_whole(served.engine)
    assert served.sched.telemetry.tokens - tokens_before < 200


def test_stopped_engine_answers_503(served):
    from micro_expert_router.server import Overloaded, Params, Scheduler

    idle = Scheduler(served.engine)  # never started
    with pytest.raises(Overloaded) as e:
        idle.submit([1, 2], Params(max_tokens=2), lambda ev: None)
    assert e.value.status == 503 and e.value.retry_after >= 1


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ('{"prompt": "x", "max_tokens": 4', None),  # malformed JSON
        ('{"prompt": "x", "max_tokens": -1}', "max_tokens"),
        ('{"prompt": "x", "temperature": "hot"}', "temperature"),
        ('{"prompt": "x", "max_tokens": "5"}', "max_tokens"),
        ('{"prompt": 5}', "prompt"),
        ('{"max_tokens": 4}', "prompt"),
        ('{"prompt": "x", "stop": 3}', "stop"),
        ('{"prompt": "x", "n": 2}', None),
        ('{"prompt": "x", "stream_options": {"include_usage": "yes"}}',
         "stream_options.include_usage"),
        ('[1, 2]', None),
        ('{"prompt": [999999]}', "prompt"),  # a token id outside the vocabulary
        ('{"prompt": "' + "hello " * 300 + '"}', "prompt"),  # longer than the context
        ('{"prompt": "hello", "max_tokens": 1000}', "max_tokens"),  # prompt + max_tokens too
    ],
)
def test_malformed_requests_get_openai_4xx(served, body, param):
    r = httpx.post(served.url + "/v1/completions", content=body,
                   headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param


def test_malformed_chat_and_unknown_route(served):
    for body in ({"messages": []}, {"messages": [{"role": "wizard", "content": "x"}]},
                 {"messages": [{"role": "user", "content": 5}]}, {"messages": "hi"},
                 {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}):
        r = httpx.post(served.url + "/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["message"], (body, r.text)
    with pytest.raises(openai.BadRequestError, match="context"):
        served.client.chat.completions.create(
            model="demo", messages=[{"role": "user", "content": "word " * 400}])
    r = httpx.get(served.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]


def test_cache_page_data(served):
    served.client.completions.create(model="demo", prompt="Love is", max_tokens=8)
    assert served.sched.telemetry.wait_newer(time.monotonic())
    v = httpx.get(served.url + "/api/cache").json()
    a = served.engine.args
    assert v["layers"] == [i for i in range(a.n_layers) if a.moe_layers[i]]
    assert len(v["resident"]) == len(v["layers"]) and len(v["resident"][0]) == a.n_experts
    cache = served.engine.provider.cache
    assert sum(map(sum, v["resident"])) == len(cache)
    assert v["total"]["pool_total"] == served.engine.provider.pool.total
    page = httpx.get(served.url + "/").text
    assert "<canvas" in page and "/api/cache" in page and "http" not in page.split("<body")[0]


def test_page_renders_in_headless_chromium(served):
    """The page at / draws real data: headless Chromium runs its script (polling mode, since a
    browser waiting for the network to go idle never sees an event stream end)."""
    import shutil
    import subprocess

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium (apt-get install chromium)")
    served.client.completions.create(model="demo", prompt="Love is", max_tokens=8)
    assert served.sched.telemetry.wait_newer(time.monotonic())
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                              f"--user-data-dir={profile}", "--virtual-time-budget=3000",
                              "--dump-dom", served.url + "/?poll"],
                             capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    assert "4 MoE layers × 16 experts" in dom
    assert dom.count('class="card"') >= 10 and "tokens / s" in dom
    assert "waiting for data" not in dom


def test_page_event_stream(served):
    with httpx.Client(base_url=served.url, timeout=30) as client:
        with client.stream("GET", "/api/cache/events") as r:
            line = next(ln for ln in r.iter_lines() if ln.startswith("data:"))
    v = json.loads(line[5:])
    assert v["model"] == "demo" and v["experts"] == served.engine.args.n_experts


def test_mer_serve_command(store, tmp_path):
    """`mer serve` as users start it: up, answers, and exits 0 on Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "micro_expert_router.cli", "serve", "--model", str(store),
           "--cache-mb", "10", "--port", str(port), "--max-context", "128", "--model-name", "m"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").json()["status"] == "ok":
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "mer serve did not come up"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"prompt": "Love is", "max_tokens": 3, "model": "m"})  # fmt: skip
        assert r.status_code == 200 and r.json()["model"] == "m"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
        assert "live cache page" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


FIELDS = ["prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
          "seed", "stop", "stream", "stream_options", "model", "n", "logprobs"]  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),  # fmt: skip
    max_leaves=5,
)
SERVER_FUZZ_EXAMPLES = 80


@settings(max_examples=SERVER_FUZZ_EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])  # fmt: skip
@given(route=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
       body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), JSON_VALUES,
                            max_size=6) | JSON_VALUES)  # fmt: skip
def test_fuzzed_request_bodies_never_get_a_500(served, route, body):
    """Any JSON body gets a 200 (valid) or an OpenAI-style 4xx/429/503 with a message."""
    if isinstance(body, dict) and "max_tokens" in body and isinstance(body["max_tokens"], int):
        body["max_tokens"] = body["max_tokens"] % 8  # keep accepted requests short
    r = httpx.post(served.url + route, content=json.dumps(body), timeout=60,
                   headers={"content-type": "application/json"})  # NaN/Infinity: not JSON
    assert r.status_code in (200, 400, 404, 422, 429, 503), (r.status_code, r.text[:300])
    if r.status_code != 200:
        err = r.json()["error"]
        assert err["message"] and err["type"]
