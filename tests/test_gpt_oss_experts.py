"""GPT-OSS experts in the gptoss:<inner> formats (kernels/biased.py): biases in the groups, the
down bias once per expert, the clamped SwiGLU, splits bit-identical to whole experts."""

from __future__ import annotations

import pytest
import torch

from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import expert_forward, get_format
from micro_expert_router.kernels.biased import BiasedExpert, dequantize_expert, float_weights
from micro_expert_router.kernels.mxfp4 import RawExpert, clamped_swiglu


def expert(d: int, inter: int, seed: int = 0) -> BiasedExpert:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    return BiasedExpert(r(inter, d, s=0.2), r(inter, d, s=0.2), r(d, inter, s=0.1), r(inter),
                        r(inter), r(d))  # fmt: skip


def reference(x: torch.Tensor, w: BiasedExpert, limit: float = 7.0) -> torch.Tensor:
    """transformers' GptOssExperts on one expert, in float64."""
    x64 = x.double()
    h = x64 @ w.gate.double().t() + w.gate_bias.double()
    u = x64 @ w.up.double().t() + w.up_bias.double()
    return clamped_swiglu(h, u, 1.702, limit) @ w.down.double().t() + w.down_bias.double()


@pytest.mark.parametrize(("inner", "tol"), [("f32", 1e-5), ("bf16", 3e-2), ("q8", 3e-2),
                                            ("q4", 2e-1)])  # fmt: skip
def test_biased_formats_match_and_split(inner: str, tol: float) -> None:
    d, inter, g = 64, 128, 32
    fmt = get_format(f"gptoss:{inner}")
    w = expert(d, inter)
    buf = fmt.pack_expert(w, g)  # type: ignore[attr-defined]
    assert buf.numel() == inter // g * fmt.group_nbytes(d, g)
    gb, ub, db = fmt.biases(buf, d, g)  # type: ignore[attr-defined]
    assert torch.equal(gb, w.gate_bias) and torch.equal(ub, w.up_bias)
    assert torch.equal(db, w.down_bias)
    x = torch.randn(3, d, generator=torch.Generator().manual_seed(5)) * 3  # reaches the clamp
    dtype = torch.float32 if inner == "f32" else torch.bfloat16
    y = expert_forward(fmt, x.to(dtype), [fmt.view(buf, d, g)])
    per = fmt.group_nbytes(d, g)
    split = expert_forward(fmt, x.to(dtype), [fmt.view(buf[: 3 * per], d, g),
                                             fmt.view(buf[3 * per :], d, g)])  # fmt: skip
    assert torch.equal(y, split)
    ref = reference(x, w)
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < tol, err


def test_pack_checks_and_mxfp4_dequantized() -> None:
    fmt = get_format("gptoss:f32")
    w = expert(64, 64)
    with pytest.raises(ConfigError, match="bias"):
        fmt.pack_expert(w._replace(up_bias=torch.zeros(3)), 32)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="NaN"):
        fmt.pack_expert(w._replace(down_bias=torch.full((64,), float("nan"))), 32)  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="inner"):
        get_format("gptoss:mxfp4")
    # an MXFP4 expert converted to a float format: dequantized exactly
    g = torch.Generator().manual_seed(0)
    raw = RawExpert(torch.randint(0, 256, (128, 2, 16), generator=g, dtype=torch.uint8),
                    torch.randint(120, 127, (128, 2), generator=g, dtype=torch.uint8),
                    torch.randint(0, 256, (64, 2, 16), generator=g, dtype=torch.uint8),
                    torch.randint(120, 127, (64, 2), generator=g, dtype=torch.uint8),
                    torch.randn(128, generator=g), torch.randn(64, generator=g))  # fmt: skip
    buf = fmt.pack_expert(raw, 32)  # type: ignore[attr-defined]
    gate, up, down = fmt.unpack(buf, 64, 64, 32)
    want = float_weights(raw)
    assert all(torch.equal(a, b) for a, b in zip((gate, up, down), want, strict=True))
    assert torch.equal(dequantize_expert(raw).gate, want[0])
    assert torch.equal(
        get_format("gptoss:bf16").unpack(
            get_format("gptoss:bf16").pack_expert(raw, 32), 64, 64, 32
        )[2],
        want[2],
    )  # type: ignore[attr-defined]
