"""Fuzzing every parser with hypothesis: the store manifest (``Store.open``, then the dense
weights and a provider over the store), the dense safetensors header (the store's and a
checkpoint's), plan files (``plan.schema``) and routing traces (``trace.read_trace``, both
formats). Inputs are valid documents mutated at random places (a value replaced, nudged by a
page, deleted or duplicated) and raw bytes. Whatever comes in, a parser either accepts it or
raises one of the project's named errors (``MERError``), never another exception type.

Example counts per test are in ``EXAMPLES``; the whole file runs in well under a minute.
"""

from __future__ import annotations

import copy
import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from hf_models import save_hf_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from micro_expert_router.checkpoint import Checkpoint, read_safetensors_header
from micro_expert_router.errors import MERError
from micro_expert_router.plan import Plan
from micro_expert_router.store import Store, convert
from micro_expert_router.streaming import StreamingProvider
from micro_expert_router.trace import TraceWriter, read_trace

EXAMPLES = {
    "manifest_mutated": 200, "manifest_bytes": 100,
    "dense_header_mutated": 150, "dense_header_bytes": 100,
    "plan_mutated": 300, "plan_text": 100,
    "mer_trace_mutated": 150, "pairs_trace_mutated": 100, "trace_bytes": 100,
}  # fmt: skip


def fuzz(name: str):
    return settings(max_examples=EXAMPLES[name], deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),  # fmt: skip
    max_leaves=6,
)


def _paths(x, prefix=()):
    yield prefix
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _paths(v, (*prefix, i))


def _nudge(data, v):
    """A near miss of ``v``: off by one or a page, negated, emptied, flipped."""
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + data.draw(st.sampled_from([-4096, -1, 1, 4096, -2 * v, v]))
    if isinstance(v, float):
        return v * data.draw(st.sampled_from([-1.0, 0.0, 2.0, 1e300, float("nan")]))
    if isinstance(v, str):
        return data.draw(st.sampled_from([v + "x", "", v[:-1], v.upper(), "../" + v]))
    if isinstance(v, list):
        return data.draw(st.sampled_from([[], v[::-1], v[:-1], v + v[-1:]]))
    if isinstance(v, dict):
        return {}
    return 0


def mutate(data, doc):
    """``doc`` with one to three random edits."""
    doc = copy.deepcopy(doc)
    for _ in range(data.draw(st.integers(1, 3), label="edits")):
        path = data.draw(st.sampled_from(list(_paths(doc))), label="path")
        op = data.draw(st.sampled_from(["replace", "nudge", "delete", "duplicate"]), label="op")
        if not path:
            doc = data.draw(JSON) if op == "replace" else _nudge(data, doc)
            continue
        parent = doc
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if op == "delete":
            del parent[key]
        elif op == "duplicate" and isinstance(parent, list):
            parent.insert(key, copy.deepcopy(parent[key]))
        elif op == "nudge":
            parent[key] = _nudge(data, parent[key])
        else:
            parent[key] = data.draw(JSON, label="value")
    return doc


def accepted_or_named(fn) -> None:
    """``fn()`` returns, or raises an ``MERError`` with a message; any other exception fails."""
    try:
        fn()
    except MERError as e:
        assert str(e)


# -- the store --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    save_hf_model("qwen2moe", root / "ckpt")  # shared experts and a dense-MLP layer too
    convert(root / "ckpt", root / "good", progress=False, log=None)
    shutil.copytree(root / "good", root / "store")
    return root


def open_everything(path: Path) -> None:
    store = Store.open(path)
    store.load_dense(torch.float32)
    provider = StreamingProvider(store, cache_bytes=store.expert_bytes * 2, io_threads=1)
    provider.close()


@fuzz("manifest_mutated")
@given(data=st.data())
def test_mutated_manifest(made, data):
    good = json.loads((made / "good" / "manifest.json").read_text())
    doc = mutate(data, good)
    (made / "store" / "manifest.json").write_text(json.dumps(doc))
    accepted_or_named(lambda: open_everything(made / "store"))


@fuzz("manifest_bytes")
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_manifest_of_random_bytes(made, raw):
    (made / "store" / "manifest.json").write_bytes(raw)
    accepted_or_named(lambda: open_everything(made / "store"))


def _split_safetensors(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


@fuzz("dense_header_mutated")
@given(data=st.data())
def test_mutated_dense_header(made, data):
    header, body = _split_safetensors(made / "good" / "dense.safetensors")
    text = json.dumps(mutate(data, header)).encode()
    dense = made / "store" / "dense.safetensors"
    dense.write_bytes(struct.pack("<Q", len(text)) + text + body)
    shutil.copy(made / "good" / "manifest.json", made / "store" / "manifest.json")
    accepted_or_named(lambda: read_safetensors_header(dense))
    accepted_or_named(lambda: Store.open(made / "store").load_dense(torch.float32))
    ckpt = made / "ckpt-fuzzed"
    ckpt.mkdir(exist_ok=True)
    shutil.copy(made / "ckpt" / "config.json", ckpt / "config.json")
    shutil.copy(dense, ckpt / "model.safetensors")
    accepted_or_named(lambda: Checkpoint(ckpt))


@fuzz("dense_header_bytes")
@given(n=st.integers(0, 2**64 - 1) | st.integers(0, 400), raw=st.binary(max_size=400))
def test_dense_header_of_random_bytes(made, n, raw):
    dense = made / "store" / "dense.safetensors"
    dense.write_bytes(struct.pack("<Q", n) + raw)
    shutil.copy(made / "good" / "manifest.json", made / "store" / "manifest.json")
    accepted_or_named(lambda: read_safetensors_header(dense))
    accepted_or_named(lambda: Store.open(made / "store").load_dense(torch.float32))


# -- plans ------------------------------------------------------------------------------------
LAYERS = [0, 2, 3]
GOOD_PLAN = json.loads(Plan.uniform(LAYERS, 3 << 20, 4, theta_grid=8).to_json())


@fuzz("plan_mutated")
@given(data=st.data())
def test_mutated_plan(data):
    text = json.dumps(mutate(data, GOOD_PLAN))

    def parse():
        plan = Plan.from_json(text, layers=LAYERS, where="plan.json")
        plan.budgets(), plan.thetas()
        for lp in plan.layers:
            lp.top_groups(plan.theta_grid, 8)

    accepted_or_named(parse)


@fuzz("plan_text")
@given(text=st.text(max_size=200) | st.binary(max_size=200).map(lambda b: b.decode("latin1")))
def test_plan_of_random_text(text):
    accepted_or_named(lambda: Plan.from_json(text, layers=LAYERS, where="plan.json"))


# -- traces -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    with TraceWriter(root / "good.jsonl", layers=[0, 2], num_experts=6, top_k=2,
                     expert_bytes=4096, hidden_size=4) as w:  # fmt: skip
        for step, t in enumerate((3, 1, 1)):
            for layer in (0, 2):
                w.route(layer, [[(i + layer) % 6, (i + layer + 1) % 6] for i in range(t)],
                        [[0.6, 0.4]] * t, torch.ones(t, 4))  # fmt: skip
            w.end_step(prefill=step == 0, token_ids=list(range(t)))
    mer = [json.loads(line) for line in (root / "good.jsonl").read_text().splitlines()]
    pairs = [[[0, i % 6], [0, (i + 1) % 6], [2, i % 6], [2, (i + 3) % 6]] for i in range(4)]
    return root, mer, pairs


def read_all(path: Path) -> None:
    trace = read_trace(path)
    trace.step_bounds()
    if trace.hidden_file is not None:
        trace.hidden_states()


def _write_lines(path: Path, lines) -> None:
    lines = lines if isinstance(lines, list) else [lines]  # the edit replaced the whole file
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))


@fuzz("mer_trace_mutated")
@given(data=st.data())
def test_mutated_mer_trace(traces, data):
    root, mer, _ = traces
    _write_lines(root / "fuzzed.jsonl", mutate(data, mer))
    accepted_or_named(lambda: read_all(root / "fuzzed.jsonl"))


@fuzz("pairs_trace_mutated")
@given(data=st.data())
def test_mutated_pairs_trace(traces, data):
    root, _, pairs = traces
    _write_lines(root / "fuzzed.json", mutate(data, pairs))
    accepted_or_named(lambda: read_all(root / "fuzzed.json"))


@fuzz("trace_bytes")
@given(raw=st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_trace_of_random_bytes(traces, raw):
    root = traces[0]
    (root / "random.jsonl").write_bytes(raw)
    accepted_or_named(lambda: read_all(root / "random.jsonl"))
