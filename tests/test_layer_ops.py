"""The fused per-layer ops of kernels/layer_ops.cpp against independent references: RMSNorm
against a float64 NumPy computation, RoPE + KV append + decode attention against the torch
expressions the model used before (cache rows bit for bit, attention to rounding)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.kernels import attention
from micro_expert_router.kernels.attention import decode_attention_torch
from micro_expert_router.kernels.layer_ops import (
    rms_norm,
    rms_norm_torch,
    rope_attend,
    router_topk,
)

needs_native = pytest.mark.skipif(not attention.available(), reason="no native layer ops here")


def rms_ref(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return w.astype(np.float64) * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


@needs_native
@pytest.mark.parametrize("d", [7, 64, 2048, 2050])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_float64_reference(d, wdtype):
    g = torch.Generator().manual_seed(d)
    x = torch.randn(3, 5, d, generator=g) * 3
    w = (torch.randn(d, generator=g) + 1).to(wdtype)
    y = rms_norm(x, w, 1e-6)
    assert y.shape == x.shape and y.dtype == torch.float32
    ref = rms_ref(x.numpy(), w.float().numpy(), 1e-6)
    assert np.abs(y.numpy() - ref).max() <= 4e-6 * np.abs(ref).max()
    # and the HuggingFace expression it replaces, to rounding
    torch.testing.assert_close(y, rms_norm_torch(x, w, 1e-6).float(), rtol=1e-5, atol=1e-6)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), dim=-1) * sin


@needs_native
@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("heads", "kv_heads", "window"), [(4, 4, None), (8, 2, None), (4, 2, 5)])
def test_rope_attend_matches_torch(kv_dtype, heads, kv_heads, window):
    g = torch.Generator().manual_seed(heads * 10 + kv_heads)
    dh, cap, pos = 16, 32, 11
    kc = torch.randn(kv_heads, cap, dh, generator=g).to(kv_dtype)
    vc = torch.randn(kv_heads, cap, dh, generator=g).to(kv_dtype)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q = torch.randn(heads, dh, generator=g)
    k = torch.randn(kv_heads, dh, generator=g)
    v = torch.randn(kv_heads, dh, generator=g)
    cos, sin = torch.rand(dh, generator=g), torch.rand(dh, generator=g)

    qr, kr = rotate(q, cos, sin), rotate(k, cos, sin)
    kc_ref[:, pos] = kr
    vc_ref[:, pos] = v
    want = decode_attention_torch(qr, kc_ref, vc_ref, pos + 1, dh**-0.5, window)

    out = rope_attend(q.clone(), k.clone(), v, kc, vc, cos, sin, pos, dh**-0.5, window)
    assert torch.equal(kc, kc_ref) and torch.equal(vc, vc_ref)  # the rows the torch path writes
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)


def test_rope_attend_declines_other_dtypes():
    q = torch.zeros(2, 4, dtype=torch.bfloat16)
    k = torch.zeros(2, 4, dtype=torch.bfloat16)
    c = torch.zeros(2, 8, 4)
    assert rope_attend(q, k, k, c, c, torch.ones(4), torch.zeros(4), 0, 0.5) is None


@needs_native
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("e,k,d", [(64, 8, 2048), (8, 2, 100), (60, 4, 64)])
def test_router_topk_matches_float64_reference(wdtype, norm, e, k, d):
    """Same experts in the same order as float64 softmax + top-k, weights within 1e-5
    relative (the logits' sum order differs from torch's GEMV, the experts may not)."""
    g = torch.Generator().manual_seed(e + k + d)
    x = torch.randn(5, d, generator=g)
    w = (torch.randn(e, d, generator=g) * d**-0.5).to(wdtype)
    got = router_topk(x, w, k, norm)
    assert got is not None
    ids, wts = got
    p = torch.softmax(x.double() @ w.double().T, dim=-1)  # [T, E]
    want_w, want_ids = torch.topk(p, k, dim=-1)
    if norm:
        want_w = want_w / want_w.sum(dim=-1, keepdim=True)
    assert ids.dtype == torch.int64 and wts.dtype == torch.float32
    assert torch.equal(ids, want_ids)
    assert torch.allclose(wts.double(), want_w, rtol=1e-5, atol=1e-7)


@needs_native
def test_router_topk_ties_go_to_the_lower_id_and_bad_shapes_fail():
    x = torch.ones(1, 16)
    w = torch.zeros(6, 16)
    w[3] = w[5] = 1.0  # experts 3 and 5 tie for first, the other four for third
    ids, wts = router_topk(x, w, 3, False)
    assert ids.tolist() == [[3, 5, 0]]
    assert router_topk(x.double(), w, 3, False) is None  # other dtypes: the torch path
    with pytest.raises(RuntimeError, match="router_topk_"):
        router_topk(x, w, 7, False)  # K > E


@needs_native
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_router_topk_same_bits_at_one_and_two_threads(wdtype):
    """The logits run in parallel over experts; each is one dot product in a fixed order, so the
    split does not change a bit."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, 2050, generator=g)  # a tail after the last eight
    w = (torch.randn(64, 2050, generator=g) * 2050**-0.5).to(wdtype)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = router_topk(x, w, 8, True)
        torch.set_num_threads(2)
        two = router_topk(x, w, 8, True)
    finally:
        torch.set_num_threads(n)
    assert one is not None and two is not None
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


@needs_native
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_router_logits_keep_dot_rows_lanes_and_tree(wdtype):
    """The logits are sums in eight lanes (lane j: the products at d = j mod 8, in order) joined
    by the tree ((0 + 4) + (1 + 5)) + ((2 + 6) + (3 + 7)). Expert 2p + 1 is expert 2p with lanes
    0 and 4 swapped (x equal in those lanes), so in that order each pair's logits are equal: a
    tie, equal weights. Logits of about 10 make a one-ulp difference show in the weights, and
    16 pairs make a running sum or another tree break at least one tie."""
    d, pairs = 2051, 16  # a tail after the last eight
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, d, generator=g)
    x[0, 4 : d - 3 : 8] = x[0, 0 : d - 7 : 8]
    w = torch.empty(2 * pairs, d, dtype=wdtype)
    for p in range(pairs):
        r = torch.randn(d, generator=g)
        a = (r * ((10.0 + 0.37 * p) / float(x[0] @ r))).to(wdtype)  # logit about 10 + 0.37 p
        b = a.clone()
        b[0 : d - 7 : 8], b[4 : d - 3 : 8] = a[4 : d - 3 : 8], a[0 : d - 7 : 8]
        w[2 * p], w[2 * p + 1] = a, b
    # the draw tells orders apart: a running sum breaks some pair's tie in float32
    run = np.cumsum((x * w.float()).numpy(), axis=1, dtype=np.float32)[:, -1]
    assert any(run[2 * p] != run[2 * p + 1] for p in range(pairs))
    ids, wts = router_topk(x, w, 2 * pairs, False)
    by_id = dict(zip(ids[0].tolist(), wts[0].tolist(), strict=True))
    assert all(by_id[2 * p] == by_id[2 * p + 1] for p in range(pairs))
    assert all(ids[0, 2 * j].item() + 1 == ids[0, 2 * j + 1].item() for j in range(pairs))
