"""MLA decode: the absorbed path against the expanded one, per decode step, at given contexts.

  python bench/mla_decode.py [--contexts 512,4096] [--layers 4] [--threads 2] [--dtype f32]

A random DeepSeek-style attention of moderate size (hidden 2048, 16 heads, q_lora 768,
kv_lora 512, rope 64, nope 128, v 128; ``--hidden`` / ``--heads`` change it) over ``--layers``
layers, each with a latent KV cache filled to the context with random rows. One decode step
runs ``models.mla.MLA`` on every layer with ``absorbed=True`` (kv_b_proj folded into the query
and output: one decode-attention call over the latent rows) and with ``absorbed=False``
(transformers' way: every cached latent expanded by kv_b_proj into per-head keys and values,
then attention). Rounds alternate the two (ABAB); each prints one line; then a table of the
medians per context and a final ratio line (expanded / absorbed at the longest context). The
two paths' outputs are compared once per context (relative L2) as a sanity check.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from micro_expert_router.config import ModelArgs
from micro_expert_router.models.mla import MLA, LatentCache, mla_tensor_shapes
from micro_expert_router.models.rope import rope_tables


def make_args(hidden: int, heads: int, layers: int, capacity: int) -> ModelArgs:
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "hidden_size": hidden,
        "num_attention_heads": heads, "num_hidden_layers": layers, "vocab_size": 1024,
        "intermediate_size": 4 * hidden, "moe_intermediate_size": hidden // 2,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "first_k_dense_replace": 0,
        "max_position_embeddings": capacity,
    }  # fmt: skip
    return ModelArgs.from_hf(cfg, where="bench config")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--contexts", default="512,4096")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="weights, KV")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="decode steps per timing")
    o = ap.parse_args()
    torch.set_num_threads(o.threads)
    dtype = torch.float32 if o.dtype == "f32" else torch.bfloat16
    contexts = [int(c) for c in o.contexts.split(",")]
    cap = max(contexts) + o.steps + 1
    a = make_args(o.hidden, o.heads, o.layers, cap)
    torch.manual_seed(0)
    w = {}
    for i in range(a.n_layers):
        for name, shape in mla_tensor_shapes(a, i):
            w[name] = (torch.randn(shape) * (1.0 if len(shape) == 1 else shape[-1] ** -0.5)).to(
                dtype
            )
    cos, sin = rope_tables(a, cap, dtype)
    paths = {"absorbed": MLA(a, w, cos, sin, absorbed=True),
             "expanded": MLA(a, w, cos, sin, absorbed=False)}  # fmt: skip
    x = torch.randn(o.steps, a.hidden_size).to(dtype)
    print(f"MLA decode: hidden {a.hidden_size}, {a.n_heads} heads, kv_lora {a.kv_lora_rank}, "
          f"rope {a.qk_rope_head_dim}, {a.n_layers} layers, {o.dtype}, threads {o.threads}; "
          f"KV {a.kv_bytes_per_token(dtype.itemsize)} bytes/token")  # fmt: skip
    med: dict[tuple[int, str], float] = {}
    for s in contexts:
        kv = LatentCache.empty(a, cap, dtype)
        for t in kv.k:
            t[0, :s] = torch.randn(s, t.shape[-1]).to(dtype)
        outs = {}
        for name, mla in paths.items():  # warm-up (absorbed weights, kernel build) + sanity
            outs[name] = torch.cat([mla(i, x[:1], kv, s) for i in range(a.n_layers)]).float()
        err = ((outs["absorbed"] - outs["expanded"]).norm() / outs["expanded"].norm()).item()
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(o.rounds):
            for name, mla in paths.items():
                t0 = time.perf_counter()
                for j in range(o.steps):
                    for i in range(a.n_layers):
                        mla(i, x[j : j + 1], kv, s + j)
                dt = (time.perf_counter() - t0) / o.steps
                times[name].append(dt)
                print(f"context {s} round {r + 1} {name}: {dt * 1e3:.2f} ms/step "
                      f"({dt / a.n_layers * 1e3:.3f} ms/layer)")  # fmt: skip
        for name in paths:
            med[(s, name)] = statistics.median(times[name])
        print(f"context {s}: absorbed vs expanded relative L2 {err:.1e}")
    print(f"{'context':>8} {'absorbed ms/step':>17} {'expanded ms/step':>17} {'ratio':>6}")
    for s in contexts:
        ab, ex = med[(s, "absorbed")], med[(s, "expanded")]
        print(f"{s:>8} {ab * 1e3:>17.2f} {ex * 1e3:>17.2f} {ex / ab:>6.2f}")
    s = contexts[-1]
    print(f"ratio expanded/absorbed at context {s}: "
          f"{med[(s, 'expanded')] / med[(s, 'absorbed')]:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
