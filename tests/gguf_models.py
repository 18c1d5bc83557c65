"""Tiny GGUF models for tests: a random HF checkpoint (``hf_models``) written as GGUF with
gguf-py's ``GGUFWriter`` in chosen block types, plus the reference: the same checkpoint with every
tensor replaced by its gguf-py dequantization, saved as an HF folder for transformers.

gguf-py quantizes Q4_0, Q8_0, MXFP4, F16 and BF16 (``gguf.quants.quantize``); it has no K-quant
encoder, so Q4_K, Q5_K and Q6_K blocks are built here by a plain round-to-nearest quantizer in
the reference block layout (``kernels/ggml.py`` documents it). The reference only needs
gguf-py's *de*quantization of whatever bytes were written.

transformers and gguf are test dependencies here; the runtime never imports transformers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from hf_models import save_hf_model

ARCH = {"Qwen3MoeForCausalLM": "qwen3moe", "OlmoeForCausalLM": "olmoe",
        "Qwen2MoeForCausalLM": "qwen2moe", "MixtralForCausalLM": "llama"}  # fmt: skip

GGUF_CONFIGS = {
    "qwen3moe-k": ("Qwen3MoeConfig", dict(
        hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=4,
        num_experts_per_tok=2, vocab_size=128, norm_topk_prob=True, rope_theta=1e6,
        tie_word_embeddings=False)),
    "olmoe-k": ("OlmoeConfig", dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, vocab_size=128,
        norm_topk_prob=False, rope_theta=10000.0, pad_token_id=0, eos_token_id=1,
        bos_token_id=None, tie_word_embeddings=False)),
    "qwen2moe-k": ("Qwen2MoeConfig", dict(
        hidden_size=256, intermediate_size=256, moe_intermediate_size=256,
        shared_expert_intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, vocab_size=128,
        norm_topk_prob=False, mlp_only_layers=[1], rope_theta=10000.0,
        tie_word_embeddings=True)),
    "mixtral-k": ("MixtralConfig", dict(
        hidden_size=256, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
        rope_theta=1e6, tie_word_embeddings=False)),
}  # fmt: skip

# Block types by tensor role; "down" may be a list (one type per layer, cycled: Q4_K_M-like).
PLANS = {
    "kquant": {"gate": "Q4_K", "up": "Q4_K", "down": ["Q6_K", "Q4_K"], "attn": "Q5_K",
               "attn_v": "Q6_K", "embd": "Q4_K", "output": "Q6_K", "router": "F32",
               "dense": "Q8_0", "norm": "F32"},
    "legacy": {"gate": "Q4_0", "up": "Q8_0", "down": "MXFP4", "attn": "F16", "attn_v": "BF16",
               "embd": "Q8_0", "output": "Q4_0", "router": "F32", "dense": "Q4_0", "norm": "F32"},
    "f32": {"gate": "F32", "up": "F32", "down": "F32", "attn": "F32", "attn_v": "F32",
            "embd": "F32", "output": "F32", "router": "F32", "dense": "F32", "norm": "F32"},
}  # fmt: skip
PLANS["q2up"] = dict(PLANS["kquant"], up="Q2_K")  # a type MER does not compute on


def _q2k(w: np.ndarray) -> np.ndarray:
    """Q2_K blocks (84 B per 256: scales, codes, f16 d, dmin) with random codes at the weights'
    scale: gguf-py has no Q2_K encoder; tests of ``--requantize`` only need valid blocks."""
    n = w.size // 256
    raw = np.random.default_rng(0).integers(0, 256, (n, 84), dtype=np.uint8)
    raw[:, 80:82] = np.float16(np.abs(w).max() / 48).reshape(1).view(np.uint8)
    raw[:, 82:84] = 0
    return raw.reshape(w.shape[0], -1)


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _kquant(w: np.ndarray, name: str) -> np.ndarray:
    """Round-to-nearest Q4_K / Q5_K / Q6_K blocks of rows ``[N, K]`` -> bytes ``[N, row]``."""
    n, k = w.shape
    b = w.reshape(-1, 256).astype(np.float32)  # [blocks, 256]
    nb = b.shape[0]
    if name == "Q6_K":
        s = b.reshape(nb, 16, 16)
        scf = np.abs(s).max(-1) / 31  # [nb, 16]
        d = _f16(scf.max(-1) / 127)  # [nb]
        sd = np.where(d > 0, d, 1)[:, None]
        sc = np.clip(np.round(scf / sd), -128, 127).astype(np.int8)
        dd = (d[:, None] * sc)[..., None]  # [nb, 16, 1]
        q = np.clip(np.round(s / np.where(dd != 0, dd, 1)) + 32, 0, 63).astype(np.uint8)
        q = q.reshape(nb, 2, 4, 32)  # halves, quarter, l
        ql = np.concatenate([q[:, :, 0] & 15 | (q[:, :, 2] & 15) << 4,
                             q[:, :, 1] & 15 | (q[:, :, 3] & 15) << 4], axis=-1)  # [nb, 2, 64]
        qh = (q[:, :, 0] >> 4) | (q[:, :, 1] >> 4) << 2 | (q[:, :, 2] >> 4) << 4 | (
            q[:, :, 3] >> 4) << 6  # [nb, 2, 32]
        out = np.concatenate([ql.reshape(nb, 128), qh.reshape(nb, 64), sc.view(np.uint8),
                              d.astype(np.float16).view(np.uint8).reshape(nb, 2)], axis=1)
        return out.reshape(n, -1)
    levels = 15 if name == "Q4_K" else 31
    s = b.reshape(nb, 8, 32)
    mnf = np.maximum(0, -s.min(-1))  # [nb, 8]
    scf = (s.max(-1) + mnf) / levels
    d, dmin = _f16(scf.max(-1) / 63), _f16(mnf.max(-1) / 63)
    sc = np.clip(np.round(scf / np.where(d > 0, d, 1)[:, None]), 0, 63).astype(np.uint8)
    m = np.clip(np.round(mnf / np.where(dmin > 0, dmin, 1)[:, None]), 0, 63).astype(np.uint8)
    step = (d[:, None] * sc)[..., None]
    q = np.round((s + (dmin[:, None] * m)[..., None]) / np.where(step > 0, step, 1))
    q = np.clip(q, 0, levels).astype(np.uint8)  # [nb, 8, 32]
    scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                             (sc[:, 4:] & 15) | (m[:, 4:] & 15) << 4], axis=1)  # [nb, 12]
    qs = ((q[:, 0::2] & 15) | (q[:, 1::2] & 15) << 4).reshape(nb, 128)
    head = [d.astype(np.float16).view(np.uint8).reshape(nb, 2),
            dmin.astype(np.float16).view(np.uint8).reshape(nb, 2), scales]
    if name == "Q5_K":
        qh = np.zeros((nb, 32), dtype=np.uint8)
        for i in range(8):
            qh |= ((q[:, i] >> 4) & 1) << i
        head.append(qh)
    return np.concatenate([*head, qs], axis=1).reshape(n, -1)


def quantize(w: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``[N, K]`` float32 -> (GGUF bytes ``[N, row]`` uint8, gguf-py's dequantization)."""
    import gguf
    from gguf import quants

    qt = gguf.GGMLQuantizationType[name]
    w = np.ascontiguousarray(w, dtype=np.float32).reshape(-1, w.shape[-1])
    if name == "Q2_K":
        raw = _q2k(w)
    elif name.endswith("_K"):
        raw = _kquant(w, name)
    else:
        raw = quants.quantize(w, qt).view(np.uint8)
    raw = raw.reshape(w.shape[0], -1)
    deq = w.copy() if name == "F32" else quants.dequantize(raw, qt).astype(np.float32)
    return raw, deq.reshape(w.shape)


def _role(hf_name: str, plan: dict) -> str:
    for key, role in (("embed_tokens", "embd"), ("lm_head", "output"), ("norm", "norm"),
                      ("v_proj", "attn_v"), ("self_attn", "attn"), ("shared_expert_gate", "router"),
                      ("mlp.gate.weight", "router"), ("block_sparse_moe.gate", "router"),
                      ("shared_expert", "dense"), ("mlp.", "dense")):  # fmt: skip
        if key in hf_name:
            return role if hf_name.endswith("weight") else "norm"
    return "norm"


def write_gguf(name: str, folder: Path, plan: str, seed: int = 0, split: int = 1,
               per_expert: bool = False):  # fmt: skip
    """Write ``folder/model.gguf`` (or split parts) for tiny config ``name`` in block-type plan
    ``plan``, and ``folder/ref`` (the dequantized HF checkpoint). Returns (gguf path, ref).
    ``per_expert``: one tensor per expert (``blk.N.ffn_gate.E.weight``, older Mixtral files)
    instead of stacked ``ffn_gate_exps``."""
    import gguf
    import hf_models
    import safetensors.torch as st

    from micro_expert_router.checkpoint import Checkpoint, dense_tensor_shapes
    from micro_expert_router.store.gguf_model import gguf_name

    hf_models.ARCH_CONFIGS.setdefault(name, GGUF_CONFIGS[name])
    src = folder / "hf"
    save_hf_model(name, src, seed)
    types = PLANS[plan]
    ck = Checkpoint(src)
    a = ck.args
    arch = ARCH[a.arch]
    path = folder / "model.gguf"
    n_tensors = len(list(dense_tensor_shapes(a))) + 3 * sum(a.moe_layers)
    per_part = -(-n_tensors // split) if split > 1 else 0
    w = gguf.GGUFWriter(str(path), arch=arch, split_max_tensors=per_part)
    w.add_block_count(a.n_layers)
    w.add_embedding_length(a.hidden_size)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(a.n_kv_heads)
    w.add_key_length(a.head_dim)
    w.add_value_length(a.head_dim)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    w.add_rope_freq_base(a.rope_theta)
    w.add_context_length(a.max_position_embeddings)
    w.add_expert_count(a.n_experts)
    w.add_expert_used_count(a.top_k)
    w.add_expert_feed_forward_length(a.expert_inter)
    w.add_feed_forward_length(a.dense_inter or a.expert_inter)
    w.add_expert_weights_norm(a.norm_topk_prob)
    if a.clip_qkv is not None:
        w.add_clamp_kqv(a.clip_qkv)
    ref = st.load_file(str(src / "model.safetensors"))

    def put(hf: str, gname: str, t: torch.Tensor, ty: str, perm=None) -> None:
        x = t.float().numpy()
        x2 = x.reshape(-1, x.shape[-1])
        if perm is not None:  # llama.cpp's converter permutes q/k for llama
            x2 = x2[np.argsort(perm)]
        raw, deq = quantize(x2, ty)
        if perm is not None:
            deq = deq[perm]
        ref[hf] = torch.from_numpy(deq.reshape(x.shape).copy())
        byte_shape = list(raw.shape) if x.ndim == 2 else [raw.shape[1]]
        w.add_tensor(gname, raw.reshape(byte_shape), raw_dtype=gguf.GGMLQuantizationType[ty])

    from micro_expert_router.store.gguf_model import unpermute_rows

    class _Arch:  # what unpermute_rows asks of a GGUF file
        pass

    gf_like = _Arch()
    gf_like.arch = arch  # type: ignore[attr-defined]
    for hf, _shape in dense_tensor_shapes(a):
        perm = unpermute_rows(gf_like, a, hf)  # type: ignore[arg-type]
        put(hf, gguf_name(hf), ck.get(hf), types[_role(hf, types)], perm)
    for layer in range(a.n_layers):
        if not a.moe_layers[layer]:
            continue
        pre = f"model.layers.{layer}.{a.spec.moe_prefix}.experts"
        names = a.spec.expert_names
        for r, role in enumerate(("gate", "up", "down")):
            ty = types[role]
            ty = ty[layer % len(ty)] if isinstance(ty, list) else ty
            raws = []
            for e in range(a.n_experts):
                hf = f"{pre}.{e}.{names[r]}.weight"
                raw, deq = quantize(ck.get(hf).float().numpy(), ty)
                ref[hf] = torch.from_numpy(deq)
                raws.append(raw)
            qt = gguf.GGMLQuantizationType[ty]
            if per_expert:
                for e, raw in enumerate(raws):
                    w.add_tensor(f"blk.{layer}.ffn_{role}.{e}.weight", raw, raw_dtype=qt)
            else:
                w.add_tensor(f"blk.{layer}.ffn_{role}_exps.weight", np.stack(raws), raw_dtype=qt)
    ck.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = folder / "ref"
    out.mkdir()
    st.save_file(ref, str(out / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(src / "config.json", out / "config.json")
    first = path if split <= 1 else folder / f"model-00001-of-{split:05d}.gguf"
    return first, out
