"""A rigged-router test: experts set to known matrices, the router forced to chosen experts,
and the MoE block's output compared with a value worked out by hand (plain Python math)."""

from __future__ import annotations

import math

import torch

from micro_expert_router.config import ModelArgs
from micro_expert_router.kernels import get_format
from micro_expert_router.model import Transformer
from micro_expert_router.provider import ResidentProvider


def silu(z: float) -> float:
    return z / (1.0 + math.exp(-z))


def build(arch: str, extra: dict) -> Transformer:
    cfg = dict(architectures=[arch], hidden_size=2, num_hidden_layers=1, num_attention_heads=1,
               num_key_value_heads=1, vocab_size=4, num_experts_per_tok=2, **extra)  # fmt: skip
    args = ModelArgs.from_hf(cfg)
    eye, zero, swap = torch.eye(2), torch.zeros(2, 2), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # expert 0: y = silu(x) * x; expert 1: y = 0; expert 2: y = swap(2 * silu(x) * x)
    experts = [(eye, eye, eye), (zero, eye, eye), (eye, 2 * eye, swap)]
    fmt = get_format("f32")
    packed = {(0, e): fmt.pack(g, u, d, 1) for e, (g, u, d) in enumerate(experts)}
    provider = ResidentProvider(fmt, 2, 1, packed)
    prefix = args.spec.moe_prefix
    # router logits for x = [1, 2]: expert 0 -> 1.0, expert 1 -> -10, expert 2 -> 0.0
    dense = {"model.embed_tokens.weight": torch.zeros(4, 2), "lm_head.weight": torch.zeros(4, 2),
             f"model.layers.0.{prefix}.gate.weight": torch.tensor([[0.0, 0.5], [-10.0, 0.0],
                                                                    [0.0, 0.0]])}  # fmt: skip
    if args.shared_expert_inter:
        dense.update({
            "model.layers.0.mlp.shared_expert.gate_proj.weight": torch.tensor([[1.0, 1.0]]),
            "model.layers.0.mlp.shared_expert.up_proj.weight": torch.tensor([[1.0, 0.0]]),
            "model.layers.0.mlp.shared_expert.down_proj.weight": torch.tensor([[1.0], [-1.0]]),
            "model.layers.0.mlp.shared_expert_gate.weight": torch.tensor([[0.5, -1.0]]),
        })  # fmt: skip
    return Transformer(args, dense, provider, torch.float32, max_context=8)


def test_mixtral_moe_block_by_hand():
    t = build("MixtralForCausalLM", dict(num_local_experts=3, intermediate_size=2))
    y = t.moe(0, torch.tensor([[1.0, 2.0]]))[0].tolist()
    # top-2 = experts 0 and 2 with softmax probs e/Z and 1/Z, renormalized: e/(e+1), 1/(e+1)
    w0, w2 = math.e / (math.e + 1), 1 / (math.e + 1)
    y0 = [silu(1) * 1, silu(2) * 2]
    y2 = [2 * silu(2) * 2, 2 * silu(1) * 1]
    expected = [w0 * y0[0] + w2 * y2[0], w0 * y0[1] + w2 * y2[1]]
    assert all(abs(a - b) < 1e-6 for a, b in zip(y, expected, strict=True)), (y, expected)


def test_qwen2moe_block_with_shared_expert_by_hand():
    t = build("Qwen2MoeForCausalLM", dict(num_experts=3, moe_intermediate_size=2,
                                          shared_expert_intermediate_size=1,
                                          norm_topk_prob=False))  # fmt: skip
    y = t.moe(0, torch.tensor([[1.0, 2.0]]))[0].tolist()
    z = math.e + math.exp(-10) + 1  # softmax denominator; no renormalization
    w0, w2 = math.e / z, 1 / z
    y0 = [silu(1) * 1, silu(2) * 2]
    y2 = [2 * silu(2) * 2, 2 * silu(1) * 1]
    # shared: h = silu(1 + 2) * 1 = silu(3); down [1, -1]; gate sigmoid(0.5 - 2)
    s = 1 / (1 + math.exp(1.5)) * silu(3.0)
    expected = [w0 * y0[0] + w2 * y2[0] + s, w0 * y0[1] + w2 * y2[1] - s]
    assert all(abs(a - b) < 1e-6 for a, b in zip(y, expected, strict=True)), (y, expected)


def test_router_picks_the_rigged_experts():
    t = build("MixtralForCausalLM", dict(num_local_experts=3, intermediate_size=2))
    experts, weights = t.route(0, torch.tensor([[1.0, 2.0]]))
    assert experts[0].tolist() == [0, 2]
    assert abs(float(weights.sum()) - 1.0) < 1e-6
