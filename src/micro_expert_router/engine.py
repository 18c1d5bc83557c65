"""The public engine: ``load(path, **options) -> Engine``, ``Engine.logits`` and
``Engine.generate``.

``load`` accepts a HuggingFace checkpoint folder (every expert packed in RAM) or an expert store
(experts streamed from disk under a cache budget). Generation is a generator of ``Step`` records:
the CLI, ``mer chat``, the benchmarks and the tests all drive the same one. The server
(``server/scheduler.py``) decodes many requests as one batch with ``Transformer.forward_batch``
instead, with the same sampler and the same end-of-sequence rule.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import Checkpoint, load_dense
from .config import EngineConfig, ModelArgs
from .errors import BudgetError, ConfigError, MERError
from .kernels import choose_group, get_format
from .model import Transformer
from .models import transformer
from .provider import ExpertProvider, ProviderStats, ResidentProvider
from .sampling import check_sampling, sample
from .store.experts import pack_expert
from .tokenizer import Tokenizer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Step:
    """One generated token and what it cost."""

    index: int  # 0 for the first generated token
    token: int
    text: str  # the new piece of text (may be empty while a multi-byte character completes)
    prefill: bool  # True for the first token, whose cost includes the prompt's forward pass
    n_tokens: int  # tokens run through the model for this step (prompt length, or 1)
    step_s: float
    experts_needed: int
    hits: int
    misses: int
    bytes_read: int
    io_wait_s: float
    compute_s: float
    finish_reason: str | None = None  # "length" | "stop" on the last step
    prefetch_hits: int = 0  # misses a prefetch had already read or started
    prefetch_bytes: int = 0
    major_faults: int = 0  # page faults that read from disk (getrusage), the whole process


@dataclass
class Summary:
    """Accumulates a generation's steps into the figures the CLI prints."""

    prompt_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    prefill_s: float = 0.0
    decode_s: float = 0.0
    experts_needed: int = 0
    hits: int = 0
    misses: int = 0
    bytes_read: int = 0
    io_wait_s: float = 0.0
    compute_s: float = 0.0
    finish_reason: str | None = None
    prefetch_hits: int = 0
    prefetch_bytes: int = 0
    major_faults: int = 0
    decode_major_faults: int = 0

    def add(self, s: Step) -> None:
        self.tokens.append(s.token)
        self.text += s.text
        if s.prefill:
            self.prompt_tokens = s.n_tokens
            self.prefill_s += s.step_s
        else:
            self.decode_s += s.step_s
            self.decode_major_faults += s.major_faults
        for k in ("experts_needed", "hits", "misses", "bytes_read", "io_wait_s", "compute_s",
                  "prefetch_hits", "prefetch_bytes", "major_faults"):  # fmt: skip
            setattr(self, k, getattr(self, k) + getattr(s, k))
        self.finish_reason = s.finish_reason or self.finish_reason

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        n_dec = max(len(self.tokens) - 1, 0)
        d["prefill_tok_s"] = self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0
        d["decode_tok_s"] = n_dec / self.decode_s if self.decode_s else 0.0
        d["hit_rate"] = self.hits / self.experts_needed if self.experts_needed else 0.0
        total = self.prefill_s + self.decode_s
        # disk bytes over wall time: reads hidden behind compute or made by prefetch count too
        d["read_gb_s"] = self.bytes_read / total / 1e9 if total else 0.0
        d["mb_read_per_token"] = self.bytes_read / 1e6 / max(len(self.tokens), 1)
        d["total_s"] = total
        # ~0 when nothing on the hot path is file-backed (docs/memory.md)
        d["major_faults_per_token"] = self.decode_major_faults / n_dec if n_dec else 0.0
        return d

    def line(self) -> str:
        d = self.as_dict()
        return (
            f"prefill {self.prompt_tokens} tok at {d['prefill_tok_s']:.1f} tok/s | decode "
            f"{max(len(self.tokens) - 1, 0)} tok at {d['decode_tok_s']:.2f} tok/s | hit rate "
            f"{d['hit_rate']:.1%} | {d['mb_read_per_token']:.2f} MB read/token at "
            f"{d['read_gb_s']:.2f} GB/s | I/O wait {self.io_wait_s:.2f} s"
        )


class Engine:
    """A loaded model: dense weights in RAM, experts from a provider."""

    def __init__(
        self,
        args: ModelArgs,
        model: Transformer,
        tokenizer: Tokenizer | None,
        config: EngineConfig,
        path: Path,
    ) -> None:
        self.args = args
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.path = path
        self.memory = None  # a memory.MemorySplit: how the memory limit was shared out

    @property
    def provider(self) -> ExpertProvider:
        return self.model.provider

    def close(self) -> None:
        self.model.provider.close()

    def preload(self, progress: bool = False) -> int:
        """Fill the expert cache before the first token (stores only; a no-op for a
        checkpoint folder, whose experts are all in RAM). Returns the bytes read."""
        fill = getattr(self.model.provider, "preload", None)
        return fill(progress) if fill is not None else 0

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompts ---------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ConfigError(f"{self.path}: no tokenizer.json, so prompts must be token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ConfigError("the prompt is empty")
        bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise ConfigError(
                f"token ids {bad[:5]} are outside the vocabulary [0, {self.args.vocab_size})"
            )
        return ids

    # -- API -------------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits ``[T, vocab]`` (float32) of a full forward pass over a fresh context."""
        ids = self.encode(token_ids)
        kv = self.model.new_cache(len(ids))
        out = self.model.forward(torch.tensor(ids), kv)
        return out.float().numpy()

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 128,
        temperature: float = 0.7,
        top_p: float = 0.95,
        top_k: int = 0,
        seed: int | None = 0,
        stop_at_eos: bool = True,
        trace: str | Path | None = None,
        trace_hidden: bool = False,
    ) -> Iterator[Step]:
        """Stream generated tokens as ``Step`` records.

        ``temperature=0`` is greedy decoding; ``top_p`` in (0, 1] and ``top_k >= 0`` (1 and 0
        are off); other values are a ``ConfigError``. Abandoning the generator part-way is safe:
        every expert buffer is released by the provider as each layer finishes. ``trace``
        records the routing of every step (prompt tokens marked as prefill) to a ``mer-trace``
        file, with the router inputs when ``trace_hidden`` (docs/trace-format.md).
        """
        check_sampling(temperature, top_p, top_k)
        ids = self.encode(prompt)
        if max_tokens <= 0:
            return
        if self.model.router is not None:
            self.model.router.reset()  # each generation replays (or samples) from the start
        if len(ids) + max_tokens > self.config.max_context:
            raise ConfigError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                              f"max_context {self.config.max_context}")  # fmt: skip
        args = (ids, max_tokens, temperature, top_p, top_k, seed, stop_at_eos)
        if trace is None:
            yield from self._run(*args, None)
            return
        with self.trace_writer(trace, trace_hidden) as writer:

            def record(r) -> None:
                writer.route(r.layer, r.experts, r.weights, r.hidden.float())

            self.model.on_route.append(record)
            try:
                yield from self._run(*args, writer)
            finally:
                self.model.on_route.remove(record)

    def trace_writer(self, path: str | Path, hidden: bool = False):
        """A ``TraceWriter`` for this model's MoE layers."""
        from .trace import TraceWriter

        a = self.args
        provider = self.model.provider
        expert_bytes = getattr(getattr(provider, "store", None), "expert_bytes", None)
        return TraceWriter(
            path, layers=[i for i in range(a.n_layers) if a.moe_layers[i]],
            num_experts=a.n_experts, top_k=a.top_k, expert_bytes=expert_bytes,
            model={"arch": a.arch, "path": str(self.path), "layers": a.n_layers},
            hidden_size=a.hidden_size if hidden else None,
        )  # fmt: skip

    def _run(
        self, ids: list[int], max_tokens: int, temperature: float, top_p: float, top_k: int,
        seed: int | None, stop_at_eos: bool, writer: Any,
    ) -> Iterator[Step]:  # fmt: skip
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        eos = set(self.args.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        stream = self.tokenizer.stream() if self.tokenizer is not None else None
        kv = self.model.new_cache(len(ids) + max_tokens)
        stats = self.model.provider.stats
        feed = ids
        for index in range(max_tokens):
            before = stats.snapshot()
            faults = _major_faults()
            t0 = time.perf_counter()
            logits = self.model.forward(torch.tensor(feed), kv, last_only=True)[-1]
            if writer is not None:
                writer.end_step(prefill=index == 0, token_ids=feed)
            token = sample(logits, temperature, top_p, top_k, gen)
            step_s = time.perf_counter() - t0
            faults = _major_faults() - faults
            d: ProviderStats = stats.minus(before)
            text = ""
            if stream is not None:
                try:
                    text = stream.step(self.tokenizer.tok, token) or ""
                except Exception:  # a token the decoder cannot place (e.g. a bare special id)
                    text = ""
            finish = None
            if stop_at_eos and token in eos:
                finish = "stop"
            elif index == max_tokens - 1:
                finish = "length"
            yield Step(
                index=index, token=token, text=text, prefill=index == 0, n_tokens=len(feed),
                step_s=step_s, experts_needed=d.experts_needed, hits=d.hits, misses=d.misses,
                bytes_read=d.bytes_read, io_wait_s=d.io_wait_s,
                compute_s=max(step_s - d.io_wait_s, 0.0), finish_reason=finish,
                prefetch_hits=d.prefetch_hits, prefetch_bytes=d.prefetch_bytes,
                major_faults=faults,
            )  # fmt: skip
            if finish is not None:
                return
            feed = [token]


def _major_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_majflt


def kv_dtype(config: EngineConfig, dense: dict[str, Any]) -> torch.dtype:
    """The KV cache's dtype: as configured, else bfloat16 when some dense weight is quantized
    (the fast mode), else the activation dtype (exact mode)."""
    if config.kv_dtype is not None:
        return TORCH_DTYPES[config.kv_dtype]
    if any(not isinstance(w, torch.Tensor) for w in dense.values()):
        return torch.bfloat16
    return TORCH_DTYPES[config.dtype]


def _torch_threads(config: EngineConfig) -> None:
    if config.threads is not None:  # EngineConfig checked it is positive
        torch.set_num_threads(config.threads)


def load(path: str | Path, **engine_options: Any) -> Engine:
    """Load a model folder (HuggingFace checkpoint, or an expert store) into an ``Engine``.

    Options are ``EngineConfig`` fields (config.py); unknown names are a ``ConfigError``:

    - any folder: ``dtype`` ("float32" | "bfloat16"), ``kv_dtype``, ``threads`` (torch's
      intra-op threads), ``max_context`` (KV cache tokens), ``memory_limit`` (bytes or "2.5G";
      docs/memory.md), ``router`` ("trace:FILE" | "markov:FILE", benchmark-only,
      docs/router.md);
    - an expert store only (a checkpoint folder runs fully resident and refuses them):
      ``cache_bytes`` (expert cache budget; None = what the memory limit leaves), ``io_threads``,
      ``io_chunk_kib`` (the size expert reads are cut into; 1024 by default),
      ``policy`` (``"lcp"`` by default, ``"lru"``, ``"lcp:rho=0.5"``, ...), ``verify``
      (checksums on first load), ``split`` (MoEpic ratio, multiples of 1/8), ``plan`` (a plan
      file from ``mer plan``),
      ``prefetch`` (``"off"`` or predictors such as ``"s,l,m"``) and ``prefetch_slots``.
    """
    path = Path(path)
    unknown = set(engine_options) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ConfigError(
            f"unknown engine options {sorted(unknown)}; known: "
            f"{sorted(EngineConfig.__dataclass_fields__)}"
        )
    config = EngineConfig(**engine_options)
    _torch_threads(config)
    if not path.exists():
        raise ConfigError(f"{path}: no such model folder")
    from .memory import process_rss

    router = None
    if config.router is not None:  # built first: its tables count in the runtime's RSS
        from .routers import make_router

        router = make_router(config.router, path)
    if (path / "manifest.json").is_file():
        from .streaming import load_store

        engine = load_store(path, config)
    else:
        rss = process_rss()
        engine = load_checkpoint(path, config)
        engine.memory = _checkpoint_memory(engine, config, rss)
    engine.model.router = router
    return engine


def _checkpoint_memory(engine: Engine, config: EngineConfig, rss: int):
    """The split of a checkpoint folder (every expert resident); fails only when a memory
    limit was asked for and the model does not fit it."""
    from . import memory

    m = engine.model
    experts = engine.provider.nbytes
    out = memory.split(memory.resolve_limit(config.memory_limit),
                       dense=memory.dense_bytes(m.w, (m.cos, m.sin)),
                       kv=memory.kv_bytes(engine.args, config.max_context, m.kv_dtype.itemsize),
                       pool_staging=0, runtime_rss=rss, experts_total=experts,
                       cache_bytes=experts, enforce=False)  # fmt: skip
    out = replace(out, cache_source="checkpoint: every expert resident")
    if config.memory_limit is not None and out.fixed + experts > out.limit:
        engine.close()
        raise BudgetError(f"{engine.path}: a checkpoint folder keeps every expert in RAM: "
                          f"{out.line()}; does not fit. Convert it to an expert store "
                          f"(`mer convert {engine.path} STORE`) to stream experts")  # fmt: skip
    return out


def load_checkpoint(path: Path, config: EngineConfig) -> Engine:
    store_only = config.store_only()
    if store_only:
        raise ConfigError(
            f"{path}: a checkpoint folder runs fully resident, so {', '.join(store_only)} "
            f"{'does' if len(store_only) == 1 else 'do'} not apply (each needs an expert "
            f"store: `mer convert {path} STORE` first)"
        )
    dtype = TORCH_DTYPES[config.dtype]
    ckpt = Checkpoint(path)
    try:
        args = ckpt.args
        dense = load_dense(ckpt, dtype)
        fmt = get_format("f32" if dtype == torch.float32 else "bf16")
        read = ckpt.expert
        if args.expert_act == "clamped_swiglu":  # GPT-OSS: experts with biases
            from .models.gpt_oss import is_mxfp4, store_format

            fmt, read = store_format(ckpt, "mxfp4" if is_mxfp4(ckpt) else fmt.name)
        group = choose_group(fmt, args.expert_inter)
        packed = {}
        for layer in range(args.n_layers):
            if not args.moe_layers[layer]:
                continue
            for e in range(args.n_experts):
                packed[(layer, e)] = pack_expert(fmt, read(layer, e), group)
    finally:
        ckpt.close()
    provider = ResidentProvider(fmt, args.hidden_size, group, packed)
    model = transformer(args, dense, provider, dtype, config.max_context, kv_dtype(config, dense))
    tokenizer = Tokenizer(path) if (path / "tokenizer.json").is_file() else None
    return Engine(args, model, tokenizer, config, path)


__all__ = ["Engine", "Step", "Summary", "load", "MERError"]
