"""Streaming experts from a store: bit-identical to the resident checkpoint at every cache
budget, for every architecture; slots always come back (errors, abandoned generators)."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
import torch
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.errors import ConfigError
from micro_expert_router.store import convert

ARCHS = ["mixtral", "qwen2moe", "qwen3moe", "olmoe"]


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_hf_model(request.param, root / "ckpt")
    store = convert(root / "ckpt", root / "store", progress=False, log=None)
    ids = torch.randint(0, 64, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = mer.load(root / "ckpt")
    logits = ref.logits(ids)
    tokens = [s.token for s in ref.generate(ids, 16, temperature=0, stop_at_eos=False)]
    sampled = [s.token for s in ref.generate(ids, 16, temperature=1.0, seed=5, stop_at_eos=False)]
    return root / "store", store.total_expert_bytes, ids, logits, tokens, sampled


@pytest.mark.parametrize("fraction", [0.0, 0.25, None])
def test_store_generation_is_bit_identical(case, fraction):
    store, expert_bytes, ids, logits, tokens, sampled = case
    budget = None if fraction is None else int(fraction * expert_bytes)
    with mer.load(store, cache_bytes=budget) as engine:
        assert np.array_equal(engine.logits(ids), logits)
        steps = list(engine.generate(ids, 16, temperature=0, stop_at_eos=False))
        assert [s.token for s in steps] == tokens
        got = [s.token for s in engine.generate(ids, 16, temperature=1.0, seed=5,
                                                stop_at_eos=False)]  # fmt: skip
        assert got == sampled
        needed = sum(s.experts_needed for s in steps)
        hits = sum(s.hits for s in steps)
        misses = sum(s.misses for s in steps)
        assert hits + misses == needed > 0
        if fraction == 0.0:
            assert hits == 0 and sum(s.bytes_read for s in steps) > 0
        if fraction is None:
            assert misses == 0  # everything was cached by the earlier logits() call
        if fraction == 0.25:
            # (LRU may still get no hits here: a token cycles through more experts than fit)
            p = engine.provider
            assert 0 < len(p.cache) and p.cache.used_bytes <= p.cache.budget_bytes <= budget


def test_reads_cut_into_small_chunks_give_the_same_bits(case):
    """io_chunk_kib: every expert read cut into 4 KiB pieces on 3 threads, nothing cached."""
    store, expert_bytes, ids, logits, tokens, _ = case
    with mer.load(store, cache_bytes=0, io_chunk_kib=4, io_threads=3) as engine:
        assert engine.provider.reader.chunk_bytes == 4096
        assert np.array_equal(engine.logits(ids), logits)
        steps = list(engine.generate(ids, 16, temperature=0, stop_at_eos=False))
        assert [s.token for s in steps] == tokens
        assert sum(s.bytes_read for s in steps) > 0
        assert engine.provider.pool.free_count == engine.provider.pool.total


def test_abandoned_generator_and_errors_return_every_slot(case, monkeypatch):
    store, expert_bytes, ids, *_ = case
    with mer.load(store, cache_bytes=expert_bytes // 4) as engine:
        pool = engine.provider.pool
        gen = engine.generate(ids, 30, temperature=0, stop_at_eos=False)
        next(gen)
        next(gen)
        del gen
        gc.collect()
        cached = len(engine.provider.cache)
        assert pool.free_count == pool.total - cached
        # an error in the middle of a layer's experts
        fmt = engine.provider.format
        calls = {"n": 0}
        real = type(fmt).partials

        def failing(self, x, w):
            calls["n"] += 1
            if calls["n"] == 7:
                raise RuntimeError("boom")
            yield from real(self, x, w)

        monkeypatch.setattr(type(fmt), "partials", failing)
        with pytest.raises(RuntimeError, match="boom"):
            for _ in engine.generate(ids, 8, temperature=0):
                pass
        monkeypatch.setattr(type(fmt), "partials", real)
        assert pool.free_count == pool.total - len(engine.provider.cache)
    assert pool.free_count == pool.total


def test_budget_zero_streams_every_expert_every_time(case):
    store, expert_bytes, ids, *_ = case
    with mer.load(store, cache_bytes=0) as engine:
        steps = list(engine.generate(ids[:4], 4, temperature=0, stop_at_eos=False))
        entry = next(iter(engine.provider.store.experts.values()))
        for s in steps:
            assert s.misses == s.experts_needed and s.bytes_read == s.misses * entry.length
        assert len(engine.provider.cache) == 0


@pytest.mark.parametrize("dtype", ["q8", "q4"])
def test_quantized_store_streams_bit_identically_to_resident(tmp_path, dtype):
    import transformers

    cfg = transformers.MixtralConfig(
        hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2, vocab_size=256,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg)
    model.model.embed_tokens.weight.data.normal_()
    model.save_pretrained(tmp_path / "ckpt")
    convert(tmp_path / "ckpt", tmp_path / "store", dtype=dtype, progress=False, log=None)
    ids = list(range(3, 40, 2))
    with (
        mer.load(tmp_path / "store", cache_bytes=0) as streamed,
        mer.load(tmp_path / "store") as resident,
    ):
        assert np.array_equal(streamed.logits(ids), resident.logits(ids))
        a = [s.token for s in streamed.generate(ids, 12, temperature=0, stop_at_eos=False)]
        b = [s.token for s in resident.generate(ids, 12, temperature=0, stop_at_eos=False)]
        assert a == b
        assert streamed.provider.stats.hits == 0 and streamed.provider.stats.bytes_read > 0


@pytest.mark.parametrize("theta", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_split_experts_are_bit_identical(case, theta):
    store, expert_bytes, ids, logits, tokens, sampled = case
    for budget in (expert_bytes // 3, None):
        with mer.load(store, cache_bytes=budget, split=theta) as engine:
            assert np.array_equal(engine.logits(ids), logits)
            steps = list(engine.generate(ids, 16, temperature=0, stop_at_eos=False))
            assert [s.token for s in steps] == tokens
            p = engine.provider
            assert p.cache.used_bytes <= p.cache.budget_bytes
            if budget is None and theta > 0:
                assert sum(s.hits for s in steps) > 0


def test_split_hit_reads_only_the_bottom(case):
    store, expert_bytes, ids, *_ = case
    with mer.load(store, split=0.25) as engine:
        engine.logits(ids)  # every needed expert is now cached (its top quarter)
        p = engine.provider
        entry = next(iter(p.store.experts.values()))
        before = p.stats.snapshot()
        engine.logits(ids)
        d = p.stats.minus(before)
        assert d.misses == 0 and d.hits == d.experts_needed > 0
        top = entry.length // 4
        assert d.bytes_read == d.hits * (entry.length - top)
        assert p.top_pools and p.pool_bytes < p.pool.nbytes + len(p.store.experts) * entry.length


def test_split_miss_reads_its_top_into_the_cache_slot(case):
    """A miss of a split expert reads top and bottom as two reads; the top lands in a top-pool
    slot that becomes the cache entry as is, holding exactly the store's top bytes."""
    store, expert_bytes, ids, *_ = case
    with mer.load(store, split=0.5) as engine:
        p = engine.provider
        engine.logits(ids)  # all misses: every needed expert's top is now cached
        d = p.stats
        assert d.hits == 0 and d.misses == d.experts_needed > 0
        entry = next(iter(p.store.experts.values()))
        assert d.bytes_read == d.misses * entry.length  # top + bottom, no more
        (pool,) = p.top_pools.values()
        cached = [(k, p.cache.peek(k)) for k in p.store.experts if k in p.cache]
        assert len(cached) == min(d.misses, pool.total - p.window - 1) > 0
        for key, c in cached:
            e = p.store.experts[key]
            assert c.lease.pool is pool
            with open(e.file, "rb") as f:
                f.seek(e.offset)
                want = f.read(e.length // 2)
            assert c.view is not None and bytes(c.lease.memoryview(len(want))) == want


def test_split_ratio_off_the_grid_is_refused(case):
    store, *_ = case
    with pytest.raises(ConfigError, match="not a multiple of 1/8"):
        mer.load(store, split=0.3)


def test_plan_file_sets_per_layer_budgets_and_splits(case, tmp_path):
    from micro_expert_router.plan import LayerPlan, Plan

    store, expert_bytes, ids, logits, tokens, _ = case
    with mer.load(store, cache_bytes=0) as probe:
        a = probe.args
        layers = [i for i in range(a.n_layers) if a.moe_layers[i]]
        entry = probe.provider.store.expert_bytes
    # different budgets and split ratios per layer: 1/4, 1/2, 3/4, 1, ...
    lps = tuple(LayerPlan(layer, (j + 2) * entry, (j % 4 + 1) * 2) for j, layer in
                enumerate(layers))  # fmt: skip
    plan = Plan(sum(lp.budget_bytes for lp in lps), 8, lps)
    path = tmp_path / "plan.json"
    path.write_text(plan.to_json())
    with mer.load(store, plan=str(path)) as engine:
        p = engine.provider
        assert p.thetas == plan.thetas()
        assert np.array_equal(engine.logits(ids), logits)
        steps = engine.generate(ids, 16, temperature=0, stop_at_eos=False)
        assert [s.token for s in steps] == tokens
        assert p.cache.used_bytes <= plan.budget_bytes
    path.write_text(plan.to_json().replace('"layer": 0', '"layer": 99'))
    with pytest.raises(ConfigError, match="plan"):
        mer.load(store, plan=str(path))
    with pytest.raises(ConfigError, match="either a plan or cache_bytes"):
        mer.load(store, plan=str(path), cache_bytes=10)


def test_generate_json_reports_how_experts_were_cached_and_read(capsys):
    """`mer generate --json` on a store names the cache policy (LCP by default), the I/O
    threads and the read chunk, as given or defaulted."""
    from micro_expert_router.cli import main

    for extra, want in [([], {"policy": "lcp", "io_threads": 4, "io_chunk_kib": 1024}),
                        (["--policy", "lru", "--io-threads", "2", "--io-chunk-kib", "64"],
                         {"policy": "lru", "io_threads": 2, "io_chunk_kib": 64})]:  # fmt: skip
        rc = main(["generate", "--prompt-ids", "1,2,3", "--max-tokens", "2", "--json", *extra])
        out = capsys.readouterr().out
        assert rc == 0
        assert json.loads(out.strip().splitlines()[-1])["reads"] == want
