"""A decode token's attention block (norm, fused q/k/v projection, q/k norms and clip, RoPE,
KV append, attention, o projection, residual add, the MLP's norm) and its softmax-top-k router
in one native call (``decode_block.cpp``).

The op-by-op forward pays a few microseconds of Python and dispatch per op and wrapper, and the
attention half of a layer was some 25 of them (``bench/overhead.py`` lists the ops of a step and
the share of the step outside them). The native block calls the same kernels in the same
order (the dense GEMV ops through torch's dispatcher, ``layer_ops.cpp``'s norm, RoPE + attention
and router), so its bits are those of the op-by-op path; ``tests/test_decode_block.py`` checks
that for every kind of weight and attention variant it takes.

``DecodeBlock.build`` returns ``None`` where the block cannot run natively (no compiler or
``MER_NATIVE=0``, activations other than float32, a dense weight the native GEMV does not take,
partial RoPE); the model then keeps its op-by-op path for that layer.

Legend: D hidden, H query heads, Hk kv heads, Dh head dim, C cache capacity, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import attention, native
from .dense_quant import Q4Blocked, Q4Dense, Q8Dense

_EMPTY = torch.empty(0)
QK_NORM = {"none": 0, "proj": 1, "head": 2}


def _weight(w: object, dtype: torch.dtype) -> tuple[int, torch.Tensor, torch.Tensor] | None:
    """(kind, a, b) of the native block for a dense weight: 0 plain (``a`` is the weight, in
    the activations' dtype), 1 q8, 2 q4, 3 / 4 q4 in 32- / 64-row blocks; ``None`` when the
    block cannot take it."""
    if isinstance(w, torch.Tensor):
        return (0, w, _EMPTY) if w.dtype == dtype and w.dim() == 2 else None
    if isinstance(w, Q4Blocked) and w.use_native(1):  # 3: n32 row blocks, 4: n64
        return (3 if w.bn == 32 else 4), w.packed, w.sz  # row slices stay contiguous
    if isinstance(w, Q4Dense | Q8Dense) and w.use_native(1):
        return (2, w.packed, w.sz) if isinstance(w, Q4Dense) else (1, w.q, w.s)
    return None


def _opt(t: torch.Tensor | None) -> torch.Tensor:
    return _EMPTY if t is None else t.contiguous()


@dataclass
class DecodeBlock:
    """The constant arguments of one layer's native attention block."""

    tensors: list[torch.Tensor]  # with the router weight
    tensors_no_router: list[torch.Tensor]  # the same, router weight empty
    ints: list[int]
    floats: list[float]
    routes: bool  # the router weight is native-ready (else the caller routes)

    @classmethod
    def build(
        cls,
        *,
        dtype: torch.dtype,
        norms: tuple[torch.Tensor, torch.Tensor],
        qkv: tuple[object, torch.Tensor | None, list[int]],
        o: tuple[object, torch.Tensor | None],
        heads: tuple[int, int, int],
        qk_norm: tuple[str, torch.Tensor | None, torch.Tensor | None],
        rope: tuple[torch.Tensor, torch.Tensor],
        scale: float,
        window: int | None,
        sinks: torch.Tensor | None,
        router: tuple[torch.Tensor | None, bool],
        eps: float,
        clip: float | None,
    ) -> DecodeBlock | None:
        """The block of one layer, or ``None`` when it cannot run natively.

        ``qkv`` is (fused weight, fused bias, [q, k, v widths]); ``o`` (weight, bias);
        ``heads`` (H, Hk, Dh); ``qk_norm`` (mode, q weight, k weight); ``rope`` the whole
        (cos, sin) tables ``[C, Dh]``; ``router`` (weight ``[E, D]`` or None, renormalize)."""
        if dtype != torch.float32 or not attention.available():
            return None
        wq, wo = _weight(qkv[0], dtype), _weight(o[0], dtype)
        if wq is None or wo is None:
            return None
        if (wq[0] or wo[0]) and not native.load():  # the dense ops live in the mer library
            return None
        ok = (torch.float32, torch.bfloat16)
        gate, renorm = router
        if any(t.dtype not in ok for t in norms) or (gate is not None and gate.dtype not in ok):
            return None
        mode, qn, kn = qk_norm
        if mode not in QK_NORM or (mode != "none" and (qn is None or kn is None)):
            return None
        cos, sin = rope
        if cos.dtype != torch.float32 or cos.shape[1] != heads[2]:
            return None  # partial RoPE or another table dtype: the op-by-op path
        ts = [
            norms[0].contiguous(), norms[1].contiguous(),
            wq[1], wq[2], _opt(qkv[1]), _opt(qn), _opt(kn),
            wo[1], wo[2], _opt(o[1]),
            cos.contiguous(), sin.contiguous(),
            _EMPTY if sinks is None else sinks.float().contiguous(),
            _opt(gate),
        ]  # fmt: skip
        h, hk, dh = heads
        ints = [wq[0], wo[0], *qkv[2], h, hk, dh, QK_NORM[mode], window or 0, int(renorm),
                int(clip is not None)]  # fmt: skip
        return cls(ts, [*ts[:13], _EMPTY], ints, [eps, scale, clip or 0.0], gate is not None)

    def run(
        self,
        x: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        pos: int,
        top_k: int,
        route: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Update the residual ``x [1, D]`` in place with the attention block at ``pos``
        (writing row ``pos`` of the caches ``kc``, ``vc`` ``[Hk, C, Dh]``); returns the MLP's
        input ``h [1, D]`` and, with ``route`` (and a router weight), the router's experts
        ``[1, K]`` int64 and weights ``[1, K]`` float32 (else ``None, None``)."""
        if route and self.routes:
            h, ids, wts = _outputs(x, top_k)
            torch.ops.mer_attn.attn_block_(x, h, ids, wts, kc, vc, self.tensors, self.ints,
                                           self.floats, pos)  # fmt: skip
            return h, ids, wts
        h = torch.empty_like(x)
        torch.ops.mer_attn.attn_block_(x, h, _IDS, _WTS, kc, vc, self.tensors_no_router,
                                       self.ints, self.floats, pos)  # fmt: skip
        return h, None, None

    def layer(
        self,
        x: torch.Tensor,
        kc: torch.Tensor,
        vc: torch.Tensor,
        pos: int,
        top_k: int,
        table: list[torch.Tensor],
        ev: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """The whole layer when the chosen experts are in RAM: ``run``'s attention block and
        router, then (``decode_block.cpp`` ``layer_``) the experts' gate-weighted sum added to
        ``x`` in the same call, with the bits of the model's resident path. ``table [E]``: each
        expert's whole buffer or an empty tensor; ``ev``: ``experts.combine_args``. Returns
        ``(h, ids, wts, done)``; not ``done`` (a chosen expert is not in the table): only the
        attention half ran, and the caller computes the MoE on ``h`` with ``ids``, ``wts``."""
        h, ids, wts = _outputs(x, top_k)
        y = torch.empty_like(x)  # the experts' sum, added to x
        done = torch.ops.mer_attn.layer_(x, h, ids, wts, kc, vc, self.tensors, self.ints,
                                         self.floats, pos, table, ev, y)  # fmt: skip
        return h, ids, wts, done


def _outputs(x: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A routed block's outputs for one token: the MLP input ``h``, experts and weights."""
    return (torch.empty_like(x), torch.empty((1, top_k), dtype=torch.int64),
            torch.empty((1, top_k), dtype=torch.float32))  # fmt: skip


_IDS = torch.empty((1, 1), dtype=torch.int64)
_WTS = torch.empty((1, 1), dtype=torch.float32)
