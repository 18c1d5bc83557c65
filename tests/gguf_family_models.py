"""Tiny DeepSeek-V2/V3, GLM-4.5 and GPT-OSS GGUF files for tests, written as llama.cpp's
``convert_hf_to_gguf.py`` writes them (metadata keys, tensor names, MLA's ``kv_b_proj`` split
into ``attn_k_b`` (transposed) and ``attn_v_b``, GLM's trailing NextN block, GPT-OSS's gate/up
de-interleaved with their biases, MXFP4 experts), from random transformers checkpoints, plus the
reference: the checkpoint with every written tensor replaced by its gguf-py dequantization.

Sizes are the family tests' tiny configs (``hf_families.py``, ``test_gpt_oss.py``) widened to
256 where K-quant rows need 256 weights; a tensor whose rows do not fit a plan's block type falls
back to Q8_0, then F16 (llama.cpp's quantizer falls back the same way).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from gguf_models import PLANS, quantize

YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
        "original_max_position_embeddings": 32, "mscale": 0.707, "mscale_all_dim": 0.707,
        "beta_fast": 32, "beta_slow": 1}  # fmt: skip
DS = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=256, vocab_size=128,
          max_position_embeddings=256, num_attention_heads=4)  # fmt: skip
CONFIGS = {
    # V3: q_lora, sigmoid + noaux_tc over 4 groups, YaRN with mscale, a dense first layer
    "dsv3": ("DeepseekV3Config", dict(DS,
        num_hidden_layers=3, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, q_lora_rank=64, kv_lora_rank=64,
        qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=32, n_shared_experts=1,
        routed_scaling_factor=2.5, norm_topk_prob=True, rope_parameters=YARN)),
    # V2: no q_lora, softmax + group-limited greedy over 4 groups, two shared experts
    "dsv2": ("DeepseekV2Config", dict(DS,
        num_hidden_layers=2, n_routed_experts=8, num_experts_per_tok=3, n_group=4,
        topk_group=2, topk_method="group_limited_greedy", first_k_dense_replace=0,
        q_lora_rank=None, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32,
        v_head_dim=32, n_shared_experts=2, routed_scaling_factor=1.5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    # GLM-4.5: partial rotary 0.5, q/k/v biases, q/k norms, noaux_tc over 2 groups, 1 dense
    "glm": ("Glm4MoeConfig", dict(
        hidden_size=256, intermediate_size=256, moe_intermediate_size=256, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1, first_k_dense_replace=1,
        n_shared_experts=1, routed_scaling_factor=2.0, norm_topk_prob=True, use_qk_norm=True,
        attention_bias=True, vocab_size=128, max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                         "partial_rotary_factor": 0.5})),
    # GPT-OSS: sliding window 8 on even layers, sinks, YaRN (no truncation), biased experts
    "gptoss": ("GptOssConfig", dict(
        vocab_size=96, hidden_size=64, intermediate_size=128, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, num_hidden_layers=4, num_local_experts=8, num_experts_per_tok=2,
        sliding_window=8, max_position_embeddings=256,
        layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False,
                         "original_max_position_embeddings": 32, "rope_theta": 10000.0})),
}  # fmt: skip
ARCH = {"DeepseekV3Config": "deepseek2", "DeepseekV2Config": "deepseek2",
        "Glm4MoeConfig": "glm4moe", "GptOssConfig": "gpt-oss"}  # fmt: skip
NEXTN = 1  # GLM files: one trailing NextN block, which MER must skip


def build(name: str, seed: int = 0):
    """A transformers model of config ``name``, random weights spread so routing is not
    collapsed (embeddings std 1, routers std 0.5, norms around 1, biases and sinks random)."""
    import transformers

    cls_name, kwargs = CONFIGS[name]
    cfg = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.normal_(1.0, 0.2)
            elif n.endswith("embed_tokens.weight") or n.endswith("sinks"):
                p.normal_(0.0, 1.0)
            elif "router" in n or n.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
            elif "experts" in n and cls_name == "GptOssConfig":
                p.normal_(0.0, 0.3 if n.endswith("gate_up_proj") else 0.1)
            elif n.endswith("bias"):
                p.normal_(0.0, 0.1)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model


def _fit(ty: str, k: int) -> str:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for t in (ty, "Q8_0", "F16"):
        if k % GGML_QUANT_SIZES[GGMLQuantizationType[t]][0] == 0:
            return t
    return "F32"


def _role(hf: str) -> str:
    for key, role in (("embed_tokens", "embd"), ("lm_head", "output"), ("norm", "norm"),
                      ("sinks", "norm"), ("v_proj", "attn_v"), ("v_b_proj", "attn_v"),
                      ("self_attn", "attn"), ("mlp.gate.", "router"), ("router", "router"),
                      ("mlp.", "dense")):  # fmt: skip
        if key in hf:
            return role if hf.endswith("weight") else "norm"
    return "norm"


def _metadata(w, arch: str, c: dict, a, old: bool = False) -> None:
    """The keys llama.cpp's converter writes for ``arch`` (``c``: config.json); ``old``: as
    DeepSeek files written before the MLA split (no ``*_mla`` keys)."""
    w.add_block_count(a.n_layers + (NEXTN if arch == "glm4moe" else 0))
    w.add_context_length(a.max_position_embeddings)
    w.add_embedding_length(a.hidden_size)
    w.add_feed_forward_length(a.dense_inter or a.expert_inter)
    w.add_head_count(a.n_heads)
    w.add_head_count_kv(1 if arch == "deepseek2" else a.n_kv_heads)
    w.add_rope_freq_base(a.rope_theta)
    w.add_layer_norm_rms_eps(a.rms_norm_eps)
    w.add_expert_count(a.n_experts)
    w.add_expert_used_count(a.top_k)
    w.add_expert_feed_forward_length(a.expert_inter)
    rope = c.get("rope_parameters") or {}
    if rope.get("rope_type") == "yarn":
        w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN)
        w.add_rope_scaling_factor(rope["factor"])
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        w.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])
    if arch in ("deepseek2", "glm4moe"):
        w.add_expert_shared_count(c["n_shared_experts"])
        w.add_leading_dense_block_count(c["first_k_dense_replace"])
        w.add_expert_weights_scale(c["routed_scaling_factor"])
        if c.get("norm_topk_prob"):
            w.add_expert_weights_norm(True)
        w.add_expert_group_count(c.get("n_group") or 1)
        w.add_expert_group_used_count(c.get("topk_group") or 1)
        gating = 1 if a.scoring == "softmax" else 2
        w.add_expert_gating_func(__import__("gguf").ExpertGatingFuncType(gating))
    if arch == "deepseek2":
        w.add_vocab_size(a.vocab_size)
        if a.q_lora_rank is not None:
            w.add_q_lora_rank(a.q_lora_rank)
        r, dr = a.kv_lora_rank, a.qk_rope_head_dim
        w.add_kv_lora_rank(r)
        if old:
            w.add_key_length(a.qk_nope_head_dim + dr)
            w.add_value_length(a.v_head_dim)
        else:
            w.add_key_length(r + dr)
            w.add_value_length(r)
            w.add_key_length_mla(a.qk_nope_head_dim + dr)
            w.add_value_length_mla(a.v_head_dim)
        w.add_rope_dimension_count(dr)
        if rope.get("mscale_all_dim"):
            w.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    elif arch == "glm4moe":
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
        w.add_rope_dimension_count(a.rotary_dim)
        w.add_nextn_predict_layers(NEXTN)
    else:
        w.add_key_length(a.head_dim)
        w.add_value_length(a.head_dim)
        w.add_sliding_window(a.sliding_window)


def write_family_gguf(name: str, folder: Path, plan: str, seed: int = 0, drop: str = "",
                      old: bool = False, shared: int | None = None):  # fmt: skip
    """Write ``folder/model.gguf`` for family config ``name`` in block-type plan ``plan``
    (``gguf_models.PLANS``; GPT-OSS experts are MXFP4 unless the plan is ``f32``) and
    ``folder/ref`` (the dequantized checkpoint). ``drop``: a metadata key left out (bad
    input). ``old``: a DeepSeek file as converters before the MLA split wrote it (one
    ``attn_kv_b``); ``shared``: a wrong ``expert_shared_count`` to write. Returns (gguf path,
    ref folder)."""
    import gguf
    import safetensors.torch as st

    from micro_expert_router.checkpoint import Checkpoint, dense_tensor_shapes
    from micro_expert_router.store.gguf_model import gguf_name

    src = folder / "hf"
    build(name, seed).save_pretrained(src)
    types = PLANS[plan]
    ck = Checkpoint(src)
    a = ck.args
    c = json.loads((src / "config.json").read_text())
    arch = ARCH[CONFIGS[name][0]]
    path = folder / "model.gguf"
    w = gguf.GGUFWriter(str(path), arch=arch)
    if drop:
        w.add_uint32 = _skipping(w.add_uint32, f"{arch}.{drop}")  # type: ignore[method-assign]
    _metadata(w, arch, c if shared is None else dict(c, n_shared_experts=shared), a, old)
    ref = st.load_file(str(src / "model.safetensors"))

    def put(gname: str, x: torch.Tensor, ty: str) -> np.ndarray:
        """Write ``x`` (rows along its last dim) as ``gname``; its dequantization, x's shape."""
        x = x.float().numpy()
        ty = _fit(ty, x.shape[-1])
        raw, deq = quantize(x.reshape(-1, x.shape[-1]), ty)
        byte_shape = [*x.shape[:-1], raw.shape[-1]]
        w.add_tensor(gname, raw.reshape(byte_shape), raw_dtype=gguf.GGMLQuantizationType[ty])
        return deq.reshape(x.shape)

    for hf, _shape in dense_tensor_shapes(a):
        ty = types[_role(hf)]
        if hf.endswith("kv_b_proj.weight") and not old:  # per head; the key half transposed
            layer = hf.split(".")[2]
            h, dn, dv, r = a.n_heads, a.qk_nope_head_dim, a.v_head_dim, a.kv_lora_rank
            kvb = ck.get(hf).float().view(h, dn + dv, r)
            kb = put(f"blk.{layer}.attn_k_b.weight", kvb[:, :dn].transpose(1, 2).contiguous(),
                     ty)  # fmt: skip
            vb = put(f"blk.{layer}.attn_v_b.weight", kvb[:, dn:].contiguous(), types["attn_v"])
            full = np.concatenate([kb.transpose(0, 2, 1), vb], axis=1).reshape(-1, r)
            ref[hf] = torch.from_numpy(np.ascontiguousarray(full))
            continue
        ref[hf] = torch.from_numpy(put(gguf_name(hf, arch), ck.get(hf), ty).copy())
    if arch == "gpt-oss":
        _gptoss_experts(ck, a, w, ref, plan, put)
    else:
        for layer in range(a.n_layers):
            if a.moe_layers[layer]:
                _experts(ck, a, layer, types, ref, w)
    if arch == "glm4moe":  # the NextN block: tensors MER must not read
        for n in range(a.n_layers, a.n_layers + NEXTN):
            put(f"blk.{n}.attn_norm.weight", torch.ones(a.hidden_size), "F32")
            put(f"blk.{n}.nextn.eh_proj.weight", torch.ones(a.hidden_size, 2 * a.hidden_size),
                "F16")  # fmt: skip
    ck.close()
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = folder / "ref"
    out.mkdir()
    st.save_file({k: v.contiguous() for k, v in ref.items()}, str(out / "model.safetensors"),
                 metadata={"format": "pt"})  # fmt: skip
    shutil.copy(src / "config.json", out / "config.json")
    return path, out


def _skipping(add, key: str):
    def add_unless(k: str, v) -> None:
        if k != key:
            add(k, v)

    return add_unless


def _experts(ck, a, layer: int, types: dict, ref: dict, w) -> None:
    import gguf

    raws: list[list[np.ndarray]] = [[], [], []]
    tys = []
    for role in ("gate", "up", "down"):
        ty = types[role]
        tys.append(_fit(ty[layer % len(ty)] if isinstance(ty, list) else ty, a.expert_inter))
    for e in range(a.n_experts):
        gate, up, down = ck.expert(layer, e)
        deqs = []
        for r, t in enumerate((gate, up, down)):
            raw, deq = quantize(t.float().numpy(), tys[r])
            raws[r].append(raw)
            deqs.append(torch.from_numpy(deq))
        names = ck.expert_names(layer, e)
        if len(names) == 3:
            for (n, _), d in zip(names, deqs, strict=True):
                ref[n] = d
        else:  # fused [E, 2I, D] gate_up and [E, D, I] down
            (gu, _), (dn, _) = names
            ref[gu][e] = torch.cat(deqs[:2])
            ref[dn][e] = deqs[2]
    for r, role in enumerate(("gate", "up", "down")):
        w.add_tensor(f"blk.{layer}.ffn_{role}_exps.weight", np.stack(raws[r]),
                     raw_dtype=gguf.GGMLQuantizationType[tys[r]])  # fmt: skip


def _gptoss_experts(ck, a, w, ref: dict, plan: str, put) -> None:
    """``gate_up_proj [E, D, 2I]`` (columns interleaved) and ``down_proj [E, I, D]`` as the
    converter splits them: ``ffn_gate_exps``/``ffn_up_exps [E, I, D]``, ``ffn_down_exps
    [E, D, I]``, biases ``[E, I]`` / ``[E, D]`` in F32."""
    ty = "F32" if plan == "f32" else "MXFP4"
    for layer in range(a.n_layers):
        p = f"model.layers.{layer}.mlp.experts"
        gu, dn = ck.get(f"{p}.gate_up_proj").float(), ck.get(f"{p}.down_proj").float()
        g = put(f"blk.{layer}.ffn_gate_exps.weight", gu[..., 0::2].transpose(1, 2), ty)
        u = put(f"blk.{layer}.ffn_up_exps.weight", gu[..., 1::2].transpose(1, 2), ty)
        d = put(f"blk.{layer}.ffn_down_exps.weight", dn.transpose(1, 2), ty)
        new = torch.empty_like(gu)
        new[..., 0::2] = torch.from_numpy(g).transpose(1, 2)
        new[..., 1::2] = torch.from_numpy(u).transpose(1, 2)
        ref[f"{p}.gate_up_proj"] = new
        ref[f"{p}.down_proj"] = torch.from_numpy(d).transpose(1, 2).contiguous()
        b = ck.get(f"{p}.gate_up_proj_bias").float()
        put(f"blk.{layer}.ffn_gate_exps.bias", b[:, 0::2].contiguous(), "F32")
        put(f"blk.{layer}.ffn_up_exps.bias", b[:, 1::2].contiguous(), "F32")
        put(f"blk.{layer}.ffn_down_exps.bias", ck.get(f"{p}.down_proj_bias"), "F32")
