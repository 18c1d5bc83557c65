"""Synthetic routers: benchmark-only routing that replaces a model's own gates.

A random-weight checkpoint routes unlike a trained model, so its cache hit rates and prefetch
accuracy say little about the real model of that shape. A router here hands the MoE block
(``Transformer.route``, through ``Transformer.router``) the experts and gate weights of each
token instead of computing them from the gate weights:

- ``trace:FILE`` (``TraceRouter``): replays a recorded routing trace (``mer-trace`` or the
  third-party ``layer-expert-pairs`` format, ``trace.read_trace``) token by token; past the
  trace's end it starts again from its first token (counted in ``wraps``).
- ``markov:FILE`` (``MarkovRouter``): samples, for any length, from 2nd-order Markov chains
  fitted on such a trace, with the pooled pair estimator of ``predict``'s S and T predictors
  (``PairChain``): along the tokens (the same layer at the two previous tokens) and along the
  layers (the two previous MoE layers), plus, per layer, the trace's distribution of how many
  of a token's experts the previous token also used.

Layers: the model's j-th MoE layer takes the trace's j-th layer. A trace with fewer layers, a
different number of experts per layer, or a smaller top-k than the model is refused
(``TraceError``); extra trace layers are ignored and a larger trace top-k is cut to the model's
(the first ranks). Each generation (``Engine.generate``) restarts the router (``reset``): the
replay from the trace's first token, the sampler from its seed. Rows of ``forward_batch`` are
taken as consecutive tokens of one stream. The generated text is meaningless: outputs are
marked benchmark-only. Statistics and the bounds they meet: docs/router.md.

Legend: T tokens, L MoE layers, K top-k, E experts per layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .config import ModelArgs
from .errors import ConfigError, TraceError
from .trace import Trace, read_trace

KINDS = ("trace", "markov")
# The chain's scores are mixed half and half with the layer's marginal (K x popularity: each
# expert's chance to be routed): fitted on one trace, most contexts were seen once, and the
# chain alone wanders into a few paths (popularity TV 0.26 on the OLMoE trace, 0.09 mixed).
MARGINAL_WEIGHT = 1.0


def model_args(path: Path) -> ModelArgs:
    """The model's arguments from a store or a checkpoint folder."""
    if (path / "manifest.json").is_file():
        from .store import Store

        return Store.open(path).args
    return ModelArgs.from_file(path / "config.json")


def make_router(spec: str, model_path: str | Path, seed: int = 0) -> TraceRouter | MarkovRouter:
    """A router from ``"trace:FILE"`` or ``"markov:FILE"`` for the model at ``model_path``."""
    kind, sep, file = str(spec).partition(":")
    if not sep or kind not in KINDS or not file:
        raise ConfigError(f"router {spec!r}: expected trace:FILE or markov:FILE")
    args = model_args(Path(model_path))
    trace = read_trace(file)
    if kind == "trace":
        return TraceRouter(trace, args, spec)
    return MarkovRouter(trace, args, spec, seed=seed)


def _checked(trace: Trace, args: ModelArgs) -> tuple[list[int], np.ndarray]:
    """The model's MoE layers and the trace's experts ``[T, L_model, K_model]`` mapped onto
    them by index."""
    layers = [i for i in range(args.n_layers) if args.moe_layers[i]]
    where = trace.path or "the trace"
    if trace.num_layers < len(layers):
        raise TraceError(f"{where}: {trace.num_layers} MoE layers, but the model has "
                         f"{len(layers)}: a router trace needs at least as many")  # fmt: skip
    if trace.num_experts != args.n_experts:
        raise TraceError(f"{where}: {trace.num_experts} experts per layer, the model "
                         f"{args.n_experts}: they must be equal")  # fmt: skip
    if trace.top_k < args.top_k:
        raise TraceError(f"{where}: top-{trace.top_k}, but the model routes each token to "
                         f"{args.top_k} experts")  # fmt: skip
    if trace.num_tokens < 3:
        raise TraceError(f"{where}: {trace.num_tokens} tokens; a router needs at least 3")
    return layers, np.ascontiguousarray(trace.experts[:, : len(layers), : args.top_k])


class _Router:
    """Shared by both routers: the step clock and the output tensors."""

    benchmark_only = True

    def __init__(self, trace: Trace, args: ModelArgs, spec: str) -> None:
        self.spec = spec
        self.layers, self.experts = _checked(trace, args)  # [T, L, K]
        self.index = {layer: j for j, layer in enumerate(self.layers)}
        self.k = args.top_k
        w = trace.weights
        if w is not None:  # mean gate weight of each rank, as recorded
            self.rank_weights = w[:, : len(self.layers), : self.k].mean(axis=(0, 1))  # [K]
        else:
            self.rank_weights = np.full(self.k, 1.0 / self.k)
        self.reset()

    def reset(self) -> None:
        self.pos = 0  # tokens of earlier steps in this generation
        self.step_tokens = 0

    def _tokens(self, layer: int, n: int) -> tuple[int, np.ndarray]:
        j = self.index.get(layer)
        if j is None:
            raise ConfigError(f"layer {layer} is not a MoE layer of the model")
        if j == 0:  # a new forward step
            self.pos += self.step_tokens
            self.step_tokens = n
        return j, self.pos + np.arange(n)

    def _out(self, experts: np.ndarray, weights: np.ndarray, dtype: torch.dtype):
        return (torch.from_numpy(experts.astype(np.int64)),  # [T, K]
                torch.from_numpy(weights.astype(np.float32)).to(dtype))  # fmt: skip


class TraceRouter(_Router):
    """Replays the trace's experts (and gate weights, when recorded) token by token."""

    def __init__(self, trace: Trace, args: ModelArgs, spec: str) -> None:
        self.weights = None
        if trace.weights is not None:
            self.weights = np.ascontiguousarray(trace.weights[:, : len(trace.layers), : args.top_k])
        super().__init__(trace, args, spec)

    def reset(self) -> None:
        super().reset()
        self.wraps = 0

    def route(self, layer: int, n: int, dtype: torch.dtype):
        j, tokens = self._tokens(layer, n)
        total = self.experts.shape[0]
        if j == 0:
            self.wraps = int((tokens[-1]) // total)
        rows = tokens % total
        experts = self.experts[rows, j]  # [T, K]
        if self.weights is not None:
            weights = self.weights[rows, j]
        else:
            weights = np.broadcast_to(self.rank_weights, experts.shape)
        return self._out(experts, weights, dtype)


class PairChain:
    """A fitted 2nd-order chain over expert sets, the estimator of ``predict.SparseMarkov``
    (without its decay, since this is a fit, not an online learner): every pair (a, b), ``a``
    from the far set and ``b`` from the near set, is a context whose row counts the experts
    that followed it; ``scores`` pools the rows of the pairs present,
    ``s(c) = sum counts[c] / sum totals``. Fitted in one vectorized pass (the online class
    observes one set at a time: seconds per trace) and stored sparse per layer."""

    def __init__(self, far: np.ndarray, near: np.ndarray, nxt: np.ndarray, num_experts: int):
        e = num_experts
        self.e = e
        self.ctx, self.ptr, self.cols, self.vals, self.totals = [], [], [], [], []
        for j in range(far.shape[1]):  # far, near, nxt: [N, L, K] aligned observations
            q = (far[:, j, :, None] * e + near[:, j, None, :]).reshape(len(far), -1)  # [N, K*K]
            ctx, inv, tot = np.unique(q, return_inverse=True, return_counts=True)
            inv = inv.reshape(q.shape)
            code = (inv[:, :, None] * e + nxt[:, j, None, :]).ravel()  # [N*K*K*K]
            code, cnt = np.unique(code, return_counts=True)
            rows = code // e
            self.ctx.append(ctx)
            self.ptr.append(np.searchsorted(rows, np.arange(len(ctx) + 1)))
            self.cols.append(code % e)
            self.vals.append(cnt.astype(np.float64))
            self.totals.append(tot.astype(np.float64))

    def scores(self, j: int, far: np.ndarray, near: np.ndarray) -> np.ndarray | None:
        """P(c follows | contexts of ``far`` x ``near``) for every expert, ``[E]``, or None."""
        q = (far[:, None] * self.e + near[None, :]).ravel()  # [K*K]
        ctx = self.ctx[j]
        i = np.searchsorted(ctx, q)
        ok = i < len(ctx)
        ok[ok] = ctx[i[ok]] == q[ok]
        rows = i[ok]  # the contexts seen in the fit
        if not len(rows):
            return None
        ptr = self.ptr[j]
        starts, lens = ptr[rows], ptr[rows + 1] - ptr[rows]
        idx = np.repeat(starts - np.cumsum(lens) + lens, lens) + np.arange(lens.sum())
        s = np.bincount(self.cols[j][idx], weights=self.vals[j][idx], minlength=self.e)
        return s / self.totals[j][rows].sum()


class _LayerChain:
    """``PairChain`` along the layers: the two MoE positions before the target, one table
    per target layer."""

    def __init__(self, far, near, nxt, layer_of, n_layers: int, num_experts: int) -> None:
        self.chains = [PairChain(far[layer_of == j], near[layer_of == j], nxt[layer_of == j],
                                 num_experts) for j in range(n_layers)]  # fmt: skip

    def scores(self, j: int, far: np.ndarray, near: np.ndarray) -> np.ndarray | None:
        return self.chains[j].scores(0, far, near)


class MarkovRouter(_Router):
    """Samples each token's experts, layer by layer, from chains fitted on the trace.

    For token g at MoE layer j: the number r of experts kept from token g-1 at layer j is drawn
    from the trace's distribution of that count in layer j; scores ``s`` are the mean of the
    token chain's estimate (contexts: layer j at tokens g-2, g-1) and the layer chain's (the
    two MoE positions before (g, j), across the token boundary for the first layers), plus
    ``MARGINAL_WEIGHT`` x K x the layer's popularity; r experts are drawn from token g-1's set and
    K - r from the others, without replacement, with probability in proportion to ``s``.
    Ranks follow ``s``; weights are the trace's mean per rank."""

    def __init__(self, trace: Trace, args: ModelArgs, spec: str, seed: int = 0) -> None:
        super().__init__(trace, args, spec)
        ex = self.experts  # [T, L, K]
        t, n_layers, k = ex.shape
        e = args.n_experts
        self.tok = PairChain(ex[:-2], ex[1:-1], ex[2:], e)  # same layer, tokens g-2, g-1
        flat = ex.reshape(t * n_layers, 1, k)  # positions g * L + j, in order
        far, near, nxt = flat[:-2], flat[1:-1], flat[2:]
        layer_of = (np.arange(2, t * n_layers) % n_layers)  # [N] target layer of each triple
        self.lay = _LayerChain(far, near, nxt, layer_of, n_layers, e)
        self.popularity = popularity(ex, e)  # [L, E]
        kept = reuse_counts(ex)  # [T-1, L]
        kept_p = np.stack([np.bincount(kept[:, j], minlength=k + 1)
                           for j in range(n_layers)]) / (t - 1)  # [L, K+1]
        self.kept_cdf = np.cumsum(kept_p, axis=1)  # [L, K+1]
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.sets: dict[tuple[int, int], np.ndarray] = {}

    def reset(self) -> None:
        super().reset()
        if hasattr(self, "seed"):
            self.rng = np.random.default_rng(self.seed)
            self.sets = {}

    def _set(self, g: int, j: int) -> np.ndarray | None:
        return self.sets.get((g, j)) if g >= 0 else None

    def _sample(self, g: int, j: int) -> np.ndarray:
        n = len(self.layers)
        parts = []
        a, b = self._set(g - 2, j), self._set(g - 1, j)
        if a is not None and b is not None:
            parts.append(self.tok.scores(j, a, b))
        a, b = self._set(*divmod(g * n + j - 2, n)), self._set(*divmod(g * n + j - 1, n))
        if a is not None and b is not None:
            parts.append(self.lay.scores(j, a, b))
        parts = [p for p in parts if p is not None]
        s = np.mean(parts, axis=0) if parts else np.zeros(self.popularity.shape[1])
        s = s + MARGINAL_WEIGHT * self.k * self.popularity[j] + 1e-12  # [E], none impossible
        prev = self._set(g - 1, j)
        k = self.k
        # weighted sampling without replacement, in one draw: the r smallest of Exp(1) / s
        # (Efraimidis-Spirakis) are a successive draw in proportion to s
        key = self.rng.exponential(size=len(s)) / s  # [E]
        if prev is None:
            chosen = np.argpartition(key, k - 1)[:k]
        else:
            r = int(np.searchsorted(self.kept_cdf[j], self.rng.random(), side="right"))
            r = min(r, k)
            kept = prev[np.argsort(key[prev])[:r]]
            key[prev] = np.inf
            chosen = np.concatenate([kept, np.argpartition(key, k - r - 1)[: k - r]])
        return chosen[np.argsort(-s[chosen], kind="stable")]  # rank order: best first

    def route(self, layer: int, n: int, dtype: torch.dtype):
        j, tokens = self._tokens(layer, n)
        experts = np.empty((n, self.k), dtype=np.int64)  # [T, K]
        for r, g in enumerate(tokens.tolist()):
            experts[r] = self.sets[(g, j)] = self._sample(g, j)
        if j == 0:  # forget what no context reaches any more
            for key in [key for key in self.sets if key[0] < tokens[0] - 2]:
                del self.sets[key]
        return self._out(experts, np.broadcast_to(self.rank_weights, experts.shape), dtype)

    def sample(self, n_tokens: int) -> np.ndarray:
        """A fresh routing ``[n_tokens, L, K]`` from the start (for statistics and tests)."""
        self.reset()
        out = np.stack([np.concatenate([self.route(layer, 1, torch.float32)[0].numpy()
                                        for layer in self.layers])
                        for _ in range(n_tokens)])  # fmt: skip
        self.reset()
        return out  # [T, L, K], decoded one token at a time


# -- statistics --------------------------------------------------------------------------------
def reuse_counts(experts: np.ndarray) -> np.ndarray:
    """``[T-1, L]``: how many of token t's experts token t-1 also used, per layer."""
    ex = np.asarray(experts)  # [T, L, K]
    same = ex[1:, :, :, None] == ex[:-1, :, None, :]  # [T-1, L, K, K]
    return same.any(-1).sum(-1)


def reuse(experts: np.ndarray) -> np.ndarray:
    """Per layer, the fraction of a token's experts that the previous token also used: [L]."""
    ex = np.asarray(experts)
    return reuse_counts(ex).mean(0) / ex.shape[2]


def popularity(experts: np.ndarray, num_experts: int) -> np.ndarray:
    """Per layer, each expert's share of the routed slots: ``[L, E]``, rows sum to 1."""
    ex = np.asarray(experts)
    return np.stack([np.bincount(ex[:, j].ravel(), minlength=num_experts)
                     for j in range(ex.shape[1])]) / (ex.shape[0] * ex.shape[2])  # fmt: skip


def compare(source: np.ndarray, generated: np.ndarray, num_experts: int) -> dict[str, Any]:
    """Per layer: |reuse difference| and the total-variation distance of the popularity
    histograms, and their maxima over layers."""
    dr = np.abs(reuse(source) - reuse(generated))
    tv = 0.5 * np.abs(popularity(source, num_experts) - popularity(generated, num_experts)).sum(1)
    return {"reuse_source": reuse(source).tolist(), "reuse_generated": reuse(generated).tolist(),
            "reuse_diff": dr.tolist(), "popularity_tv": tv.tolist(),
            "max_reuse_diff": float(dr.max()), "max_popularity_tv": float(tv.max())}  # fmt: skip
