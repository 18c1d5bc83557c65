"""Quantized dense weights (kernels/dense_quant.py, native_dense.cpp) against the NumPy reference
(kernels/dense_reference.py).

- Quantization, packing, dequantization, the embedding gather and the activation quantization:
  bit-exact.
- The native GEMV against ``linear_ref`` (exact float64 math on the dequantized weights and the
  int8-quantized x): the integer dot products are exact, so only the float32 scaling and sums
  round. Per lane a chain of K/32 (q8) or 2 K/64 (q4) fused multiply-adds, a 3-level tree, then
  one product (q8) or the scale product s sx and a chain of K/64 zero terms (q4):
  ``|y - y_ref| <= (K/32 + 8) u M``, u = 2^-24, M = |qx sx| @ |W|.T; checked per element.
- Against the unquantized x (float64): normwise within 1% (int8 x in blocks of 32 costs about
  0.3-0.5%).
- Bit-exact: the scalar code (isa=0) against the AVX2 code; 1 against 2 threads; a token's row
  alone against the same token inside a batch of T.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import dense_reference as dref
from micro_expert_router.kernels import native
from micro_expert_router.kernels.dense import embedding, linear
from micro_expert_router.kernels.dense_quant import CHUNK_ROWS, Q4Dense, Q8Dense, from_parts

U = 2.0**-24
FMTS = {"q8": Q8Dense, "q4": Q4Dense}
needs_native = pytest.mark.skipif(not native.load(), reason="native kernels unavailable")


def matrix(n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * k**-0.5
    w[0] = 0.0  # an all-zero row: scale 0
    w[1, :64] = 0.25  # a constant block: q4 s = 0
    return w


def ref_quantize(name: str, w: np.ndarray):
    return dref.quantize_q8(w) if name == "q8" else dref.quantize_q4(w)


def ref_dequantize(name: str, parts) -> np.ndarray:
    return dref.dequantize_q8(*parts) if name == "q8" else dref.dequantize_q4(*parts)


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_quantize_and_dequantize_bit_exact(name):
    w = matrix(96, 256, 1)
    dw = FMTS[name].quantize(w)
    want = ref_quantize(name, w.numpy())
    got = list(dw.parts().values())
    assert np.array_equal(got[0].numpy(), want[0])
    assert np.array_equal(got[1].view(torch.uint16).numpy(), want[1])
    full = ref_dequantize(name, want)
    assert np.array_equal(dw.dequantize().numpy(), full)
    ids = torch.tensor([5, 0, 95, 5])
    assert np.array_equal(dw.rows(ids, torch.float32).numpy(), full[ids.numpy()])
    assert embedding(ids, dw, torch.bfloat16).dtype == torch.bfloat16
    assert dw.nbytes == sum(t.numel() * t.element_size() for t in dw.parts().values())
    again = from_parts(name, dw.parts())
    assert np.array_equal(again.dequantize().numpy(), full)


def test_q4_error_bound_and_bits():
    w = matrix(64, 512, 2)
    d = Q4Dense.quantize(w).dequantize()
    assert Q4Dense.quantize(w).nbytes * 8 / w.numel() == 4.5
    # round to nearest: at most half a step (plus the bf16 rounding of s and z)
    wb = w.reshape(64, 8, 64)
    step = (wb.amax(2) - wb.amin(2)) / 15
    err = (d - w).abs().reshape(64, 8, 64).amax(2)
    assert bool((err <= step * 0.53 + 2**-8 * wb.abs().amax(2)).all())


@needs_native
def test_native_q4_dequantize_bit_exact():
    """The GEMM path's native dequantization (scalar and AVX2, 1 and 2 threads, any row range)
    gives the torch expression's bits and the NumPy reference's."""
    dw = Q4Dense.quantize(matrix(131, 320, 7))
    want = dref.dequantize_q4(dw.packed.numpy(), dw.sz.view(torch.uint16).numpy())
    old = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for isa in (0, 1):
                for r0, r1 in ((0, 131), (3, 70), (130, 131)):
                    got = dw.native_dequantize(r0, r1, isa)
                    assert np.array_equal(got.numpy(), want[r0:r1]), (threads, isa, r0, r1)
                    assert torch.equal(got, Q4Dense._decode(dw.packed[r0:r1], dw.sz[r0:r1]))
    finally:
        torch.set_num_threads(old)


@needs_native
def test_activation_quantization_bit_exact():
    x = torch.randn(3, 256) * torch.linspace(0.01, 10, 256)
    x[1, :32] = 0.0
    qx, sx, c = torch.empty(3, 256, dtype=torch.int8), torch.empty(3, 8), torch.empty(3, 4)
    torch.ops.mer.dense_quantize_x_(qx, sx, c, x)
    want = dref.quantize_x(x.numpy())
    for got, ref in zip((qx, sx, c), want, strict=True):
        assert np.array_equal(got.numpy(), ref)


@needs_native
@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize(("n", "k", "t"), [(70, 256, 1), (64, 2048, 3), (13, 128, 6)])
def test_native_linear_against_reference(name, n, k, t):
    w = matrix(n, k, n + k + t)
    dw = FMTS[name].quantize(w)
    x = torch.randn(t, k)
    want, mag = dref.linear_ref(x.numpy(), dw.dequantize().numpy())
    # isa 1: the best kernels (AVX-512 VNNI for q4 where the CPU has it), 2: the AVX2 ones
    ys = [dw.native_linear(x, isa) for isa in ([0, 1, 2] if native.dense_available() else [0])]
    for y in ys:
        err = np.abs(y.double().numpy() - want)
        assert np.all(err <= (k / 32 + 8) * U * mag * 1.01)
        exact = x.double().numpy() @ dw.dequantize().double().numpy().T
        assert np.linalg.norm(y.double().numpy() - exact) <= 0.01 * np.linalg.norm(exact)
    for y in ys[1:]:
        assert torch.equal(y, ys[0])  # scalar == best == AVX2
    # one token alone == the same token in the batch (no dependence on T or the tile)
    assert torch.equal(dw.native_linear(x[-1:], 0)[0], ys[0][-1])


@needs_native
@pytest.mark.skipif(not native.dense_available(), reason="no AVX2")
@pytest.mark.parametrize("name", ["q8", "q4"])
def test_threads_do_not_change_bits(name):
    dw = FMTS[name].quantize(matrix(512, 512, 7))
    x = torch.randn(2, 512)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = dw.linear(x)
        torch.set_num_threads(2)
        b = dw.linear(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_gemm_path_matches_dequantized_weights(name):
    n = CHUNK_ROWS + 64  # two chunks
    dw = FMTS[name].quantize(matrix(n, 64, 3))
    x = torch.randn(dw.native_below + 1, 64)
    y = linear(x, dw, torch.ones(n))
    want = x.double() @ dw.dequantize().double().T + 1
    assert y.shape == (x.shape[0], n)
    assert torch.allclose(y.double(), want, rtol=1e-5, atol=1e-5)
    xb = x.bfloat16()
    assert dw.linear(xb).dtype == torch.bfloat16


def test_bad_shapes_are_named_errors():
    with pytest.raises(ConfigError, match="a multiple of 64"):
        Q4Dense(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, 0, 2, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match="q8"):
        Q8Dense(torch.zeros(4, 32, dtype=torch.int8), torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match=r"\[T, 64\]"):
        Q8Dense.quantize(torch.randn(4, 64)).linear(torch.randn(2, 32))
    with pytest.raises(ConfigError, match="unknown dense format"):
        from_parts("q3", {})
