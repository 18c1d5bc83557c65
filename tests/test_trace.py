"""Routing traces: the writer and reader round-trip, the third-party pairs format, sniffing by
content, and a clear TraceError for every kind of garbage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from micro_expert_router.errors import TraceError
from micro_expert_router.trace import PAIRS_FORMAT, Trace, TraceWriter, read_trace

OLMOE = Path(__file__).resolve().parents[1].parent / "shared/data/traces/olmoe-1b-7b-llamacpp"


def record(path, rng, steps=((4, True), (1, False), (1, False)), hidden=8, weights=True):
    """Write a trace step by step as the engine would; return what went in."""
    layers, k, e = (1, 3, 4), 2, 6
    got = {"experts": [], "weights": [], "hidden": [], "prefill": [], "step": [], "ids": []}
    with TraceWriter(path, layers=layers, num_experts=e, top_k=k, model={"name": "tiny"},
                     expert_bytes=4096, hidden_size=hidden) as w:  # fmt: skip
        for s, (t, prefill) in enumerate(steps):
            ex = np.stack([np.stack([rng.permutation(e)[:k] for _ in range(t)])
                           for _ in layers], axis=1)  # [T, L, K]  # fmt: skip
            wt = rng.random((t, len(layers), k)).astype(np.float32)
            h = rng.standard_normal((t, len(layers), hidden or 1)).astype(np.float32)
            for j, layer in enumerate(reversed(layers)):  # any layer order within a step
                j = len(layers) - 1 - j
                w.route(layer, torch.tensor(ex[:, j]), wt[:, j] if weights else None,
                        h[:, j] if hidden else None)  # fmt: skip
            ids = rng.integers(0, 100, t)
            w.end_step(prefill=prefill, token_ids=ids)
            got["experts"].append(ex), got["weights"].append(wt), got["hidden"].append(h)
            got["prefill"] += [prefill] * t
            got["step"] += [s] * t
            got["ids"].append(ids)
    return {k: np.concatenate(v) if k in ("experts", "weights", "hidden", "ids") else np.array(v)
            for k, v in got.items()}  # fmt: skip


def test_writer_reader_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    want = record(tmp_path / "run.trace", rng)
    tr = read_trace(tmp_path / "run.trace")
    assert tr.format == "mer-trace" and tr.layers == (1, 3, 4) and tr.num_experts == 6
    assert (tr.num_tokens, tr.num_layers, tr.top_k, tr.num_steps) == (6, 3, 2, 3)
    assert np.array_equal(tr.experts, want["experts"])
    assert np.allclose(tr.weights, want["weights"], atol=1e-6)
    assert np.array_equal(tr.prefill, want["prefill"]) and np.array_equal(tr.step, want["step"])
    assert np.array_equal(tr.token_ids, want["ids"])
    assert tr.step_bounds() == [(0, 4), (4, 5), (5, 6)]
    assert tr.model == {"name": "tiny"} and tr.expert_bytes == 4096
    h = tr.hidden_states()
    assert h.dtype == np.float16 and np.allclose(h, want["hidden"], atol=2e-3, rtol=1e-3)
    assert not tr.experts.flags.writeable


def test_without_weights_or_hidden(tmp_path):
    record(tmp_path / "t.jsonl", np.random.default_rng(1), hidden=None, weights=False)
    tr = read_trace(tmp_path / "t.jsonl")
    assert tr.weights is None and tr.hidden_file is None
    with pytest.raises(TraceError, match="no hidden states"):
        tr.hidden_states()


def test_interrupted_recording_reads_up_to_the_last_step(tmp_path):
    w = TraceWriter(tmp_path / "cut.trace", layers=[0], num_experts=4, top_k=1, hidden_size=2)
    w.route(0, [[1]], [[1.0]], [[0.5, 0.5]])
    w.end_step()
    w.route(0, [[2]], [[1.0]], [[0.5, 0.5]])  # never ended: the process died
    tr = read_trace(tmp_path / "cut.trace")
    assert tr.experts.tolist() == [[[1]]]
    with pytest.raises(TraceError, match="interrupted"):
        tr.hidden_states()  # the .npy header was never finished
    w.close()
    assert read_trace(tmp_path / "cut.trace").hidden_states().shape == (1, 1, 2)


def test_writer_rejects_misuse(tmp_path):
    with TraceWriter(tmp_path / "x", layers=[0, 1], num_experts=4, top_k=2) as w:
        with pytest.raises(ValueError, match="not one of"):
            w.route(5, [[0, 1]])
        with pytest.raises(ValueError, match=r"\[T, 2\]"):
            w.route(0, [[0, 1, 2]])
        w.route(0, [[0, 1]])
        with pytest.raises(ValueError, match="before layers"):
            w.end_step()


def write_pairs(path, tokens):
    path.write_text("".join(json.dumps(t) + "\n" for t in tokens))


def test_pairs_format_sniffed_by_content(tmp_path):
    tokens = [[[0, 3], [0, 1], [2, 0], [2, 4]], [[0, 1], [0, 2], [2, 4], [2, 3]]]
    write_pairs(tmp_path / "anything.txt", tokens)
    tr = read_trace(tmp_path / "anything.txt")
    assert tr.format == PAIRS_FORMAT and tr.layers == (0, 2) and tr.top_k == 2
    assert tr.experts.tolist() == [[[3, 1], [0, 4]], [[1, 2], [4, 3]]]
    assert tr.num_experts == 5 and read_trace(tmp_path / "anything.txt", 64).num_experts == 64
    assert not tr.prefill.any() and tr.num_steps == 2 and (tr.token_ids == -1).all()
    with pytest.raises(TraceError, match="num_experts is 3"):
        read_trace(tmp_path / "anything.txt", 3)


GARBAGE = {
    "empty": (b"", "empty"),
    "binary": (b"\x93NUMPY\x01\x00\xff\xfe\x00", "not UTF-8|not JSON"),
    "text": (b"hello world\n", "not JSON"),
    "object": (b'{"tokens": []}\n', "neither a mer-trace header"),
    "truncated": (b"[[0, 1], [1, 2]]\n[[0, 1], [1,", "line 2 is not JSON"),
    "ragged": (b"[[0, 1], [1, 2]]\n[[0, 1]]\n", "line 2: expected 1 experts"),
    "regrouped": (b"[[0, 1], [1, 2]]\n[[1, 2], [0, 1]]\n", "grouped by layer"),
    "floats": (b"[[0, 1.5], [1, 2]]\n", "line 1 is not a list of"),
    "negative": (b"[[0, -1], [1, 2]]\n", "outside"),
    "twice": (b"[[0, 1], [0, 1]]\n", "names an expert twice"),
    "version": (b'{"format": "mer-trace", "version": 9}\n', "version 9"),
    "header": (b'{"format": "mer-trace", "version": 1, "layers": [0]}\n', "bad header"),
    "token": (b'{"format": "mer-trace", "version": 1, "layers": [0], "num_experts": 4, '
              b'"top_k": 1}\n{"i": 0, "experts": [[1, 2]]}\n', "line 2: experts must be"),
    "index": (b'{"format": "mer-trace", "version": 1, "layers": [0], "num_experts": 4, '
              b'"top_k": 1}\n{"i": 3, "experts": [[1]]}\n', "token index 3"),
    "range": (b'{"format": "mer-trace", "version": 1, "layers": [0], "num_experts": 4, '
              b'"top_k": 1}\n{"i": 0, "experts": [[4]]}\n', "outside"),
    "weight": (b'{"format": "mer-trace", "version": 1, "layers": [0], "num_experts": 4, '
               b'"top_k": 1}\n{"i": 0, "experts": [[1]], "weights": [[1e300]]}\n',
               "not a finite float32"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(GARBAGE))
def test_garbage_is_a_trace_error_naming_the_file(tmp_path, name):
    data, words = GARBAGE[name]
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(data)
    with pytest.raises(TraceError, match=words) as e:
        read_trace(path)
    assert str(path) in str(e.value)


def test_missing_file(tmp_path):
    with pytest.raises(TraceError, match="cannot open"):
        read_trace(tmp_path / "nope.jsonl")


def test_from_arrays_validates():
    with pytest.raises(TraceError, match="twice"):
        Trace.from_arrays([[[1, 1]]], 4)
    with pytest.raises(TraceError, match="steps"):
        Trace.from_arrays([[[1]], [[2]]], 4, step=[0, 2])
    assert Trace.from_arrays(np.zeros((0, 2, 1), int), 4).num_steps == 0


@pytest.mark.skipif(not OLMOE.is_dir(), reason="../shared/data is not present")
def test_the_olmoe_trace_reads():
    tr = read_trace(OLMOE / "olmoe-all.tokens.jsonl")
    assert (tr.num_tokens, tr.num_layers, tr.top_k, tr.num_experts) == (897, 16, 8, 64)
    assert tr.format == PAIRS_FORMAT and tr.layers == tuple(range(16))
