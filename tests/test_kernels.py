"""Quantized expert formats (q8, q4): fast torch paths against the NumPy reference.

Tolerances (derived in docs/quantization.md):
- Quantization and packing are bit-exact: torch and NumPy do the same IEEE f32 operations.
- One quantized matmul: ``|y - y_ref| <= 2^-8 |y_ref| + (K + 2) 2^-24 sum_k |x_k w_k|`` per
  element (one bf16 rounding of the output, f32 accumulation over K), with x rounded to bf16.
- One group's SwiGLU (``partials``) against ``swiglu_bf16_ref``, which rounds to bf16 where the
  kernels do: normwise relative difference <= 2^-8 (only f32 summation order differs, which
  can flip single bf16 roundings by one ulp).
- The same against exact float64 math on the dequantized weights: <= 2^-6 normwise (four bf16
  roundings, each <= 2^-8 relative: the two matmul outputs, silu, and the product).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micro_expert_router.errors import CheckpointError, ConfigError, StoreError
from micro_expert_router.kernels import quality, quant
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.formats import FORMATS, choose_group, expert_forward, get_format
from micro_expert_router.kernels.quant import Q4, Q8, gemm_dtype, int4_layout

QFORMATS = ["q8", "q4"]
U_BF16 = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits)
U_F32 = 2.0**-24
SLOW = settings(max_examples=12, deadline=None)


def weights(d: int, i: int, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(i, d, generator=g) * scale * d**-0.5
    up = torch.randn(i, d, generator=g) * scale * d**-0.5
    down = torch.randn(d, i, generator=g) * scale * i**-0.5
    return gate, up, down


def ref_pack(name: str, gate, up, down, group: int) -> np.ndarray:
    a = [t.float().numpy() for t in (gate, up, down)]
    if name == "q8":
        return ref.pack_q8_ref(*a, group)
    return ref.pack_q4_ref(*a, group, Q4.block_size(a[0].shape[1], group), int4_layout())


def ref_unpack(name: str, buf: np.ndarray, d: int, i: int, group: int):
    if name == "q8":
        return ref.unpack_q8_ref(buf, d, i, group)
    return ref.unpack_q4_ref(buf, d, i, group, Q4.block_size(d, group), int4_layout())


def with_prefill(name: str, min_tokens: int | None):
    fmt = type(FORMATS[name])()
    fmt.prefill_min_tokens = min_tokens  # instance override: force one path
    return fmt


def normwise(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---- the NumPy reference itself ----------------------------------------------------------------


def test_bf16_round_matches_torch_including_ties():
    x = np.random.default_rng(1).standard_normal(4096).astype(np.float32) * 100
    ties = (np.arange(1, 200, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact halves
    for v in (x, ties, -ties):
        want = torch.from_numpy(v).to(torch.bfloat16).float().numpy()
        assert np.array_equal(ref.bf16_round(v), want)
        assert np.array_equal(ref.bits_to_f32(ref.bf16_to_bits(want)), want)


@given(
    layout=st.sampled_from(sorted(ref.INT4_LAYOUTS)),
    nb=st.integers(1, 9),
    k=st.integers(1, 6).map(lambda v: 2 * v),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40, deadline=None)
def test_int4_layout_roundtrip(layout, nb, k, seed):
    q = np.random.default_rng(seed).integers(0, 16, (16 * nb, k)).astype(np.uint8)
    p = ref.encode_int4(q, layout)
    assert p.shape == (16 * nb, k // 2) and np.array_equal(ref.decode_int4(p, layout), q)


@pytest.mark.parametrize("n", [16, 48, 64, 112, 192])
def test_int4_encoding_matches_torch_packing(n):
    q = np.random.default_rng(n).integers(0, 16, (n, 96)).astype(np.uint8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
        torch.from_numpy(q.astype(np.int32)), 2
    )
    assert np.array_equal(packed.numpy().reshape(n, 48), ref.encode_int4(q, int4_layout()))


# ---- quantization and packing: bit-exact against the reference ---------------------------------


def special_rows(w: torch.Tensor) -> torch.Tensor:
    w = w.clone()
    w[0] = 0.0  # all-zero row / blocks
    w[1] = 0.37  # constant row: q4 blocks with max == min
    w[2, ::2] *= 1e3  # wide range
    return w


@pytest.mark.parametrize(("name", "block"), [("q8", None), ("q4", 64), ("q4", 32)])
def test_quantize_matches_reference_bit_exact(name, block):
    w = special_rows(torch.randn(128, 192, generator=torch.Generator().manual_seed(3)))
    fmt = FORMATS[name]
    if name == "q8":
        q, s = fmt.quantize(w)
        rq, rs = ref.quantize_q8(w.numpy())
        assert np.array_equal(q.numpy(), rq) and np.array_equal(s.float().numpy(), rs)
    else:
        q, sz = fmt.quantize(w, block)
        rq, rs, rz = ref.quantize_q4(w.numpy(), block)
        assert np.array_equal(q.numpy(), rq)
        assert np.array_equal(sz[..., 0].float().numpy(), rs.T)
        assert np.array_equal(sz[..., 1].float().numpy(), rz.T)


@given(
    name=st.sampled_from(QFORMATS),
    d=st.sampled_from([64, 96, 128]),  # 96: q4 blocks of 32 and a partial block of rows
    group=st.sampled_from([32, 64]),
    n=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
    bf16_input=st.booleans(),
)
@SLOW
def test_pack_matches_reference_bit_exact(name, d, group, n, seed, scale, bf16_input):
    gate, up, down = weights(d, n * group, seed, scale)
    if bf16_input:
        gate, up, down = (t.to(torch.bfloat16) for t in (gate, up, down))
    fmt = FORMATS[name]
    buf = fmt.pack(gate, up, down, group)
    assert buf.dtype == torch.uint8 and buf.dim() == 1
    assert buf.numel() == n * fmt.group_nbytes(d, group)
    assert np.array_equal(buf.numpy(), ref_pack(name, gate, up, down, group))


@given(
    name=st.sampled_from(QFORMATS),
    n=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    scale=st.sampled_from([1e-3, 1.0, 1e3]),
)
@SLOW
def test_pack_unpack_roundtrip_error_bounds(name, n, seed, scale):
    d, group = 64, 64
    gate, up, down = weights(d, n * group, seed, scale)
    fmt = FORMATS[name]
    out = fmt.unpack(fmt.pack(gate, up, down, group), d, n * group, group)
    want = ref_unpack(name, ref_pack(name, gate, up, down, group), d, n * group, group)
    for got, exp in zip(out, want, strict=True):
        assert got.dtype == torch.float32 and np.array_equal(got.numpy(), exp)
    # per-matrix error bounds, on the matrices exactly as the kernels see them
    mats = [(torch.cat([gate[j * group : (j + 1) * group], up[j * group : (j + 1) * group]]),
             torch.cat([out[0][j * group : (j + 1) * group], out[1][j * group : (j + 1) * group]]))
            for j in range(n)]  # fmt: skip
    mats += [(down[:, j * group : (j + 1) * group], out[2][:, j * group : (j + 1) * group])
             for j in range(n)]  # fmt: skip
    for w, wq in mats:
        w, err = w.numpy(), np.abs(wq.numpy() - w.numpy())
        if name == "q8":
            # rounding <= s/2 with s <= (m/127)(1 + 2^-8); clipping (s rounded down) <= 2^-8 m
            m = np.abs(w).max(axis=1, keepdims=True)
            assert np.all(err <= 0.503 * m / 127 + 1e-6 * m)
        else:
            # rounding <= s/2, z's bf16 rounding <= 2^-8 |z|, clipping (s rounded down) <= 15 ds
            b = Q4.block_size(d, group)
            wb, eb = w.reshape(w.shape[0], -1, b), err.reshape(w.shape[0], -1, b)
            s = (wb.max(2) - wb.min(2)) / 15
            z = wb.min(2) + 8 * s
            bound = 0.5 * s * (1 + U_BF16) + U_BF16 * np.abs(z) + 15 * U_BF16 * s
            assert np.all(eb <= bound[..., None] * 1.001 + 1e-6 * np.abs(wb).max())


@given(
    name=st.sampled_from(QFORMATS),
    n=st.integers(2, 5),
    k=st.integers(1, 4),
    seed=st.integers(0, 99),
)
@SLOW
def test_group_prefix_is_byte_prefix(name, n, k, seed):
    k = min(k, n - 1)
    d, group = 64, 64
    gate, up, down = weights(d, n * group, seed)
    fmt = FORMATS[name]
    full = fmt.pack(gate, up, down, group)
    head = fmt.pack(gate[: k * group], up[: k * group], down[:, : k * group], group)
    assert torch.equal(full[: k * fmt.group_nbytes(d, group)], head)


def test_zero_and_constant_weights():
    d, group = 64, 64
    gate = torch.full((group, d), 0.25)
    up, down = torch.zeros(group, d), torch.full((d, group), -1.5)
    for name in QFORMATS:
        fmt = FORMATS[name]
        g2, u2, d2 = fmt.unpack(fmt.pack(gate, up, down, group), d, group, group)
        assert torch.equal(u2, up)  # zeros stay zeros (scale 0, no division by zero)
        if name == "q4":  # a constant block is its zero point: exact for bf16 values
            assert torch.equal(g2, gate) and torch.equal(d2, down)
        else:  # q8 has no zero point: within half a step of m / 127
            assert float((g2 - gate).abs().max()) <= 0.503 * 0.25 / 127


# ---- kernels against the reference ---------------------------------------------------------------


@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize("t", [1, 5])
def test_quantized_matmul_elementwise_bound(name, t):
    d, group = 256, 128
    gate, up, down = weights(d, group, seed=7)
    fmt = FORMATS[name]
    w = fmt.view(fmt.pack(gate, up, down, group), d, group)
    gq, uq, dq = (
        m.double().numpy() for m in fmt.unpack(fmt.pack(gate, up, down, group), d, group, group)
    )
    x = torch.randn(t, d).to(torch.bfloat16)
    a = torch.randn(t, group).to(torch.bfloat16)
    if name == "q8":
        ys = [torch.ops.aten._weight_int8pack_mm(x, w.gu[0], w.gu_scale[0]),
              torch.ops.aten._weight_int8pack_mm(a, w.dn[0], w.dn_scale[0])]  # fmt: skip
    else:
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        ys = [mm(x, w.gu[0], w.block, w.gu_sz[0]), mm(a, w.dn[0], w.block, w.dn_sz[0])]
    for y, xin, wm in zip(ys, (x, a), (np.concatenate([gq, uq]), dq), strict=True):
        xf = xin.double().numpy()
        exact = xf @ wm.T
        k = xf.shape[1]
        bound = U_BF16 * np.abs(exact) + (k + 2) * U_F32 * (np.abs(xf) @ np.abs(wm).T)
        assert y.dtype == torch.bfloat16
        assert np.all(np.abs(y.double().numpy() - exact) <= bound * 1.001)


@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize(("t", "path"), [(1, "fused"), (4, "fused"), (1, "dense"), (24, "dense"),
                                         (100, "auto")])  # fmt: skip
@pytest.mark.parametrize(("d", "n", "group"), [(128, 3, 64), (96, 2, 32)])
def test_partials_match_bf16_reference(name, t, path, d, n, group):
    gate, up, down = weights(d, n * group, seed=11 + t)
    fmt = {"fused": with_prefill(name, None), "dense": with_prefill(name, 1)}.get(
        path, FORMATS[name]
    )
    buf = fmt.pack(gate, up, down, group)
    gq, uq, dq = (m.numpy() for m in fmt.unpack(buf, d, n * group, group))
    x = torch.randn(t, d)
    parts = list(fmt.partials(x, fmt.view(buf, d, group)))
    assert len(parts) == n
    dense = fmt.prefill_min_tokens is not None and t >= fmt.prefill_min_tokens
    # q4 falls back to the fused kernel when D is not a whole number of row blocks
    dense = dense and not (name == "q4" and d % ref.INT4_LAYOUTS[int4_layout()][0])
    for j, p in enumerate(parts):
        assert p.dtype == torch.float32 and p.shape == (t, d)
        sl = slice(j * group, (j + 1) * group)
        g_, u_, d_ = gq[sl], uq[sl], dq[:, sl]
        if dense and gemm_dtype() == torch.float32:  # no AVX512_BF16: a float32 GEMM
            if name == "q8":  # q8's dequantized group is rounded to bf16 once (q * s)
                g_, u_, d_ = (ref.bf16_round(m) for m in (g_, u_, d_))
            exact = ref.swiglu_ref(x.numpy(), g_, u_, d_)
            assert normwise(p.double().numpy(), exact) <= 1e-5
            continue
        if dense:  # the dense path multiplies by the weights rounded to bf16
            g_, u_, d_ = (ref.bf16_round(m) for m in (g_, u_, d_))
        emulated = ref.swiglu_bf16_ref(x.numpy(), g_, u_, d_)
        exact = ref.swiglu_ref(ref.bf16_round(x.numpy()), g_, u_, d_)
        assert normwise(p.double().numpy(), emulated) <= U_BF16
        assert normwise(p.double().numpy(), exact) <= 4 * U_BF16


@pytest.mark.parametrize("layout", sorted(ref.INT4_LAYOUTS))
def test_torch_dequantize_matches_reference_in_every_layout(layout):
    n, k = 128, 128  # two row blocks in every layout
    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, (n, k)).astype(np.uint8)
    s = ref.bf16_round(rng.random((n, k // 64)).astype(np.float32))
    z = ref.bf16_round(rng.standard_normal((n, k // 64)).astype(np.float32))
    sz = torch.from_numpy(np.stack([s.T, z.T], -1)).to(torch.bfloat16)
    wt = quant._dequant4_t(torch.from_numpy(ref.encode_int4(q, layout)), sz, 64, layout)
    w = wt.transpose(1, 2).reshape(n, k)
    want = ref.dequantize_q4(q, s, z, 64)
    # f32 (q - 8) s + z, rounded once to bf16: at most half a bf16 ulp, plus f32 rounding
    assert np.all(np.abs(w.float().numpy() - want) <= U_BF16 * np.abs(want) + 1e-6)


@pytest.mark.parametrize("name", QFORMATS)
def test_partials_return_activation_dtype(name):
    d, group = 64, 64
    fmt = FORMATS[name]
    w = fmt.view(fmt.pack(*weights(d, group, 0), group), d, group)
    x = torch.randn(2, d)
    (pf,) = fmt.partials(x, w)
    (pb,) = fmt.partials(x.to(torch.bfloat16), w)
    assert pf.dtype == torch.float32 and pb.dtype == torch.bfloat16
    assert torch.equal(pf.to(torch.bfloat16), pb)  # f32 input is cast to bf16 first


@pytest.mark.parametrize("name", QFORMATS)
@pytest.mark.parametrize("t", [1, 3, 100])
def test_split_segments_are_bit_exact(name, t):
    d, n, group = 128, 4, 64
    fmt = FORMATS[name]
    buf = fmt.pack(*weights(d, n * group, 5), group)
    per = fmt.group_nbytes(d, group)
    x = torch.randn(t, d)
    whole = expert_forward(fmt, x, [fmt.view(buf, d, group)])
    for k in range(1, n):
        top, bottom = buf[: k * per].clone(), buf[k * per :].clone()  # separate slots
        split = expert_forward(fmt, x, [fmt.view(top, d, group), fmt.view(bottom, d, group)])
        assert torch.equal(whole, split)


@pytest.mark.parametrize("name", QFORMATS)
def test_view_is_zero_copy_over_an_mmap_slot(name):
    d, n, group = 64, 2, 64
    fmt = FORMATS[name]
    packed = fmt.pack(*weights(d, n * group, 9), group)
    slot = mmap.mmap(-1, 1 << 16)  # page-aligned, like a pool slot
    buf = torch.frombuffer(slot, dtype=torch.uint8, count=packed.numel())
    buf.copy_(packed)
    w = fmt.view(buf, d, group)
    lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
    for tensors in w[:4]:
        assert all(lo <= t.data_ptr() < hi for t in tensors)
    x = torch.randn(1, d)
    assert torch.equal(
        expert_forward(fmt, x, [w]), expert_forward(fmt, x, [fmt.view(packed, d, group)])
    )
    buf.zero_()  # the view sees the slot's bytes, not a copy
    assert not bool(expert_forward(fmt, x, [w]).any())
    del w, buf
    slot.close()


# ---- errors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", QFORMATS)
def test_bad_input_raises_config_error(name):
    fmt = FORMATS[name]
    gate, up, down = weights(64, 128, 0)
    with pytest.raises(ConfigError, match="shapes disagree"):
        fmt.pack(gate, up, down.t(), 64)
    with pytest.raises(ConfigError, match="does not divide"):
        fmt.pack(gate, up, down, 48)
    with pytest.raises(ConfigError, match="multiples of"):
        fmt.pack(*weights(72, 128, 0), 64)
    bad = gate.clone()
    bad[3, 3] = float("nan")
    with pytest.raises(ConfigError, match="NaN"):
        fmt.pack(bad, up, down, 64)
    buf = fmt.pack(gate, up, down, 64)
    with pytest.raises(ConfigError, match="whole number"):
        fmt.view(buf[:-64], 64, 64)
    with pytest.raises(ConfigError, match="aligned"):
        fmt.view(torch.cat([torch.zeros(8, dtype=torch.uint8), buf])[8:], 64, 64)
    with pytest.raises(ConfigError, match="activations"):
        list(fmt.partials(torch.randn(1, 32), fmt.view(buf, 64, 64)))


# ---- layout tag and repack -----------------------------------------------------------------------


def test_layout_tags():
    assert FORMATS["q8"].layout_tag() == "q8:rowwise-int8-bf16scale:v1"
    tag = FORMATS["q4"].layout_tag()
    assert tag == f"q4:v1:int4pack-cpu:{int4_layout()}"
    if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX"):
        assert int4_layout() == "n64"


@pytest.mark.parametrize("src", sorted(ref.INT4_LAYOUTS))
def test_repack_from_another_layout_is_bit_identical(src):
    d, n, group = 128, 2, 64
    gate, up, down = weights(d, n * group, 21)
    fmt = FORMATS["q4"]
    foreign = torch.from_numpy(
        ref.pack_q4_ref(*(t.numpy() for t in (gate, up, down)), group, 64, src)
    )
    tag = f"q4:v1:int4pack-cpu:{src}"
    assert fmt.check_tag(tag) is (src == int4_layout())
    assert torch.equal(fmt.repack(foreign, d, group, tag), fmt.pack(gate, up, down, group))


def test_unknown_layout_tags_raise_store_error():
    assert FORMATS["q8"].check_tag("q8:rowwise-int8-bf16scale:v1")
    with pytest.raises(StoreError, match="convert"):
        FORMATS["q8"].check_tag("q8:rowwise-int8-bf16scale:v0")
    fmt = FORMATS["q4"]
    buf = fmt.pack(*weights(64, 64, 0), 64)
    for tag in ("q4:v1:int4pack-cpu:opaque-torch9.9-AVX1024", "q4:b64:int4pack-cpu:n64", "q8:x"):
        with pytest.raises(StoreError, match="convert"):
            fmt.check_tag(tag)
        with pytest.raises(StoreError, match="convert"):
            fmt.repack(buf, 64, 64, tag)


CROSS_CAPABILITY = """
import numpy as np, torch
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.formats import expert_forward
from micro_expert_router.kernels.quant import Q4, int4_layout
g = torch.Generator().manual_seed(0)
d, group = 64, 64
w = [torch.randn(group, d, generator=g), torch.randn(group, d, generator=g),
     torch.randn(d, group, generator=g)]
fmt = Q4()
n64 = torch.from_numpy(ref.pack_q4_ref(*(t.numpy() for t in w), group, 64, "n64"))
buf = fmt.repack(n64, d, group, "q4:v1:int4pack-cpu:n64")
assert torch.equal(buf, fmt.pack(*w, group))
x = torch.randn(1, d)
y = expert_forward(fmt, x, [fmt.view(buf, d, group)]).double().numpy()
gq, uq, dq = (t.double().numpy() for t in fmt.unpack(buf, d, group, group))
xd = x.double().numpy()
h, u = xd @ gq.T, xd @ uq.T
want = (h / (1 + np.exp(-h)) * u) @ dq.T  # exact SwiGLU of the dequantized weights
tol = 2**-7  # the torch-op path rounds x to bf16 (~2^-9 per element)
from micro_expert_router.kernels import native
if native.available() and native.q4_block_rows() is not None and fmt.int8_activations:
    # the native default quantizes x and a to int8 (1.2% here): the SwiGLU it computes
    want, tol = ref.swiglu_int8_ref(x.numpy(), gq, uq, dq, group)[0], 2**-12
assert np.linalg.norm(y - want) <= tol * np.linalg.norm(want)
print(int4_layout())
"""


@pytest.mark.parametrize(("cap", "layout"), [("avx2", "n32"), ("default", "pair32")])
def test_other_cpu_capability_layouts_and_repack(cap, layout):
    env = {**os.environ, "ATEN_CPU_CAPABILITY": cap}
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(CROSS_CAPABILITY)], env=env,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == [layout]


def test_registered_and_grouped():
    assert isinstance(get_format("q8"), Q8) and isinstance(get_format("q4"), Q4)
    assert choose_group(FORMATS["q4"], 5632) == 704
    assert choose_group(FORMATS["q4"], 1408) == 352  # 1408 = 44 blocks of 32: four groups
    assert choose_group(FORMATS["q4"], 224) == 32  # the demo model: seven groups
    assert Q4.block_size(2048, 704) == 64 and Q4.block_size(2048, 352) == 32
    assert choose_group(FORMATS["q8"], 1408) == 176


# ---- quality helpers -----------------------------------------------------------------------------


def test_expert_error_and_summary():
    d, group = 128, 64
    gate, up, down = weights(d, 2 * group, 4)
    errs = {}
    for name, hi in (("q8", 0.01), ("q4", 0.12)):
        fmt = FORMATS[name]
        e = quality.expert_error(fmt, fmt.pack(gate, up, down, group), gate, up, down, group)
        gq, _, _ = ref_unpack(name, ref_pack(name, gate, up, down, group), d, 2 * group, group)
        want = np.linalg.norm(gq - gate.numpy()) / np.linalg.norm(gate.numpy())
        assert e.gate == pytest.approx(want, rel=1e-6)
        assert 0 < e.gate < hi and 0 < e.up < hi and 0 < e.down < hi
        errs[name] = e
    assert errs["q8"].gate < errs["q4"].gate / 8
    lines = quality.error_summary(errs)
    assert len(lines) == 3 and "(q4)" in lines[0] and "2 experts" in lines[2]
    rg, ru, rd = quality.roundtrip(FORMATS["q4"], gate, up, down, group)
    assert quality.rel_l2(gate, rg) == pytest.approx(errs["q4"].gate)


def test_rel_l2_top1_perplexity_by_hand():
    assert quality.rel_l2(torch.tensor([3.0, 4.0]), torch.tensor([3.0, 5.0])) == pytest.approx(0.2)
    assert quality.rel_l2(torch.zeros(2), torch.zeros(2)) == 0.0
    ref_l = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 2.0, 3.0]])
    test_l = torch.tensor([[0.0, 2.0, 0.0], [0.0, 3.0, 0.0], [0.0, 0.0, 1.0], [3.0, 2.0, 1.0]])
    assert quality.top1_agreement(ref_l, test_l) == 0.5
    assert quality.perplexity(torch.zeros(5, 7), torch.arange(5)) == pytest.approx(7.0)
    # p(target) = 1/2 and 1/4 -> ppl = exp((ln 2 + ln 4) / 2) = sqrt(8)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25], [0.25, 0.5, 0.25]]))
    assert quality.perplexity(logits, torch.tensor([0, 2])) == pytest.approx(8**0.5)
    with pytest.raises(ConfigError):
        quality.perplexity(logits, torch.tensor([0]))


# ---- quality on the demo model (acceptance: q8 ppl within 1% of f32, q4 within 2%) ----------


@pytest.mark.slow
def test_demo_model_quality_through_the_real_kernels(monkeypatch):
    """Held-out perplexity and next-token agreement of q8 and q4 against f32, every expert
    packed and computed by the real kernels (ResidentProvider + the engine's Transformer).
    Measured on all 772 held-out cookies: q8 -0.01%, top-1 0.994; q4 +0.23%, top-1 0.948.
    The 120 cookies used here are shipped in tests/data, so the bounds run in CI."""
    import importlib
    from pathlib import Path

    from micro_expert_router.checkpoint import Checkpoint, load_dense
    from micro_expert_router.demo import demo_model_path
    from micro_expert_router.model import Transformer
    from micro_expert_router.provider import ResidentProvider
    from micro_expert_router.tokenizer import Tokenizer

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "scripts"))
    corpus = importlib.import_module("demo_corpus")
    # 120 held-out cookies, shipped as test data (tests/data/README.md)
    heldout = corpus.split_cookies((root / "tests/data/demo-heldout.txt").read_text("utf-8"))
    assert len(heldout) == corpus.HELDOUT_SAMPLE
    try:
        folder = demo_model_path()
    except CheckpointError as e:
        pytest.skip(str(e))
    ckpt = Checkpoint(folder)
    args = ckpt.args
    dense = load_dense(ckpt, torch.float32)
    experts = {(layer, e): ckpt.expert(layer, e) for layer in range(args.n_layers)
               if args.moe_layers[layer] for e in range(args.n_experts)}  # fmt: skip
    ckpt.close()
    tok = Tokenizer(folder)
    seqs = [torch.tensor(tok.encode(c)[:128]) for c in heldout]
    targets = torch.cat([s[1:] for s in seqs])
    logits = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: 2 threads only add waits on a shared machine
    try:
        for name in ("f32", "q8", "q4"):
            fmt = get_format(name)
            group = choose_group(fmt, args.expert_inter)
            packed = {k: fmt.pack(*w, group) for k, w in experts.items()}
            provider = ResidentProvider(fmt, args.hidden_size, group, packed)
            model = Transformer(args, dense, provider, torch.float32, 512)
            logits[name] = torch.cat([model.forward(s, model.new_cache())[:-1] for s in seqs])
    finally:
        torch.set_num_threads(threads)
    ppl = {k: quality.perplexity(v, targets) for k, v in logits.items()}
    assert ppl["q8"] <= ppl["f32"] * 1.01
    assert ppl["q4"] <= ppl["f32"] * 1.02
    assert quality.top1_agreement(logits["f32"], logits["q8"]) >= 0.98
    assert quality.top1_agreement(logits["f32"], logits["q4"]) >= 0.90


def test_shipped_heldout_text_is_the_corpus_split(monkeypatch):
    """tests/data/demo-heldout.txt is the first held-out cookies of the corpus, unchanged
    (checked where Debian's fortune files are installed)."""
    import importlib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "scripts"))
    corpus = importlib.import_module("demo_corpus")
    if not corpus.FORTUNE_DIR.is_dir():
        pytest.skip(f"the fortune files are not installed under {corpus.FORTUNE_DIR}")
    shipped = corpus.split_cookies((root / "tests/data/demo-heldout.txt").read_text("utf-8"))
    assert shipped == list(corpus.load_corpus().heldout[: corpus.HELDOUT_SAMPLE])
