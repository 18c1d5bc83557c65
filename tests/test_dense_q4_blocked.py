"""q4 dense matrices repacked for the decode GEMV (``dense_quant.Q4Blocked``): the repack is
lossless (the same codes and (s, z) pairs as the stored ``Q4Dense``), the GEMV keeps the expert
kernel's definition (checked against the NumPy reference with the bound of
``test_int8_experts.py``, and bit for bit against its scalar code), a token gets the same bits
alone, in a batch and on 1 or 2 threads, the large-T path matches the dequantized weights, and
the model repacks what it can (fused q/k/v of whole row blocks, o_proj, lm_head) and keeps the
embedding table as stored."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import native
from micro_expert_router.kernels import reference as ref
from micro_expert_router.kernels.dense import fuse_rows
from micro_expert_router.kernels.dense_quant import Q4Blocked, Q4Dense
from micro_expert_router.kernels.quant import _int4_pack, int4_layout
from micro_expert_router.store import convert

U = 2.0**-24
SPLIT = ref.INT4_LAYOUTS.get(int4_layout(), (0, False))[1]
pytestmark = pytest.mark.skipif(not (native.dense_available() and SPLIT),
                                reason="no native kernels or split int4 packing")  # fmt: skip


def weight(n: int, k: int, seed: int = 0) -> Q4Dense:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    w[3, :64] = 0.25  # a constant block (s = 0)
    return Q4Dense.quantize(w)


def codes(d: Q4Dense) -> torch.Tensor:
    """The 4-bit codes ``[N, K]`` of a row-major q4 matrix."""
    pb = d.packed.view(d.shape[0], -1, 32)
    return torch.cat([pb & 15, pb >> 4], dim=-1).reshape(d.shape)


def test_repack_is_lossless():
    d = weight(192, 256)
    want, q, sz = d.dequantize().double(), codes(d), d.sz.clone()
    b = d.blocked()  # consumes d
    assert isinstance(b, Q4Blocked) and b.shape == (192, 256)
    assert b.nbytes == 192 * 128 + 4 * 192 * 4  # codes + (s, z) per 64-block
    # the codes in torch's own packing (and the reference encoder's), the same (s, z) pairs
    assert np.array_equal(b.packed.numpy(), ref.encode_int4(q.numpy(), int4_layout()))
    assert torch.equal(b.packed, _int4_pack(q.to(torch.int32), 2).view(torch.uint8))
    bn = b.bn  # each row block's pairs together: [N/bn, K/64, bn, 2]
    assert torch.equal(b.sz, sz.view(192 // bn, bn, 4, 2).transpose(1, 2))
    assert torch.equal(b.pairs(bn, 3 * bn), sz[bn : 3 * bn].transpose(0, 1))
    # and the same weights, up to the two dequantizations' roundings
    got = b.dequantize().double()
    assert torch.allclose(got, want, rtol=2 * U, atol=0)
    ids = torch.tensor([5, 0, 191, 5])
    assert torch.allclose(b.rows(ids, torch.float32).double(), want[ids], rtol=2 * U, atol=0)


@pytest.mark.parametrize(("n", "k", "t"), [(128, 256, 1), (64, 2048, 3), (192, 128, 8)])
def test_gemv_against_the_reference_and_the_scalar_code(n, k, t):
    d = weight(n, k, seed=n + t)
    q = codes(d).double().numpy()
    s = np.repeat(d.sz[..., 0].double().numpy(), 64, axis=1)
    z = np.repeat(d.sz[..., 1].double().numpy(), 64, axis=1)
    b = d.blocked()
    x = torch.randn(t, k) * 2
    y = b.native_linear(x)
    # the definition: q4 (q - 8) s + z in float64, x quantized to int8 in blocks of 32
    want, _ = ref.linear_int8_ref(x.numpy(), (q - 8) * s + z)
    _, m = ref.linear_int8_ref(x.numpy(), q * np.abs(s) + np.abs(z - 8 * s))
    bound = (k // 32 + k // 64 + 4) * U * m
    assert np.all(np.abs(y.double().numpy() - want) <= bound * 1.01)
    assert torch.equal(y, b.native_linear(x, isa=0))  # the scalar code's bits


def test_bits_do_not_depend_on_the_batch_or_threads():
    b = weight(256, 512).blocked()
    x = torch.randn(8, 512)
    y = b.linear(x)
    assert all(torch.equal(b.linear(x[i : i + 1]), y[i : i + 1]) for i in range(8))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(b.linear(x), y)
    finally:
        torch.set_num_threads(threads)


def test_gemm_path_matches_the_dequantized_weights():
    b = weight(320, 256).blocked()
    x = torch.randn(b.native_below + 4, 256)
    want = x.double() @ b.dequantize().double().T
    assert torch.allclose(b.linear(x).double(), want, rtol=1e-4, atol=1e-4)


def test_fused_rows_and_slices():
    alone = [weight(64, 256, s).blocked() for s in range(3)]
    fused, parts = fuse_rows([weight(64, 256, s).blocked() for s in range(3)])
    assert isinstance(fused, Q4Blocked) and fused.shape == (192, 256)
    x = torch.randn(1, 256)
    y = fused.linear(x)
    for j, (w, p) in enumerate(zip(alone, parts, strict=True)):
        assert isinstance(p, Q4Blocked) and torch.equal(p.linear(x), y[:, 64 * j : 64 * j + 64])
        assert torch.equal(p.linear(x), w.linear(x))
    # row-major q4 parts fuse and block where each part is whole row blocks
    fused, _ = fuse_rows([weight(64, 256), weight(64, 256, 1)])
    assert isinstance(fused, Q4Blocked)
    # q4 parts that are not whole row blocks fuse, unblocked
    fused, _ = fuse_rows([weight(64, 256), weight(16, 256, 1)])
    assert type(fused) is Q4Dense
    with pytest.raises(ConfigError, match="cut a .*-row block"):
        fused_b = weight(128, 256).blocked()
        fused_b.row_slice(0, 16)


def test_model_repacks_its_q4_matrices(tmp_path):
    save_hf_model("qwen2moe", tmp_path / "ckpt")
    store = convert(tmp_path / "ckpt", tmp_path / "s", dtype="q4", dense="q4", progress=False,
                    log=None)  # fmt: skip
    with mer.load(store.path) as eng:
        w = eng.model.w
        assert type(w["model.embed_tokens.weight"]) is Q4Dense  # gathered by rows
        assert isinstance(w["model.layers.0.self_attn.o_proj.weight"], Q4Blocked)
        steps = list(eng.generate([3, 4, 5], max_tokens=4, temperature=0, stop_at_eos=False))
        assert len(steps) == 4
