"""Conversion speed: `mer convert --dtype q4` against llama.cpp's convert + quantize to q4_0.

Both convert the same HuggingFace folder; each run is a fresh process, timed from start to exit
(imports, reading, quantizing, writing; mer's time includes its fsyncs). With ``--llama-cpp DIR``
(llama.cpp's source folder: convert_hf_to_gguf.py and gguf-py, as vendored in the
llama-cpp-python sdist) each trial also runs llama.cpp's two steps, the order alternating
between trials so neither always finds the other's reads in the page cache:

1. ``convert_hf_to_gguf.py MODEL --outtype f16`` (its tokenizer pre-check answered "gpt-2", as
   /work/shared/peers/to_gguf.py does for the synthetic tokenizer);
2. ``llama-quantize F16 Q4_0 THREADS`` (``--quantize BIN``, else DIR/build*/bin,
   /tmp/peers/build/*/bin or PATH; else the same C function through the llama_cpp binding).

Outputs go to ``--work`` (default: beside the model) and are deleted after each trial. One line
per run, JSON lines to ``--json``, and the median ratio mer / llama.cpp last.

  python bench/convert_speed.py /tmp/peers/models/olmoe-like \\
      --llama-cpp /tmp/peers/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp --trials 2
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

# Runs in the llama.cpp python: llama.cpp's converter with the tokenizer pre-check answered.
CONVERT = """
import runpy, sys
llama, model, out = sys.argv[1:4]
sys.path[:0] = [llama, llama + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", model, "--outtype", "f16", "--outfile", out]
runpy.run_path(llama + "/convert_hf_to_gguf.py", run_name="__main__")
"""
# The fallback when no llama-quantize binary is found: the same C function, via the binding.
QUANTIZE = """
import ctypes, sys, llama_cpp
p = llama_cpp.llama_model_quantize_default_params()
p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, int(sys.argv[3])
src, dst = sys.argv[1].encode(), sys.argv[2].encode()
sys.exit(llama_cpp.llama_model_quantize(src, dst, ctypes.byref(p)))
"""


def timed(cmd: list[str], env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    p = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return time.perf_counter() - t0


def find_quantize(llama: Path, given: str | None) -> str | None:
    cands = [given] if given else []
    cands += sorted(glob.glob(str(llama / "build*" / "bin" / "llama-quantize")))
    cands += sorted(glob.glob("/tmp/peers/build/*/bin/llama-quantize"))
    cands.append(shutil.which("llama-quantize"))
    return next((c for c in cands if c and os.access(c, os.X_OK)), None)


def run_mer(a: argparse.Namespace, work: Path) -> dict:
    dst = work / "mer-q4"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "micro_expert_router.cli", "convert", str(a.model), str(dst),
           "--dtype", "q4", "--force", *([] if a.progress else ["--quiet"]),
           *([f"--workers={a.workers}"] if a.workers else [])]  # fmt: skip
    s = timed(cmd, env)
    size = sum(f.stat().st_size for f in dst.iterdir())
    shutil.rmtree(dst)
    return {"engine": "mer", "seconds": round(s, 2), "bytes": size}


def run_llama(a: argparse.Namespace, work: Path) -> dict:
    f16, q4 = work / "llama-f16.gguf", work / "llama-q4_0.gguf"
    threads = str(a.threads)
    t_convert = timed([a.llama_python, "-c", CONVERT, str(a.llama_cpp), str(a.model), str(f16)])
    if a.quantize_bin:
        t_quant = timed([a.quantize_bin, str(f16), str(q4), "Q4_0", threads])
    else:
        t_quant = timed([a.llama_python, "-c", QUANTIZE, str(f16), str(q4), threads])
    size = q4.stat().st_size
    f16.unlink()
    q4.unlink()
    return {"engine": "llama.cpp", "seconds": round(t_convert + t_quant, 2), "bytes": size,
            "convert_f16": round(t_convert, 2), "quantize": round(t_quant, 2)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("model", type=Path, help="HuggingFace folder (config.json + safetensors)")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source dir (convert_hf_to_gguf.py)")
    ap.add_argument("--quantize", help="llama-quantize binary (default: searched, see above)")
    ap.add_argument("--llama-python", default=None,
                    help="python for llama.cpp's converter (default: /tmp/peers/venv's if "
                         "present, else this one)")  # fmt: skip
    ap.add_argument("--trials", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="llama-quantize threads")
    ap.add_argument("--workers", type=int, help="mer convert --workers (default: its own)")
    ap.add_argument("--work", type=Path, help="output folder (default: beside the model)")
    ap.add_argument("--progress", action="store_true", help="show mer's progress bar")
    ap.add_argument("--json", type=Path, help="append one JSON line per run here")
    a = ap.parse_args()
    a.model = a.model.resolve()
    if not (a.model / "config.json").is_file():
        sys.exit(f"{a.model}: not a HuggingFace folder (no config.json)")
    work = (a.work or a.model.parent / f".convert-speed-{os.getpid()}").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if a.llama_cpp:
        if not (a.llama_cpp / "convert_hf_to_gguf.py").is_file():
            sys.exit(f"{a.llama_cpp}: no convert_hf_to_gguf.py")
        peers = Path("/tmp/peers/venv/bin/python")
        a.llama_python = a.llama_python or (str(peers) if peers.exists() else sys.executable)
        a.quantize_bin = find_quantize(a.llama_cpp, a.quantize)
        print(f"llama.cpp: {a.llama_cpp}; quantize: {a.quantize_bin or 'llama_cpp binding'}; "
              f"python {a.llama_python}", flush=True)  # fmt: skip
    times: dict[str, list[float]] = {"mer": [], "llama.cpp": []}
    try:
        for trial in range(a.trials):
            runs = [run_mer] + ([run_llama] if a.llama_cpp else [])
            for run in runs if trial % 2 == 0 else runs[::-1]:
                r = {"trial": trial, **run(a, work)}
                times[r["engine"]].append(r["seconds"])
                print(json.dumps(r), flush=True)
                if a.json:
                    with open(a.json, "a") as f:
                        f.write(json.dumps({"model": str(a.model), **r}) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mer = statistics.median(times["mer"])
    if not times["llama.cpp"]:
        print(f"mer convert --dtype q4: median {mer:.1f} s over {a.trials} trial(s)")
        return
    llama = statistics.median(times["llama.cpp"])
    print(f"ratio mer / llama.cpp: {mer / llama:.2f} (median mer {mer:.1f} s, llama.cpp "
          f"{llama:.1f} s, {a.trials} trial(s); target <= 1.00)")  # fmt: skip


if __name__ == "__main__":
    main()
