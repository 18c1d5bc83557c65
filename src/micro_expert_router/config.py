"""Model and engine configuration.

``ModelArgs`` is read from a HuggingFace ``config.json``: it keeps only the keys it knows, for the
architectures in ``ARCHITECTURES``, and computes derived values once. ``EngineConfig`` holds the
engine's own settings (precision, threads, budgets). Nothing here guesses from file or folder names.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class ArchSpec:
    """What differs between the supported architectures, as data."""

    n_experts_keys: tuple[str, ...]  # config keys that may hold the number of routed experts
    expert_inter_key: str  # config key holding one routed expert's intermediate size
    norm_topk_default: bool | None  # None: always renormalize (Mixtral has no such key)
    qk_norm: str  # "none" | "head" (per head, Qwen3) | "proj" (whole projection, OLMoE)
    shared_expert: bool
    moe_prefix: str  # checkpoint name of the MoE block inside a layer
    expert_names: tuple[str, str, str]  # gate, up, down tensor names inside one expert
    shared_prefix: str = "shared_expert"  # the shared expert(s) inside the MoE block
    shared_gate: bool = True  # a sigmoid gate scales the shared expert (Qwen2-MoE)
    family: str | None = None  # models/<family>.py parses the config keys of its own


ARCHITECTURES: dict[str, ArchSpec] = {
    "MixtralForCausalLM": ArchSpec(
        ("num_local_experts",), "intermediate_size", None, "none", False,
        "block_sparse_moe", ("w1", "w3", "w2"),
    ),
    "Qwen2MoeForCausalLM": ArchSpec(
        ("num_experts", "num_local_experts"), "moe_intermediate_size", False, "none", True,
        "mlp", ("gate_proj", "up_proj", "down_proj"),
    ),
    "Qwen3MoeForCausalLM": ArchSpec(
        ("num_experts", "num_local_experts"), "moe_intermediate_size", False, "head", False,
        "mlp", ("gate_proj", "up_proj", "down_proj"),
    ),
    "OlmoeForCausalLM": ArchSpec(
        ("num_experts", "num_local_experts"), "intermediate_size", False, "proj", False,
        "mlp", ("gate_proj", "up_proj", "down_proj"),
    ),
    "DeepseekV2ForCausalLM": ArchSpec(
        ("n_routed_experts",), "moe_intermediate_size", False, "none", True,
        "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", False, "deepseek",
    ),
    "DeepseekV3ForCausalLM": ArchSpec(
        ("n_routed_experts",), "moe_intermediate_size", True, "none", True,
        "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", False, "deepseek",
    ),
    "GptOssForCausalLM": ArchSpec(
        ("num_local_experts",), "intermediate_size", None, "none", False,
        "mlp", ("gate_up_proj", "gate_up_proj", "down_proj"), family="gpt_oss",
    ),
    "Glm4MoeForCausalLM": ArchSpec(
        ("n_routed_experts",), "moe_intermediate_size", True, "none", True,
        "mlp", ("gate_proj", "up_proj", "down_proj"), "shared_experts", False, "glm4_moe",
    ),
}  # fmt: skip


def _req(cfg: dict[str, Any], key: str, where: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise ConfigError(f"{where}: required key {key!r} is missing")
    return cfg[key]


@dataclass(frozen=True)
class ModelArgs:
    arch: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: float  # linear position scaling factor; 1.0 = none
    max_position_embeddings: int
    tie_word_embeddings: bool
    n_experts: int
    top_k: int
    expert_inter: int  # intermediate size of one routed expert
    norm_topk_prob: bool
    qkv_bias: bool  # biases on q, k, v projections
    o_bias: bool  # bias on the output projection
    qk_norm: str  # "none" | "head" | "proj"
    clip_qkv: float | None
    shared_expert_inter: int  # 0 = no shared expert
    dense_inter: int  # intermediate size of dense-MLP layers (Qwen mlp_only_layers), 0 if none
    moe_layers: tuple[bool, ...]  # per layer: MoE block (True) or dense MLP (False)
    sliding_window: int | None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # rotary embedding (models/rope.py); defaults are the four original families'
    rope_type: str = "default"  # "default" | "linear" (rope_scaling) | "yarn"
    rope_dim: int = 0  # rotated dims per head, from the first; 0 = all of head_dim
    rope_interleave: bool = False  # rotate pairs (x0, x1), (x2, x3).. (DeepSeek), not halves
    yarn_factor: float = 1.0
    yarn_original_max: int = 0  # original_max_position_embeddings
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_truncate: bool = True
    rope_attention_factor: float = 1.0  # multiplies cos and sin (YaRN's attention factor)
    softmax_scale: float | None = None  # attention logits scale; None = head_dim ** -0.5
    # attention (models/mla.py): "gqa" (q/k/v projections) or "mla" (DeepSeek's latent KV)
    attention: str = "gqa"
    q_lora_rank: int | None = None  # MLA: None = a plain q_proj
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # routing (models/routing.py): "softmax_topk" (Mixtral, Qwen, OLMoE) or DeepSeek's
    # "greedy" | "group_limited_greedy" | "noaux_tc", with "softmax" or "sigmoid" scores
    topk_method: str = "softmax_topk"
    scoring: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling: float = 1.0
    # GPT-OSS (models/gpt_oss.py): per-layer sliding window (empty: sliding_window applies to
    # every layer), attention sinks, experts with biases and the clamped SwiGLU
    sliding_layers: tuple[bool, ...] = ()
    attn_sinks: bool = False
    expert_act: str = "swiglu"  # "swiglu" | "clamped_swiglu" (GPT-OSS, with expert biases)
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    @property
    def rotary_dim(self) -> int:
        """Dims of each q/k head that RoPE rotates."""
        return self.rope_dim or self.head_dim

    @property
    def attn_scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim**-0.5

    def kv_bytes_per_token(self, element_size: int) -> int:
        """Bytes the KV cache holds per token over all layers: K and V of each kv head, or
        MLA's compressed latent plus its rope key."""
        if self.attention == "mla":
            return (self.kv_lora_rank + self.qk_rope_head_dim) * self.n_layers * element_size
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * element_size

    @property
    def spec(self) -> ArchSpec:
        return ARCHITECTURES[self.arch]

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], where: str = "config.json") -> ModelArgs:
        archs = cfg.get("architectures") or []
        arch = next((a for a in archs if a in ARCHITECTURES), None)
        if arch is None:
            named = ", ".join(archs) if archs else f"model_type={cfg.get('model_type')!r}"
            raise ConfigError(
                f"{where}: unsupported architecture {named}; supported: {', '.join(ARCHITECTURES)}"
            )
        spec = ARCHITECTURES[arch]
        hidden = int(_req(cfg, "hidden_size", where))
        n_heads = int(_req(cfg, "num_attention_heads", where))
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        n_layers = int(_req(cfg, "num_hidden_layers", where))

        from .models.rope import parse_rope

        rope = parse_rope(cfg, where, head_dim)
        if spec.norm_topk_default is None:
            norm_topk = True
        else:
            norm_topk = bool(cfg.get("norm_topk_prob", spec.norm_topk_default))

        if arch == "Qwen2MoeForCausalLM":
            qkv_bias, o_bias = bool(cfg.get("qkv_bias", True)), False
        elif arch == "MixtralForCausalLM":
            qkv_bias = o_bias = False
        else:
            qkv_bias = o_bias = bool(cfg.get("attention_bias", False))

        key = next((k for k in spec.n_experts_keys if cfg.get(k) is not None), None)
        if key is None:
            raise ConfigError(f"{where}: required key {spec.n_experts_keys[0]!r} is missing")
        n_experts = int(cfg[key])
        act = cfg.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{where}: hidden_act {act!r} is not supported (only silu/SwiGLU)")
        mlp_only = set(cfg.get("mlp_only_layers") or [])
        step = int(cfg.get("decoder_sparse_step") or 1)
        moe_layers = tuple(
            (i not in mlp_only) and n_experts > 0 and (i + 1) % step == 0 for i in range(n_layers)
        )
        dense_inter = int(cfg.get("intermediate_size") or 0) if not all(moe_layers) else 0

        window = cfg.get("sliding_window")
        if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
            if cfg.get("use_sliding_window"):
                raise ConfigError(f"{where}: use_sliding_window=true is not supported yet")
            window = None
        window = int(window) if window else None

        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        kw: dict[str, Any] = dict(
            arch=arch,
            vocab_size=int(_req(cfg, "vocab_size", where)),
            hidden_size=hidden,
            n_layers=n_layers,
            n_heads=n_heads,
            n_kv_heads=n_kv,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            **rope,
            max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            n_experts=n_experts,
            top_k=int(_req(cfg, "num_experts_per_tok", where)),
            expert_inter=int(_req(cfg, spec.expert_inter_key, where)),
            norm_topk_prob=norm_topk,
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            qk_norm=spec.qk_norm,
            clip_qkv=float(cfg["clip_qkv"]) if cfg.get("clip_qkv") is not None else None,
            shared_expert_inter=int(cfg.get("shared_expert_intermediate_size") or 0)
            if spec.shared_expert
            else 0,
            dense_inter=dense_inter,
            moe_layers=moe_layers,
            sliding_window=window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )
        if spec.family is not None:  # the family's own keys: models/<family>.py
            from .models import family_config

            kw.update(family_config(spec.family, cfg, where, kw))
        args = cls(**kw)
        if args.n_heads % args.n_kv_heads:
            raise ConfigError(
                f"{where}: num_attention_heads {args.n_heads} is not a multiple of "
                f"num_key_value_heads {args.n_kv_heads}"
            )
        if not 0 < args.top_k <= max(n_experts, 1):
            raise ConfigError(
                f"{where}: num_experts_per_tok {args.top_k} must be between 1 "
                f"and the {n_experts} experts per layer"
            )
        return args

    @classmethod
    def from_file(cls, path: Path) -> ModelArgs:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"{path}: config.json not found; a model folder must contain the "
                "HuggingFace config.json next to its weights"
            )
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(cfg, dict):
            raise ConfigError(f"{path}: expected a JSON object")
        return cls.from_hf(cfg, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["moe_layers"] = list(self.moe_layers)
        d["eos_token_ids"] = list(self.eos_token_ids)
        d["sliding_layers"] = list(self.sliding_layers)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelArgs:
        d = dict(d)
        d["moe_layers"] = tuple(d["moe_layers"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["sliding_layers"] = tuple(d.get("sliding_layers", ()))
        return cls(**d)


DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class EngineConfig:
    """The engine's own settings (not the model's)."""

    dtype: str = "float32"  # activations and dense weights: "float32" (exact) or "bfloat16"
    # the KV cache: None = bfloat16 when the dense weights are quantized (the fast mode of q4/q8
    # stores), else the activation dtype (exact mode keeps float32)
    kv_dtype: str | None = None
    threads: int | None = None  # torch intra-op threads; None = torch's default
    max_context: int = 4096  # KV cache capacity in tokens
    cache_bytes: int | None = None  # expert cache budget (stores); None = what memory_limit leaves
    io_threads: int | None = None  # expert-read threads (stores); None = the reader's default
    # the size each expert read is cut into, read in parallel by the I/O threads (stores);
    # None = the reader's default, 1024 (docs/memory.md)
    io_chunk_kib: int | None = None
    policy: str | None = None  # expert cache policy (stores); None = "lcp" (docs/memory.md)
    verify: bool = False  # check expert checksums on first load (stores)
    split: float = 1.0  # MoEpic split ratio: cached fraction of each expert (1 = whole experts)
    plan: str | None = None  # a plan file from `mer plan`: per-layer budgets and split ratios
    prefetch: str = "off"  # predictors driving prefetch: "off" or e.g. "s,l,m" (docs/prefetch.md)
    prefetch_slots: int = 0  # staging slots for prefetched experts; 0 = 2 x top-k when on
    # bytes (or "2.5G", "1800M") the process may use; None = the cgroup's limit, else a share of
    # MemAvailable (memory.py). Fixed costs first, the rest to the expert cache. An explicit
    # cache_bytes wins over it.
    memory_limit: int | str | None = None
    # benchmark-only routing instead of the model's gates: "trace:FILE" or "markov:FILE"
    # (routers.py, docs/router.md)
    router: str | None = None

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r} is not supported; choose one of {DTYPES}")
        if self.kv_dtype is not None and self.kv_dtype not in DTYPES:
            raise ConfigError(
                f"kv_dtype {self.kv_dtype!r} is not supported; choose one of {DTYPES}"
            )
        if self.max_context <= 0:
            raise ConfigError("max_context must be positive")
        for name in ("threads", "io_threads", "io_chunk_kib"):
            v = getattr(self, name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"{name} must be a positive integer (or None for the default), "
                                  f"not {v!r}")  # fmt: skip
        if self.io_chunk_kib is not None and (self.io_chunk_kib < 4 or self.io_chunk_kib % 4):
            raise ConfigError(f"io_chunk_kib must be a multiple of 4 (O_DIRECT reads whole 4 KiB "
                              f"blocks), not {self.io_chunk_kib}")  # fmt: skip
        if self.cache_bytes is not None and self.cache_bytes < 0:
            raise ConfigError("cache_bytes must be >= 0")
        if self.prefetch_slots < 0:
            raise ConfigError("prefetch_slots must be >= 0")
        if self.memory_limit is not None:
            from .memory import parse_size

            object.__setattr__(self, "memory_limit", parse_size(self.memory_limit))
        if self.plan is not None and (self.cache_bytes is not None or self.split != 1.0):
            raise ConfigError(
                "a plan sets the cache budgets and split ratios itself: give either "
                "a plan or cache_bytes/split, not both"
            )

    @property
    def io_chunk_bytes(self) -> int | None:
        return None if self.io_chunk_kib is None else self.io_chunk_kib << 10

    @property
    def cache_policy(self) -> str:
        """The policy a store's expert cache uses (``policy``, or LCP when not given: it reads
        fewer bytes than LRU out of core and is as fast when the disk is fast; docs/memory.md)."""
        return self.policy or "lcp"

    def store_only(self) -> list[str]:
        """The settings given that only an expert store uses (a checkpoint runs resident)."""
        given = {
            "cache_bytes": self.cache_bytes is not None, "split": self.split != 1.0,
            "plan": self.plan is not None, "prefetch": self.prefetch.strip().lower() != "off",
            "policy": self.policy is not None, "io_threads": self.io_threads is not None,
            "io_chunk_kib": self.io_chunk_kib is not None,
            "verify": self.verify, "prefetch_slots": self.prefetch_slots != 0,
        }  # fmt: skip
        return [k for k, v in given.items() if v]
