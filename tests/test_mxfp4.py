"""The mxfp4 expert format and its native kernel (kernels/mxfp4.py, mxfp4.cpp).

References: gguf-py's ``gguf.quants.MXFP4`` (NumPy, after reordering the checkpoint's nibbles
into GGUF's block layout here, independently of the engine) and transformers'
``convert_moe_packed_tensors`` (what transformers itself runs on GPT-OSS checkpoints).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import expert_forward, get_format
from micro_expert_router.kernels.mxfp4 import (
    MXFP4,
    RawExpert,
    available,
    clamped_swiglu,
    dequantize_rows,
)

gguf_quants = pytest.importorskip("gguf.quants")
native = pytest.mark.skipif(not available(), reason="no native MXFP4 kernel (compiler or AVX2)")

# Bounds of the native kernel against float64 math on the dequantized weights, relative to
# sum_k |w_k x_k| (the condition of the dot): f32 activations differ from the reference only by
# float32 rounding (1e-6 leaves room for K up to ~3000); int8 activations by the rounding of x to
# 8 bits per block of 32, at most half a step, 1/254 of the block's max|x|.
F32_BOUND, I8_BOUND = 1e-6, 1 / 254


def random_mxfp4(rows: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (rows, k // 32, 16), generator=g, dtype=torch.uint8)
    scales = torch.randint(118, 128, (rows, k // 32), generator=g, dtype=torch.uint8)
    return blocks, scales


def gguf_reference(blocks: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Dequantize with gguf-py: checkpoint byte k holds elements 2k (low) and 2k+1 (high);
    a GGUF block is the exponent byte, then byte i = element i | element i+16 << 4."""
    b, s = blocks.numpy(), scales.numpy()
    codes = np.empty(b.shape[:-1] + (32,), dtype=np.uint8)
    codes[..., 0::2], codes[..., 1::2] = b & 15, b >> 4
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    raw = np.concatenate([s[..., None], qs], axis=-1)  # [R, B, 17]
    out = gguf_quants.dequantize(
        raw.reshape(raw.shape[0], -1), gguf_quants.GGMLQuantizationType.MXFP4
    )
    return out.astype(np.float32)


def test_dequantize_bit_identical_to_gguf_and_transformers() -> None:
    blocks, scales = random_mxfp4(48, 256)
    scales[0, 0], scales[1, 1], scales[2, 2] = 0, 1, 250  # subnormal and large exponents
    ours = dequantize_rows(blocks, scales)
    assert np.array_equal(
        ours.numpy().view(np.uint32), gguf_reference(blocks, scales).view(np.uint32)
    )
    mx = pytest.importorskip("transformers.integrations.mxfp4")
    hf = mx.convert_moe_packed_tensors(blocks[None], scales[None], dtype=torch.float32)  # [1, K, R]
    # the same values; transformers' table has -0.0 for code 8 where gguf (and we) have +0.0
    assert torch.equal(ours, hf[0].t())


def _linear(x: torch.Tensor, blocks: torch.Tensor, scales: torch.Tensor, isa: int) -> torch.Tensor:
    y = torch.empty((x.shape[0], blocks.shape[0]))
    torch.ops.mer_mxfp4.linear_(y, x.contiguous(), blocks, scales, isa)
    return y


@native
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("k", [1024, 1184, 2880, 480])  # 32, 37, 90 and 15 blocks (tails)
def test_native_dots_scalar_identical_and_within_bound(t: int, k: int) -> None:
    blocks, scales = random_mxfp4(42, k)  # 4-row kernels and 2 rows left
    scales[0, 0], scales[1, 1], scales[2, 2] = 0, 1, 2  # subnormal block scales (2^(e - 128))
    x = torch.randn(t, blocks.shape[1] * 32, generator=torch.Generator().manual_seed(1))
    w = dequantize_rows(blocks, scales).double()  # [N, K]
    ref = x.double() @ w.t()
    cond = x.double().abs() @ w.abs().t()
    # isa 1 / 2: the best SIMD code (AVX-512 where the CPU has it); 4 / 5: AVX2 forced
    for simd, scalar, bound in ((1, 0, F32_BOUND), (2, 3, I8_BOUND), (4, 0, F32_BOUND),
                                (5, 3, I8_BOUND)):  # fmt: skip
        y = _linear(x, blocks, scales, simd)
        assert torch.equal(
            y.view(torch.int32), _linear(x, blocks, scales, scalar).view(torch.int32)
        )
        err = ((y.double() - ref).abs() / cond).max().item()
        assert err <= bound, (simd, err)


def _expert(d: int, inter: int, seed: int = 0) -> RawExpert:
    g = torch.Generator().manual_seed(seed)
    gb, gs = random_mxfp4(2 * inter, d, seed)
    db, ds = random_mxfp4(d, inter, seed + 1)
    gs.clamp_(max=121)  # keep h within the clamp's interesting range
    return RawExpert(gb, gs, db, ds, torch.randn(2 * inter, generator=g),
                     torch.randn(d, generator=g))  # fmt: skip


def reference_expert(x: torch.Tensor, w: RawExpert, alpha: float = 1.702, limit: float = 7.0):
    """float64 GPT-OSS expert on the gguf-dequantized weights, as transformers writes it."""
    gu = torch.from_numpy(gguf_reference(w.gu_blocks, w.gu_scales)).double()  # [2I, D]
    dn = torch.from_numpy(gguf_reference(w.dn_blocks, w.dn_scales)).double()  # [D, I]
    h = x.double() @ gu.t() + w.gu_bias.double()
    a = clamped_swiglu(h[:, 0::2], h[:, 1::2], alpha, limit)
    return a @ dn.t() + w.dn_bias.double(), a, dn


def test_pack_roundtrip_and_layout() -> None:
    fmt = get_format("mxfp4")
    w = _expert(64, 128)
    buf = fmt.pack_raw(w, 32)
    assert buf.numel() == 4 * fmt.group_nbytes(64, 32)
    r = fmt.unpack_raw(buf, 64, 128, 32)
    for a, b in zip(r, w, strict=True):
        assert torch.equal(a, b.to(a.dtype))
    v = fmt.view(buf, 64, 32)
    assert torch.equal(v.gu_blocks[1].reshape(-1), w.gu_blocks[64:128].reshape(-1))  # a slice
    assert not v.dn_bias[1:].any()  # the down bias lives in group 0 only
    bad = w._replace(gu_scales=w.gu_scales.clone().fill_(255))
    with pytest.raises(ConfigError, match="NaN"):
        fmt.pack_raw(bad, 32)
    with pytest.raises(ConfigError, match="lossless"):
        fmt.pack(torch.zeros(128, 64), torch.zeros(128, 64), torch.zeros(64, 128), 32)
    assert get_format("mxfp4:1.5:6.0").limit == 6.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expert_within_bound_and_split_identical(dtype: torch.dtype) -> None:
    d, inter, g = 128, 256, 64
    fmt: MXFP4 = get_format("mxfp4")  # type: ignore[assignment]
    w = _expert(d, inter, seed=3)
    buf = fmt.pack_raw(w, g)
    per = fmt.group_nbytes(d, g)
    for t in (1, 20):  # native decode (when available) and the dequantize + matmul path
        x = torch.randn(t, d, generator=torch.Generator().manual_seed(t)).to(dtype)
        whole = expert_forward(fmt, x, [fmt.view(buf, d, g)])
        top, bottom = buf[:per], buf[per:]  # noqa: E203  (a split after one group)
        split = expert_forward(fmt, x, [fmt.view(top, d, g), fmt.view(bottom, d, g)])
        assert torch.equal(whole, split)
        ref, a, dn = reference_expert(x.float(), w)
        cond = a.abs() @ dn.abs().t() + ref.abs()
        err = ((whole.double() - ref).abs() / cond).max().item()
        bound = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: x and h rounded to 8 bits
        assert err <= bound, (t, err)


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_several_experts_in_one_call_identical_to_one_each(dtype: torch.dtype) -> None:
    from micro_expert_router.kernels.experts import experts_forward

    d, inter, g = 64, 128, 32
    fmt: MXFP4 = get_format("mxfp4")  # type: ignore[assignment]
    per = fmt.group_nbytes(d, g)
    bufs = [fmt.pack_raw(_expert(d, inter, seed=s), g) for s in range(3)]
    views = [fmt.view(bufs[0], d, g), fmt.view(bufs[1][:per], d, g), fmt.view(bufs[2], d, g)]
    x = torch.randn(1, d, generator=torch.Generator().manual_seed(7)).to(dtype)
    together = experts_forward(fmt, x, views)
    for v, y in zip(views, together, strict=True):
        assert torch.equal(y, expert_forward(fmt, x, [v]))
    # a split expert continued in a second call (its bottom), as the MoE block does
    rest = experts_forward(fmt, x, [fmt.view(bufs[1][per:], d, g)], out=[together[1].clone()])
    assert torch.equal(rest[0], expert_forward(fmt, x, [fmt.view(bufs[1], d, g)]))
