"""The prefill path's native q4 decoder (kernels/native_dequant.cpp, ``quant.dequant4_wt``)
against NumPy: ``W.T`` in float32, ``fl(q s + fl(z - 8 s))``, bit for bit, in every int4 packing
(scalar and AVX2 code, 1 and 2 threads); and the prefill path that uses it against the float64
reference of the same quantized expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.kernels import native, quant
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.formats import FORMATS
from micro_expert_router.kernels.quant import _dequant4_t, dequant4_wt, int4_layout

pytestmark = pytest.mark.skipif(not native.load(), reason="native kernels unavailable")


def random_q4(n: int, k: int, b: int, seed: int):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, size=(n, k), dtype=np.uint8)  # [N, K]
    s = (rng.standard_normal((k // b, n)) * 0.02).astype(np.float32)
    z = (rng.standard_normal((k // b, n)) * 0.01).astype(np.float32)
    sz = torch.stack([torch.from_numpy(s), torch.from_numpy(z)], dim=-1).to(torch.bfloat16)
    return q, sz  # sz: [K/b, N, 2]


def want_wt(q: np.ndarray, sz: torch.Tensor, b: int) -> np.ndarray:
    s = sz[..., 0].float().numpy()  # [K/b, N]
    z = sz[..., 1].float().numpy()
    zc = z - np.float32(8) * s  # float32, one rounding
    kb = np.arange(q.shape[1]) // b
    prod = q.T.astype(np.float32) * s[kb]  # [K, N], exact
    return prod + zc[kb]


@pytest.mark.parametrize("layout", list(ref.INT4_LAYOUTS))
@pytest.mark.parametrize("b", [32, 64])
def test_dequant_bit_exact(layout, b):
    bn = ref.INT4_LAYOUTS[layout][0]
    n, k = 3 * bn, 256
    q, sz = random_q4(n, k, b, seed=b + bn)
    packed = torch.from_numpy(ref.encode_int4(q, layout)).view(n, k // 2)
    want = want_wt(q, sz, b)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in (0, 1):
                got = dequant4_wt(packed, sz, b, layout, isa)
                assert got.shape == (k, n) and got.dtype == torch.float32
                assert np.array_equal(got.numpy(), want), (layout, b, threads, isa)
            # bf16 output: the float32 values rounded as torch rounds them
            want16 = torch.from_numpy(want).to(torch.bfloat16)
            for isa in (0, 1):
                got = dequant4_wt(packed, sz, b, layout, isa, dtype=torch.bfloat16)
                assert got.dtype == torch.bfloat16 and torch.equal(got, want16), (layout, threads)
    finally:
        torch.set_num_threads(old)
    # the torch-op decoder it replaces gives the same float32 values
    t = _dequant4_t(packed, sz, b, layout, torch.float32)  # [N/bn, K, bn]
    assert np.array_equal(t.permute(1, 0, 2).reshape(k, n).numpy(), want)


def test_bad_arguments_are_errors():
    packed = torch.zeros(48, 64, dtype=torch.uint8)  # N = 48: not whole row blocks of 32
    sz = torch.zeros(2, 48, 2, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="q4_dequant_t_ needs"):
        dequant4_wt(packed, sz, 64, "n32")


@pytest.mark.parametrize("gemm", [torch.float32, torch.bfloat16])
def test_prefill_path_matches_reference(monkeypatch, gemm):
    """An expert at T >= prefill_min_tokens goes through dequant4_wt and float32 GEMMs (CPUs
    without AVX512_BF16) or the bf16 dequantize + GEMM (with it; forced here both ways); its
    output is the float64 SwiGLU of the dequantized weights within float32 (bf16) rounding."""
    monkeypatch.setattr(quant, "gemm_dtype", lambda: gemm)
    fmt, d, inter, group = FORMATS["q4"], 128, 256, 128
    g = torch.Generator().manual_seed(3)
    w = [torch.randn(inter, d, generator=g) * d**-0.5, torch.randn(inter, d, generator=g) * d**-0.5,
         torch.randn(d, inter, generator=g) * inter**-0.5]  # fmt: skip
    buf = fmt.pack(*w, group)
    view = fmt.view(buf, d, group)
    gate, up, down = fmt.unpack(buf, d, inter, group)
    x = torch.randn(fmt.prefill_min_tokens + 3, d, generator=g)
    got = sum(fmt.partials(x, view))
    want = ref.swiglu_ref(x.double().numpy(), gate.numpy(), up.numpy(), down.numpy())
    assert int4_layout() in ref.INT4_LAYOUTS
    if gemm == torch.float32:
        np.testing.assert_allclose(got.double().numpy(), want, rtol=2e-4, atol=2e-5)
    else:  # bf16 activations (u = 2^-8) in both GEMMs: normwise within a few u
        err = np.linalg.norm(got.double().numpy() - want) / np.linalg.norm(want)
        assert err < 1.5e-2, err
