"""``Transformer.forward_batch``: B sequences decoding together give the logits each gives alone,
and each layer fetches the union of the batch's experts once."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.errors import BudgetError


@pytest.mark.parametrize("arch", ["qwen2moe", "olmoe"])
def test_batch_decode_matches_each_sequence_alone(tmp_path, arch):
    save_hf_model(arch, tmp_path / "ckpt")
    engine = mer.load(tmp_path / "ckpt")
    m = engine.model
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 64, (n,), generator=g) for n in (5, 9, 3)]
    feeds = [torch.randint(0, 64, (4,), generator=g) for _ in prompts]
    alone = []
    for p, f in zip(prompts, feeds, strict=True):
        kv = m.new_cache(16)
        m.forward(p, kv)
        alone.append(np.stack([m.forward(f[j : j + 1], kv)[0].numpy() for j in range(4)]))
    caches = [m.new_cache(16) for _ in prompts]
    for p, kv in zip(prompts, caches, strict=True):
        m.forward(p, kv)
    needed = []
    for j in range(4):
        before = m.provider.stats.experts_needed
        out = m.forward_batch([int(f[j]) for f in feeds], caches).numpy()  # [B, V]
        needed.append(m.provider.stats.experts_needed - before)
        for b in range(len(prompts)):
            np.testing.assert_allclose(out[b], alone[b][j], rtol=1e-5, atol=1e-5)
    assert [kv.length for kv in caches] == [9, 13, 7]
    # the union of experts is fetched once per layer: never more than B x top-k per layer
    a = m.args
    assert max(needed) <= sum(a.moe_layers) * min(a.n_experts, len(prompts) * a.top_k)


def test_batch_rejects_shared_or_full_caches(tmp_path):
    save_hf_model("olmoe", tmp_path / "ckpt")
    m = mer.load(tmp_path / "ckpt").model
    kv = m.new_cache(2)
    with pytest.raises(ValueError, match="its own KV cache"):
        m.forward_batch([1, 2], [kv, kv])
    m.forward(torch.tensor([1, 2]), kv)
    with pytest.raises(BudgetError, match="max_context"):
        m.forward_batch([3], [kv])
