"""Synthetic routers (routers.py): the trace replay is exact and bypasses the gates, the Markov
sampler's routing matches its source's per-layer reuse and expert popularity within the bounds
of docs/router.md (on a trace the test writes, and on the OLMoE trace in shared/data when it is
there), and traces that do not fit the model are refused with a clear error."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import micro_expert_router as mer
from micro_expert_router import routers
from micro_expert_router.config import ModelArgs
from micro_expert_router.errors import ConfigError, TraceError
from micro_expert_router.trace import TraceWriter, read_trace

# the bounds stated in docs/router.md
REUSE_BOUND = 0.03  # |reuse(generated) - reuse(source)| per layer
TV_BOUND = 0.15  # total-variation distance of the per-layer popularity histograms

SHARED = Path(os.environ.get("MER_SHARED_DATA",
                             Path(__file__).resolve().parents[2] / "shared" / "data"))  # fmt: skip
OLMOE = SHARED / "traces" / "olmoe-1b-7b-llamacpp" / "olmoe-all.tokens.jsonl"


def args_of(layers: int, experts: int, k: int) -> ModelArgs:
    return ModelArgs.from_hf({
        "architectures": ["OlmoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
        "num_hidden_layers": layers, "vocab_size": 100, "num_experts": experts,
        "num_experts_per_tok": k, "intermediate_size": 32,
    })  # fmt: skip


def sticky_routing(tokens: int, layers: int, e: int, k: int, seed: int = 0) -> np.ndarray:
    """A routing with locality (each layer keeps some of the previous token's experts, more in
    late layers) and skewed popularity (Zipf-like per layer), [T, L, K]."""
    rng = np.random.default_rng(seed)
    pop = 1.0 / (1 + np.arange(e)) ** 0.8
    out = np.zeros((tokens, layers, k), np.int64)
    for j in range(layers):
        p = rng.permutation(pop)
        p /= p.sum()
        keep = 0.2 + 0.5 * j / max(layers - 1, 1)
        prev = rng.choice(e, k, replace=False, p=p)
        for t in range(tokens):
            kept = [x for x in prev if rng.random() < keep]
            rest = np.setdiff1d(np.arange(e), kept)
            new = rng.choice(rest, k - len(kept), replace=False, p=p[rest] / p[rest].sum())
            prev = np.array(kept + new.tolist())
            out[t, j] = prev
    return out


def write_trace(path: Path, experts: np.ndarray, layers: list[int], e: int) -> Path:
    t, n, k = experts.shape
    w = np.tile(np.linspace(1.0, 0.5, k) / np.linspace(1.0, 0.5, k).sum(), (n, 1))  # [L, K]
    with TraceWriter(path, layers=layers, num_experts=e, top_k=k, model={"arch": "test"}) as tw:
        for i in range(t):
            for j, layer in enumerate(layers):
                tw.route(layer, experts[i, j][None], w[j][None])
            tw.end_step(prefill=False, token_ids=[i % 7])
    return path


def test_markov_matches_a_synthetic_trace(tmp_path):
    src = sticky_routing(500, 4, 16, 2)
    path = write_trace(tmp_path / "src.trace", src, [0, 1, 2, 3], 16)
    r = routers.MarkovRouter(read_trace(path), args_of(4, 16, 2), f"markov:{path}", seed=3)
    gen = r.sample(800)
    assert gen.shape == (800, 4, 2)
    assert all(len(set(row)) == 2 for row in gen.reshape(-1, 2).tolist())  # distinct per token
    c = routers.compare(src, gen, 16)
    print(json.dumps({k: c[k] for k in ("max_reuse_diff", "max_popularity_tv")}))
    assert c["max_reuse_diff"] <= REUSE_BOUND, c
    assert c["max_popularity_tv"] <= TV_BOUND, c
    # not a copy of the trace, and a different seed gives a different routing
    assert not np.array_equal(gen[:500], src)
    r.seed = 4
    assert not np.array_equal(r.sample(50), gen[:50])
    # a flat router (uniform, no locality) would be far off: the bound can fail
    flat = np.stack([np.stack([np.random.default_rng(t * 8 + j).choice(16, 2, replace=False)
                               for j in range(4)]) for t in range(800)])  # fmt: skip
    bad = routers.compare(src, flat, 16)
    assert bad["max_reuse_diff"] > REUSE_BOUND or bad["max_popularity_tv"] > TV_BOUND


@pytest.mark.skipif(not OLMOE.is_file(), reason="shared/data OLMoE trace not present")
def test_markov_matches_the_olmoe_trace():
    tr = read_trace(OLMOE)
    r = routers.MarkovRouter(tr, args_of(16, 64, 8), f"markov:{OLMOE}", seed=0)
    gen = r.sample(800)
    c = routers.compare(tr.experts, gen, 64)
    print(json.dumps({k: c[k] for k in ("max_reuse_diff", "max_popularity_tv")}))
    assert c["max_reuse_diff"] <= REUSE_BOUND, c
    assert c["max_popularity_tv"] <= TV_BOUND, c


@pytest.mark.skipif(not OLMOE.is_file(), reason="shared/data OLMoE trace not present")
def test_trace_router_replays_the_olmoe_trace():
    tr = read_trace(OLMOE)
    r = routers.TraceRouter(tr, args_of(16, 64, 8), f"trace:{OLMOE}")
    rows = []
    for _ in range(tr.num_tokens + 3):  # past the end: wraps to the first token
        rows.append(np.stack([r.route(layer, 1, torch.float32)[0][0].numpy()
                              for layer in range(16)]))  # fmt: skip
    got = np.stack(rows)
    assert np.array_equal(got[: tr.num_tokens], tr.experts)
    assert np.array_equal(got[tr.num_tokens :], tr.experts[:3]) and r.wraps == 1


def test_refuses_traces_that_do_not_fit(tmp_path):
    src = sticky_routing(20, 2, 16, 2)
    path = write_trace(tmp_path / "t.trace", src, [0, 1], 16)
    tr = read_trace(path)
    with pytest.raises(TraceError, match="2 MoE layers, but the model has 4"):
        routers.TraceRouter(tr, args_of(4, 16, 2), "trace:x")
    with pytest.raises(TraceError, match="16 experts per layer, the model 32"):
        routers.TraceRouter(tr, args_of(2, 32, 2), "trace:x")
    with pytest.raises(TraceError, match="top-2"):
        routers.MarkovRouter(tr, args_of(2, 16, 4), "markov:x")
    r = routers.TraceRouter(tr, args_of(1, 16, 1), "trace:x")  # fewer layers and top-k: cut
    assert r.route(0, 3, torch.float32)[0].tolist() == src[:3, 0, :1].tolist()
    for bad in ("trace", "replay:x", "markov:"):
        with pytest.raises(ConfigError, match="trace:FILE or markov:FILE"):
            routers.make_router(bad, tmp_path)


@pytest.fixture(scope="module")
def demo_store():
    from micro_expert_router.demo.store import demo_store_path

    return demo_store_path()


def test_engine_routes_from_the_trace_not_the_gates(tmp_path, demo_store):
    src = sticky_routing(64, 4, 16, 2, seed=5)
    path = write_trace(tmp_path / "src.trace", src, [0, 1, 2, 3], 16)
    ids = list(range(1, 9))
    with mer.load(demo_store, router=f"trace:{path}") as eng:
        assert eng.model.router.benchmark_only
        for _ in range(2):  # each generation replays from the first token
            list(eng.generate(ids, 6, temperature=0, stop_at_eos=False,
                              trace=tmp_path / "rec.trace"))  # fmt: skip
            rec = read_trace(tmp_path / "rec.trace")
            assert np.array_equal(rec.experts, src[: rec.num_tokens])  # 8 prompt + 5 decode
    with mer.load(demo_store) as eng:  # without it, the model's own gates
        list(eng.generate(ids, 6, temperature=0, stop_at_eos=False, trace=tmp_path / "own"))
    assert not np.array_equal(read_trace(tmp_path / "own").experts, src[:13])
    with mer.load(demo_store, router=f"markov:{path}") as eng:
        steps = list(eng.generate(ids, 6, temperature=0, stop_at_eos=False))
        assert len(steps) == 6


def test_cli_marks_the_output_benchmark_only(tmp_path, demo_store, capsys):
    from micro_expert_router.cli import main

    path = write_trace(tmp_path / "src.trace", sticky_routing(64, 4, 16, 2), [0, 1, 2, 3], 16)
    rc = main(["generate", "--model", str(demo_store), "--router", f"markov:{path}",
               "--max-tokens", "4", "--json", "--memory-limit", "2G"])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0
    d = json.loads(out.out.strip().splitlines()[-1])
    assert d["benchmark_only"] is True and d["router"] == f"markov:{path}"
    assert d["memory"]["limit"] == 2_000_000_000 and d["memory"]["cache"] > 0
    assert "BENCHMARK ONLY" in out.err
