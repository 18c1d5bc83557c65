"""The fused multi-expert decode op (native.cpp ``q*_experts_swiglu_``, kernels/experts.py):
bit-identical to one call per expert segment, with whole experts and split ones (tops in one
call, bottoms in the next), float32 and bf16 outputs, 1 and 2 threads, every ISA this CPU has,
float32 and int8 activations."""

from __future__ import annotations

import pytest
import torch

from micro_expert_router.kernels import native
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.experts import experts_forward
from micro_expert_router.kernels.formats import FORMATS, expert_forward
from micro_expert_router.kernels.quant import Q4, _offsets, int4_layout

if not native.load():
    pytest.skip(f"native kernels unavailable: {native.INFO.reason}", allow_module_level=True)

ISAS = [0, 1] if native.has_avx512() or native.has_avx2_fma() else [0]
D, N_GROUPS = 128, 4


def experts(name: str, k: int, group: int):
    fmt = FORMATS[name]
    g = torch.Generator().manual_seed(k)
    i = N_GROUPS * group
    bufs = [fmt.pack(torch.randn(i, D, generator=g) * D**-0.5,
                     torch.randn(i, D, generator=g) * D**-0.5,
                     torch.randn(D, i, generator=g) * i**-0.5, group)
            for _ in range(k)]  # fmt: skip
    return fmt, bufs


def op(name: str, ys, x, bufs, group: int, isa: int, fused: bool, int8: bool = False) -> None:
    offs, per = _offsets(name, D, group)
    if name == "q8":
        if fused:
            torch.ops.mer.q8_experts_swiglu_(ys, x, bufs, D, group, offs, per, isa, int8)
        else:
            for y, b in zip(ys, bufs, strict=True):
                torch.ops.mer.q8_swiglu_(y, x, b, D, group, offs, per, isa, int8)
        return
    layout = int4_layout()
    bn, split = ref.INT4_LAYOUTS[layout]
    blk = Q4.block_size(D, group)
    if fused:
        torch.ops.mer.q4_experts_swiglu_(ys, x, bufs, D, group, blk, offs, per, bn, split, isa,
                                         int8)  # fmt: skip
    else:
        for y, b in zip(ys, bufs, strict=True):
            torch.ops.mer.q4_swiglu_(y, x, b, D, group, blk, offs, per, bn, split, isa, int8)


@pytest.mark.parametrize("name", ["q8", "q4"])
@pytest.mark.parametrize("t", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("int8", [False, True])
def test_fused_equals_one_call_per_expert(name, t, dtype, int8):
    group = 64
    fmt, bufs = experts(name, 5, group)
    per = fmt.group_nbytes(D, group)
    x = torch.randn(t, D)
    for isa in ISAS:
        if name == "q4" and isa and native.q4_block_rows() is None:
            continue
        sep = [torch.zeros(t, D, dtype=dtype) for _ in bufs]
        op(name, sep, x, bufs, group, isa, fused=False, int8=int8)
        fused = [torch.zeros(t, D, dtype=dtype) for _ in bufs]
        op(name, fused, x, bufs, group, isa, fused=True, int8=int8)
        assert all(torch.equal(a, b) for a, b in zip(sep, fused, strict=True))
        # split experts: every expert cut at its own group, tops fused, then bottoms fused
        cuts = [1, 2, 3, 1, 2]
        split = [torch.zeros(t, D, dtype=dtype) for _ in bufs]
        op(name, split, x, [b[: c * per] for b, c in zip(bufs, cuts, strict=True)], group, isa,
           fused=True, int8=int8)  # fmt: skip
        op(name, split, x, [b[c * per :] for b, c in zip(bufs, cuts, strict=True)], group, isa,
           fused=True, int8=int8)  # fmt: skip
        assert all(torch.equal(a, b) for a, b in zip(sep, split, strict=True))
        old = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            one = [torch.zeros(t, D, dtype=dtype) for _ in bufs]
            op(name, one, x, bufs, group, isa, fused=True, int8=int8)
        finally:
            torch.set_num_threads(old)
        assert all(torch.equal(a, b) for a, b in zip(sep, one, strict=True))


def test_segments_of_different_lengths_in_one_call():
    fmt, bufs = experts("q8", 3, 32)
    per = fmt.group_nbytes(D, 32)
    x = torch.randn(1, D)
    segs = [bufs[0], bufs[1][:per], bufs[2][2 * per :]]  # 4, 1 and 2 groups
    sep = [torch.zeros(1, D) for _ in segs]
    op("q8", sep, x, segs, 32, 0, fused=False)
    fused = [torch.zeros(1, D) for _ in segs]
    op("q8", fused, x, segs, 32, 0, fused=True)
    assert all(torch.equal(a, b) for a, b in zip(sep, fused, strict=True))


@pytest.mark.parametrize("name", ["q8", "q4"])
def test_experts_forward_matches_expert_forward(name):
    """The Python entry: native fused where it applies, else one expert_forward per view."""
    fmt, bufs = experts(name, 4, 64)
    views = [fmt.view(b, D, 64) for b in bufs]
    x = torch.randn(1, D)
    want = [expert_forward(fmt, x, [v]) for v in views]
    got = experts_forward(fmt, x, views)
    assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))
    again = experts_forward(fmt, x, views, out=[w.clone() for w in want])
    for a, b in zip(again, want, strict=True):  # out continues: w + the same sum
        assert torch.allclose(a, 2 * b, rtol=1e-5, atol=1e-6)
    assert experts_forward(fmt, x, []) == []
