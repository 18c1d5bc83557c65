"""MER against llama.cpp on the same checkpoint, in one run, alternating A/B.

  python bench/vs_llamacpp.py --store S.q4 --gguf M-q4_0.gguf --llama-python PEERS_VENV/bin/python
  python bench/vs_llamacpp.py --store S.q4 --gguf M-q4_0.gguf --prompt-tokens 512 -n 4   # prefill
  python bench/vs_llamacpp.py --store S.q4 --gguf M-q4_0.gguf --limit 0.83x --read-ahead-kb 128

Both engines get the same prompt ids and, at each decode step, the same fed id
(``Random(seed).randrange(vocab)``), the same thread count, and run as fresh child processes one
after the other (never side by side). Resident (no ``--limit``): the GGUF is read into the page
cache first and MER preloads its experts; llama.cpp runs with repack on and off. With
``--limit`` (bytes with K/M/G, or a multiple of the GGUF size like ``0.83x``), each child joins a
fresh cgroup-v1 memory group before exec, the page cache is dropped, llama.cpp runs with
``--no-repack`` (repack is OOM-killed under a limit), and MER gets ``memory_limit`` when the
engine has that option, else ``--cache-mb``. ``read_ahead_kb`` of the store's block device is set
for the run (and restored) when asked, and recorded either way. Needs root for limits.

llama.cpp runs through llama-cpp-python in ``--llama-python`` (an interpreter where ``import
llama_cpp`` works; docs/benchmarks.md shows how to build one). One JSON line per child; the last
line prints the median ratios MER / llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

CG_ROOT = "/sys/fs/cgroup/memory"


def _status_bytes(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _ids(seed: int, n: int, vocab: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(vocab) for _ in range(n)]


def _report(t: dict) -> None:
    t.update(peak_rss_bytes=_status_bytes("VmHWM"), rss_anon_bytes=_status_bytes("RssAnon"),
             rss_shmem_bytes=_status_bytes("RssShmem"), rss_file_bytes=_status_bytes("RssFile"),
             major_faults=resource.getrusage(resource.RUSAGE_SELF).ru_majflt)  # fmt: skip
    print(json.dumps(t), flush=True)


def _cgroup_dir() -> Path | None:
    """This process's cgroup-v1 memory group (None outside one)."""
    for line in open("/proc/self/cgroup"):
        _, ctrl, rel = line.rstrip("\n").split(":", 2)
        if "memory" in ctrl.split(",") and rel not in ("", "/"):
            return Path(CG_ROOT) / rel.lstrip("/")
    return None


CG_EVENTS = ("pgmajfault", "pgfault", "pgpgin", "pgpgout")  # counters: deltas over the decode
CG_LEVELS = ("cache", "rss", "shmem", "mapped_file", "active_file", "inactive_file")


class Probe:
    """Load-independent counters of a decode, read before and after: CPU time in user and
    kernel mode, page faults, and (inside a memory cgroup) the group's fault and paging
    events, how often it hit its limit (``failcnt``) and what its memory is made of."""

    def __init__(self) -> None:
        self.cg = _cgroup_dir()
        self.before = self._read()

    def _read(self) -> dict[str, float]:
        r = resource.getrusage(resource.RUSAGE_SELF)
        d = {"utime_s": r.ru_utime, "stime_s": r.ru_stime, "minflt": r.ru_minflt,
             "majflt": r.ru_majflt, "wall_s": time.perf_counter()}  # fmt: skip
        if self.cg is not None:
            stat = dict(x.split() for x in (self.cg / "memory.stat").read_text().splitlines())
            d.update({f"cg_{k}": int(stat[k]) for k in CG_EVENTS + CG_LEVELS if k in stat})
            d["cg_failcnt"] = int((self.cg / "memory.failcnt").read_text())
        return d

    def per_token(self, n: int) -> dict[str, float]:
        """Per decode token: CPU seconds (user, system), faults and cgroup events; the
        group's memory make-up (bytes) at the end."""
        now = self._read()
        out = {}
        for k, v in now.items():
            if k[3:] in CG_LEVELS:
                out[k + "_bytes"] = v
            else:
                out[k + "_per_tok"] = (v - self.before[k]) / n
        return out


def child_mer(a: argparse.Namespace) -> None:
    import torch

    import micro_expert_router as mer

    opts = json.loads(a.mer_options)
    eng = mer.load(a.store, threads=a.threads, **opts)
    if a.limit_bytes is None:
        eng.preload()
    model = eng.model
    vocab = eng.args.vocab_size
    prompt, feed = _ids(a.seed, a.prompt_tokens, vocab), _ids(a.seed + 1, a.n, vocab)
    kv = model.new_cache(len(prompt) + a.n + 1)
    stats = eng.provider.stats
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.forward(torch.tensor(prompt), kv, last_only=True)
        t1 = time.perf_counter()
        before_faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        before = stats.snapshot()
        reader = getattr(eng.provider, "reader", None)
        r0 = reader.stats if reader is not None else None
        probe = Probe()
        steps = []
        for tok in feed:
            s0, w0 = stats.snapshot(), time.perf_counter()
            model.forward(torch.tensor([tok]), kv, last_only=True)
            ds = stats.minus(s0)
            steps.append((time.perf_counter() - w0, ds.misses, ds.io_wait_s))
        t2 = time.perf_counter()
    d = stats.minus(before)
    extra = {}
    if r0 is not None:
        r1 = reader.stats
        reads = max(r1.reads - r0.reads, 1)
        extra = {"read_ms_per_read": 1e3 * (r1.read_s - r0.read_s) / reads,
                 "disk_busy_ms_per_tok": 1e3 * (r1.busy_s - r0.busy_s) / a.n}  # fmt: skip
    # medians: robust to the load spikes of a shared machine, unlike decode_tps
    extra["median_ms_per_tok"] = 1e3 * statistics.median(w for w, _, _ in steps)
    extra["median_io_wait_ms_per_tok"] = 1e3 * statistics.median(io for _, _, io in steps)
    hit = [w for w, m, _ in steps if m == 0]
    miss = [(w - io, m) for w, m, io in steps if m]
    if hit:  # a token with no miss runs as resident: the rest of a miss token is overhead
        extra["all_hit_tokens"] = len(hit)
        extra["all_hit_ms_per_tok"] = 1e3 * statistics.median(hit)
    if miss:
        extra["miss_tokens_compute_ms_per_tok"] = 1e3 * statistics.median(w for w, _ in miss)
    memory = getattr(eng, "memory", None)
    _report({"prompt_tps": len(prompt) / (t1 - t0), "decode_tps": a.n / (t2 - t1),
             "decode_hit_rate": d.hits / max(d.experts_needed, 1),
             "decode_major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt
             - before_faults, "decode_mb_read_per_tok": d.bytes_read / 1e6 / a.n,
             "decode_misses_per_tok": d.misses / a.n,
             "decode_io_wait_ms_per_tok": 1e3 * d.io_wait_s / a.n,
             "cache_mb": getattr(memory, "cache", 0) / 1e6,
             **extra, **probe.per_token(a.n)})  # fmt: skip


def child_llama(a: argparse.Namespace) -> None:
    import llama_cpp
    import llama_cpp.llama_cpp as raw

    if not a.repack:  # as llama-cli --no-repack: weights stay in the mmap
        default = raw.llama_model_default_params

        def no_repack():
            p = default()
            p.use_extra_bufts = False
            return p

        raw.llama_model_default_params = no_repack
    batch = max(32, a.prompt_tokens)
    llm = llama_cpp.Llama(a.gguf, n_ctx=a.prompt_tokens + a.n + 16, n_batch=batch,
                          n_ubatch=batch, n_threads=a.threads, n_threads_batch=a.threads,
                          use_mmap=True, seed=0, verbose=False)  # fmt: skip
    vocab = llm.n_vocab()
    prompt, feed = _ids(a.seed, a.prompt_tokens, vocab), _ids(a.seed + 1, a.n, vocab)
    t0 = time.perf_counter()
    llm.eval(prompt)
    t1 = time.perf_counter()
    before_faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    for tok in feed:
        llm.eval([tok])
    t2 = time.perf_counter()
    _report({"prompt_tps": len(prompt) / (t1 - t0), "decode_tps": a.n / (t2 - t1),
             "decode_major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt
             - before_faults})  # fmt: skip


def size_arg(s: str, ref: int) -> int:
    if s.endswith("x"):
        return int(float(s[:-1]) * ref)
    mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1].upper(), 1)
    return int(float(s.rstrip("KMGkmg")) * mult)


def block_device(path: str) -> Path | None:
    dev = os.stat(path).st_dev
    sys_dev = Path(f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}")
    for q in (sys_dev / "queue", sys_dev / ".." / "queue"):
        if (q / "read_ahead_kb").exists():
            return q / "read_ahead_kb"
    return None


def run_child(a: argparse.Namespace, engine: str, extra: list[str], python: str) -> dict:
    cg, pre = None, None
    if a.limit_bytes is not None:
        cg = f"{CG_ROOT}/mer_vs_llama_{os.getpid()}_{time.monotonic_ns()}"
        os.mkdir(cg)
        for f in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"):
            if os.path.exists(f"{cg}/{f}"):
                open(f"{cg}/{f}", "w").write(str(a.limit_bytes))
        os.sync()
        open("/proc/sys/vm/drop_caches", "w").write("3")

        def pre():
            open(f"{cg}/cgroup.procs", "w").write(str(os.getpid()))
    elif engine == "llama":  # resident: the GGUF in the page cache, as after a first run
        with open(a.gguf, "rb", buffering=0) as f:
            while f.read(64 << 20):
                pass
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [python, os.path.abspath(__file__), "--child", engine, *a.argv, *extra]  # extra wins
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=pre, env=env)
        sys.stderr.write(p.stderr)
        lines = p.stdout.strip().splitlines()
        res = json.loads(lines[-1]) if p.returncode == 0 and lines else {
            "error": f"exit code {p.returncode}"
            + (f" ({signal.Signals(-p.returncode).name})" if p.returncode < 0 else ""),
            "stderr_tail": p.stderr.strip().splitlines()[-3:]}  # fmt: skip
        if cg:
            res["cgroup_peak_bytes"] = int(open(f"{cg}/memory.max_usage_in_bytes").read())
            oom = dict(x.split() for x in open(f"{cg}/memory.oom_control").read().splitlines())
            res["oom_kills"] = int(oom.get("oom_kill", 0))
    finally:
        if cg:
            os.rmdir(cg)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--store", required=True)
    ap.add_argument("--gguf", required=True)
    ap.add_argument("--llama-python", default=sys.executable)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("-n", type=int, default=32, help="decode tokens")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--limit", help="memory limit: bytes (K/M/G) or a multiple of the GGUF (0.83x)")
    ap.add_argument("--read-ahead-kb", type=int, help="set the disk's read_ahead_kb for the run")
    ap.add_argument("--mer-options", default="{}", help="JSON of extra mer.load options")
    ap.add_argument("--mer-b", help="JSON of mer.load options for a second MER variant 'mer:b' "
                    "(run ABAB with 'mer'; the last line then also gives mer/mer:b)")
    ap.add_argument("--engines", default="mer,llama", help="which to run: mer,llama (or one)")
    ap.add_argument("--cache-mb", type=float, help="MER's cache under --limit (if no memory_limit)")
    ap.add_argument("--child", choices=["mer", "llama"])
    ap.add_argument("--repack", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--limit-bytes", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child_mer(a) if a.child == "mer" else child_llama(a)

    a.limit_bytes = size_arg(a.limit, os.path.getsize(a.gguf)) if a.limit else None
    a.argv = ["--store", a.store, "--gguf", a.gguf, "--prompt-tokens", str(a.prompt_tokens),
              "-n", str(a.n), "-t", str(a.threads), "--seed", str(a.seed)]  # fmt: skip
    opts = json.loads(a.mer_options)
    # the same context for both: llama.cpp's n_ctx; MER's KV cache (and its share of a memory
    # limit) is sized by max_context, 4096 tokens by default
    opts.setdefault("max_context", a.prompt_tokens + a.n + 16)
    if a.limit_bytes is not None:
        a.argv += ["--limit-bytes", str(a.limit_bytes)]
        if "memory_limit" not in opts and a.cache_mb is not None:
            opts["cache_bytes"] = int(a.cache_mb * 1e6)
    a.argv += ["--mer-options", json.dumps(opts)]
    ra = block_device(a.store)
    old_ra = ra.read_text().strip() if ra else None
    if ra and a.read_ahead_kb is not None:
        ra.write_text(str(a.read_ahead_kb))
    engines = set(a.engines.split(","))
    variants = [("mer", [], sys.executable)] if "mer" in engines else []
    if a.mer_b is not None:
        b = {**opts, **json.loads(a.mer_b)}
        variants.append(("mer", ["--mer-options", json.dumps(b), "--variant", "mer:b"],
                         sys.executable))  # fmt: skip
    llama = [("llama", ["--no-repack"], a.llama_python)]
    if a.limit_bytes is None:
        llama.insert(0, ("llama", ["--repack"], a.llama_python))
    variants += llama if "llama" in engines else []
    res: dict[str, list[dict]] = {}
    try:
        for r in range(a.rounds):
            for engine, extra, py in variants:
                name = (extra[-1] if "--variant" in extra else
                        engine if engine == "mer" else engine + extra[0].replace("--", ":"))
                out = run_child(a, engine, extra, py)
                ra_now = ra.read_text().strip() if ra else None
                out.update(round=r, variant=name, read_ahead_kb=ra_now)
                print(json.dumps(out), flush=True)
                res.setdefault(name, []).append(out)
    finally:
        if ra and old_ra is not None:
            ra.write_text(old_ra)
    ok = {k: [x for x in v if "error" not in x] for k, v in res.items()}
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("decode_tps", "prompt_tps")}
           for k, v in ok.items() if v}  # fmt: skip
    if "mer" not in med:
        print("mer failed in every round: " + json.dumps(res.get("mer", [])[:1]))
        sys.exit(1)
    parts = []
    for k in med:
        if k != "mer":
            parts.append(f"decode mer/{k} {med['mer']['decode_tps'] / med[k]['decode_tps']:.2f}, "
                         f"prompt({a.prompt_tokens}) mer/{k} "
                         f"{med['mer']['prompt_tps'] / med[k]['prompt_tps']:.2f}")  # fmt: skip
    rss = {k: max(x.get("peak_rss_bytes", 0) for x in v) / 1e9 for k, v in ok.items() if v}
    failed = [f"{k} failed in every round ({v[0]['error']})"
              for k, v in res.items() if k not in med]  # fmt: skip
    print(f"medians over {a.rounds} rounds: " + "; ".join(parts + failed) + " | peak RSS GB "
          + ", ".join(f"{k} {v:.2f}" for k, v in rss.items()))


if __name__ == "__main__":
    main()
