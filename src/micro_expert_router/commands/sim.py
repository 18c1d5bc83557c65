"""``mer sim``: replay a routing trace through a cache policy, or sweep policies and sizes."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

HELP = "replay a routing trace through expert-cache policies: hit rate, misses, bytes per token"

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}  # fmt: skip


def parse_bytes(text: str) -> int:
    """``"4096"``, ``"1.5GB"`` (10^9), ``"512MiB"`` (2^20) -> bytes (an argparse type)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"cannot read {text!r} as a size; write e.g. 3400000, 512MiB or 1.5GB"
        )
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("trace", help="routing trace: mer-trace JSONL, or [layer, expert] pairs JSONL")
    p.add_argument("--policy", action="append", metavar="NAME",
                   help="lru, lfu, lcp or opt, parameters as NAME:K=V,K=V (e.g. lcp:rho=0.5,"
                        "omega=64); with --sweep repeat it (default: all four)")  # fmt: skip
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--cache-frac",
        type=float,
        metavar="F",
        help="capacity floor(F x layers x experts), one cache for all layers",
    )
    size.add_argument("--cache-experts", type=int, metavar="N", help="capacity in experts")
    size.add_argument("--cache-bytes", type=parse_bytes, metavar="B",
                      help="capacity in bytes (needs the expert size)")  # fmt: skip
    size.add_argument(
        "--plan", metavar="FILE", help="per-layer budgets, a JSON object {layer: bytes}"
    )
    p.add_argument("--warmup", type=int, default=0, metavar="N",
                   help="leave the first N tokens out of the counts (default 0)")  # fmt: skip
    p.add_argument("--expert-bytes", type=parse_bytes, metavar="B",
                   help="bytes one expert takes (default: the trace header's, if any)")  # fmt: skip
    p.add_argument("--num-experts", type=int, metavar="E",
                   help="routed experts per layer, if the trace cannot tell")  # fmt: skip
    p.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    p.add_argument(
        "--predictors",
        metavar="S,L,M",
        help="replay with prediction-driven prefetch: s (Markov), l (locality), m (next "
        "gate on hidden states; needs --store and a trace with hidden states)",
    )
    p.add_argument("--store", metavar="DIR", help="expert store the trace came from (m's gates)")
    p.add_argument(
        "--window-experts",
        type=int,
        metavar="N",
        help="with --predictors: experts the disk reads while one layer computes "
        "(default: bounded only by the staging slots)",
    )
    p.add_argument(
        "--staging-slots",
        type=int,
        metavar="N",
        help="with --predictors: prefetch staging slots (default 2 x top-k)",
    )
    p.add_argument(
        "--sweep",
        action="store_true",
        help="every policy at several sizes; a CSV and a PNG to --out",
    )
    p.add_argument("--fracs", metavar="F,F,...",
                   help="cache fractions for --sweep (default 0.05,0.1,...,0.75)")  # fmt: skip
    p.add_argument("--out", metavar="DIR", help="folder for the --sweep CSV and PNG")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _describe(trace) -> str:
    n_pre = int(trace.prefill.sum())
    kind = f", {n_pre} of them prefill" if n_pre else ""
    return (f"{trace.path.name} ({trace.format}): {trace.num_tokens} tokens{kind} in "
            f"{trace.num_steps} steps, {trace.num_layers} MoE layers x {trace.num_experts} "
            f"experts, top-{trace.top_k}")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..trace import read_trace

    trace = read_trace(args.trace, args.num_experts)
    expert_bytes = args.expert_bytes or trace.expert_bytes
    if args.sweep:
        return _run_sweep(args, trace, expert_bytes)
    policies = args.policy or []
    if len(policies) != 1:
        raise ConfigError("give exactly one --policy (lru, lfu, lcp, opt), or use --sweep")
    return _run_one(args, trace, expert_bytes, policies[0], ConfigError)


def _run_one(args, trace, expert_bytes, policy, ConfigError) -> int:
    from ..sim import simulate

    total = trace.num_layers * trace.num_experts
    unit = expert_bytes or 1
    if args.cache_frac is not None:
        from ..sim import experts_for_fraction

        budget = experts_for_fraction(trace, args.cache_frac) * unit
    elif args.cache_experts is not None:
        if args.cache_experts < 0:
            raise ConfigError("--cache-experts must be >= 0")
        budget = args.cache_experts * unit
    elif args.cache_bytes is not None or args.plan is not None:
        if expert_bytes is None:
            raise ConfigError("a budget in bytes needs the size of an expert: pass --expert-bytes "
                              "(the trace header does not record it)")  # fmt: skip
        budget = args.cache_bytes if args.plan is None else _read_plan(Path(args.plan))
    else:
        raise ConfigError("give a cache size: --cache-frac, --cache-experts, --cache-bytes or "
                          "--plan")  # fmt: skip
    if args.predictors:
        return _run_prefetch(args, trace, expert_bytes, policy, budget)
    r = simulate(trace, policy, budget, expert_bytes=expert_bytes, warmup=args.warmup)
    scope = "per-layer plan" if args.plan else "one cache over all layers"
    print(f"trace     {_describe(trace)}")
    print(f"cache     {r.policy}, {r.capacity_experts} experts "
          f"({100 * r.capacity_experts / total:.1f}% of {total}), {scope}")  # fmt: skip
    print(f"counted   {r.tokens} tokens ({r.steps} steps) after a warmup of {r.warmup} tokens")
    print(f"hit rate  {100 * r.hit_rate:.1f}%  ({r.requests:,} requests: {r.hits:,} hits, "
          f"{r.misses:,} misses, {r.evictions:,} evicted, {r.refused:,} not admitted)")  # fmt: skip
    print(f"misses    {r.misses_per_token:.2f} per token")
    if r.bytes_read_per_token is None:
        print("read      unknown bytes per token (pass --expert-bytes)")
    else:
        print(f"read      {r.bytes_read_per_token / 1e6:.2f} MB per token")
    layers = "  ".join(f"{l}:{100 * h:.0f}%" for l, h in r.per_layer_hit_rate.items())
    print(f"by layer  {layers}")
    print(f"time      {r.seconds:.2f} s")
    if args.json:
        d = r.as_dict()
        d["trace"] = str(trace.path)
        print(json.dumps(d))
    return 0


def _run_prefetch(args, trace, expert_bytes, policy, budget) -> int:
    from ..sim.prefetch import PrefetchReplay, gates_from_store

    gates = gates_from_store(args.store) if args.store else None
    unit = expert_bytes or 1
    window = None if args.window_experts is None else args.window_experts * unit
    d = PrefetchReplay(trace).compare(
        policy, budget, predictors=args.predictors, expert_bytes=expert_bytes,
        warmup=args.warmup, window_bytes=window, staging_slots=args.staging_slots, gates=gates,
    )  # fmt: skip
    print(f"trace     {_describe(trace)}")
    print(
        f"cache     {policy}, {d['capacity_experts']} experts; prefetch {d['predictors']}, "
        f"{d['staging_slots']} staging slots, window "
        f"{'unbounded' if window is None else f'{args.window_experts} experts'}"
    )
    print(f"misses    {d['misses_per_token']:.2f} per token without prefetch; exposed with "
          f"prefetch {d['exposed_misses_per_token']:.2f}; OPT without prefetch "
          f"{d['opt_misses_per_token']:.2f}")  # fmt: skip
    print(f"prefetch  {d['prefetch_bytes_per_token'] / unit:.2f} experts read per token "
          f"({d['wasted_prefetch_bytes_per_token'] / unit:.2f} wasted); precision "
          f"{d['prefetch_precision']:.1%}, miss coverage {d['miss_coverage']:.1%}")  # fmt: skip
    for name, sc in d["per_predictor"].items():
        print(f"  {name:7s} precision {sc['precision']:.1%}  recall {sc['recall']:.1%}")
    for layer, per in d["per_layer"].items():
        cells = "  ".join(f"{n}: p {v['precision']:.0%} r {v['recall']:.0%}"
                          for n, v in per.items())  # fmt: skip
        print(f"layer {layer:>3}  {cells}")
    if args.json:
        d["trace"] = str(trace.path)
        print(json.dumps(d))
    return 0


def _read_plan(path: Path) -> dict[int, int]:
    from ..errors import ConfigError

    try:
        plan = json.loads(path.read_text())
        return {int(k): int(v) for k, v in plan.items()}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the plan: {e.strerror}") from None
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(f"{path}: a plan is a JSON object {{layer: bytes}}") from None


def _run_sweep(args, trace, expert_bytes) -> int:
    from ..errors import ConfigError, DependencyError
    from ..sim import DEFAULT_SWEEP_FRACTIONS, plot_sweep, sweep, write_sweep_csv

    if not args.out:
        raise ConfigError("--sweep writes a CSV and a PNG: give the folder with --out DIR")
    if any(x is not None for x in (args.cache_frac, args.cache_experts, args.cache_bytes,
                                   args.plan)):  # fmt: skip
        raise ConfigError("--sweep chooses the sizes itself: use --fracs instead of a cache size")
    try:
        fracs = ([float(x) for x in args.fracs.split(",") if x.strip()] if args.fracs
                 else list(DEFAULT_SWEEP_FRACTIONS))  # fmt: skip
    except ValueError:
        raise ConfigError(
            f"--fracs takes numbers separated by commas, not {args.fracs!r}"
        ) from None
    policies = list(args.policy or ["lru", "lfu", "lcp"])
    if not any(p.split(":")[0].strip() == "opt" for p in policies):
        policies.append("opt")  # the upper line
    rows = sweep(trace, policies, fracs, expert_bytes=expert_bytes, warmup=args.warmup,
                 progress=not args.quiet)  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = trace.path.name.split(".")[0]
    csv_path, png_path = out / f"sim-{stem}.csv", out / f"sim-{stem}.png"
    write_sweep_csv(rows, csv_path)
    title = (f"{trace.path.name}: {trace.num_tokens} tokens, {trace.num_layers}x"
             f"{trace.num_experts} experts, top-{trace.top_k}, warmup {args.warmup}")  # fmt: skip
    try:
        plot_sweep(rows, png_path, title)
    except DependencyError as e:
        raise DependencyError(f"{e} (the CSV is written: {csv_path})") from None
    print(f"trace     {_describe(trace)}")
    print(f"{'size':>6}  " + "  ".join(f"{p:>10}" for p in policies))
    for f in fracs:
        rates = {r.policy: r.hit_rate for g, r in rows if g == f}
        print(f"{100 * f:5.1f}%  " + "  ".join(f"{100 * rates[p]:9.1f}%" for p in policies))
    print(f"wrote     {csv_path} and {png_path}")
    if args.json:
        results = [dict(r.as_dict(), fraction=f) for f, r in rows]
        print(json.dumps({"csv": str(csv_path), "png": str(png_path), "results": results}))
    return 0
