"""Decode attention (kernels/attention.py): the native kernel and the torch fallback against a
float64 NumPy reference, for f32 and bf16 caches, GQA, a sliding window and attention sinks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.kernels import attention
from micro_expert_router.kernels.attention import decode_attention, decode_attention_torch


def reference(q, k, v, length, scale, window=None, sinks=None):
    """float64: softmax(q K^T * scale [+ sink column]) V over rows [s0, length)."""
    q, k, v = (np.asarray(t.float().numpy(), dtype=np.float64) for t in (q, k, v))
    h, dh = q.shape
    hk = k.shape[0]
    s0 = max(0, length - window) if window else 0
    out = np.zeros((h, dh))
    for i in range(h):
        j = i // (h // hk)
        sc = k[j, s0:length] @ q[i] * scale  # [S]
        m = sc.max() if sinks is None else max(sc.max(), float(sinks[i]))
        e = np.exp(sc - m)
        den = e.sum() + (0.0 if sinks is None else np.exp(float(sinks[i]) - m))
        out[i] = e @ v[j, s0:length] / den
    return out


CASES = [  # H, Hk, Dh, capacity, length, window, sinks
    (4, 4, 16, 8, 1, None, False),
    (8, 2, 64, 100, 37, None, False),
    (6, 1, 40, 64, 64, None, False),  # Dh not a multiple of 16: SIMD tails
    (8, 2, 64, 100, 100, 16, False),
    (8, 4, 32, 70, 50, None, True),
    (4, 2, 24, 40, 30, 7, True),
    # Dh a multiple of 64: the bf16 cache's register kernel (eight keys at a time, vector exp)
    (8, 2, 128, 300, 203, None, True),
    (4, 1, 64, 80, 75, 20, True),
    (16, 16, 128, 600, 512, None, False),  # whole 16-row value blocks; the next head prefetched
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", ["native", "native-scalar", "torch"])
def test_decode_attention_matches_float64(dtype, case, path):
    h, hk, dh, cap, length, window, with_sinks = case
    g = torch.Generator().manual_seed(h * 100 + length)
    q = torch.randn(h, dh, generator=g)
    k = torch.randn(hk, cap, dh, generator=g).to(dtype)
    v = torch.randn(hk, cap, dh, generator=g).to(dtype)
    sinks = torch.randn(h, generator=g) if with_sinks else None
    scale = dh**-0.5
    if path == "torch":
        out = decode_attention_torch(q, k, v, length, scale, window, sinks)
    else:
        if not attention.available():
            pytest.skip("native decode attention unavailable (no compiler)")
        if path == "native":
            out = decode_attention(q, k, v, length, scale, window, sinks)
        else:  # the portable scalar code of the same kernel
            out = torch.empty_like(q)
            sk = sinks if sinks is not None else torch.empty(0)
            torch.ops.mer_attn.decode_(out, q, k, v, length, scale, window or 0, sk, 0)
    ref = reference(q, k, v, length, scale, window, sinks)
    assert out.dtype == torch.float32 and out.shape == (h, dh)
    # float32 accumulation over at most 100 positions of unit-scale values
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=2e-5 * max(1.0, np.abs(ref).max()))


def test_decode_attention_ignores_rows_past_length():
    q = torch.randn(4, 32)
    k, v = torch.randn(2, 50, 32), torch.randn(2, 50, 32)
    a = decode_attention(q, k, v, 20, 0.2)
    k[:, 20:] = float("nan")
    v[:, 20:] = float("nan")
    assert torch.equal(a, decode_attention(q, k, v, 20, 0.2))


@pytest.mark.skipif(not attention.available(), reason="native decode attention unavailable")
def test_native_kernel_rejects_bad_shapes():
    q = torch.randn(4, 32)
    k = torch.randn(2, 10, 32)
    with pytest.raises(RuntimeError, match="length"):
        decode_attention(q, k, k.clone(), 11, 0.1)
    with pytest.raises(RuntimeError, match="head dims"):
        decode_attention(torch.randn(3, 32), k, k.clone(), 5, 0.1)
