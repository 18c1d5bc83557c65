"""GPT-OSS (``GptOssForCausalLM``, 20B and 120B): config keys, tensor names, experts, blocks.

What differs from the GQA families (transformers' ``modeling_gpt_oss.py``):

- Attention: biases on q/k/v/o; per-head **sinks** (``self_attn.sinks [H]``), a logit that joins
  each head's softmax denominator and carries no value; ``layer_types`` alternates
  ``sliding_attention`` (the last ``sliding_window`` positions) and ``full_attention`` layers;
  YaRN RoPE (``rope.py``; ``truncate: false`` in the released configs).
- Router: ``mlp.router.weight [E, D]`` and ``.bias [E]``; the top-k of the logits, then a softmax
  over the chosen k (``routing.py``, ``topk_softmax``).
- Experts: ``gate_up_proj [E, D, 2I]`` with gate and up **interleaved** along 2I (columns 2i and
  2i + 1 are neuron i's), ``down_proj [E, I, D]``, biases ``gate_up_proj_bias [E, 2I]`` and
  ``down_proj_bias [E, D]``, and the clamped SwiGLU (``kernels/mxfp4.clamped_swiglu``: alpha,
  ``swiglu_limit``). The official checkpoints hold the experts as MXFP4 ``*_blocks`` and
  ``*_scales`` (``quantization_config.quant_method == "mxfp4"``), transposed to ``[E, 2I, ...]``
  and ``[E, D, ...]``. ``read_expert`` returns either as the expert formats take them
  (``kernels/mxfp4.RawExpert`` or ``kernels/biased.BiasedExpert``); the biases and the
  activation run inside the expert formats, so streaming, the cache, splits and the planner work
  unchanged.

Legend: T tokens, S positions, D hidden, H heads, Hk kv heads, Dh head dim, E experts, K top-k,
I intermediate.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch

from ..errors import CheckpointError, ConfigError
from ..kernels.biased import BiasedExpert, expert_format
from ..kernels.formats import ExpertFormat
from ..kernels.mxfp4 import DEFAULT_ALPHA, DEFAULT_LIMIT, RawExpert
from .rope import parse_rope

LAYER_TYPES = ("sliding_attention", "full_attention")
# transformers' GptOssConfig defaults when a config.json names no rotary embedding
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096,
                "rope_theta": 150000.0}  # fmt: skip


def config(cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> dict[str, Any]:
    n_layers = kw["n_layers"]
    types = cfg.get("layer_types")
    if types is None:  # transformers' default: sliding, full, sliding, ...
        types = [LAYER_TYPES[i % 2] for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers or not set(types) <= set(LAYER_TYPES):
        raise ConfigError(f"{where}: layer_types must list {n_layers} of {LAYER_TYPES}, "
                          f"not {types!r}")  # fmt: skip
    window = cfg.get("sliding_window")
    sliding = tuple(t == "sliding_attention" for t in types)
    if any(sliding) and (not isinstance(window, int) or window <= 0):
        raise ConfigError(f"{where}: sliding_attention layers need a positive sliding_window, "
                          f"not {window!r}")  # fmt: skip
    out: dict[str, Any] = {}
    if not (cfg.get("rope_parameters") or cfg.get("rope_scaling")):
        out.update(parse_rope({**cfg, "rope_parameters": DEFAULT_ROPE}, where, kw["head_dim"]))
    bias = bool(cfg.get("attention_bias", True))
    limit = cfg.get("swiglu_limit", DEFAULT_LIMIT)
    alpha = cfg.get("swiglu_alpha", DEFAULT_ALPHA)
    for name, v in (("swiglu_limit", limit), ("swiglu_alpha", alpha)):
        if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
            raise ConfigError(f"{where}: {name} must be a positive number, not {v!r}")
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    if quant not in (None, "mxfp4"):
        raise ConfigError(f"{where}: GPT-OSS quant_method {quant!r} is not supported (mxfp4 is)")
    return dict(
        out, qkv_bias=bias, o_bias=bias, qk_norm="none", sliding_window=window if any(sliding)
        else None, sliding_layers=sliding, attn_sinks=True, topk_method="topk_softmax",
        norm_topk_prob=True, shared_expert_inter=0, dense_inter=0,
        moe_layers=(kw["n_experts"] > 0,) * n_layers, expert_act="clamped_swiglu",
        swiglu_alpha=float(alpha), swiglu_limit=float(limit),
    )  # fmt: skip


def window(a: Any, i: int) -> int | None:
    """The attention window of layer ``i`` (None: full attention)."""
    if a.sliding_layers and not a.sliding_layers[i]:
        return None
    return a.sliding_window


# ---- tensors ---------------------------------------------------------------------------------


def dense_tensor_shapes(a: Any) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every RAM-resident tensor of a GPT-OSS model: name and expected shape."""
    d, hd = a.hidden_size, a.head_dim
    yield "model.embed_tokens.weight", (a.vocab_size, d)
    yield "model.norm.weight", (d,)
    if not a.tie_word_embeddings:
        yield "lm_head.weight", (a.vocab_size, d)
    for i in range(a.n_layers):
        p = f"model.layers.{i}"
        yield f"{p}.input_layernorm.weight", (d,)
        yield f"{p}.post_attention_layernorm.weight", (d,)
        for name, rows in (("q", a.n_heads), ("k", a.n_kv_heads), ("v", a.n_kv_heads)):
            yield f"{p}.self_attn.{name}_proj.weight", (rows * hd, d)
            if a.qkv_bias:
                yield f"{p}.self_attn.{name}_proj.bias", (rows * hd,)
        yield f"{p}.self_attn.o_proj.weight", (d, a.n_heads * hd)
        if a.o_bias:
            yield f"{p}.self_attn.o_proj.bias", (d,)
        yield f"{p}.self_attn.sinks", (a.n_heads,)
        yield f"{p}.mlp.router.weight", (a.n_experts, d)
        yield f"{p}.mlp.router.bias", (a.n_experts,)


def is_mxfp4(ckpt: Any) -> bool:
    """Whether the checkpoint holds its experts as MXFP4 blocks (the official release)."""
    return "model.layers.0.mlp.experts.gate_up_proj_blocks" in ckpt


def read_expert(ckpt: Any, layer: int, e: int) -> RawExpert | BiasedExpert:
    """One expert of a GPT-OSS checkpoint: its MXFP4 blocks as stored, or float weights with
    gate and up de-interleaved; safe to call from several threads at once."""
    a = ckpt.args
    d, n = a.hidden_size, a.expert_inter
    p = f"model.layers.{layer}.mlp.experts"
    if is_mxfp4(ckpt):
        raw = RawExpert(
            ckpt.raw(f"{p}.gate_up_proj_blocks", e), ckpt.raw(f"{p}.gate_up_proj_scales", e),
            ckpt.raw(f"{p}.down_proj_blocks", e), ckpt.raw(f"{p}.down_proj_scales", e),
            ckpt.get(f"{p}.gate_up_proj_bias", (2 * n,), e),
            ckpt.get(f"{p}.down_proj_bias", (d,), e),
        )  # fmt: skip
        want = ((2 * n, d // 32, 16), (2 * n, d // 32), (d, n // 32, 16), (d, n // 32))
        for t, shape, what in zip(raw, want, ("gate_up_proj_blocks", "gate_up_proj_scales",
                                              "down_proj_blocks", "down_proj_scales"),
                                  strict=False):  # fmt: skip
            if tuple(t.shape) != shape or t.dtype != torch.uint8:
                raise CheckpointError(f"{ckpt.folder}: {p}.{what}[{e}] is {t.dtype} "
                                      f"{list(t.shape)}, expected uint8 {list(shape)}")  # fmt: skip
        return raw
    gu = ckpt.get(f"{p}.gate_up_proj", (d, 2 * n), e)  # [D, 2I], columns interleaved
    dn = ckpt.get(f"{p}.down_proj", (n, d), e)  # [I, D]
    b = ckpt.get(f"{p}.gate_up_proj_bias", (2 * n,), e)
    return BiasedExpert(gu[:, 0::2].t().contiguous(), gu[:, 1::2].t().contiguous(),
                        dn.t().contiguous(), b[0::2].contiguous(), b[1::2].contiguous(),
                        ckpt.get(f"{p}.down_proj_bias", (d,), e))  # fmt: skip


def store_format(
    ckpt: Any, dtype: str, log: Callable[[str], None] | None = None
) -> tuple[ExpertFormat, Callable[[int, int], RawExpert | BiasedExpert]]:
    """The expert format for ``mer convert --dtype dtype`` of a GPT-OSS checkpoint and the
    expert reader to feed it; says (``log``) what a conversion of MXFP4 experts loses."""
    a = ckpt.args
    fmt = expert_format(dtype, a.swiglu_alpha, a.swiglu_limit)
    mx = is_mxfp4(ckpt)
    if dtype == "mxfp4" and not mx:
        raise ConfigError(f"{ckpt.folder}: --dtype mxfp4 keeps a checkpoint's MXFP4 blocks as "
                          "they are, and this checkpoint's experts are floats; choose f32, bf16, "
                          "q8 or q4")  # fmt: skip
    if mx and log is not None:
        if dtype == "mxfp4":
            log("GPT-OSS MXFP4 experts: kept as they are (lossless)")
        elif dtype in ("f32", "bf16"):
            log(f"GPT-OSS MXFP4 experts dequantized to {dtype}: exact (every MXFP4 value is a "
                f"{dtype}), {'8' if dtype == 'f32' else '4'}x the bytes; --dtype mxfp4 keeps "
                "the blocks")  # fmt: skip
        else:
            log(f"GPT-OSS MXFP4 experts re-quantized to {dtype}: lossy; the conversion error "
                "below is against the MXFP4 values (--dtype mxfp4 is lossless)")  # fmt: skip
    return fmt, functools.partial(read_expert, ckpt)


# ---- blocks ----------------------------------------------------------------------------------


def attention_with_sinks(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos: int,
    scale: float,
    sinks: torch.Tensor,
    window: int | None,
) -> torch.Tensor:
    """Causal attention of queries ``q [H, T, Dh]`` at positions ``pos ..`` over keys and values
    ``[Hk, S, Dh]`` (the cache up to ``pos + T``), with per-head sinks ``[H]`` and an optional
    window: ``[H, T, Dh]``. The eager math of transformers (SDPA has no sinks)."""
    h, t, dh = q.shape
    hk, s = k.shape[0], k.shape[1]
    qi = torch.arange(pos, pos + t)[:, None]
    ki = torch.arange(s)[None, :]
    keep = ki <= qi  # [T, S]
    if window is not None:
        keep &= ki > qi - window
    scores = torch.matmul(q.view(hk, h // hk, t, dh), k.unsqueeze(1).transpose(-1, -2)) * scale
    scores = scores.masked_fill(~keep, float("-inf")).view(h, t, s)  # [H, T, S]
    sink = sinks.to(scores.dtype).view(h, 1, 1).expand(h, t, 1)
    p = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]  # [H, T, S]
    return torch.matmul(p.view(hk, h // hk, t, s), v.unsqueeze(1)).view(h, t, dh)


def transformer(*args: Any, **kw: Any) -> Any:
    """The GPT-OSS model (``Transformer``'s arguments): built here so that ``model.py`` is
    imported only when a model is made."""
    from ..kernels.attention import decode_attention
    from ..kernels.layer_ops import rope_attend
    from ..model import Transformer
    from .rope import apply_rope

    class GptOss(Transformer):
        """``Transformer`` with GPT-OSS's attention (sinks, a window on some layers); YaRN and
        the ``topk_softmax`` router are ModelArgs data the shared blocks read, and the
        experts' biases and activation live in the expert formats."""

        def decode_attn_extras(self, i: int) -> tuple[int | None, torch.Tensor | None]:
            return window(self.args, i), self.w[f"model.layers.{i}.self_attn.sinks"]

        def attend(self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: Any,
                   pos: int) -> torch.Tensor:  # fmt: skip
            a = self.args
            t = q.shape[0]
            sinks = self.w[f"model.layers.{i}.self_attn.sinks"]  # [H]
            if t == 1:  # decode: RoPE, cache append, window and sinks in one native call
                o = rope_attend(q[0], k[0], v[0], kv.k[i], kv.v[i], self.cos[pos], self.sin[pos],
                                pos, a.attn_scale, window(a, i), sinks)  # fmt: skip
                if o is not None:
                    return o.view(1, a.n_heads * a.head_dim)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H|Hk, T, Dh]
            cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]  # [T, Dh]
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            kv.k[i][:, pos : pos + t] = k
            kv.v[i][:, pos : pos + t] = v
            s, win = pos + t, window(a, i)
            if t == 1:  # decode without the native op: decode attention (window, sinks)
                o = decode_attention(q[:, 0], kv.k[i], kv.v[i], s, a.attn_scale, win, sinks)
                return o.to(q.dtype).view(1, a.n_heads * a.head_dim)
            keys, vals = kv.k[i][:, :s].to(q.dtype), kv.v[i][:, :s].to(q.dtype)  # [Hk, S, Dh]
            o = attention_with_sinks(q, keys, vals, pos, a.attn_scale, sinks, win)  # [H, T, Dh]
            return o.transpose(0, 1).reshape(t, a.n_heads * a.head_dim)

    return GptOss(*args, **kw)
