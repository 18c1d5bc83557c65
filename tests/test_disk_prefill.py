"""Prefill of a prompt larger than the cache (issue 13, point 6): every layer needs every expert,
the cache holds a few, and the read slots a handful; the step still runs, reads each needed
expert exactly once per layer, returns every slot, and gives the resident checkpoint's bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.store import convert


@pytest.fixture(scope="module")
def olmoe(tmp_path_factory):
    root = tmp_path_factory.mktemp("olmoe")
    save_hf_model("olmoe", root / "ckpt")
    store = convert(root / "ckpt", root / "store", progress=False, log=None)
    return root, store


@pytest.mark.parametrize("cached_experts", [0, 2])
def test_prefill_larger_than_the_cache_reads_each_expert_once(olmoe, cached_experts):
    root, store = olmoe
    a = store.args
    ids = torch.randint(0, a.vocab_size, (64,), generator=torch.Generator().manual_seed(0))
    ids = ids.tolist()
    with mer.load(root / "ckpt") as ref:
        want = ref.logits(ids)
    with mer.load(store.path, cache_bytes=cached_experts * store.expert_bytes) as eng:
        p = eng.provider
        staging = p.pool.total - p.cache_bytes // p.slot_bytes
        assert staging < a.n_experts  # the read slots cannot hold a layer's experts at once
        layers = sum(a.moe_layers)
        before = p.stats.snapshot()
        got = eng.logits(ids)
        d = p.stats.minus(before)
        assert np.array_equal(got, want)
        # one acquire per layer: each needed expert counted (and read on a miss) once
        assert d.experts_needed <= layers * a.n_experts
        assert d.experts_needed > layers * a.top_k  # the prompt spreads over many experts
        assert d.bytes_read == d.misses * store.expert_bytes
        assert d.hits == 0  # a cold cache and one acquire per layer: nothing to hit
        assert p.pool.free_count == p.pool.total - len(p.cache)
