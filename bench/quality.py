"""Quantization quality on the bundled demo model (issue 4, point 2).

Converts the demo checkpoint to f32, q8 and q4 stores (dense weights in the store's default
dense format; ``EXPERT:DENSE`` picks another, e.g. ``q4:bf16``) and evaluates each on held-out
text (the demo corpus's deterministic held-out cookies, never seen in training): perplexity per
token, and next-token top-1 agreement with float32 at every position. Prints one line per store
and the perplexity ratios to float32 last. Needs Debian's `fortunes` package (the corpus).

    python bench/quality.py [--windows N] [--seq-len L] [--stores f32,q8,q4,q4:bf16,q4:q8]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import micro_expert_router as mer
from micro_expert_router.demo import demo_model_path
from micro_expert_router.store import convert

ROOT = Path(__file__).resolve().parents[1]


def heldout_ids(seq_len: int, windows: int) -> list[list[int]]:
    sys.path.insert(0, str(ROOT / "scripts"))
    from demo_corpus import load_corpus  # the training script's own split

    from micro_expert_router.tokenizer import Tokenizer

    tok = Tokenizer(demo_model_path())
    stream: list[int] = []
    for text in load_corpus().heldout:
        stream += tok.encode(text)
        if len(stream) >= seq_len * windows + 1:
            break
    return [stream[i * seq_len : (i + 1) * seq_len + 1] for i in range(windows)
            if len(stream) >= (i + 1) * seq_len + 1]  # fmt: skip


def evaluate(store: Path, wins: list[list[int]]) -> tuple[float, list[np.ndarray]]:
    nll, n, argmaxes = 0.0, 0, []
    with mer.load(store) as engine:
        for w in wins:
            logits = torch.from_numpy(engine.logits(w[:-1]))
            targets = torch.tensor(w[1:])
            nll += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            n += len(targets)
            argmaxes.append(logits.argmax(-1).numpy())
    return float(np.exp(nll / n)), argmaxes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--windows", type=int, default=48)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--stores", default="f32,q8,q4,q8:bf16,q4:bf16,q4:q8",
                    help="EXPERT[:DENSE] formats; f32 first (the reference)")  # fmt: skip
    args = ap.parse_args()
    wins = heldout_ids(args.seq_len, args.windows)
    n_tok = sum(len(w) - 1 for w in wins)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for dtype in args.stores.split(","):
            expert, _, dense = dtype.partition(":")
            store = convert(demo_model_path(), Path(tmp) / dtype.replace(":", "-"), dtype=expert,
                            dense=dense or None, progress=False, log=None)  # fmt: skip
            t0 = time.perf_counter()
            ppl, am = evaluate(store.path, wins)
            results[dtype] = (ppl, am, store.total_expert_bytes)
            agree = (np.mean(np.concatenate(am) == np.concatenate(results["f32"][1]))
                     if dtype != "f32" else 1.0)  # fmt: skip
            print(f"{dtype:7s} experts {store.total_expert_bytes / 1e6:6.2f} MB dense "
                  f"{store.dense_format} {store.dense_bytes / 1e6:5.2f} MB  perplexity "
                  f"{ppl:8.3f}  top-1 agreement with f32 {agree:.2%}  ({n_tok} held-out tokens, "
                  f"{time.perf_counter() - t0:.1f} s)")  # fmt: skip
    base = results["f32"][0]
    out = ROOT / "bench" / "results" / "quality.jsonl"
    out.parent.mkdir(exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps({"time": time.time(), "tokens": n_tok,
                            **{k: v[0] for k, v in results.items()}}) + "\n")  # fmt: skip
    ratios = [f"{k} {v[0] / base:.4f}" for k, v in results.items() if k != "f32"]
    print("perplexity ratio to f32: " + ", ".join(ratios))


if __name__ == "__main__":
    main()
