"""The bundled float expert formats (f32, bf16): pack/unpack round trip, SwiGLU against a NumPy
reference, the group-prefix property and bit-exact split computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import choose_group, expert_forward, get_format


def numpy_swiglu(x, gate, up, down):
    g, u = x @ gate.T, x @ up.T
    return ((g / (1 + np.exp(-g))) * u) @ down.T


@pytest.mark.parametrize("name,tol", [("f32", 1e-5), ("bf16", 2e-2)])
@pytest.mark.parametrize("t", [1, 3, 17])
def test_expert_forward_matches_numpy(name, tol, t):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(t)
    d, i = 48, 64
    gate, up = torch.randn(i, d, generator=gen) / 7, torch.randn(i, d, generator=gen) / 7
    down = torch.randn(d, i, generator=gen) / 8
    group = choose_group(fmt, i)
    buf = fmt.pack(gate, up, down, group)
    assert buf.numel() == (i // group) * fmt.group_nbytes(d, group)
    x = torch.randn(t, d, generator=gen)
    # the reference sees the weights as stored (bf16-rounded for bf16)
    g2, u2, d2 = fmt.unpack(buf, d, i, group)
    ref = numpy_swiglu(x.numpy().astype(np.float64), g2.numpy(), u2.numpy(), d2.numpy())
    y = expert_forward(fmt, x, [fmt.view(buf, d, group)]).numpy()
    # bf16: activations are rounded to bf16 (2**-8 relative) before each of two matmuls
    assert np.abs(y - ref).max() <= tol * np.abs(ref).max()


@pytest.mark.parametrize("name", ["f32", "bf16"])
def test_pack_unpack_roundtrip_and_prefix(name):
    fmt = get_format(name)
    d, i, group = 16, 24, 3
    gate, up, down = torch.randn(i, d), torch.randn(i, d), torch.randn(d, i)
    buf = fmt.pack(gate, up, down, group)
    g2, u2, d2 = fmt.unpack(buf, d, i, group)
    dt = fmt.dtype
    assert torch.equal(g2, gate.to(dt).float()) and torch.equal(u2, up.to(dt).float())
    assert torch.equal(d2, down.to(dt).float())
    k = 5  # the first k groups are the bytes of the first k*group neurons
    prefix = fmt.pack(gate[: k * group], up[: k * group], down[:, : k * group], group)
    assert torch.equal(buf[: prefix.numel()], prefix)


@pytest.mark.parametrize("name", ["f32", "bf16"])
def test_split_segments_are_bit_exact(name):
    fmt = get_format(name)
    d, i = 32, 64
    group = choose_group(fmt, i)
    buf = fmt.pack(torch.randn(i, d), torch.randn(i, d), torch.randn(d, i), group)
    per, n = fmt.group_nbytes(d, group), i // group
    for t in (1, 6):
        x = torch.randn(t, d)
        whole = expert_forward(fmt, x, [fmt.view(buf, d, group)])
        for k in range(1, n):
            top, bottom = fmt.view(buf[: k * per], d, group), fmt.view(buf[k * per :], d, group)
            assert torch.equal(expert_forward(fmt, x, [top, bottom]), whole)


def test_bad_buffers_and_groups():
    fmt = get_format("f32")
    with pytest.raises(ConfigError, match="whole number"):
        fmt.view(torch.zeros(100, dtype=torch.uint8), 16, 2)
    with pytest.raises(ConfigError, match="does not divide"):
        fmt.pack(torch.zeros(6, 4), torch.zeros(6, 4), torch.zeros(4, 6), 4)
    with pytest.raises(ConfigError, match="unknown expert format"):
        get_format("q3")
