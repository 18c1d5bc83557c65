"""mer against llama.cpp itself on the same GGUF: logits over 64 positions, tokenization of a
fixed text, and the time to convert the GGUF into a store against ``cp`` of the same file.

Use GGUFs made by llama.cpp's converter from random checkpoints (``../shared/peers``:
``make_model.py``, then ``to_gguf.py --type q8_0`` or ``--type q4_k_m`` for llama-quantize).
llama.cpp runs in its own venv (``--llama-python``, default ``/tmp/peers/venv/bin/python``)
through llama-cpp-python, fed the same random ids (``Random(1)``), ``logits_all``. mer runs the
store converted from the GGUF in float32 mode. llama.cpp rounds activations to 8 bits in its dot
products, so the bar is top-1 agreement >= 0.9 and a median per-position relative L2 error
<= 2e-2 (issue 15).

    python bench/vs_llamacpp_logits.py /tmp/peers/models/tiny-q4_k_m.gguf [--rounds 3]

Prints one line per conversion round (convert s, cp s), the tokenization check, the logits
lines, then the ratio lines: convert / cp (bar <= 1.5) last but one, top-1 and median error last.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT = "Once upon a time, a little fox said: \"Hello, world!\" 1234 times. It's 3.14, naïve!"
LLAMA = r"""
import json, sys, numpy as np
from llama_cpp import Llama
path, ids, text, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
llm = Llama(model_path=path, n_ctx=max(128, len(ids) + 8), logits_all=True, n_threads=2,
            n_batch=len(ids), verbose=False)
llm.eval(ids)
np.save(out, np.array(llm.scores[: len(ids)], dtype=np.float32))
print(json.dumps({"tokens": llm.tokenize(text.encode(), add_bos=False, special=False)}))
"""


def drop_file_cache(path: Path) -> None:
    """Evict ``path`` from the page cache (both sides read it cold)."""
    import os

    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def time_conversions(gguf: Path, work: Path, rounds: int) -> tuple[list[float], list[float]]:
    from micro_expert_router.store.gguf_convert import convert_gguf

    conv, cp = [], []
    for r in range(rounds):  # ABAB: convert, cp, convert, cp ...
        drop_file_cache(gguf)
        t = time.perf_counter()
        convert_gguf(gguf, work / "store", force=True, progress=False, log=None)
        conv.append(time.perf_counter() - t)
        drop_file_cache(gguf)
        t = time.perf_counter()
        subprocess.run(["cp", str(gguf), str(work / "copy.gguf")], check=True)
        subprocess.run(["sync"], check=True)
        cp.append(time.perf_counter() - t)
        (work / "copy.gguf").unlink()
        print(f"round {r}: convert {conv[-1]:.2f} s, cp {cp[-1]:.2f} s", flush=True)
    return conv, cp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--llama-python", default="/tmp/peers/venv/bin/python")
    p.add_argument("--positions", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--work", type=Path, default=None, help="folder for the store (default: tmp)")
    a = p.parse_args()
    import micro_expert_router as mer

    work = a.work or Path(tempfile.mkdtemp(prefix="mer-vs-llamacpp-"))
    work.mkdir(parents=True, exist_ok=True)
    conv, cp = time_conversions(a.gguf, work, a.rounds)
    with mer.load(work / "store", dtype="float32") as engine:
        rng = random.Random(1)
        ids = [rng.randrange(engine.args.vocab_size) for _ in range(a.positions)]
        ours = engine.logits(ids)  # [P, V]
        our_tokens = engine.tokenizer.encode(TEXT, add_special_tokens=False) if (
            engine.tokenizer) else None  # fmt: skip
    out = work / "llama_logits.npy"
    run = subprocess.run([a.llama_python, "-c", LLAMA, str(a.gguf), json.dumps(ids), TEXT,
                          str(out)], capture_output=True, text=True)  # fmt: skip
    if run.returncode:
        sys.exit(f"llama.cpp side failed: {run.stderr.strip()[-2000:]}")
    theirs = np.load(out)[:, : ours.shape[1]]
    their_tokens = json.loads(run.stdout.strip().splitlines()[-1])["tokens"]
    print(f"tokenization of the fixed text identical: {our_tokens == their_tokens} "
          f"({len(their_tokens)} tokens)")
    top1 = float(np.mean(ours.argmax(1) == theirs.argmax(1)))
    rel = np.linalg.norm(ours - theirs, axis=1) / np.linalg.norm(theirs, axis=1)
    for i in range(0, len(rel), 8):
        print(f"positions {i}-{i + 7}: rel err " + " ".join(f"{v:.2e}" for v in rel[i : i + 8]))
    shutil.rmtree(work / "store", ignore_errors=True)
    c, k = statistics.median(conv), statistics.median(cp)
    print(f"ratio convert / cp: {c / k:.2f} (convert {c:.2f} s, cp {k:.2f} s, "
          f"{a.gguf.stat().st_size / 1e9:.2f} GB; bar <= 1.5)")
    print(f"ratio top-1 agreement {top1:.3f} (bar >= 0.9), median per-position rel err "
          f"{float(np.median(rel)):.2e} (bar <= 2e-2), max {float(rel.max()):.2e}")


if __name__ == "__main__":
    main()
