"""Out-of-core defaults chosen by measurement (issue 13, point 4): cache policy, prefetch on or
off, I/O threads and read (chunk) size, swept on one store at one memory limit, with the
model's own gates and with a synthetic router (``--router trace:FILE``, docs/router.md).

One factor at a time from the current defaults (``--grid oat``, the default): the policies
first; then prefetch off / on with the best policy; then the I/O threads; then the read chunk
size, each step keeping the winners so far. ``--grid full`` runs every combination. Every
configuration is a fresh engine (``memory_limit`` only, no hand-picked cache), a short prompt
and ``-n`` decode steps fed ``Random(1)`` ids, ``--repeats`` times in alternating order; the
median decode tok/s decides. Each run is a child process of its own. Prefetch must pay: it
wins only if its median beats off by ``--prefetch-margin`` (default 3 %), else it stands down.

Prints one JSON line per run, then a markdown table per router (for docs/memory.md) and a final
line naming the winners:

    python bench/defaults_sweep.py --store /tmp/peers/models/olmoe-like-q4 --limit 0.5x -n 32 \\
        --routers gates,trace:/work/shared/data/traces/olmoe-1b-7b-llamacpp/olmoe-all.tokens.jsonl

The read size is the ``DirectReader``'s ``chunk_bytes`` (each request is cut into chunks of it,
read in parallel by the I/O threads); the engine has no option for it, so the bench swaps in a
reader with that chunk size right after loading.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

import micro_expert_router as mer
from micro_expert_router.config import EngineConfig
from micro_expert_router.io import DirectReader
from micro_expert_router.io.reader import DEFAULT_CHUNK_BYTES, DEFAULT_THREADS
from micro_expert_router.store import Store

DEFAULTS = {"policy": EngineConfig().cache_policy, "prefetch": "off",
            "io_threads": DEFAULT_THREADS, "chunk_kib": DEFAULT_CHUNK_BYTES >> 10}  # fmt: skip


def ids(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def run(a: argparse.Namespace, limit: int, router: str | None, cfg: dict) -> dict:
    """One configuration in a fresh child process (a process that loaded an engine before keeps
    memory the next engine's memory split would count as its runtime)."""
    job = json.dumps({"limit": limit, "router": router, "cfg": cfg})
    r = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", job],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:  # reported and skipped (a BudgetError, a trace of another shape)
        last = [x for x in r.stderr.strip().splitlines() if x.strip()] or [f"exit {r.returncode}"]
        return {"error": last[-1][-300:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def child(a: argparse.Namespace, limit: int, router: str | None, cfg: dict) -> dict:
    opts = dict(memory_limit=limit, max_context=a.prompt_tokens + a.n + 1, threads=a.threads,
                policy=cfg["policy"], prefetch=cfg["prefetch"],
                io_threads=cfg["io_threads"])  # fmt: skip
    if router:
        opts["router"] = router
    eng = mer.load(a.store, **opts)
    try:
        p = eng.provider
        if cfg["chunk_kib"] << 10 != p.reader.chunk_bytes:  # the read size: a reader of its own
            p.reader.close()
            p.reader = DirectReader(threads=cfg["io_threads"], chunk_bytes=cfg["chunk_kib"] << 10)
        model, vocab = eng.model, eng.args.vocab_size
        kv = model.new_cache(a.prompt_tokens + a.n + 1)
        with torch.inference_mode():
            model.forward(torch.tensor(ids(a.seed, a.prompt_tokens, vocab)), kv, last_only=True)
            s0 = p.stats.snapshot()
            t0 = time.perf_counter()
            for tok in ids(a.seed + 1, a.n, vocab):
                model.forward(torch.tensor([tok]), kv, last_only=True)
            dt = time.perf_counter() - t0
        d = p.stats.minus(s0)
        return {"decode_tps": a.n / dt, "hit_rate": d.hits / max(d.experts_needed, 1),
                "mb_read_per_token": d.bytes_read / 1e6 / a.n, "io_wait_s": d.io_wait_s,
                "prefetch_hits": d.prefetch_hits, "prefetch_wasted": d.prefetch_wasted,
                "cache_mb": eng.memory.cache / 2**20 if eng.memory else None}  # fmt: skip
    finally:
        eng.close()


def key(cfg: dict) -> str:
    return f"{cfg['policy']} | {cfg['prefetch']} | {cfg['io_threads']} | {cfg['chunk_kib']}"


def measure(a, limit, router, cfgs: list[dict], results: dict) -> None:
    """Each of ``cfgs`` ``--repeats`` times, alternating order (ABAB, then BABA)."""
    for r in range(a.repeats):
        for cfg in cfgs if r % 2 == 0 else cfgs[::-1]:
            out = run(a, limit, router, cfg)
            row = {"router": router or "gates", **cfg, **out, "repeat": r, "loadavg": loadavg()}
            print(json.dumps(row), flush=True)
            results.setdefault(key(cfg), (cfg, []))[1].append(out)


def ok(outs: list[dict]) -> list[dict]:
    return [o for o in outs if "error" not in o]


def median_tps(results: dict, cfg: dict) -> float:
    """Median decode tok/s of a configuration; 0 if every run of it failed."""
    outs = ok(results[key(cfg)][1])
    return statistics.median(o["decode_tps"] for o in outs) if outs else 0.0


def sweep(a, limit, router) -> tuple[dict, dict]:
    results: dict = {}
    space = {"policy": a.policies, "prefetch": ["off", a.prefetch_spec],
             "io_threads": a.io_threads, "chunk_kib": a.chunk_kib}  # fmt: skip
    if a.grid == "full":
        cfgs = [dict(zip(space, v, strict=True)) for v in itertools.product(*space.values())]
        measure(a, limit, router, cfgs, results)
        best = max((c for c, _ in results.values()), key=lambda c: median_tps(results, c))
        return best, results
    best = dict(DEFAULTS)
    for factor, values in space.items():
        if factor not in a.factors:
            continue
        cfgs = [{**best, factor: v} for v in values]
        measure(a, limit, router, cfgs, results)
        tps = {v: median_tps(results, c) for v, c in zip(values, cfgs, strict=True)}
        if factor == "prefetch":  # prefetch must pay by a margin, or it stands down
            pays = tps[a.prefetch_spec] > tps["off"] * (1 + a.prefetch_margin)
            best["prefetch"] = a.prefetch_spec if pays else "off"
        else:
            best[factor] = max(tps, key=tps.get)
    return best, results


def table(router: str, best: dict, results: dict) -> str:
    lines = [f"Router: {router}. Decode tok/s (median of the repeats), hit rate, MB read/token.",
             "", "| policy | prefetch | I/O threads | chunk KiB | decode tok/s | hit rate | "
             "MB/token |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for k, (_, runs) in results.items():
        outs = ok(runs)
        if not outs:
            lines.append(f"| {k} | failed: {runs[-1]['error']} | | |")
            continue
        med = {f: statistics.median(o[f] for o in outs)
               for f in ("decode_tps", "hit_rate", "mb_read_per_token")}  # fmt: skip
        mark = " **(chosen)**" if k == key(best) else ""
        lines.append(f"| {k} | {med['decode_tps']:.2f}{mark} | {med['hit_rate']:.2f} | "
                     f"{med['mb_read_per_token']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--store", required=True)
    ap.add_argument("--limit", default="0.5x", help="bytes (K/M/G) or a multiple of the store")
    ap.add_argument("--routers", default="gates",
                    help="comma-separated: gates (the model's own) and/or trace:FILE, markov:FILE")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--grid", choices=("oat", "full"), default="oat")
    ap.add_argument("--policies", default="lru,lfu,lcp")
    ap.add_argument("--prefetch-spec", default="s,l,m", help="the predictors of prefetch on")
    ap.add_argument("--prefetch-margin", type=float, default=0.03)
    ap.add_argument("--io-threads", default="2,4,8")
    ap.add_argument("--chunk-kib", default="1024,4096")
    ap.add_argument("--factors", default="policy,prefetch,io_threads,chunk_kib",
                    help="the factors a one-at-a-time sweep visits (the others keep defaults)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.factors = a.factors.split(",")
    a.policies = a.policies.split(",")
    a.io_threads = [int(v) for v in a.io_threads.split(",")]
    a.chunk_kib = [int(v) for v in a.chunk_kib.split(",")]
    if a.child is not None:
        job = json.loads(a.child)
        print(json.dumps(child(a, job["limit"], job["router"], job["cfg"])), flush=True)
        return 0
    store = Store.open(a.store)
    size = store.total_expert_bytes + store.dense_file.stat().st_size
    s = a.limit
    if s.endswith("x"):
        limit = int(float(s[:-1]) * size)
    else:
        limit = int(float(s.rstrip("KMGkmg")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(
            s[-1].upper(), 1))  # fmt: skip
    chosen = []
    for router in a.routers.split(","):
        spec = None if router == "gates" else router
        best, results = sweep(a, limit, spec)
        print(table(router, best, results), flush=True)
        if not any(ok(runs) for _, runs in results.values()):
            chosen.append(f"{router.split('/')[-1]}: every configuration failed")
            continue
        chosen.append(f"{router.split('/')[-1]}: {key(best)}")
    print("winners (policy | prefetch | I/O threads | chunk KiB): " + "; ".join(chosen)
          + f" | limit {limit} bytes | loadavg {loadavg()}", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
