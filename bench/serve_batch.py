"""Batched decode across requests (issue 16): the server's scheduler with B concurrent requests vs
one request alone, on any expert store, resident and under a cache of a fraction of the store.

Drives ``server.Scheduler`` in-process (the engine thread ``mer serve`` runs, without HTTP).
Per cache setting it alternates trials (single, batch, single, batch, ...) after a warm-up, and
reports per trial the decode tok/s and the experts read per MoE layer per step (the union of
the batch's experts). Final lines, per setting: the measured union vs what uniform random routing
would give (E x (1 - (1 - K/E)^B)), the aggregate/single speed ratio, and the bound the bytes
set: single-request bytes per token / (batch bytes per step / B), where a step's bytes are the
dense weights (read once per step for the whole batch) plus the experts it reads; under a cache,
also the bound the measured disk bytes set (single MB read per token / batch MB read per token).

    python bench/serve_batch.py                          # the bundled demo store
    python bench/serve_batch.py --store DIR --batch 8 --tokens 32 --cache-fracs 1,0.5
    python bench/serve_batch.py --store DIR --option prefetch=s,l,m   # any load() option

Prompts are text when the store has a tokenizer, else random token ids (seeded). Writes JSON
lines to bench/results/serve_batch.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
from pathlib import Path

import torch

import micro_expert_router as mer
from micro_expert_router.server import Done, Failed, Params, Scheduler
from micro_expert_router.store import Store

TEXT = ("The secret of life is", "Never trust a man who", "The best things in life are",
        "If at first you don't succeed,", "A fool and his money", "Love is",
        "There is no such thing as", "Q: Why did the programmer quit his job?\nA:")  # fmt: skip


def prompts(engine, n: int, seed: int) -> list[list[int]]:
    if engine.tokenizer is not None:
        return [engine.encode(TEXT[i % len(TEXT)]) for i in range(n)]
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, engine.args.vocab_size, (16,), generator=g).tolist()
            for _ in range(n)]  # fmt: skip


def run(sched: Scheduler, ids: list[list[int]], tokens: int, seed: int) -> list:
    """Submit every prompt at once; the decode steps where all of them ran together."""
    done = threading.Semaphore(0)
    errors: list[str] = []

    def sink(ev) -> None:
        if isinstance(ev, Failed):
            errors.append(ev.message)
        if isinstance(ev, Done | Failed):
            done.release()

    start = len(sched.steps)
    for i, p in enumerate(ids):
        sched.submit(p, Params(max_tokens=tokens, temperature=0.8, seed=seed + i,
                               stop_at_eos=False), sink)  # fmt: skip
    for _ in ids:
        done.acquire()
    if errors:
        raise SystemExit(f"generation failed: {errors[0]}")
    return [s for s in list(sched.steps)[start:] if s.batch == len(ids)]


def dense_bytes(model) -> int:
    """Bytes of the dense weights (plain or quantized), a tied matrix counted once."""
    from micro_expert_router.kernels.dense import nbytes

    seen, total = set(), 0
    for t in model.w.values():
        key = t.data_ptr() if isinstance(t, torch.Tensor) else id(t)
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total


def setting(path: Path, frac: float, args, options: dict) -> dict:
    store = Store.open(path)
    cache = None if frac >= 1 else int(store.total_expert_bytes * frac)
    name = "resident" if cache is None else f"cache {frac:g} of the store"
    with mer.load(path, cache_bytes=cache, max_context=args.context, **options) as engine:
        a = engine.args
        moe = sum(a.moe_layers)
        sched = Scheduler(engine, max_batch=args.batch, max_queue=args.batch).start()
        try:
            batch_ids = prompts(engine, args.batch, args.seed)
            run(sched, batch_ids, args.tokens, args.seed)  # warm-up: fills the cache, kernels
            runs = {"single": [], "batch": []}
            for trial in range(args.trials):
                for kind in ("single", "batch"):
                    ids = batch_ids[:1] if kind == "single" else batch_ids
                    steps = run(sched, ids, args.tokens, args.seed + 100 * trial)
                    sec = sum(s.seconds for s in steps)
                    tok_s = len(ids) * len(steps) / sec
                    union = sum(s.experts_needed for s in steps) / len(steps) / moe
                    mb = sum(s.bytes_read for s in steps) / len(steps) / len(ids) / 1e6
                    row = {"setting": name, "trial": trial, "kind": kind, "batch": len(ids),
                           "tok_s": tok_s, "union_per_layer": union, "mb_read_per_token": mb,
                           "steps": len(steps)}  # fmt: skip
                    runs[kind].append(row)
                    print(f"{name} | trial {trial} {kind:6s} B={len(ids)}: {tok_s:8.2f} tok/s, "
                          f"{union:5.1f} experts/layer/step, {mb:7.2f} MB read/token", flush=True)
                    _log(args.out, row)
        finally:
            sched.stop()
        eb = store.expert_bytes
        db = dense_bytes(engine.model)
    single = statistics.median(r["tok_s"] for r in runs["single"])
    batch = statistics.median(r["tok_s"] for r in runs["batch"])
    union = statistics.median(r["union_per_layer"] for r in runs["batch"])
    k, e, b = a.top_k, a.n_experts, args.batch
    bound = (db + moe * k * eb) / ((db + moe * union * eb) / b)
    # under a cache, the bytes that set the pace are the ones read from disk, as measured
    mb1 = statistics.median(r["mb_read_per_token"] for r in runs["single"])
    mbb = statistics.median(r["mb_read_per_token"] for r in runs["batch"])
    read_bound = mb1 / mbb if mb1 > 0 and mbb > 0 else None
    return {"setting": name, "single_tok_s": single, "batch_tok_s": batch,
            "speedup": batch / single, "union_per_layer": union,
            "union_random": e * (1 - (1 - k / e) ** b),
            "bound": bound, "of_bound": batch / single / bound, "read_bound": read_bound,
            "of_read_bound": batch / single / read_bound if read_bound else None,
            "mb_read_per_token_single": mb1, "mb_read_per_token_batch": mbb, "dense_mb": db / 1e6,
            "expert_mb": eb / 1e6, "batch": b, "top_k": k, "experts": e}  # fmt: skip


def _log(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default=None, help="expert store (default: the demo store)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32, help="decode tokens per request")
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--cache-fracs", default="1,0.5",
                    help="cache budgets as fractions of the store's expert bytes (1 = resident)")
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra load() option, e.g. dtype=bfloat16, threads=2")  # fmt: skip
    ap.add_argument("--out", default="bench/results/serve_batch.jsonl")
    args = ap.parse_args()
    args.out = Path(args.out)
    if args.store is None:
        from micro_expert_router.demo.store import demo_store_path

        args.store = demo_store_path()
    options = {}
    for kv in args.option:
        key, _, value = kv.partition("=")
        options[key] = int(value) if value.lstrip("-").isdigit() else value
    results = [setting(Path(args.store), float(f), args, options)
               for f in args.cache_fracs.split(",")]  # fmt: skip
    for r in results:
        _log(args.out, {"summary": True, **r})
        print(f"{r['setting']}: union {r['union_per_layer']:.1f} experts/layer at B={r['batch']} "
              f"(uniform random routing: {r['union_random']:.1f} of {r['experts']}) | aggregate "
              f"{r['batch_tok_s']:.2f} tok/s = {r['speedup']:.2f}x single "
              f"({r['single_tok_s']:.2f} tok/s) | bytes bound {r['bound']:.2f}x -> "
              f"{r['of_bound']:.2f} of the bound" + (
                  "" if r["read_bound"] is None else
                  f" | disk: {r['mb_read_per_token_single']:.2f} -> "
                  f"{r['mb_read_per_token_batch']:.2f} MB/token, bound {r['read_bound']:.2f}x -> "
                  f"{r['of_read_bound']:.2f} of it"))  # fmt: skip


if __name__ == "__main__":
    main()
