"""The transformer forward pass for the supported MoE families (Mixtral, Qwen2-MoE, Qwen3-MoE,
OLMoE), written to read like the math.

Dense weights (embeddings, attention, norms, routers, shared experts, dense MLPs) are a dict of
tensors keyed by their HuggingFace checkpoint names; routed experts come from an ``ExpertProvider``
and are computed by ``kernels.expert_forward``. The MoE block groups the tokens of a step by
expert, so each expert is fetched once per step; it computes the experts already in RAM first
and the others as their reads land, but sums expert outputs in id order, so the float result does
not depend on where the bytes came from. Follows the HuggingFace implementations
(transformers 5.x) operation for operation, so float32 results agree to rounding.

Legend: T tokens in the step, S positions in the KV cache, D hidden, H heads, Hk kv heads,
Dh head dim, E experts, K top-k, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch
import torch.nn.functional as F

from .config import ModelArgs
from .errors import BudgetError
from .kernels import expert_forward
from .kernels.attention import decode_attention
from .kernels.decode_block import DecodeBlock
from .kernels.dense import block_q4, embedding, fuse_rows, linear
from .kernels.experts import (
    combine_args,
    experts_combine,
    experts_forward,
    experts_rows,
    experts_stack,
    moe_combine,
)
from .kernels.layer_ops import rope_attend, router_topk
from .models.mla import MLA, LatentCache
from .models.norms import rms_norm
from .models.rope import apply_rope, rope_tables
from .models.routing import gate_name, route
from .provider import ExpertProvider

__all__ = ["KVCache", "LatentCache", "Routing", "Transformer", "rms_norm", "rope_tables"]

# Steps of fewer tokens than this (a batched decode step, a short prompt) run the union's experts
# on their tokens in one call (``routed_batch``); larger ones one expert at a time (``routed``).
BATCH_BELOW = 64


@functools.cache
def _rows(k: int) -> torch.Tensor:
    """``[[0, 1, ..., k-1]]`` int64, made once per k (the decode step's combine index)."""
    return torch.arange(k)[None, :]


def swiglu(
    x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor
) -> torch.Tensor:
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


@dataclass
class KVCache:
    """Per-layer key/value tensors ``[Hk, S_max, Dh]``, filled up to ``length``."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    length: int = 0

    @classmethod
    def empty(cls, a: ModelArgs, capacity: int, dtype: torch.dtype) -> KVCache:
        shape = (a.n_kv_heads, capacity, a.head_dim)
        return cls([torch.zeros(shape, dtype=dtype) for _ in range(a.n_layers)],
                   [torch.zeros(shape, dtype=dtype) for _ in range(a.n_layers)])  # fmt: skip

    @property
    def capacity(self) -> int:
        return self.k[0].shape[1]


@dataclass
class Routing:
    """What the router chose for one layer of one step (for traces and predictors)."""

    layer: int
    experts: torch.Tensor  # [T, K] expert ids in rank order
    weights: torch.Tensor  # [T, K] gate weights after normalization
    hidden: torch.Tensor  # [T, D] router input


class Transformer:
    def __init__(
        self,
        args: ModelArgs,
        dense: dict[str, torch.Tensor],
        provider: ExpertProvider,
        dtype: torch.dtype,
        max_context: int,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        self.args = args
        self.w = dense
        self.provider = provider
        self.dtype = dtype  # activations
        self.kv_dtype = kv_dtype or dtype  # the KV cache (bf16 halves decode attention's bytes)
        self.max_context = max_context
        self.cos, self.sin = rope_tables(args, max_context, dtype)
        # q4 matrices in the expert kernel's row blocks (decode GEMV); the embedding table is
        # gathered by rows and stays as stored; q/k/v are blocked when fused (fuse_rows)
        block_q4(dense, skip=("model.embed_tokens.weight", "q_proj.weight", "k_proj.weight",
                              "v_proj.weight"))  # fmt: skip
        self.lm_head = dense["model.embed_tokens.weight" if args.tie_word_embeddings
                             else "lm_head.weight"]  # fmt: skip
        self.qkv_fused = [self._fuse_qkv(i) for i in range(args.n_layers)]
        self.on_route: list = []  # callbacks(Routing), e.g. trace recorders
        self.router = None  # routers.py: benchmark-only routing that bypasses the gates
        # the native softmax-top-k router in the fast mode (some dense weight quantized; its
        # logits round in another order than torch's GEMV, so the exact mode keeps torch's)
        self.fast_router = args.topk_method == "softmax_topk" and any(
            not isinstance(v, torch.Tensor) for v in dense.values()
        )
        # MLA (DeepSeek) instead of grouped-query attention: its own blocks and latent cache
        self.mla = MLA(args, dense, self.cos, self.sin) if args.attention == "mla" else None
        # a decode token's attention block (and router) in one native call per layer; False
        # keeps the op-by-op path (the same bits: tests compare the two)
        self.fused_decode = True
        self._blocks: list[DecodeBlock | None] | None = None
        self._one_call: list[bool] | None = None  # layers whose whole step may be one call
        self._combine_ev: list[int] | None = None  # their experts_combine_ arguments

    def new_cache(self, capacity: int | None = None) -> KVCache | LatentCache:
        """An empty KV cache for ``capacity`` tokens (default: ``max_context``)."""
        if self.mla is not None:
            return self.mla.new_cache(capacity or self.max_context, self.kv_dtype)
        return KVCache.empty(self.args, capacity or self.max_context, self.kv_dtype)

    # -- attention -------------------------------------------------------------------------
    def attention(self, i: int, x: torch.Tensor, kv: KVCache, pos: int) -> torch.Tensor:
        if self.mla is not None:
            return self.mla(i, x, kv, pos)
        q, k, v = self.qkv(i, x)
        return self.o_proj(i, self.attend(i, q, k, v, kv, pos))

    def _fuse_qkv(self, i: int) -> tuple | None:
        """q, k and v stacked into one weight (one GEMV per token instead of three); the dict
        entries become views of its rows, so no weight is held twice."""
        w, p = self.w, f"model.layers.{i}.self_attn"
        names = [f"{p}.{n}_proj.weight" for n in "qkv"]
        biases = [w.get(f"{p}.{n}_proj.bias") for n in "qkv"]
        if any(n not in w for n in names) or len({b is None for b in biases}) > 1:
            return None
        fused = fuse_rows([w[n] for n in names])
        if fused is None:
            return None
        for n, part in zip(names, fused[1], strict=True):
            w[n] = part
        bias = None if biases[0] is None else torch.cat(biases)  # [(H + 2 Hk) Dh]
        return fused[0], bias, [part.shape[0] for part in fused[1]]

    def qkv(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Projected and normalized q ``[T, H, Dh]``, k and v ``[T, Hk, Dh]`` (before RoPE)."""
        a, w, p = self.args, self.w, f"model.layers.{i}.self_attn"
        t = x.shape[0]
        if (fused := self.qkv_fused[i]) is not None:
            q, k, v = linear(x, fused[0], fused[1]).split(fused[2], dim=1)  # [T, (H+2Hk)Dh]
        else:
            q = linear(x, w[f"{p}.q_proj.weight"], w.get(f"{p}.q_proj.bias"))  # [T, H*Dh]
            k = linear(x, w[f"{p}.k_proj.weight"], w.get(f"{p}.k_proj.bias"))  # [T, Hk*Dh]
            v = linear(x, w[f"{p}.v_proj.weight"], w.get(f"{p}.v_proj.bias"))  # [T, Hk*Dh]
        if a.qk_norm == "proj":
            q = rms_norm(q, w[f"{p}.q_norm.weight"], a.rms_norm_eps)
            k = rms_norm(k, w[f"{p}.k_norm.weight"], a.rms_norm_eps)
        if a.clip_qkv is not None:
            q, k, v = (z.clamp(-a.clip_qkv, a.clip_qkv) for z in (q, k, v))
        q = q.view(t, a.n_heads, a.head_dim)
        k = k.view(t, a.n_kv_heads, a.head_dim)
        v = v.view(t, a.n_kv_heads, a.head_dim)
        if a.qk_norm == "head":
            q = rms_norm(q, w[f"{p}.q_norm.weight"], a.rms_norm_eps)
            k = rms_norm(k, w[f"{p}.k_norm.weight"], a.rms_norm_eps)
        return q, k, v

    def attend(
        self, i: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv: KVCache, pos: int
    ) -> torch.Tensor:
        """RoPE, append k/v to the cache at ``pos``, causal attention: ``[T, H*Dh]``."""
        a = self.args
        t = q.shape[0]
        if t == 1 and a.rotary_dim == a.head_dim:  # decode: RoPE, cache append and one query
            # per head in one native call (which rotates whole heads)
            o = rope_attend(q[0], k[0], v[0], kv.k[i], kv.v[i], self.cos[pos], self.sin[pos],
                            pos, a.attn_scale, a.sliding_window)  # fmt: skip
            if o is not None:
                return o.view(1, a.n_heads * a.head_dim)
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [H|Hk, T, Dh]
        cos, sin = self.cos[pos : pos + t], self.sin[pos : pos + t]  # [T, R]
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        kv.k[i][:, pos : pos + t] = k
        kv.v[i][:, pos : pos + t] = v
        s = pos + t
        if t == 1:  # decode: one query per head, each cached key and value read once
            o = decode_attention(q[:, 0], kv.k[i], kv.v[i], s, a.attn_scale,
                                 a.sliding_window)  # fmt: skip
            return o.to(q.dtype).view(1, a.n_heads * a.head_dim)
        keys = kv.k[i][:, :s].to(q.dtype)  # [Hk, S, Dh] (a no-op when KV has q's dtype)
        vals = kv.v[i][:, :s].to(q.dtype)
        mask = None
        if pos or a.sliding_window is not None:
            qi = torch.arange(pos, s)[:, None]
            ki = torch.arange(s)[None, :]
            mask = ki <= qi  # [T, S]
            if a.sliding_window is not None:
                mask &= ki > qi - a.sliding_window
        # with a batch dimension: on CPU, SDPA takes its flash kernel only for 4-D inputs (3-D
        # ones fall back to bmm + softmax, 10x slower in bf16 at 512 tokens; docs/design.md)
        out = F.scaled_dot_product_attention(
            q[None],
            keys[None],
            vals[None],
            attn_mask=mask,
            is_causal=mask is None,  # a fresh prompt: SDPA's causal kernel, no mask to build
            scale=a.attn_scale,
            enable_gqa=a.n_heads != a.n_kv_heads,
        )[0]  # [H, T, Dh]
        return out.transpose(0, 1).reshape(t, a.n_heads * a.head_dim)

    def o_proj(self, i: int, o: torch.Tensor) -> torch.Tensor:
        w, p = self.w, f"model.layers.{i}.self_attn"
        return linear(o, w[f"{p}.o_proj.weight"], w.get(f"{p}.o_proj.bias"))

    def decode_attn_extras(self, i: int) -> tuple[int | None, torch.Tensor | None] | None:
        """(window, sinks) of layer ``i``'s decode attention, for the native block; ``None``
        when a subclass's ``attend`` does something the block does not (then the layer keeps
        the op-by-op path). Subclasses that change ``attend`` override this too."""
        if type(self).attend is not Transformer.attend:
            return None
        return self.args.sliding_window, None

    def decode_blocks(self) -> list[DecodeBlock | None]:
        """Each layer's native decode block (``kernels/decode_block.py``), or ``None`` for a
        layer it cannot run; built on first use."""
        if self._blocks is None:
            self._blocks = [self._decode_block(i) for i in range(self.args.n_layers)]
        return self._blocks

    def _resident_layer(self, i: int, blk: DecodeBlock, x: torch.Tensor) -> tuple | None:
        """(expert table, ``experts_combine_`` arguments) when layer ``i``'s decode step may run
        whole in one native call (``DecodeBlock.layer``): the model's own softmax-top-k router
        and routed experts alone (no router override, shared expert or route callback, this
        class's MoE path), a provider with a resident table, q4/q8 experts the native kernel
        takes. Else None: the attention block alone, then ``mlp``."""
        if self._one_call is None:
            cls, t = type(self), Transformer
            plain = (cls.mlp is t.mlp and cls.moe is t.moe and cls.routed_one is t.routed_one
                     and cls.route is t.route and self.router is None
                     and not self.args.shared_expert_inter
                     and hasattr(self.provider, "resident_table")
                     and getattr(self.provider.format, "name", None) in ("q4", "q8"))  # fmt: skip
            self._one_call = [plain and self.args.moe_layers[j] for j in range(self.args.n_layers)]
        if not self._one_call[i] or not blk.routes or self.on_route:
            return None
        if (tab := self.provider.resident_table(i)) is None:
            return None
        table, view = tab
        if self._combine_ev is None and view is not None:  # once: the experts' shape is fixed
            self._combine_ev = combine_args(self.provider.format, x, view) or []
        return (table, self._combine_ev) if self._combine_ev else None

    def _decode_block(self, i: int) -> DecodeBlock | None:
        a, w, cls = self.args, self.w, type(self)
        overridden = (cls.attention is not Transformer.attention or cls.qkv is not Transformer.qkv
                      or cls.o_proj is not Transformer.o_proj)  # fmt: skip
        extras = self.decode_attn_extras(i)
        fused = self.qkv_fused[i]
        if self.mla is not None or overridden or extras is None or fused is None:
            return None
        p, ap = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        gate = w.get(gate_name(a, i)) if self.fast_router and a.moe_layers[i] else None
        return DecodeBlock.build(
            dtype=self.dtype,
            norms=(w[f"{p}.input_layernorm.weight"], w[f"{p}.post_attention_layernorm.weight"]),
            qkv=fused,
            o=(w[f"{ap}.o_proj.weight"], w.get(f"{ap}.o_proj.bias")),
            heads=(a.n_heads, a.n_kv_heads, a.head_dim),
            qk_norm=(a.qk_norm, w.get(f"{ap}.q_norm.weight"), w.get(f"{ap}.k_norm.weight")),
            rope=(self.cos, self.sin),
            scale=a.attn_scale,
            window=extras[0],
            sinks=extras[1],
            router=(gate if isinstance(gate, torch.Tensor) else None, a.norm_topk_prob),
            eps=a.rms_norm_eps,
            clip=a.clip_qkv,
        )

    # -- mixture of experts ----------------------------------------------------------------
    def route(self, i: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.router is not None:  # experts [T, K] int64, weights [T, K] in x's dtype
            return self.router.route(i, x.shape[0], x.dtype)
        a = self.args
        gate = self.w.get(gate_name(a, i)) if self.fast_router else None
        if isinstance(gate, torch.Tensor):  # fast mode: one native call
            if (r := router_topk(x, gate, a.top_k, a.norm_topk_prob)) is not None:
                return r[0], r[1].to(x.dtype)
        return route(a, self.w, i, x)

    def moe(
        self, i: int, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """The MoE block; ``routing`` (experts, weights) when the router already ran."""
        experts, weights = routing if routing is not None else self.route(i, x)  # [T, K]
        if x.shape[0] == 1:
            out = self.routed_one(i, x, experts, weights)
        elif x.shape[0] < BATCH_BELOW:
            out = self.routed_batch(i, x, experts, weights)
        else:
            out = self.routed(i, x, experts, weights)
        a = self.args
        if a.shared_expert_inter:  # dense, always resident
            p = f"model.layers.{i}.mlp"
            sp = f"{p}.{a.spec.shared_prefix}"
            shared = swiglu(x, self.w[f"{sp}.gate_proj.weight"], self.w[f"{sp}.up_proj.weight"],
                            self.w[f"{sp}.down_proj.weight"])  # fmt: skip
            if a.spec.shared_gate:
                shared = torch.sigmoid(linear(x, self.w[f"{p}.shared_expert_gate.weight"])) * shared
            out = out + shared
        return out

    def routed(
        self, i: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for a batch of tokens, grouped by expert: each
        expert is fetched once and runs on all the tokens that chose it."""
        needed = torch.unique(experts).tolist()  # sorted: a fixed accumulation order
        out = torch.zeros_like(x)
        fmt = self.provider.format
        with self.provider.acquire(i, needed) as handles:
            # after this layer's demand reads are queued, so a prefetch a callback starts for
            # a later layer never gets onto the disk ahead of them
            for cb in self.on_route:
                cb(Routing(i, experts, weights, x))
            # Compute order: first what is in RAM (whole cached experts, cached tops), while
            # the misses and bottom segments are read; then the rest in read order. Each
            # expert's groups and the experts' sum into `out` keep a fixed order, so the
            # result is the same bits whatever was cached.
            rows = [torch.where(experts == e) for e in needed]  # (tokens, top-k slot) per expert
            segs = [h.segments() for h in handles]
            ys: list[torch.Tensor | None] = [None] * len(needed)
            for j, h in enumerate(handles):
                if h.resident:
                    ys[j] = expert_forward(fmt, x[rows[j][0]], [next(segs[j])])  # [T_e, D]
            for j, (tok, _) in enumerate(rows):
                ys[j] = expert_forward(fmt, x[tok], segs[j], out=ys[j])  # waits for reads
            for (tok, slot), y in zip(rows, ys, strict=True):
                out.index_add_(0, tok, y * weights[tok, slot, None])
        return out

    def routed_one(
        self, i: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for one token (decode): no grouping, no gathers.
        Expert outputs land in rows of one ``[K, D]`` tensor in expert-id order and are summed
        with their gate weights in one op, so the bits do not depend on what was cached."""
        ids = experts[0].tolist()
        order = sorted(range(len(ids)), key=ids.__getitem__)
        needed = [ids[r] for r in order]  # [K] distinct ids, ascending
        fmt = self.provider.format
        fast = getattr(self.provider, "resident_views", None)
        if fast is not None and (views := fast(i, needed)) is not None:
            # every expert whole in RAM: no handles, no reads, one native call
            for cb in self.on_route:
                cb(Routing(i, experts, weights, x))
            if (y := experts_combine(fmt, x, views, weights, order)) is not None:
                return y  # [1, D], one native call
            ys = experts_stack(fmt, x, views)[:, 0]  # [K, D]
            return moe_combine(ys, _rows(len(ids)), weights[:, order])  # [1, D]
        with self.provider.acquire(i, needed) as handles:
            for cb in self.on_route:
                cb(Routing(i, experts, weights, x))
            segs = [h.segments() for h in handles]
            started = [h.resident for h in handles]
            first = [j for j in range(len(needed)) if started[j]]
            # in RAM first, while the reads run: every resident segment in one native call
            outs = experts_forward(fmt, x, [next(segs[j]) for j in first])  # [1, D] each
            if len(first) == len(needed):  # all in RAM (the resident case): one copy
                ys = torch.cat(outs)  # [K, D]
            else:
                ys = torch.empty((len(needed), x.shape[1]), dtype=x.dtype)  # [K, D]
                for j, y in zip(first, outs, strict=True):
                    ys[j] = y[0]
            done = [False] * len(needed)
            for j in range(len(needed)):  # in request order, as the reads land
                if done[j]:
                    continue
                if not started[j]:  # a miss: with the later misses already read, one call
                    first = next(segs[j])  # waits for its read (a split miss: its top)
                    more = [m for m in range(j + 1, len(needed))
                            if not started[m] and not done[m] and handles[m].landed()]  # fmt: skip
                    outs = experts_forward(fmt, x, [first, *(next(segs[m]) for m in more)])
                    for m, y in zip(more, outs[1:], strict=True):
                        ys[m] = y[0]
                        next(segs[m], None)  # a whole read: no more segments; settles it
                        done[m] = True
                    ys[j] = outs[0][0]
                if (rest := next(segs[j], None)) is not None:  # a split expert's bottom
                    expert_forward(fmt, x, chain((rest,), segs[j]), out=ys[j : j + 1])
        # the gate-weighted sum in id order, by the rule a batched step uses for each token
        return moe_combine(ys, torch.arange(len(ids))[None, :], weights[:, order])  # [1, D]

    def routed_batch(
        self, i: int, x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for a few tokens (a batched decode step, a short
        prompt): each expert of the union is fetched once and runs on the tokens routed to it,
        all of them in one native call when every expert is in RAM (``experts_rows``); each
        token's outputs are summed in id order by ``moe_combine``, so a token gets the bits
        ``routed_one`` gives it alone."""
        t, k = experts.shape
        flat = experts.reshape(-1)  # [T K]
        order = torch.argsort(flat * t + torch.arange(t).repeat_interleave(k))  # by (id, token)
        tokens = order // k  # [P] the token of each (expert, token) pair, grouped by expert
        needed, counts = torch.unique_consecutive(flat[order], return_counts=True)
        offsets = [0, *torch.cumsum(counts, 0).tolist()]
        row = torch.empty_like(order)
        row[order] = torch.arange(order.shape[0])  # pair row of each (token, rank) slot
        by_id = torch.argsort(experts, dim=1)  # [T, K] each token's experts in id order
        idx = row.view(t, k).gather(1, by_id)  # [T, K] rows of Y to sum, in id order
        w = weights.gather(1, by_id)  # [T, K]
        ids = needed.tolist()
        fmt = self.provider.format
        fast = getattr(self.provider, "resident_views", None)
        if fast is not None and (views := fast(i, ids)) is not None:
            for cb in self.on_route:
                cb(Routing(i, experts, weights, x))
            return moe_combine(experts_rows(fmt, x, views, tokens, offsets), idx, w)  # [T, D]
        y = torch.zeros((order.shape[0], x.shape[1]), dtype=x.dtype)  # [P, D]
        with self.provider.acquire(i, ids) as handles:
            for cb in self.on_route:
                cb(Routing(i, experts, weights, x))
            segs = [h.segments() for h in handles]
            first = [j for j, h in enumerate(handles) if h.resident]
            if first:  # in RAM first, in one call, while the misses are read
                sub = torch.cat([tokens[offsets[j] : offsets[j + 1]] for j in first])  # [P']
                subo = [0, *torch.cumsum(counts[first], 0).tolist()]
                rows = torch.cat([torch.arange(offsets[j], offsets[j + 1]) for j in first])
                y[rows] = experts_rows(fmt, x, [next(segs[j]) for j in first], sub, subo)
            for j in range(len(ids)):  # then in request order, as the reads land
                a, b = offsets[j], offsets[j + 1]
                for view in segs[j]:  # a miss's segments, a split hit's bottom
                    experts_rows(fmt, x, [view], tokens[a:b], [0, b - a], out=y[a:b])
        return moe_combine(y, idx, w)  # [T, D]

    def mlp(
        self, i: int, x: torch.Tensor, routing: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        if self.args.moe_layers[i]:
            return self.moe(i, x, routing)
        p = f"model.layers.{i}.mlp"
        return swiglu(x, self.w[f"{p}.gate_proj.weight"], self.w[f"{p}.up_proj.weight"],
                      self.w[f"{p}.down_proj.weight"])  # fmt: skip

    # -- whole model -----------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, kv: KVCache, last_only: bool = False) -> torch.Tensor:
        """Logits ``[T, V]`` (``[1, V]`` with ``last_only``) for ``tokens`` appended to ``kv``."""
        a, w = self.args, self.w
        t, pos = tokens.shape[0], kv.length
        if pos + t > kv.capacity:
            raise BudgetError(
                f"context of {pos + t} tokens exceeds the KV cache capacity of "
                f"{kv.capacity}; raise max_context"
            )
        self.provider.begin_step()
        x = embedding(tokens, w["model.embed_tokens.weight"], self.dtype)  # [T, D]
        blocks = self.decode_blocks() if t == 1 and self.fused_decode else None
        for i in range(a.n_layers):
            if blocks is not None and (blk := blocks[i]) is not None:  # one native call
                if (tab := self._resident_layer(i, blk, x)) is not None:  # the MoE in it too
                    h, ids, wts, done = blk.layer(x, kv.k[i], kv.v[i], pos, a.top_k, *tab)
                    if done:
                        self.provider.count_resident(i, sorted(ids[0].tolist()))
                        continue
                else:
                    h, ids, wts = blk.run(x, kv.k[i], kv.v[i], pos, a.top_k, self.router is None)
                x.add_(self.mlp(i, h, None if ids is None else (ids, wts)))  # x is this step's own
                continue
            p = f"model.layers.{i}"
            h = rms_norm(x, w[f"{p}.input_layernorm.weight"], a.rms_norm_eps)
            x = x + self.attention(i, h, kv, pos)
            h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], a.rms_norm_eps)
            x = x + self.mlp(i, h)
        kv.length = pos + t
        if last_only:
            x = x[-1:]
        x = rms_norm(x, w["model.norm.weight"], a.rms_norm_eps)
        return linear(x, self.lm_head)  # [T, V]

    @torch.inference_mode()
    def forward_batch(self, tokens: Sequence[int], caches: Sequence[KVCache]) -> torch.Tensor:
        """One decode step of B independent sequences: ``tokens[b]`` is appended to
        ``caches[b]``. Logits ``[B, V]``.

        Attention runs per sequence (each has its own cache and position); the projections,
        the router, the dense MLPs and the routed experts run over the whole batch, so each
        layer fetches the union of the sequences' experts once.
        """
        a, w = self.args, self.w
        if len(tokens) != len(caches) or not tokens:
            raise ValueError("forward_batch needs one cache per token, and at least one")
        if len({id(kv) for kv in caches}) != len(caches):
            raise ValueError("forward_batch: each sequence needs its own KV cache")
        for kv in caches:
            if kv.length + 1 > kv.capacity:
                raise BudgetError(
                    f"context of {kv.length + 1} tokens exceeds the KV cache capacity of "
                    f"{kv.capacity}; raise max_context"
                )
        self.provider.begin_step(len(tokens))
        ids = torch.tensor([int(t) for t in tokens])
        x = embedding(ids, w["model.embed_tokens.weight"], self.dtype)  # [B, D]
        for i in range(a.n_layers):
            p = f"model.layers.{i}"
            h = rms_norm(x, w[f"{p}.input_layernorm.weight"], a.rms_norm_eps)
            if self.mla is not None:  # MLA: per sequence, projections included
                x = x + torch.cat([self.mla(i, h[b : b + 1], kv, kv.length)
                                   for b, kv in enumerate(caches)])  # fmt: skip
            else:
                q, k, v = self.qkv(i, h)  # [B, H|Hk, Dh]
                o = torch.cat([self.attend(i, q[b : b + 1], k[b : b + 1], v[b : b + 1], kv,
                                           kv.length) for b, kv in enumerate(caches)])  # fmt: skip
                x = x + self.o_proj(i, o)
            h = rms_norm(x, w[f"{p}.post_attention_layernorm.weight"], a.rms_norm_eps)
            x = x + self.mlp(i, h)
        for kv in caches:
            kv.length += 1
        x = rms_norm(x, w["model.norm.weight"], a.rms_norm_eps)
        return linear(x, self.lm_head)  # [B, V]
