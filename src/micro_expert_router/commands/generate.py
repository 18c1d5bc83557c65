"""``mer generate``: stream text from a model and print a one-line summary."""

from __future__ import annotations

import argparse
import json
import sys

HELP = "generate text from a model folder or expert store, streaming tokens to stdout"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF checkpoint folder, expert store, or GGUF file (converted "
                   "once into the cache directory; default: the bundled demo model, streamed "
                   "with a cache of 1/4 of its experts)")  # fmt: skip
    p.add_argument("--prompt", default=None, help="prompt text (default: a demo prompt)")
    p.add_argument("--prompt-ids", default=None,
                   help="prompt as comma-separated token ids instead of text")  # fmt: skip
    p.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message with the model's chat template",
    )
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="activations (float32: exact mode with float dense weights)")
    p.add_argument("--kv-dtype", choices=["float32", "bfloat16"], default=None,
                   help="KV cache (default: bfloat16 when the dense weights are quantized, "
                   "else --dtype)")
    p.add_argument("--threads", type=int, default=None, help="compute threads (default: torch's)")
    p.add_argument("--cache-mb", type=float, default=None,
                   help="expert cache budget in MB for a store (0 = stream every expert every "
                   "time; default: what --memory-limit leaves; wins over it)")  # fmt: skip
    p.add_argument("--memory-limit", default=None, metavar="SIZE",
                   help="memory the process may use, e.g. 2.5G or 1800M: dense weights, KV at "
                   "max context, staging slots and the runtime come first, the expert cache "
                   "gets the rest (default: the cgroup's limit, else 0.8 x MemAvailable; "
                   "--cache-mb wins over it)")  # fmt: skip
    p.add_argument("--max-context", type=int, default=None,
                   help="KV cache capacity in tokens (default 4096; counts in --memory-limit)")
    p.add_argument("--router", default=None, metavar="trace:FILE|markov:FILE",
                   help="BENCHMARK ONLY: bypass the model's gates and route from a recorded "
                   "trace (replayed) or a Markov chain fitted on one (docs/router.md)")  # fmt: skip
    p.add_argument("--io-threads", type=int, default=None,
                   help="expert-read threads for a store (default 4)")  # fmt: skip
    p.add_argument("--io-chunk-kib", type=int, default=None,
                   help="size each expert read is cut into, read in parallel by the I/O threads "
                   "(default 1024; docs/memory.md)")  # fmt: skip
    p.add_argument("--policy", default=None,
                   help="expert cache policy for a store (see `mer sim`; default lcp)")  # fmt: skip
    p.add_argument("--split", type=float, default=1.0,
                   help="MoEpic split ratio: cache only this leading fraction of each expert and "
                   "stream the rest (multiples of 1/8; 1 = whole experts)")  # fmt: skip
    p.add_argument("--prefetch", default="off", metavar="off|s,l,m",
                   help="predictors driving non-evicting prefetch: s (Markov), l (locality), m "
                   "(next layer's gate on the hidden state); off to disable")  # fmt: skip
    p.add_argument(
        "--plan",
        default=None,
        help="a plan file from `mer plan` (per-layer cache budgets and split ratios)",
    )
    p.add_argument("--verify", action="store_true", help="check expert checksums on first load")
    p.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-sequence")
    p.add_argument(
        "--trace",
        default=None,
        metavar="FILE",
        help="record each step's routing (experts, gate weights) to FILE",
    )
    p.add_argument(
        "--trace-hidden",
        action="store_true",
        help="with --trace, also record the router inputs (FILE.hidden.npy)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="end with one JSON line: text, tokens, speeds, cache and I/O figures",
    )


def run(args: argparse.Namespace) -> int:
    from ..engine import Summary, load
    from ..errors import ConfigError
    from ..sampling import check_sampling

    check_sampling(args.temperature, args.top_p, args.top_k)  # before the model loads
    model = args.model
    options = dict(dtype=args.dtype, kv_dtype=args.kv_dtype, threads=args.threads,
                   policy=args.policy, verify=args.verify, io_threads=args.io_threads,
                   io_chunk_kib=args.io_chunk_kib,
                   split=args.split, plan=args.plan, prefetch=args.prefetch,
                   memory_limit=args.memory_limit, router=args.router)  # fmt: skip
    if args.max_context is not None:
        options["max_context"] = args.max_context
    if model is None:
        from ..demo.store import default_cache_bytes, demo_store_path

        model = demo_store_path()
        if args.cache_mb is None and args.plan is None and args.memory_limit is None:
            options["cache_bytes"] = default_cache_bytes(model)
    elif str(model).endswith(".gguf"):
        from ..store.gguf_cache import gguf_store_path

        model = gguf_store_path(model)
    if args.cache_mb is not None:
        if args.cache_mb < 0:
            raise ConfigError("--cache-mb must be >= 0")
        options["cache_bytes"] = int(args.cache_mb * 1e6)
    if args.max_tokens <= 0:
        raise ConfigError("--max-tokens must be positive")
    with load(model, **options) as engine:
        if args.router is not None:
            print(f"mer generate: warning: routing from {args.router}; the model's gates are "
                  "bypassed, so the text is meaningless: BENCHMARK ONLY", file=sys.stderr)
        if args.prompt_ids is not None:
            try:
                prompt = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
            except ValueError:
                raise ConfigError("--prompt-ids must be comma-separated integers") from None
        else:
            prompt = args.prompt if args.prompt is not None else "Once upon a time"
            if args.chat:
                if engine.tokenizer is None:
                    raise ConfigError("--chat needs a tokenizer")
                prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            if not args.json and not args.chat:
                sys.stdout.write(prompt)
        summary = Summary()
        steps = engine.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                stop_at_eos=not args.ignore_eos, trace=args.trace,
                                trace_hidden=args.trace_hidden)  # fmt: skip
        for step in steps:
            summary.add(step)
            if not args.json:
                sys.stdout.write(step.text)
                sys.stdout.flush()
        if args.json:
            out = summary.as_dict()
            if engine.memory is not None:
                out["memory"] = engine.memory.as_dict()
            reader = getattr(engine.provider, "reader", None)
            if reader is not None:  # a store: how its experts were cached and read
                out["reads"] = {"policy": engine.config.cache_policy, "io_threads": reader.threads,
                                "io_chunk_kib": reader.chunk_bytes >> 10}  # fmt: skip
            out["router"] = args.router
            out["benchmark_only"] = args.router is not None
            print(json.dumps(out))
        else:
            sys.stdout.write("\n")
            print(summary.line(), file=sys.stderr)
    return 0
