"""The engine options ``mer serve`` and ``mer chat`` share, and loading the engine from them.

Not a subcommand (``cli.COMMANDS`` does not list it). With no ``--model``, the bundled demo model
is converted once into a store and streamed under a cache of a quarter of its expert bytes, as
``mer generate`` does.
"""

from __future__ import annotations

import argparse


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF checkpoint folder or expert store (default: the bundled "
                   "demo model, streamed with a cache of 1/4 of its experts)")  # fmt: skip
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: torch's)")
    p.add_argument("--max-context", type=int, default=4096, help="tokens per sequence (KV)")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="expert cache budget in MB for a store (default: what --memory-limit "
                   "leaves, docs/memory.md)")
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory limit for the whole engine, e.g. 8G: the expert cache gets what "
                   "the fixed costs leave (default: the cgroup's limit, else 0.8 x "
                   "MemAvailable; --cache-mb wins over it)")  # fmt: skip
    p.add_argument("--io-threads", type=int, default=None)
    p.add_argument("--io-chunk-kib", type=int, default=None,
                   help="size each expert read is cut into (default 1024; docs/memory.md)")
    p.add_argument("--policy", default=None,
                   help="expert cache policy: lru, lfu, lcp (default), ... (see `mer sim`)")
    p.add_argument("--prefetch", default="off", metavar="off|s,l,m",
                   help="predictors driving non-evicting prefetch (docs/prefetch.md)")
    p.add_argument("--plan", default=None, help="a plan file from `mer plan`")


def parse_size(text: str) -> int:
    """``"8G"``, ``"512MiB"``, ``"1.5e9"`` -> bytes (``memory.parse_size``)."""
    from ..memory import parse_size as parse

    return parse(text, "--memory-limit")


def load_engine(args: argparse.Namespace):
    from ..config import EngineConfig
    from ..engine import load
    from ..errors import ConfigError

    model = args.model
    options = dict(dtype=args.dtype, threads=args.threads, max_context=args.max_context,
                   io_threads=args.io_threads, io_chunk_kib=args.io_chunk_kib,
                   policy=args.policy, plan=args.plan,
                   prefetch=args.prefetch)  # fmt: skip
    if args.memory_limit is not None:
        if "memory_limit" not in EngineConfig.__dataclass_fields__:
            raise ConfigError("--memory-limit needs an engine with the memory_limit option; "
                              "this one sizes the cache with --cache-mb")  # fmt: skip
        options["memory_limit"] = parse_size(args.memory_limit)
    if args.cache_mb is not None:
        if args.cache_mb < 0:
            raise ConfigError("--cache-mb must be >= 0")
        options["cache_bytes"] = int(args.cache_mb * 1e6)
    if model is None:
        from ..demo.store import default_cache_bytes, demo_store_path

        model = demo_store_path()
        if args.cache_mb is None and args.plan is None and args.memory_limit is None:
            options["cache_bytes"] = default_cache_bytes(model)
    return load(model, **options)
