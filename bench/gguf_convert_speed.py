"""GGUF conversion speed: `mer convert MODEL.gguf STORE` against `cp MODEL.gguf` on the same disk.

Each run starts cold: ``sync; echo 3 > /proc/sys/vm/drop_caches`` (root; else only the GGUF's
own pages are evicted with ``posix_fadvise(DONTNEED)``, and the line says so). ``cp`` is timed
with a closing ``sync`` (its writes on disk, as mer's fsyncs put the store on disk); ``mer
convert`` runs as a fresh process (imports, reading, packing, hashing, writing, fsync). The runs
alternate, cp first (ABAB), and each output goes to ``--work`` (default: a new folder in $TMPDIR;
give a folder on the GGUF's disk if that is another) and is deleted right after its run.

Dropping the page cache also drops the program: a fresh ``mer`` then reads torch's libraries
(about 1 GB) from disk before it reads a byte of the GGUF, 5-11 s on this machine, a cost ``cp``
(a small, always cached binary) never pays. So after the drop and before a convert run, the bench
times an import of what ``mer convert`` imports (``WARM``: torch, numpy, gguf, the converter, the
store), the program's cold start; it does not touch the GGUF, which stays cold. The run's line
reports it; the ratio line gives the ratio without and with it. ``--cold-program`` skips that
warm-up, so that the timed run includes the cold start.

    python bench/gguf_convert_speed.py [/tmp/peers/models/olmoe-like-q4_0.gguf]
        [--work /tmp/h15k-scratch] [--rounds 2]

One line per run (with the load average), then the ratio median convert / median cp (the bar is
<= 1.5 for a 4 GB file, issue 15), and the same with the program's cold start added.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT = Path("/tmp/peers/models/olmoe-like-q4_0.gguf")


def drop_caches(path: Path) -> str:
    """Empty the page cache (or, without root, evict ``path``); the method used."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return "drop_caches"
    except OSError:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return "fadvise"


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def run_cp(src: Path, work: Path) -> float:
    dst = work / src.name
    try:
        return timed(["sh", "-c", 'cp "$0" "$1" && sync', str(src), str(dst)])
    finally:
        dst.unlink(missing_ok=True)


ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}


WARM = ("import torch, numpy, gguf, tqdm, xxhash; import micro_expert_router.cli; "
        "from micro_expert_router.commands import convert; "
        "from micro_expert_router.store import gguf_convert, gguf_tokenizer, format")


def warm_program() -> float:
    """The program's cold start after a cache drop: its imports, the GGUF untouched."""
    return timed([sys.executable, "-c", WARM], ENV)


def run_convert(src: Path, work: Path) -> float:
    dst = work / "store"
    env = ENV
    try:
        return timed([sys.executable, "-m", "micro_expert_router.cli", "convert", str(src),
                      str(dst), "--force", "--quiet"], env)  # fmt: skip
    finally:
        shutil.rmtree(dst, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path, nargs="?", default=DEFAULT)
    p.add_argument("--work", type=Path, default=None, help="scratch folder on the same disk")
    p.add_argument("--rounds", type=int, default=2, help="cp + convert pairs")
    p.add_argument("--cold-program", action="store_true",
                   help="no warm-up import after the cache drop: time the cold start too")
    a = p.parse_args()
    work = a.work or Path(tempfile.mkdtemp(prefix="mer-convert-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    size = a.gguf.stat().st_size
    times: dict[str, list[float]] = {"cp": [], "convert": [], "start": []}
    try:
        for r in range(a.rounds):
            for name, run in (("cp", run_cp), ("convert", run_convert)):
                how = drop_caches(a.gguf)
                start = 0.0
                if name == "convert" and not a.cold_program:
                    start = warm_program()
                    times["start"].append(start)
                s = run(a.gguf, work)
                times[name].append(s)
                load = os.getloadavg()[0]
                note = f"; program cold start {start:.2f} s before it, not counted" if start else ""
                print(f"round {r} {name}: {s:.2f} s ({size / s / 1e9:.2f} GB/s; cache emptied by "
                      f"{how}{note}; load average {load:.2f})", flush=True)  # fmt: skip
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)
    c, k = statistics.median(times["convert"]), statistics.median(times["cp"])
    st = statistics.median(times["start"]) if times["start"] else 0.0
    with_start = f"; with the program's cold start {(c + st) / k:.2f}" if st else ""
    print(f"ratio convert / cp: {c / k:.2f} (median convert {c:.2f} s, cp {k:.2f} s, "
          f"{size / 1e9:.2f} GB; bar <= 1.5{with_start})")


if __name__ == "__main__":
    main()
