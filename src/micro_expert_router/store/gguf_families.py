"""The GGUF metadata of DeepSeek-V2/V3 (``deepseek2``), GLM-4.5 (``glm4moe``) and GPT-OSS
(``gpt-oss``) as the config.json keys their families read (``models/deepseek.py``,
``glm4_moe.py``, ``gpt_oss.py``), and the one tensor llama.cpp's converter rewrites in a way that
must be undone: MLA's ``kv_b_proj``.

What llama.cpp's ``convert_hf_to_gguf.py`` writes, and what this module reads back:

- ``deepseek2`` (V2, V2-Lite, V3, R1, Kimi-K2): ``head_count_kv`` is 1 (MLA written as MQA);
  ``kv_lora_rank``, ``q_lora_rank`` (absent without q LoRA), ``rope.dimension_count`` (the rope
  part of a head); newer files write ``key_length_mla`` / ``value_length_mla`` (the per-head q/k
  and v widths; ``key_length`` is then the latent's ``kv_lora_rank + rope``), older ones only
  ``key_length`` / ``value_length``. ``leading_dense_block_count`` (first_k_dense_replace),
  ``expert_shared_count``, ``expert_weights_scale`` (routed_scaling_factor),
  ``expert_weights_norm``, ``expert_gating_func`` (1 softmax, 2 sigmoid),
  ``expert_group_count`` / ``expert_group_used_count``; V3's ``e_score_correction_bias`` is
  ``exp_probs_b.bias``, so its presence means ``noaux_tc``. YaRN: ``rope.scaling.*`` and
  ``yarn_log_multiplier`` = 0.1 x ``mscale_all_dim`` (llama.cpp takes ``mscale`` to equal it, as in
  every release). Newer files split ``kv_b_proj`` per head into ``attn_k_b`` (the key half,
  *transposed* to ``[H, r, dn]``) and ``attn_v_b`` (``[H, dv, r]``); ``kv_b_proj`` is rebuilt
  from them (``kv_b``): exactly in their type when both are F32/F16/BF16, else dequantized
  (exactly) to F32, as a transposed quantized block is no block. The MTP layers are not written.
- ``glm4moe``: ``block_count`` counts the NextN/MTP layers (``nextn_predict_layers``) after the
  model's own; those are skipped. ``rope.dimension_count`` is the rotated part of a head.
  ``post_attention_layernorm`` is ``post_attention_norm``.
- ``gpt-oss``: ``sliding_window`` (every even layer slides, llama.cpp's pattern, unless
  ``attention.sliding_window_pattern`` lists them), YaRN without truncation (transformers'
  GPT-OSS), sinks ``attn_sinks``, router ``ffn_gate_inp`` with a bias, experts ``ffn_*_exps``
  with ``.bias`` (gate and up de-interleaved by the converter); ``gguf_gptoss.py`` packs them.

No q/k row permutation is applied by the converter for these three (their RoPE layouts are
llama.cpp's own).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch

from ..errors import GGUFError
from ..kernels.ggml import TYPES, BlockType, dequantize
from .gguf_file import GGUFFile, TensorInfo

HF_ARCH = {"deepseek2": "DeepseekV3ForCausalLM", "glm4moe": "Glm4MoeForCausalLM",
           "gpt-oss": "GptOssForCausalLM"}  # fmt: skip
DEEPSEEK_V2 = "DeepseekV2ForCausalLM"
GATING = {1: "softmax", 2: "sigmoid"}  # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE
PLAIN = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # element-exact rearranging

Key = Callable[..., Any]


def n_layers(gf: GGUFFile, arch: str, key: Key) -> int:
    """The model's own layers: ``block_count`` less GLM's trailing NextN layers."""
    blocks = int(key("block_count", required=True))
    if arch == "glm4moe":
        blocks -= int(key("nextn_predict_layers", 0) or 0)
    # the tensor table bounds it: a corrupt count must not send the reader over a billion layers
    present = [int(m.group(1)) for name in gf.tensors if (m := _BLOCK.match(name))]
    top = max(present, default=-1) + 1
    if not 0 < blocks <= top:
        raise GGUFError(f"{gf.path}: {arch}.block_count says {blocks} layers, but the "
                        f"tensor table holds blk.0 to blk.{top - 1}; the file is corrupt or "
                        "truncated")  # fmt: skip
    return blocks


_BLOCK = re.compile(r"blk\.(\d+)\.")


def _rope(gf: GGUFFile, key: Key, cfg: dict[str, Any], **extra: Any) -> dict[str, Any] | None:
    kind = key("rope.scaling.type")
    theta = float(key("rope.freq_base", 10000.0))
    if kind in (None, "none"):
        return None
    if kind not in ("yarn", "linear"):
        raise GGUFError(f"{gf.path}: rope.scaling.type {kind!r} is not supported for "
                        f"{gf.arch} (yarn or linear)")  # fmt: skip
    out: dict[str, Any] = {"rope_type": kind, "rope_theta": theta,
                           "factor": float(key("rope.scaling.factor", 1.0))}  # fmt: skip
    if kind == "yarn":
        orig = key("rope.scaling.original_context_length")
        out["original_max_position_embeddings"] = int(orig or cfg["max_position_embeddings"])
        for name, gkey in (("beta_fast", "rope.scaling.yarn_beta_fast"),
                           ("beta_slow", "rope.scaling.yarn_beta_slow"),
                           ("attention_factor", "rope.scaling.attn_factor")):  # fmt: skip
            if key(gkey) is not None:
                out[name] = float(key(gkey))
        out.update(extra)
    return out


def _need(gf: GGUFFile, key: Key, name: str) -> int:
    v = key(name)
    if v is None:
        raise GGUFError(f"{gf.path}: metadata key {gf.arch}.{name} is missing; a {gf.arch} "
                        "model needs it")  # fmt: skip
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise GGUFError(f"{gf.path}: metadata key {gf.arch}.{name} must be a non-negative "
                        f"integer, not {v!r}")  # fmt: skip
    return v


def _shared(gf: GGUFFile, key: Key, layers: int, inter: int, default: int) -> int:
    """Shared experts per layer (the ``ffn_*_shexp`` rows are that many experts side by side)."""
    t = next((gf.tensors[n] for i in range(layers)
              if (n := f"blk.{i}.ffn_gate_shexp.weight") in gf.tensors), None)  # fmt: skip
    count = key("expert_shared_count")
    if t is None:
        return 0
    count = int(count) if count is not None else default
    if t.shape[0] != count * inter:
        raise GGUFError(f"{t.path}: {t.name} has {t.shape[0]} rows, but {gf.arch}."
                        f"expert_shared_count {count} x expert width {inter} = "
                        f"{count * inter}")  # fmt: skip
    return count


def _routing(gf: GGUFFile, key: Key, noaux: bool) -> dict[str, Any]:
    gating = key("expert_gating_func")
    scoring = GATING.get(int(gating)) if gating is not None else None
    if gating is not None and scoring is None:
        raise GGUFError(f"{gf.path}: {gf.arch}.expert_gating_func {gating} is not softmax (1) or "
                        "sigmoid (2)")  # fmt: skip
    groups = int(key("expert_group_count", 1) or 1)
    return {"scoring_func": scoring or ("sigmoid" if noaux else "softmax"), "n_group": groups,
            "topk_group": int(key("expert_group_used_count", 1) or 1),
            "routed_scaling_factor": float(key("expert_weights_scale", 1.0) or 1.0),
            "norm_topk_prob": bool(key("expert_weights_norm", False))}  # fmt: skip


def deepseek2(gf: GGUFFile, key: Key, cfg: dict[str, Any], inter: int) -> dict[str, Any]:
    layers = cfg["num_hidden_layers"]
    noaux = any(f"blk.{i}.exp_probs_b.bias" in gf.tensors for i in range(layers))
    r = _need(gf, key, "attention.kv_lora_rank")
    dr = _need(gf, key, "rope.dimension_count")
    if key("attention.key_length_mla") is not None:  # newer converters
        qk = _need(gf, key, "attention.key_length_mla")
        dv = _need(gf, key, "attention.value_length_mla")
    else:  # older: the per-head widths in key_length / value_length
        qk, dv = _need(gf, key, "attention.key_length"), _need(gf, key, "attention.value_length")
    if qk <= dr:
        raise GGUFError(f"{gf.path}: q/k head width {qk} is not larger than its rope part "
                        f"{dr} ({gf.arch}.rope.dimension_count)")  # fmt: skip
    routing = _routing(gf, key, noaux)
    method = "noaux_tc" if noaux else ("group_limited_greedy" if routing["n_group"] > 1
                                       else "greedy")  # fmt: skip
    log_mul = key("rope.scaling.yarn_log_multiplier")
    mscale = {} if not log_mul else {"mscale": float(log_mul) / 0.1,
                                     "mscale_all_dim": float(log_mul) / 0.1}  # fmt: skip
    out = dict(
        cfg, architectures=[HF_ARCH["deepseek2"] if noaux else DEEPSEEK_V2],
        n_routed_experts=cfg["num_experts"], moe_intermediate_size=inter,
        q_lora_rank=key("attention.q_lora_rank"), kv_lora_rank=r, qk_rope_head_dim=dr,
        qk_nope_head_dim=qk - dr, v_head_dim=dv, head_dim=qk,
        first_k_dense_replace=int(key("leading_dense_block_count", 0) or 0), moe_layer_freq=1,
        n_shared_experts=_shared(gf, key, layers, inter, 0), topk_method=method,
        rope_interleave=True, attention_bias="blk.0.attn_kv_a_mqa.bias" in gf.tensors,
        **routing,
    )  # fmt: skip
    rope = _rope(gf, key, cfg, **mscale)
    if rope is not None:
        out["rope_parameters"] = rope
    return out


def glm4moe(gf: GGUFFile, key: Key, cfg: dict[str, Any], inter: int) -> dict[str, Any]:
    head_dim = cfg["head_dim"]
    rot = int(key("rope.dimension_count", head_dim // 2))
    if not 0 < rot <= head_dim:
        raise GGUFError(f"{gf.path}: {gf.arch}.rope.dimension_count {rot} is not within the "
                        f"head width {head_dim}")  # fmt: skip
    rope = _rope(gf, key, cfg) or {"rope_type": "default",
                                   "rope_theta": float(key("rope.freq_base", 10000.0))}
    rope["partial_rotary_factor"] = rot / head_dim
    routing = _routing(gf, key, True)
    if routing["scoring_func"] != "sigmoid":
        raise GGUFError(f"{gf.path}: glm4moe routes with sigmoid scores; this file's "
                        f"expert_gating_func is {routing['scoring_func']}")  # fmt: skip
    return dict(
        cfg, n_routed_experts=cfg["num_experts"], moe_intermediate_size=inter,
        n_shared_experts=_shared(gf, key, cfg["num_hidden_layers"], inter, 1),
        first_k_dense_replace=int(key("leading_dense_block_count", 0) or 0),
        use_qk_norm="blk.0.attn_q_norm.weight" in gf.tensors,
        attention_bias="blk.0.attn_q.bias" in gf.tensors, rope_parameters=rope,
        **{k: v for k, v in routing.items() if k != "scoring_func"},
    )  # fmt: skip


def gpt_oss(gf: GGUFFile, key: Key, cfg: dict[str, Any], inter: int) -> dict[str, Any]:
    layers = cfg["num_hidden_layers"]
    window = key("attention.sliding_window")
    pattern = key("attention.sliding_window_pattern")
    if isinstance(pattern, list) and len(pattern) == layers:
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's GPT-OSS: layers 0, 2, 4, .. slide
        sliding = [i % 2 == 0 for i in range(layers)]
    if window is None and any(sliding):
        raise GGUFError(f"{gf.path}: metadata key gpt-oss.attention.sliding_window is missing")
    out = dict(
        cfg, intermediate_size=inter, sliding_window=window,
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        attention_bias="blk.0.attn_q.bias" in gf.tensors,
    )  # fmt: skip
    clamp = key("swiglu_clamp_exp")
    if isinstance(clamp, list) and clamp and clamp[0]:
        out["swiglu_limit"] = float(clamp[0])
    rope = _rope(gf, key, cfg, truncate=False)
    if rope is not None:
        out["rope_parameters"] = rope
    return out


CONFIGS = {"deepseek2": deepseek2, "glm4moe": glm4moe, "gpt-oss": gpt_oss}


# ---- MLA's kv_b_proj from attn_k_b / attn_v_b -------------------------------------------------


class SplitKvB(NamedTuple):
    """Where a layer's ``kv_b_proj`` is, when the file holds it split."""

    k_b: TensorInfo  # [H, r, dn]: per head, the key half transposed
    v_b: TensorInfo  # [H, dv, r]


def split_kv_b(gf: GGUFFile, layer: int, args: Any) -> SplitKvB:
    p = f"blk.{layer}"
    k, v = gf.tensor(f"{p}.attn_k_b.weight"), gf.tensor(f"{p}.attn_v_b.weight")
    h, r, dn, dv = args.n_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    for t, want in ((k, (h, r, dn)), (v, (h, dv, r))):
        if tuple(t.shape) != want:
            raise GGUFError(f"{t.path}: tensor {t.name} has shape {list(t.shape)}, expected "
                            f"{list(want)}")  # fmt: skip
    return SplitKvB(k, v)


def kv_b(read: Callable[[TensorInfo], bytes], s: SplitKvB, args: Any) -> tuple[np.ndarray,
                                                                               BlockType]:
    """``kv_b_proj`` ``[H (dn + dv), r]`` as raw rows (uint8 ``[rows, row bytes]``) and its type:
    per head, the key rows (``attn_k_b`` transposed back) then the value rows."""
    h, r, dn, dv = args.n_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    tk, tv = s.k_b.supported(), s.v_b.supported()
    if tk.name == tv.name and tk.name in PLAIN:
        dt = PLAIN[tk.name]
        k = np.frombuffer(read(s.k_b), dtype=dt).reshape(h, r, dn)
        v = np.frombuffer(read(s.v_b), dtype=dt).reshape(h, dv, r)
        out, bt = np.concatenate([k.transpose(0, 2, 1), v], axis=1), tk  # [H, dn+dv, r]
    else:  # dequantized, exactly (gguf-py's values), to float32
        def rows(t: TensorInfo, bt: BlockType, n: int, width: int) -> np.ndarray:
            raw = torch.frombuffer(bytearray(read(t)), dtype=torch.uint8).view(n, -1)
            return dequantize(bt, raw, width).numpy()

        k = rows(s.k_b, tk, h * r, dn).reshape(h, r, dn)
        v = rows(s.v_b, tv, h * dv, r).reshape(h, dv, r)
        out, bt = np.concatenate([k.transpose(0, 2, 1), v], axis=1), TYPES["F32"]
    out = np.ascontiguousarray(out).reshape(h * (dn + dv), r)
    return out.view(np.uint8), bt
