"""Batched decode across requests (issue 16): the server's scheduler with B concurrent requests vs
one request alone, on any expert store, resident and under a cache of a fraction of the store.

Drives ``server.Scheduler`` in-process (the engine thread ``mer serve`` runs, without HTTP).
Resident settings read every expert before the first trial (``Engine.preload``); every setting
runs a warm-up. Then it alternates trials: ``generate`` (one request through ``Engine.generate``,
the ``mer generate`` loop), ``single`` (one request through the scheduler), ``batch`` (B
requests through the scheduler) and, with ``--ab``, ``old`` (the batch through the per-expert
path that preceded ``routed_batch``). Per trial: decode tok/s (wall), CPU ms per token (all
threads), experts read per MoE layer per step (the union of the batch's experts) and MB read per
token. Final lines, per setting: the measured union vs uniform random routing
(E x (1 - (1 - K/E)^B)), the aggregate/single ratio, and the bound the bytes set: single-request
bytes per token / (batch bytes per step / B), where a step's bytes are the dense weights read per
step (read once for the whole batch; the embedding table only when lm_head is tied to it) plus
the experts it uses; under a cache, also the bound the measured disk bytes set.

    python bench/serve_batch.py                          # the bundled demo store
    python bench/serve_batch.py --store DIR --batch 8 --tokens 32 --cache-fracs 1,0.5 --ab
    python bench/serve_batch.py --store DIR --option router=trace:TRACE.jsonl  # a real routing
    python bench/serve_batch.py --store DIR --option threads=1   # any load() option

With a trace router, the rows of a batch step replay consecutive tokens of the trace
(``routers.py``). Prompts are text when the store has a tokenizer, else random token ids. Writes
JSON lines to bench/results/serve_batch.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

import micro_expert_router as mer
import micro_expert_router.model as model_module
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


def trial(kind: str, engine, sched: Scheduler, ids: list[list[int]], tokens: int, seed: int):
    """(tok/s, CPU s per token, union per MoE layer, MB read per token) of one trial."""
    moe = sum(engine.args.moe_layers)
    if kind == "generate":
        it = engine.generate(ids[0], tokens, temperature=0.8, seed=seed, stop_at_eos=False)
        next(it)  # the prefill
        c0 = time.process_time()
        steps = list(it)
        n, cpu, sec = len(steps), time.process_time() - c0, sum(s.step_s for s in steps)
        needed, read = [s.experts_needed for s in steps], sum(s.bytes_read for s in steps)
    else:
        model_module.BATCH_BELOW = 2 if kind == "old" else 64  # "old": routed() for T >= 2
        try:
            steps = run(sched, ids, tokens, seed)
        finally:
            model_module.BATCH_BELOW = 64
        n, sec = len(ids) * len(steps), sum(s.seconds for s in steps)
        cpu = sum(s.cpu_seconds for s in steps)
        needed, read = [s.experts_needed for s in steps], sum(s.bytes_read for s in steps)
    # CPU time: every thread of the process over the decode steps (I/O threads included)
    return n / sec, cpu / n, sum(needed) / len(needed) / moe, read / n / 1e6


def dense_bytes(model) -> int:
    """Bytes of the dense weights one decode step reads (plain or quantized): a tied matrix
    counted once, the embedding table only when it is also lm_head (else a step reads B rows)."""
    from micro_expert_router.kernels.dense import nbytes

    seen, total = set(), 0
    for name, t in model.w.items():
        if name == "model.embed_tokens.weight" and t is not model.lm_head:
            continue
        key = t.data_ptr() if isinstance(t, torch.Tensor) else id(t)
        if key not in seen:
            seen.add(key)
            total += nbytes(t)
    return total


def setting(path: Path, frac: float, args, options: dict) -> dict:
    store = Store.open(path)
    cache = None if frac >= 1 else int(store.total_expert_bytes * frac)
    name = "resident" if cache is None else f"cache {frac:g} of the store"
    kinds = ("generate", "single", "batch", "old") if args.ab else ("generate", "single", "batch")
    with mer.load(path, cache_bytes=cache, max_context=args.context, **options) as engine:
        a = engine.args
        if cache is None:
            engine.preload()  # every expert in RAM before the first trial: no disk reads
        sched = Scheduler(engine, max_batch=args.batch, max_queue=args.batch).start()
        try:
            batch_ids = prompts(engine, args.batch, args.seed)
            run(sched, batch_ids, args.tokens, args.seed)  # warm-up: fills the cache, kernels
            runs = {k: [] for k in kinds}
            for t in range(args.trials):
                for kind in kinds:
                    ids = batch_ids[:1] if kind in ("single", "generate") else batch_ids
                    tok_s, cpu, union, mb = trial(kind, engine, sched, ids, args.tokens,
                                                  args.seed + 100 * t)  # fmt: skip
                    row = {"setting": name, "trial": t, "kind": kind, "batch": len(ids),
                           "tok_s": tok_s, "cpu_ms_per_token": cpu * 1e3,
                           "union_per_layer": union, "mb_read_per_token": mb}  # fmt: skip
                    runs[kind].append(row)
                    print(f"{name} | trial {t} {kind:8s} B={len(ids)}: {tok_s:8.2f} tok/s, "
                          f"{cpu * 1e3:7.1f} CPU ms/token, {union:5.1f} experts/layer/step, "
                          f"{mb:7.2f} MB read/token", flush=True)  # fmt: skip
                    _log(args.out, row)
        finally:
            sched.stop()
        eb, db = store.expert_bytes, dense_bytes(engine.model)
    skip = ("setting", "kind")
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0] if f not in skip}
           for k, rs in runs.items()}  # fmt: skip
    single, batch = med["single"]["tok_s"], med["batch"]["tok_s"]
    union, moe = med["batch"]["union_per_layer"], sum(a.moe_layers)
    k, e, b = a.top_k, a.n_experts, args.batch
    bound = (db + moe * k * eb) / ((db + moe * union * eb) / b)
    mb1, mbb = med["single"]["mb_read_per_token"], med["batch"]["mb_read_per_token"]
    read_bound = mb1 / mbb if mb1 > 0 and mbb > 0 else None
    return {"setting": name, "single_tok_s": single, "batch_tok_s": batch,
            "generate_tok_s": med["generate"]["tok_s"], "speedup": batch / single,
            "old_speedup": med["old"]["tok_s"] / single if args.ab else None,
            "cpu_speedup": med["single"]["cpu_ms_per_token"] / med["batch"]["cpu_ms_per_token"],
            "union_per_layer": union, "union_random": e * (1 - (1 - k / e) ** b),
            "bound": bound, "of_bound": batch / single / bound, "read_bound": read_bound,
            "of_read_bound": batch / single / read_bound if read_bound else None,
            "mb_read_per_token_single": mb1, "mb_read_per_token_batch": mbb, "dense_mb": db / 1e6,
            "expert_mb": eb / 1e6, "batch": b, "top_k": k, "experts": e}  # fmt: skip


def _log(out: Path, row: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.open("a").write(json.dumps(row) + "\n")


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
    ap.add_argument("--ab", action="store_true", help="also time the batch on the old path")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="extra load() option, e.g. dtype=bfloat16, threads=2, router=trace:F")
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
        _log(args.out, {"summary": True, "options": options, **r})
        old = "" if r["old_speedup"] is None else f" (old path {r['old_speedup']:.2f}x)"
        print(f"{r['setting']}: union {r['union_per_layer']:.1f} experts/layer at B={r['batch']} "
              f"(uniform random routing: {r['union_random']:.1f} of {r['experts']}) | aggregate "
              f"{r['batch_tok_s']:.2f} tok/s = {r['speedup']:.2f}x single{old} "
              f"({r['single_tok_s']:.2f} tok/s; generate {r['generate_tok_s']:.2f}; CPU time per "
              f"token {r['cpu_speedup']:.2f}x) | bytes bound {r['bound']:.2f}x -> "
              f"{r['of_bound']:.2f} of the bound" + (
                  "" if r["read_bound"] is None else
                  f" | disk: {r['mb_read_per_token_single']:.2f} -> "
                  f"{r['mb_read_per_token_batch']:.2f} MB/token, bound {r['read_bound']:.2f}x -> "
                  f"{r['of_read_bound']:.2f} of it"))  # fmt: skip


if __name__ == "__main__":
    main()
