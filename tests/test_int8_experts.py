"""The int8-activation expert kernels (kernels/native_int8.cpp, the q4/q8 decode default)
against the NumPy reference (reference.quantize_acts, linear_int8_ref, swiglu_int8_ref).

Tolerances (u = 2^-24). The activation quantization is bit-exact with the reference and the
integer sums are exact, so one matrix differs from the exact product on the quantized x only by
the float32 roundings of the per-block scaling:
- q4: y = sum over K/32 blocks j of fl(I_j fl(s sx_j)) and K/b terms fl(zc c) (zc = fl(z - 8 s),
  c = 2 roundings), accumulated by fused multiply-adds in one chain:
  |y - y~| <= (K/32 + K/b + 4) u sum_k |x~_k| (q_k |s| + |z - 8 s|).
- q8: 8 lanes of K/32 fused multiply-adds, a 3-level tree, one product with s:
  |y - y~| <= (K/32 + 5) u |s| sum_k |q_k x~_k|.
Checked per element with 1% slack. A whole expert also quantizes a_j = silu(h_j) u_j, computed
in float32 from h and u that carry the bounds above: where a_j lies within that rounding of a
rounding boundary of its quantization, native and reference pick neighbouring codes, one
quantum sx_a apart. So per element |y - y_ref| <= sum_k |W_dk| 1.1 sx_a,k (one quantum, and
10% for the float differences), and in norm (where a flip is rare) within 2e-3.
Bit-exact: scalar vs AVX2, one call vs top + bottom segments, fused vs one call per expert,
1 vs 2 threads, the "n32" and "n64" packings.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_native_kernels import assert_split_bit_exact, swiglu_op

from micro_expert_router.kernels import native
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.experts import experts_forward
from micro_expert_router.kernels.formats import FORMATS, expert_forward

U = 2.0**-24

if not native.load():
    pytest.skip(f"native kernels unavailable: {native.INFO.reason}", allow_module_level=True)

# isa 1: the best kernels (AVX-512 VNNI's q4 rows where the CPU has them), 3: the AVX2 ones
SIMD = [1, 3] if native.has_avx2_fma() else []
ISAS = [0, *SIMD]


def weights(d: int, i: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(i, d, generator=g) * d**-0.5, torch.randn(i, d, generator=g) * d**-0.5,
            torch.randn(d, i, generator=g) * i**-0.5)  # fmt: skip


def op(name: str, y, x, buf, d: int, g: int, isa: int, int8: bool = True) -> None:
    swiglu_op(name, y, x, buf, d, g, isa, int8)


# ---- activation quantization: bit-exact ----------------------------------------------------


@pytest.mark.parametrize(("t", "k", "b"), [(1, 2048, 64), (3, 96, 32), (2, 128, 0)])
def test_quantize_acts_is_bit_exact_with_the_reference(t, k, b):
    x = torch.randn(t, k) * torch.logspace(-3, 3, k)  # blocks of very different scales
    x[0, :32] = 0.0  # a zero block: sx = 0, qx = 0
    x[0, 40] = -x[0, 32:64].abs().max() * 1.5  # a negative maximum
    if t > 1:
        x[1, 5] = float("nan")  # a non-finite block: sx = NaN, qx = 0
    qx, sx = torch.empty(t, k, dtype=torch.int8), torch.empty(t, k // 32)
    c = torch.empty(t, k // b if b else 0)
    torch.ops.mer.quantize_acts_(qx, sx, c, x, b)
    rq, rs, rc = ref.quantize_acts(x.numpy(), b)
    assert np.array_equal(qx.numpy(), rq)
    assert np.array_equal(sx.numpy(), rs, equal_nan=True)
    assert np.array_equal(c.numpy(), rc, equal_nan=True)
    assert sx[0, 0] == 0 and (t == 1 or bool(sx[1, 0].isnan()))


def test_quantize_acts_ties_infinities_and_subnormals():
    """Halves round to even (a scale of exactly 1: max 127), an infinity makes its block's scale
    NaN and its codes 0, and subnormal blocks keep the reference's codes (the AVX2 and scalar
    paths alike: the op takes the CPU's best)."""
    x = torch.zeros(1, 128)
    x[0, :32] = torch.tensor([127.0, *(k + 0.5 for k in range(-15, 16)), 0.0])[:32]
    x[0, 40] = float("inf")
    x[0, 64:96] = torch.linspace(-1, 1, 32) * 1e-40  # subnormal values
    x[0, 96:128] = torch.linspace(-1, 1, 32) * 3e-45  # a few ulps: the scale rounds to 0
    qx, sx = torch.empty(1, 128, dtype=torch.int8), torch.empty(1, 4)
    c = torch.empty(1, 2)
    torch.ops.mer.quantize_acts_(qx, sx, c, x, 64)
    rq, rs, rc = ref.quantize_acts(x.numpy(), 64)
    assert np.array_equal(qx.numpy(), rq)
    assert np.array_equal(sx.numpy(), rs, equal_nan=True)
    assert np.array_equal(c.numpy(), rc, equal_nan=True)
    assert sx[0, 0] == 1.0 and qx[0, 1] == -14 and qx[0, 2] == -14  # -14.5 and -13.5: even
    assert bool(sx[0, 1].isnan()) and not qx[0, 32:64].any()


# ---- one matrix: elementwise bounds ------------------------------------------------------------


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", sorted(ref.INT4_LAYOUTS))
@pytest.mark.parametrize(("n", "k", "b", "t"), [(128, 256, 64, 1), (96, 128, 32, 5),
                                                (192, 64, 32, 3), (64, 2048, 64, 2)])  # fmt: skip
def test_q4_linear_int8_elementwise_bound(isa, layout, n, k, b, t):
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
    torch.ops.mer.q4_linear_(y, x, packed, sz, b, bn, split, isa, True)
    sk, zk = np.repeat(s, b, axis=1).astype(np.float64), np.repeat(z, b, axis=1).astype(np.float64)
    want, _ = ref.linear_int8_ref(x.numpy(), (q - 8.0) * sk + zk)
    _, m = ref.linear_int8_ref(x.numpy(), q * np.abs(sk) + np.abs(zk - 8 * sk))
    bound = (k // 32 + k // b + 4) * U * m
    assert np.all(np.abs(y.double().numpy() - want) <= bound * 1.01)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(("n", "k", "t"), [(64, 2048, 1), (37, 192, 6), (5, 32, 4)])
def test_q8_linear_int8_elementwise_bound(isa, n, k, t):
    rng = np.random.default_rng(n + k)
    q = rng.integers(-127, 128, (n, k)).astype(np.int8)
    s = ref.bf16_round(rng.random(n).astype(np.float32) * 0.01)
    x = torch.randn(t, k)
    y = torch.full((t, n), float("nan"))
    st = torch.from_numpy(ref.bf16_to_bits(s)).view(torch.bfloat16)
    torch.ops.mer.q8_linear_(y, x, torch.from_numpy(q), st, isa, True)
    want, m = ref.linear_int8_ref(x.numpy(), q.astype(np.float64) * s[:, None])
    bound = (k // 32 + 5) * U * m
    assert np.all(np.abs(y.double().numpy() - want) <= bound * 1.01)


@pytest.mark.parametrize("layout", ["n32", "n64"])
@pytest.mark.parametrize("t", [1, 2, 3])
def test_q4_linear_scalar_and_simd_agree_bit_for_bit(layout, t):
    if not SIMD:
        pytest.skip("no AVX2 on this CPU")
    rng = np.random.default_rng(t)
    n, k, b = 192, 512, 64
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = ref.bf16_round(rng.random((n, k // b)).astype(np.float32) * 0.1)
    z = ref.bf16_round(rng.standard_normal((n, k // b)).astype(np.float32) * 0.1)
    packed = torch.from_numpy(ref.encode_int4(q, layout))
    sz = torch.from_numpy(ref._sz_bits(s, z)).view(torch.bfloat16)
    bn, split = ref.INT4_LAYOUTS[layout]
    x = torch.randn(t, k) * 3
    ys = [torch.empty(t, n) for _ in range(1 + len(SIMD))]
    for y, isa in zip(ys, (0, *SIMD), strict=True):
        torch.ops.mer.q4_linear_(y, x, packed, sz, b, bn, split, isa, True)
    for y in ys[1:]:
        assert torch.equal(ys[0], y)


# ---- a whole expert ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize(
    ("d", "n", "group", "t"), [(128, 3, 64, 1), (96, 2, 32, 5), (256, 2, 128, 4), (2048, 1, 704, 2)]
)
def test_expert_matches_the_int8_reference(name, d, n, group, t):
    fmt = FORMATS[name]
    assert fmt.int8_activations  # the default
    gate, up, down = weights(d, n * group, seed=d + t)
    buf = fmt.pack(gate, up, down, group)
    gq, uq, dq = (m.numpy() for m in fmt.unpack(buf, d, n * group, group))
    x = torch.randn(t, d)
    y = expert_forward(fmt, x, [fmt.view(buf, d, group)]).double().numpy()
    want, a = ref.swiglu_int8_ref(x.numpy(), gq, uq, dq, group)
    quantum = np.concatenate([np.repeat(ref.quantize_acts(a[:, j * group:(j + 1) * group])[1],
                                        32, axis=1) for j in range(n)], axis=1)  # fmt: skip
    absp = sum(np.abs(ref.dequantize_acts(*ref.quantize_acts(a[:, j * group:(j + 1) * group])[:2])
                      @ dq[:, j * group:(j + 1) * group].T.astype(np.float64))
               for j in range(n))  # fmt: skip
    bound = (1.1 * quantum) @ np.abs(dq.astype(np.float64)).T + (group // 32 + n + 8) * U * absp
    err = np.abs(y - want)
    assert np.all(err <= bound)
    assert np.linalg.norm(err) <= 2e-3 * np.linalg.norm(want)
    # and what the int8 activations cost against the float32 path's exact SwiGLU
    exact = ref.swiglu_ref(x.numpy(), gq, uq, dq)
    assert np.linalg.norm(y - exact) <= 0.02 * np.linalg.norm(exact)


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_nan_activations_give_nan(name):
    d, group = 128, 64
    fmt = FORMATS[name]
    w = fmt.view(fmt.pack(*weights(d, group, seed=3), group), d, group)
    x = torch.randn(2, d)
    x[1, 7] = float("nan")
    y = expert_forward(fmt, x, [w])
    assert bool(y[1].isnan().all()) and bool(y[0].isfinite().all())


# ---- bit-exactness -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize(("d", "t"), [(128, 1), (96, 5), (2048, 2), (256, 3)])
def test_scalar_and_simd_agree_bit_for_bit(name, d, t):
    if not SIMD:
        pytest.skip("no AVX2 on this CPU")
    n, group = 2, 64
    fmt = FORMATS[name]
    buf = fmt.pack(*weights(d, n * group, seed=d), group)
    x = torch.randn(t, d) * 4  # wide range for silu: saturated and negative h
    ys = []
    for isa in (0, *SIMD):
        y = torch.zeros(t, d)
        op(name, y, x, buf, d, group, isa)
        ys.append(y)
    for y in ys[1:]:
        assert torch.equal(ys[0], y)


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("t", [1, 3])
def test_split_is_bit_exact(name, dtype, isa, t):
    assert_split_bit_exact(name, dtype, isa, t, int8=True)


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize("t", [1, 4])
def test_fused_experts_and_threads_are_bit_exact(name, t):
    d, n, group = 256, 4, 64
    fmt = FORMATS[name]
    views = [fmt.view(fmt.pack(*weights(d, n * group, seed=s), group), d, group) for s in range(5)]
    x = torch.randn(t, d)
    threads = torch.get_num_threads()
    try:
        out = []
        for k in (1, 2):
            torch.set_num_threads(k)
            out.append(experts_forward(fmt, x, views))
            out.append([expert_forward(fmt, x, [v]) for v in views])
    finally:
        torch.set_num_threads(threads)
    for other in out[1:]:
        assert all(torch.equal(a, b) for a, b in zip(out[0], other, strict=True))


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_int8_activations_can_be_turned_off(name):
    d, group = 128, 64
    cls = type(FORMATS[name])
    off = cls()
    off.int8_activations = False
    w = off.view(off.pack(*weights(d, group, seed=4), group), d, group)
    x = torch.randn(1, d)
    y_off = expert_forward(off, x, [w])
    y_f32 = torch.zeros(1, d)
    op(name, y_f32, x, w.buf, d, group, 1, int8=False)
    assert torch.equal(y_off, y_f32)
    assert not torch.equal(y_off, expert_forward(FORMATS[name], x, [w]))
