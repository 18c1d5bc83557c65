"""What a GGUF model is, in the engine's terms: ``ModelArgs`` from the GGUF metadata, and the
GGUF tensor that holds each dense tensor (by its HuggingFace name) and each routed expert.

GGUF architecture names map to the engine's families: ``llama`` with experts (Mixtral),
``qwen2moe``, ``qwen3moe``, ``olmoe``, ``deepseek2`` (DeepSeek-V2/V3, Kimi-K2),
``glm4moe`` (GLM-4.5) and ``gpt-oss``; ``gguf_families.py`` reads the last three's metadata.
llama.cpp's converter permutes the rows of ``attn_q`` and ``attn_k`` for ``llama`` (its RoPE
pairs adjacent dimensions, HF's pairs the two halves); ``unpermute_rows`` gives the row order
that undoes it, applied to whole rows of blocks, so it is lossless. Routed experts are stacked
(``blk.N.ffn_gate_exps.weight``, ``[E, I, D]``) or, in older Mixtral files, one tensor per
expert (``blk.N.ffn_gate.E.weight``).
"""

from __future__ import annotations

from typing import Any

from ..checkpoint import dense_tensor_shapes
from ..config import ModelArgs
from ..errors import ConfigError, GGUFError
from .gguf_families import CONFIGS, HF_ARCH, n_layers, split_kv_b
from .gguf_file import GGUFFile

FAMILIES = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
            "olmoe": "OlmoeForCausalLM", "llama": "MixtralForCausalLM", **HF_ARCH}  # fmt: skip
NOT_YET = ("deepseek", "glm4")  # DeepSeek-MoE v1; GLM-4 (dense)
NORM_TOPK_DEFAULT = {"qwen2moe": False, "qwen3moe": True, "olmoe": False, "llama": True,
                     "deepseek2": False, "glm4moe": False, "gpt-oss": True}  # fmt: skip

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight", "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight", "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # DeepSeek (MLA) and GLM-4.5
    "self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_a_proj.bias": "attn_q_a.bias",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_proj_with_mqa.bias": "attn_kv_a_mqa.bias",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    "self_attn.kv_b_proj.weight": "attn_kv_b.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight",
    # GPT-OSS
    "self_attn.sinks": "attn_sinks.weight", "mlp.router.weight": "ffn_gate_inp.weight",
    "mlp.router.bias": "ffn_gate_inp.bias",
}  # fmt: skip
# GLM-4.5 and GPT-OSS name the norm before the MLP ``post_attention_norm``
_ARCH_NAMES = {a: {"post_attention_layernorm.weight": "post_attention_norm.weight"}
               for a in ("glm4moe", "gpt-oss")}  # fmt: skip


def gguf_name(hf_name: str, arch: str = "") -> str:
    """The GGUF tensor name of a dense tensor's HuggingFace name (in architecture ``arch``)."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight":
           "output_norm.weight", "lm_head.weight": "output.weight"}  # fmt: skip
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".", 3)  # model, layers, i, rest
    names = {**_LAYER_NAMES, **_ARCH_NAMES.get(arch, {})}
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in names:
        return f"blk.{parts[2]}.{names[parts[3]]}"
    raise ConfigError(f"no GGUF name for tensor {hf_name}")


def family(gf: GGUFFile) -> str:
    arch = gf.arch
    if arch in NOT_YET:
        raise GGUFError(f"{gf.path}: GGUF architecture {arch!r} (DeepSeek-MoE v1 / dense GLM-4) "
                        "is not supported: the engine does not run that family; supported: "
                        f"{', '.join(FAMILIES)} (llama with experts = Mixtral)")  # fmt: skip
    if arch not in FAMILIES:
        raise GGUFError(f"{gf.path}: GGUF architecture {arch!r} is not supported; supported: "
                        f"{', '.join(FAMILIES)} (llama with experts = Mixtral)")  # fmt: skip
    if arch == "llama" and not gf.get("llama.expert_count"):
        raise GGUFError(f"{gf.path}: a llama model without experts (llama.expert_count) is "
                        "dense; MER runs mixture-of-experts models only")  # fmt: skip
    return arch


def _expert_shape(gf: GGUFFile, layer: int) -> tuple[int, int] | None:
    """(I, D) of layer ``layer``'s routed experts, or ``None`` when it has none."""
    fused = gf.tensors.get(f"blk.{layer}.ffn_gate_up_exps.weight")
    if fused is not None:
        raise GGUFError(f"{fused.path}: {fused.name}: gate and up experts fused in one tensor "
                        "(llama.cpp's --fuse-gate-up-exps) are not supported yet; convert the "
                        "model without that option")  # fmt: skip
    t = gf.tensors.get(f"blk.{layer}.ffn_gate_exps.weight")
    if t is not None:
        return t.shape[1], t.shape[2]
    t = gf.tensors.get(f"blk.{layer}.ffn_gate.0.weight")
    if t is not None and f"blk.{layer}.ffn_gate_inp.weight" in gf.tensors:
        return t.shape[0], t.shape[1]
    return None


def model_args(gf: GGUFFile) -> ModelArgs:
    """``ModelArgs`` from the GGUF metadata and tensor shapes (through ``ModelArgs.from_hf``,
    so the same checks apply)."""
    arch = family(gf)

    def key(name: str, default: Any = None, required: bool = False) -> Any:
        v = gf.get(f"{arch}.{name}", default)
        if v is None and required:
            raise GGUFError(f"{gf.path}: metadata key {arch}.{name} is missing")
        return v

    layers = n_layers(gf, arch, key)
    hidden = int(key("embedding_length", required=True))
    n_heads = int(key("attention.head_count", required=True))
    moe = [_expert_shape(gf, i) for i in range(layers)]
    shapes = {s for s in moe if s is not None}
    if not shapes:
        raise GGUFError(f"{gf.path}: no routed expert tensors (blk.N.ffn_gate_exps.weight)")
    if len(shapes) > 1:
        raise GGUFError(f"{gf.path}: routed experts differ in shape between layers: {shapes}")
    inter = shapes.pop()[0]
    dense_layers = [i for i, s in enumerate(moe) if s is None]
    cfg: dict[str, Any] = {
        "architectures": [FAMILIES[arch]], "hidden_size": hidden, "num_hidden_layers": layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", n_heads)),
        "head_dim": int(key("attention.key_length", hidden // n_heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(key("context_length", 4096)),
        "vocab_size": gf.tensor("token_embd.weight").shape[0],
        "tie_word_embeddings": "output.weight" not in gf.tensors,
        "num_experts": int(key("expert_count", required=True)),
        "num_local_experts": int(key("expert_count", required=True)),
        "num_experts_per_tok": int(key("expert_used_count", required=True)),
        "moe_intermediate_size": inter,
        "intermediate_size": inter,
        "norm_topk_prob": bool(key("expert_weights_norm", NORM_TOPK_DEFAULT[arch])),
        "mlp_only_layers": dense_layers,
        "bos_token_id": gf.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": gf.get("tokenizer.ggml.eos_token_id"),
    }  # fmt: skip
    if dense_layers:
        cfg["intermediate_size"] = gf.tensor(f"blk.{dense_layers[0]}.ffn_gate.weight").shape[0]
    scaling = key("rope.scaling.type")
    if scaling not in (None, "none"):
        cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(key("rope.scaling.factor",
                                                                         1.0))}  # fmt: skip
    has_bias = "blk.0.attn_q.bias" in gf.tensors
    cfg["qkv_bias"] = has_bias
    cfg["attention_bias"] = has_bias
    if key("attention.clamp_kqv") is not None:
        cfg["clip_qkv"] = float(key("attention.clamp_kqv"))
    if key("attention.sliding_window"):
        cfg["sliding_window"] = int(key("attention.sliding_window"))
    shexp = next((gf.tensors[n] for i in range(layers)
                  if (n := f"blk.{i}.ffn_gate_shexp.weight") in gf.tensors), None)  # fmt: skip
    if shexp is not None:
        cfg["shared_expert_intermediate_size"] = shexp.shape[0]
    if arch in CONFIGS:
        cfg = CONFIGS[arch](gf, key, cfg, inter)
    try:
        args = ModelArgs.from_hf(cfg, where=str(gf.path))
    except ConfigError as e:
        raise GGUFError(str(e)) from None
    found = tuple(s is not None for s in moe)
    if args.moe_layers != found:
        raise GGUFError(f"{gf.path}: the metadata makes layers "
                        f"{[i for i, m in enumerate(args.moe_layers) if m]} mixture-of-experts, "
                        f"but routed expert tensors are in layers "
                        f"{[i for i, m in enumerate(found) if m]}")  # fmt: skip
    return args


def dense_tensors(gf: GGUFFile, args: ModelArgs) -> list[tuple[str, tuple[int, ...], Any]]:
    """(HF name, HF shape, GGUF tensor) of every dense tensor; shapes checked (a ``[D]`` GGUF
    vector may stand for a ``[1, D]`` HF matrix). MLA's ``kv_b_proj`` may come as a
    ``gguf_families.SplitKvB`` (the file holds it split into ``attn_k_b`` / ``attn_v_b``)."""
    arch = gf.arch
    out: list[tuple[str, tuple[int, ...], Any]] = []
    for name, shape in dense_tensor_shapes(args):
        g = gguf_name(name, arch)
        if g.endswith("attn_kv_b.weight") and g not in gf.tensors:
            layer = int(name.split(".")[2])
            if f"blk.{layer}.attn_k_b.weight" in gf.tensors:
                out.append((name, tuple(shape), split_kv_b(gf, layer, args)))
                continue
        t = gf.tensor(g)
        ok = tuple(t.shape) == tuple(shape) or (len(shape) == 2 and shape[0] == 1
                                                and tuple(t.shape) == (shape[1],))  # fmt: skip
        if not ok:
            raise GGUFError(f"{t.path}: tensor {t.name} has shape {list(t.shape)}, expected "
                            f"{list(shape)} (for {name})")  # fmt: skip
        out.append((name, tuple(shape), t))
    return out


def unpermute_rows(gf: GGUFFile, args: ModelArgs, hf_name: str) -> list[int] | None:
    """For ``llama`` files, the GGUF row order of q/k (``hf[r] = gguf[perm[r]]``), else None."""
    if gf.arch != "llama" or not hf_name.endswith(("q_proj.weight", "k_proj.weight")):
        return None
    heads = args.n_heads if "q_proj" in hf_name else args.n_kv_heads
    half = args.head_dim // 2
    # the converter's permute: gguf row (h, i, j) = hf row (h, j, i), i < half, j < 2
    return [h * 2 * half + i * 2 + j for h in range(heads) for j in range(2) for i in range(half)]


def expert_tensors(gf: GGUFFile, layer: int, expert: int, args: ModelArgs):
    """For the gate, up and down of one expert: (tensor, byte offset of this expert inside the
    tensor, bytes of this expert)."""
    out = []
    for role in ("gate", "up", "down"):
        stacked = gf.tensors.get(f"blk.{layer}.ffn_{role}_exps.weight")
        if stacked is not None:
            if stacked.shape[0] != args.n_experts:
                raise GGUFError(f"{stacked.path}: {stacked.name} holds {stacked.shape[0]} "
                                f"experts, metadata says {args.n_experts}")  # fmt: skip
            per = stacked.nbytes // args.n_experts
            out.append((stacked, expert * per, per))
        else:
            t = gf.tensor(f"blk.{layer}.ffn_{role}.{expert}.weight")
            out.append((t, 0, t.nbytes))
    d, i = args.hidden_size, args.expert_inter
    for (t, _, _), want in zip(out, ((i, d), (i, d), (d, i)), strict=True):
        if tuple(t.shape[-2:]) != want:
            raise GGUFError(f"{t.path}: {t.name} has shape {list(t.shape)}, expected rows x "
                            f"columns {list(want)}")  # fmt: skip
    return out
