"""The shared blocks of models/ against the transformers modules they follow: RoPE tables (YaRN
with its attention factor, partial rotary), DeepSeek routing (group-limited greedy, noaux_tc with
the correction bias, softmax and sigmoid scores) and MLA attention (prefill, then decode by the
absorbed and the expanded path) on the tiny random configs of ``hf_families.py``."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from hf_families import build_family_model  # noqa: E402

from micro_expert_router.config import ModelArgs  # noqa: E402
from micro_expert_router.models.mla import MLA, LatentCache  # noqa: E402
from micro_expert_router.models.rope import rope_tables  # noqa: E402
from micro_expert_router.models.routing import route  # noqa: E402

CASES = ["dsv2", "dsv2-lora-greedy", "dsv3", "dsv3-plain", "glm", "glm-plain"]


@pytest.fixture(scope="module", params=CASES)
def case(request):
    model = build_family_model(request.param)
    cfg = dict(model.config.to_dict(), architectures=[type(model).__name__])
    args = ModelArgs.from_hf(cfg)
    return request.param, model, args


def test_rope_tables_match_transformers(case):
    _, model, a = case
    x = torch.zeros(1, 5, 4)
    pos = torch.arange(70)[None]
    out = model.model.rotary_emb(x, pos)
    cos, sin = rope_tables(a, 70, torch.float32)
    if isinstance(out, torch.Tensor):  # DeepSeek-V2: complex exp(i f) x attention factor
        r = a.rotary_dim // 2
        torch.testing.assert_close(cos[:, :r], out[0].real, rtol=0, atol=1e-6)
        torch.testing.assert_close(sin[:, :r], out[0].imag, rtol=0, atol=1e-6)
    else:
        torch.testing.assert_close(cos, out[0][0], rtol=0, atol=1e-6)
        torch.testing.assert_close(sin, out[1][0], rtol=0, atol=1e-6)


def test_router_matches_transformers(case):
    _, model, a = case
    w = model.state_dict()
    torch.manual_seed(1)
    x = torch.randn(40, a.hidden_size)
    for i in range(a.n_layers):
        if not a.moe_layers[i]:
            continue
        _, ref_w, ref_e = model.model.layers[i].mlp.gate(x)
        experts, weights = route(a, w, i, x)
        ref = torch.zeros(40, a.n_experts).scatter_(1, ref_e, ref_w)
        got = torch.zeros(40, a.n_experts).scatter_(1, experts, weights)
        torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
        # rank order: the weights of a token decrease along K (sigmoid/softmax scores)
        assert len(set(experts[0].tolist())) == a.top_k


@pytest.mark.parametrize("absorbed", [True, False])
def test_mla_prefill_and_decode_match_transformers(case, absorbed):
    name, model, a = case
    if a.attention != "mla":
        pytest.skip("GQA family")
    torch.manual_seed(2)
    t = 12
    h = torch.randn(1, t, a.hidden_size)
    attn = model.model.layers[1].self_attn
    pos = torch.arange(t)[None]
    pe = model.model.rotary_emb(h, pos)
    mask = torch.full((t, t), float("-inf")).triu(1)[None, None]
    ref, _ = attn(hidden_states=h, attention_mask=mask, position_embeddings=pe)
    cos, sin = rope_tables(a, 64, torch.float32)
    mla = MLA(a, model.state_dict(), cos, sin, absorbed=absorbed)
    kv = LatentCache.empty(a, 64, torch.float32)
    got = [mla(1, h[0, :7], kv, 0)]  # a prompt, then five decode steps
    for p in range(7, t):
        got.append(mla(1, h[0, p : p + 1], kv, p))
    torch.testing.assert_close(torch.cat(got), ref[0], rtol=1e-4, atol=1e-5)


def test_latent_cache_bytes_per_token(case):
    _, _, a = case
    if a.attention != "mla":
        pytest.skip("GQA family")
    kv = LatentCache.empty(a, 100, torch.bfloat16)
    per_token = (a.kv_lora_rank + a.qk_rope_head_dim) * a.n_layers * 2
    assert kv.nbytes == 100 * per_token == 100 * a.kv_bytes_per_token(2)
