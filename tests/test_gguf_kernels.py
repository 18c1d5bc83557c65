"""GGML block kernels against gguf-py: ``ggml.dequantize`` equals ``gguf.quants.dequantize`` bit
for bit for every supported type; the expert format's reference path and the native kernels
(``mer_ggml``: AVX2 and scalar) agree with a float64 computation on the dequantized weights
within the stated bound: max |error| <= 2e-5 x max |y| (float32 dot products over K <= 512).
With bfloat16 activations the native types round activations to int8 per weight block (256 for
the K-quants, 32 otherwise; as llama.cpp does): bound 3e-2 on the relative L2 error of y. (The
rounding error of a code is uniform in +-max|x| / 254; for a Gaussian x that is about 0.7 % of
its rms, and the heavy-tailed SwiGLU activation fed to the down rows loses about 1.4 %: 1.1-2.3 %
over the type sets and seeds here.) The SIMD code (AVX2; the K-quants' AVX-512 VNNI row dots
where the CPU has them) and the scalar code give the same bits in both modes, whatever the
thread count; bfloat16 x and y passed to the op directly equal float32 copies rounded once."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import quants
from gguf_models import quantize

from micro_expert_router.kernels import ggml_native
from micro_expert_router.kernels.formats import expert_forward
from micro_expert_router.kernels.ggml import TYPES, dequantize
from micro_expert_router.kernels.ggml_dense import GGMLDense
from micro_expert_router.kernels.ggml_formats import GGUFExperts

BOUND = 2e-5
BOUND_INT8 = 3e-2  # relative L2
native = pytest.mark.skipif(not ggml_native.available(), reason="native GGUF kernels unavailable")


@pytest.mark.parametrize("name", sorted(TYPES))
def test_dequantize_is_bit_exact_with_gguf_py(name):
    t = TYPES[name]
    rng = np.random.default_rng(3)
    k = 512
    w = rng.standard_normal((5, k)).astype(np.float32) * rng.uniform(0.01, 3, (5, 1))
    raw, ref = quantize(w, name)  # realistic blocks
    got = dequantize(t, torch.from_numpy(raw), k).numpy()
    assert got.view(np.uint32).tolist() == ref.astype(np.float32).view(np.uint32).tolist()
    if t.block > 1:  # arbitrary bytes too (NaN/Inf scales included: same positions)
        raw = rng.integers(0, 256, (7, t.row_bytes(k)), dtype=np.uint8)
        with np.errstate(all="ignore"):
            ref = quants.dequantize(raw, gguf.GGMLQuantizationType[name]).astype(np.float32)
        got = dequantize(t, torch.from_numpy(raw), k).numpy()
        fin = np.isfinite(ref)
        assert np.array_equal(fin, np.isfinite(got))
        assert np.array_equal(ref[fin].view(np.uint32), got[fin].view(np.uint32))


def _expert(types, d=256, inter=512, seed=0):
    """A packed GGUF expert of types (gate, up, down) and its dequantized f64 weights."""
    rng = np.random.default_rng(seed)
    mats = [rng.standard_normal(s).astype(np.float32) * 0.05 for s in
            ((inter, d), (inter, d), (d, inter))]  # fmt: skip
    raws, deqs = zip(*(quantize(m, t) for m, t in zip(mats, types, strict=True)), strict=True)
    fmt = GGUFExperts(tuple((t,) for t in types))  # type: ignore[arg-type]
    g = 256 if any(t.endswith("_K") for t in types[2:]) else 128
    buf = fmt.pack_blocks(tuple(r.tobytes() for r in raws), types, d, inter, g)
    return fmt, buf, g, [torch.from_numpy(x).double() for x in deqs]


def _ref(x, gate, up, down):
    x = x.double()
    return (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T  # [T, D]


def _close(y, ref, bound=BOUND):
    err = float((y.double() - ref).abs().max() / ref.abs().max())
    assert err <= bound, err


def _close_l2(y, ref, bound=BOUND_INT8):
    err = float((y.double() - ref).norm() / ref.norm())
    assert err <= bound, err


TYPE_SETS = [("Q4_K", "Q4_K", "Q6_K"), ("Q6_K", "Q5_K", "Q4_K"), ("Q8_0", "Q4_0", "MXFP4"),
             ("F16", "BF16", "F32"), ("Q4_K", "Q8_0", "Q8_0"),
             ("Q5_0", "Q4_1", "Q5_1")]  # fmt: skip


@pytest.mark.parametrize("types", TYPE_SETS, ids="-".join)
def test_reference_partials_and_unpack(types):
    fmt, buf, g, (gate, up, down) = _expert(types)
    view = fmt.view(buf, 256, g)
    gu, uu, du = fmt.unpack(buf, 256, 512, g)
    assert torch.equal(gu.double(), gate) and torch.equal(du.double(), down)
    assert torch.equal(uu.double(), up)
    x = torch.randn(20, 256)  # 20 tokens: the reference (partials) path
    _close(expert_forward(fmt, x, [view]), _ref(x, gate, up, down))


NATIVE_SETS = [t for t in TYPE_SETS if all(n in ggml_native.NATIVE_TYPES for n in t)]


def _swiglu(x, fmt, buf, g, isa):
    view = fmt.view(buf, 256, g)
    y = torch.zeros(x.shape[0], 256)
    torch.ops.mer_ggml.swiglu_(y, x.float(), buf, 256, g, view.per, *[t.id for t in view.types],
                               *fmt.offsets(256, g), isa)  # fmt: skip
    return y


@native
@pytest.mark.parametrize("types", NATIVE_SETS, ids="-".join)
@pytest.mark.parametrize("tokens", [1, 3])
def test_native_swiglu_matches_reference(types, tokens):
    fmt, buf, g, (gate, up, down) = _expert(types)
    x = torch.randn(tokens, 256)
    ref = _ref(x, gate, up, down)
    y = fmt.accumulate(x, fmt.view(buf, 256, g), None)
    assert y is not None
    _close(y, ref)
    assert torch.equal(_swiglu(x, fmt, buf, g, 0), y)  # the portable scalar code: same bits
    # one call over both groups == top group, then bottom group into the same y (same bits)
    per = fmt.view(buf, 256, g).per
    top = fmt.accumulate(x, fmt.view(buf[:per], 256, g), None)
    both = fmt.accumulate(x, fmt.view(buf[per:], 256, g), top)
    assert torch.equal(both, y)


@native
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "MXFP4", "BF16"])
def test_dense_linear_and_rows(name):
    rng = np.random.default_rng(5)
    w = rng.standard_normal((96, 512)).astype(np.float32)
    raw, deq = quantize(w, name)
    m = GGMLDense(TYPES[name], torch.from_numpy(raw), (96, 512))
    ref_w = torch.from_numpy(deq).double()
    for t in (1, 4, 40):  # native below 16 tokens (when the type has a kernel), torch above
        x = torch.randn(t, 512)
        _close(m.linear(x), x.double() @ ref_w.T)
    ids = torch.tensor([3, 0, 95])
    assert torch.equal(m.rows(ids, torch.float32), torch.from_numpy(deq)[ids])
    assert m.nbytes == raw.size and torch.equal(m.dequantize(), torch.from_numpy(deq))


@native
@pytest.mark.parametrize("types", NATIVE_SETS + [("Q6_K", "Q6_K", "Q4_K")], ids="-".join)
def test_native_int8_activations_in_bfloat16_mode(types):
    fmt, buf, g, (gate, up, down) = _expert(types)
    x = torch.randn(2, 256).to(torch.bfloat16)
    ref = _ref(x.float(), gate, up, down)
    view = fmt.view(buf, 256, g)
    y = fmt.accumulate(x, view, None)
    assert y.dtype == torch.bfloat16
    _close_l2(y.float(), ref)
    ya = _swiglu(x, fmt, buf, g, 2)
    _close_l2(ya, ref)
    assert torch.equal(ya, _swiglu(x, fmt, buf, g, 3))  # SIMD and scalar int8 code: same bits
    assert torch.equal(ya, _swiglu(x, fmt, buf, g, 4))  # AVX2 without AVX-512: the same


@native
@pytest.mark.parametrize("name", sorted(ggml_native.NATIVE_TYPES))
def test_native_scalar_and_avx2_bits_on_arbitrary_blocks(name):
    """Random bytes (NaN/Inf and extreme scales, every code): both paths, both modes, the same
    bits (NaN payloads aside)."""
    t = TYPES[name]
    rng = np.random.default_rng(7)
    raw = torch.from_numpy(rng.integers(0, 256, (64, t.row_bytes(512)), dtype=np.uint8))
    x = torch.randn(3, 512)
    for fast, slow in ((1, 0), (2, 3), (4, 3)):  # 2: AVX-512 where the CPU has it, 4: AVX2
        ya, ys = torch.empty(3, 64), torch.empty(3, 64)
        torch.ops.mer_ggml.linear_(ya, x, raw, t.id, fast)
        torch.ops.mer_ggml.linear_(ys, x, raw, t.id, slow)
        a, b = ya.numpy(), ys.numpy()
        assert np.array_equal(np.isnan(a), np.isnan(b)), fast
        fin = ~np.isnan(a)
        assert np.array_equal(a[fin].view(np.uint32), b[fin].view(np.uint32)), fast


@native
@pytest.mark.parametrize("types", [("Q4_K", "Q4_K", "Q6_K"), ("Q6_K", "Q6_K", "Q4_K"),
                                   ("Q8_0", "Q4_0", "Q8_0")], ids="-".join)  # fmt: skip
def test_native_swiglu_bfloat16_io_and_threads(types):
    """bfloat16 x and y (what ``accumulate`` passes in bfloat16 mode) give the float32 op's y
    rounded once; one thread and two give the same bits (the row split differs)."""
    fmt, buf, g, _ = _expert(types, d=512, inter=1024)
    view = fmt.view(buf, 512, g)
    args = (buf, 512, g, view.per, *[t.id for t in view.types], *fmt.offsets(512, g))
    x = torch.randn(3, 512).to(torch.bfloat16)
    y0 = torch.randn(3, 512).to(torch.bfloat16)
    for isa in (2, 4):
        yf = y0.float()
        torch.ops.mer_ggml.swiglu_(yf, x.float(), *args, isa)
        yb = y0.clone()
        torch.ops.mer_ggml.swiglu_(yb, x, *args, isa)
        assert torch.equal(yb, yf.to(torch.bfloat16))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            y1 = y0.float()
            torch.ops.mer_ggml.swiglu_(y1, x.float(), *args, isa)
        finally:
            torch.set_num_threads(threads)
        assert torch.equal(y1, yf)
