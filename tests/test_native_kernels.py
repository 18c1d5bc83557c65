"""The native q4/q8 decode kernels with float32 activations (kernels/native_q4.cpp,
native_q8.cpp; ``int8_x=False``, the formats' ``int8_activations = False``) against the NumPy
reference. The int8-activation kernels, the default, are tested in tests/test_int8_experts.py.

Tolerances (u = 2^-24, float32's unit roundoff; derived in docs/quantization.md). The kernels
take float32 activations and accumulate in float32, so the reference is exact float64 math on
the exact dequantized weights, and the bounds are first-order rounding-error bounds:
- q4 matrix: per block of b along K the kernel forms A = sum q x (b fused multiply-adds) and
  X = sum x (b adds), then y = sum over K/b blocks of s A + fl(z - 8 s) X (2 K/b fused
  multiply-adds). |y - y_exact| <= (b + 2 K/b + 4) u sum_k |x_k| (q_k |s| + |z - 8 s|).
  The BF16-dot path (AVX512_BF16 CPUs) splits x into bf16 hi + lo (|x - x~| <= 2^-17 |x|) and
  sums D = sum (1 + q/16) x~ (2b bf16 products, exact, summed in f32), y = 16 s D +
  fl(z - 24 s) X~: (2b + 2 K/b + 4) u sum_k |x_k| ((16 + q_k)|s| + |z - 24 s|) + 2^-17 M, M the
  sum above.
- q8 matrix: 16 chains of K/16 fused multiply-adds, a 4-level tree, one product with s:
  |y - y_exact| <= (K/16 + 6) u |s| sum_k |q_k x_k|.
- Expert: the gate/up bound above (the BF16-dot one for q4, the larger); silu(h) u through
  the same exp polynomial in every code path, at most 16 u relative (exp ~2 ulp, then 1 + e,
  the division and the product), plus the propagated error |silu'(h)| |u| dh + |silu(h)| du
  with |silu'| <= 1.1; the down bound on the computed a plus sum_k |W_dk| da_k; then n - 1
  roundings of the group sum, n u sum_j |p_j|.
  Checked per element with 1% slack for second-order terms.
Bit-exact: a whole expert vs a top segment + a bottom segment into the same y; 1 vs 2 threads;
the scalar C++ code vs the AVX-512 float32 code, isa=2 (the same IEEE operations in the same
order; the BF16-dot q4 kernel, isa=1 here, rounds differently and has its own bound).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.kernels import native, quant
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.formats import FORMATS, expert_forward
from micro_expert_router.kernels.quant import Q4, int4_layout

U = 2.0**-24
QFORMATS = ["q8", "q4"]

if not native.load():
    pytest.skip(f"native kernels unavailable: {native.INFO.reason}", allow_module_level=True)

# scalar, best (BF16 dots for q4 on AVX-512), AVX-512 f32, AVX2 + FMA f32
ISAS = [0] + ([1, 2] if native.has_avx512() else []) + ([3] if native.has_avx2_fma() else [])
BF16 = native.has_avx512() and bool(torch.ops.mer.has_avx512_bf16())
X_SPLIT = 2.0**-17  # |x - hi - lo| <= 2^-17 |x| for hi = bf16(x), lo = bf16(x - hi)


def weights(d: int, i: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(i, d, generator=g) * d**-0.5, torch.randn(i, d, generator=g) * d**-0.5,
            torch.randn(d, i, generator=g) * i**-0.5)  # fmt: skip


def swiglu_op(name: str, y, x, buf, d: int, g: int, isa: int, int8: bool = False) -> None:
    """Accumulate one segment into y with an explicit ISA (0 scalar, 1 AVX-512), with float or
    (``int8``) int8-quantized activations."""
    offs, per = quant._offsets(name, d, g)
    if name == "q8":
        torch.ops.mer.q8_swiglu_(y, x, buf, d, g, offs, per, isa, int8)
    else:
        bn, split = ref.INT4_LAYOUTS[int4_layout()]
        b = Q4.block_size(d, g)
        torch.ops.mer.q4_swiglu_(y, x, buf, d, g, b, offs, per, bn, split, isa, int8)


def assert_split_bit_exact(name: str, dtype, isa: int, t: int, int8: bool = False) -> None:
    """An expert cut into top + bottom at every group boundary, both added into one y, gives the
    bits of the whole expert in one call."""
    d, n, group = 128, 5, 64
    fmt = FORMATS[name]
    buf = fmt.pack(*weights(d, n * group, seed=t), group)
    per = fmt.group_nbytes(d, group)
    x = torch.randn(t, d)
    whole = torch.zeros(t, d, dtype=dtype)
    swiglu_op(name, whole, x, buf, d, group, isa, int8)
    for k in range(1, n):
        y = torch.zeros(t, d, dtype=dtype)
        swiglu_op(name, y, x, buf[: k * per].clone(), d, group, isa, int8)  # top, its own slot
        swiglu_op(name, y, x, buf[k * per :].clone(), d, group, isa, int8)  # bottom, same y
        assert torch.equal(whole, y)


# ---- one matrix: elementwise bounds ------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", sorted(ref.INT4_LAYOUTS))
@pytest.mark.parametrize(("n", "k", "b", "t"), [(128, 256, 64, 1), (96, 128, 32, 5),
                                                (192, 64, 32, 3)])  # fmt: skip
def test_q4_linear_elementwise_bound(isa, layout, n, k, b, t):
    rng = np.random.default_rng(n + k + t)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = ref.bf16_round(rng.random((n, k // b)).astype(np.float32) * 0.1)
    z = ref.bf16_round(rng.standard_normal((n, k // b)).astype(np.float32) * 0.1)
    s[0, 0] = 0.0  # a constant block
    packed = torch.from_numpy(ref.encode_int4(q, layout))
    sz = torch.from_numpy(ref._sz_bits(s, z)).view(torch.bfloat16)  # [K/b, N, 2]
    x = torch.randn(t, k)
    y = torch.full((t, n), float("nan"))
    bn, split = ref.INT4_LAYOUTS[layout]
    torch.ops.mer.q4_linear_(y, x, packed, sz, b, bn, split, isa)
    sk, zk = np.repeat(s, b, axis=1).astype(np.float64), np.repeat(z, b, axis=1).astype(np.float64)
    w = (q - 8.0) * sk + zk  # [N, K] exact
    xf = x.double().numpy()
    exact = xf @ w.T
    m = np.abs(xf) @ (q * np.abs(sk) + np.abs(zk - 8 * sk)).T
    bound = (b + 2 * k // b + 4) * U * m
    if isa == 1 and BF16 and layout == "n64":  # BF16 dots: D = sum (1 + q/16) x~, 2b sums
        m2 = np.abs(xf) @ ((16 + q) * np.abs(sk) + np.abs(zk - 24 * sk)).T
        bound = (2 * b + 2 * k // b + 4) * U * m2 + X_SPLIT * m
    assert np.all(np.abs(y.double().numpy() - exact) <= bound * 1.01)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("n", "k", "t"), [(64, 2048, 1), (37, 176, 6), (5, 16, 4)])
def test_q8_linear_elementwise_bound(isa, n, k, t):
    rng = np.random.default_rng(n + k)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    s = ref.bf16_round(rng.random(n).astype(np.float32) * 0.01)
    x = torch.randn(t, k)
    y = torch.full((t, n), float("nan"))
    st = torch.from_numpy(ref.bf16_to_bits(s)).view(torch.bfloat16)
    torch.ops.mer.q8_linear_(y, x, torch.from_numpy(q), st, isa)
    xf, qf = x.double().numpy(), q.astype(np.float64)
    exact = (xf @ qf.T) * s
    bound = (k // 16 + 6) * U * (np.abs(xf) @ np.abs(qf).T) * np.abs(s)
    assert np.all(np.abs(y.double().numpy() - exact) <= bound * 1.01)


# ---- a whole expert ----------------------------------------------------------------------------


def expert_bound(name, x, gq, uq, dq, group, block):
    """Exact f64 SwiGLU and the per-element error bound of the module docstring."""
    x = x.astype(np.float64)
    g64, u64, d64 = (m.astype(np.float64) for m in (gq, uq, dq))
    ax = np.abs(x)
    if name == "q8":  # |s| |q| = |w|: dequantization is exact
        kd = x.shape[1]
        eg = (kd // 16 + 6) * U * (ax @ np.abs(g64).T)
        eu = (kd // 16 + 6) * U * (ax @ np.abs(u64).T)
    else:  # the BF16-dot bound (the larger): (2b + 2K/b + 4) u M2 + 2^-17 M
        c = (2 * block + 2 * x.shape[1] // block + 4) * U
        eg = (c * 7.4 + X_SPLIT * 3.03) * (ax @ _blockmax(g64, block).T)
        eu = (c * 7.4 + X_SPLIT * 3.03) * (ax @ _blockmax(u64, block).T)
    h, u = x @ g64.T, x @ u64.T  # [T, I]
    sig = 1 / (1 + np.exp(-h))
    silu = h * sig
    a = silu * u
    dsilu = 1.1
    ea = dsilu * np.abs(u) * eg + np.abs(silu) * eu + 16 * U * np.abs(a)
    y = np.zeros((x.shape[0], d64.shape[0]))
    ey = np.zeros_like(y)
    absp = np.zeros_like(y)
    n = gq.shape[0] // group
    for j in range(n):
        sl = slice(j * group, (j + 1) * group)
        dj = d64[:, sl]
        p = a[:, sl] @ dj.T
        y += p
        absp += np.abs(p)
        if name == "q8":
            ep = (group // 16 + 6) * U * (np.abs(a[:, sl]) @ np.abs(dj).T)
        else:
            cd = (2 * block + 2 * group // block + 4) * U
            ep = (cd * 7.4 + X_SPLIT * 3.03) * (np.abs(a[:, sl]) @ _blockmax(dj, block).T)
        ey += ep + np.abs(ea[:, sl]) @ np.abs(dj).T
    ey += n * U * absp
    return y, ey


def _blockmax(w: np.ndarray, block: int) -> np.ndarray:
    """Per element, max|w| of its block, m. With s = (max - min) / 15 <= 2m / 15 and
    |z - 8 s| = |min| <= m (up to bf16 rounding): q|s| + |z - 8s| <= 3.03 m, and
    (16 + q)|s| + |z - 24 s| <= 47 |s| + |z - 8 s| <= 7.4 m."""
    r, k = w.shape
    m = np.abs(w).reshape(r, k // block, block).max(axis=2)  # [R, K/b]
    return np.repeat(m, block, axis=1)


@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize(
    ("d", "n", "group", "t"), [(128, 3, 64, 1), (96, 2, 32, 5), (256, 2, 128, 4), (2048, 1, 704, 2)]
)
def test_expert_matches_exact_reference_elementwise(name, d, n, group, t):
    fmt = type(FORMATS[name])()
    fmt.int8_activations = False  # the float32 kernels (the int8 default: test_int8_experts.py)
    gate, up, down = weights(d, n * group, seed=d + t)
    buf = fmt.pack(gate, up, down, group)
    gq, uq, dq = (m.numpy() for m in fmt.unpack(buf, d, n * group, group))
    x = torch.randn(t, d)
    y = expert_forward(fmt, x, [fmt.view(buf, d, group)])
    assert y.dtype == torch.float32
    want, bound = expert_bound(name, x.numpy(), gq, uq, dq, group, Q4.block_size(d, group))
    err = np.abs(y.double().numpy() - want)
    assert np.all(err <= bound * 1.01)
    # measured: q8 ~3e-7, q4 ~5e-6 (BF16 dots; x split to 2^-17) or ~1e-6 (f32)
    assert np.linalg.norm(err) <= 2e-5 * np.linalg.norm(want)


# ---- bit-exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t", [1, 3, 6])
def test_split_is_bit_exact_at_the_kernel(name, dtype, isa, t):
    assert_split_bit_exact(name, dtype, isa, t)


@pytest.mark.skipif(not native.has_avx512(), reason="no AVX-512 on this CPU")
@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize(("d", "t"), [(128, 1), (96, 5), (2048, 2)])
def test_scalar_and_avx512_f32_agree_bit_for_bit(name, d, t):
    n, group = 2, 64
    fmt = FORMATS[name]
    buf = fmt.pack(*weights(d, n * group, seed=d), group)
    x = torch.randn(t, d) * 4  # wide range for silu: saturated and negative h
    ys = []
    for isa in (0, 2):  # the BF16-dot q4 path (isa 1) rounds differently: bounds above
        y = torch.zeros(t, d)
        swiglu_op(name, y, x, buf, d, group, isa)
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


@pytest.mark.skipif(not native.has_avx2_fma(), reason="no AVX2 + FMA on this CPU")
@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize(("d", "t"), [(128, 1), (96, 5), (2048, 2), (256, 3)])
def test_scalar_and_avx2_agree_bit_for_bit(name, d, t):
    n, group = 2, 64
    fmt = FORMATS[name]
    buf = fmt.pack(*weights(d, n * group, seed=d), group)
    x = torch.randn(t, d) * 4  # wide range for silu: saturated and negative h
    ys = []
    for isa in (0, 3):
        y = torch.zeros(t, d)
        swiglu_op(name, y, x, buf, d, group, isa)
        ys.append(y)
    assert torch.equal(ys[0], ys[1])


@pytest.mark.parametrize("name", QFORMATS)
def test_result_does_not_depend_on_thread_count(name):
    d, n, group = 256, 4, 64
    fmt = FORMATS[name]
    w = fmt.view(fmt.pack(*weights(d, n * group, seed=1), group), d, group)
    x = torch.randn(3, d)
    threads = torch.get_num_threads()
    try:
        out = []
        for k in (1, 2):
            torch.set_num_threads(k)
            out.append(expert_forward(fmt, x, [w]))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0], out[1])


# ---- routing and fallback ----------------------------------------------------------------------


@pytest.mark.parametrize("name", QFORMATS)
def test_decode_uses_native_and_prefill_does_not(name):
    d, group = 128, 64
    fmt = FORMATS[name]
    w = fmt.view(fmt.pack(*weights(d, group, seed=2), group), d, group)
    use = native.available() and (name == "q8" or native.q4_block_rows() is not None)
    y = fmt.accumulate(torch.randn(1, d), w, None)
    assert (y is not None) == use
    assert fmt.accumulate(torch.randn(fmt.native_below, d), w, None) is None
    off = type(fmt)()
    off.native = False
    assert off.accumulate(torch.randn(1, d), w, None) is None
    if use:  # bf16 activations: a bf16 result, the f32 sum rounded once
        xb = torch.randn(2, d).to(torch.bfloat16)
        yb = expert_forward(fmt, xb, [w])
        assert yb.dtype == torch.bfloat16
        assert torch.equal(yb, expert_forward(fmt, xb.float(), [w]).to(torch.bfloat16))
