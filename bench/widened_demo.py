"""A disk-bound store with learned routing: the bundled demo model with its experts widened.

The demo model's experts are small (0.7 MB in f32), so decoding it from a store is compute-bound
and says little about streaming. Here every expert gets ``--width`` intermediate neurons instead
of 224: the trained neurons first, then extra neurons whose gate and up rows are random and whose
down columns are zero. A zero down column adds exactly nothing to the expert's output, so the
model computes the demo's function (up to float rounding, since longer sums round differently)
and routes like the trained demo, while each expert costs the bytes and the compute of a
``width``-neuron expert. Width 4096 in f32 gives 12.6 MB experts, the size of OLMoE's and
Qwen3-30B-A3B's bf16 experts; 64 experts make an 805 MB store.

The checkpoint and store are built once under ``.bench-data/`` (not in git).

    python bench/widened_demo.py [--width 4096] [--dir DIR]     # builds, prints the store path
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from micro_expert_router.demo import demo_model_path
from micro_expert_router.store import convert

DEFAULT_DIR = Path(__file__).resolve().parents[1] / ".bench-data"


def widened_checkpoint(width: int, root: Path) -> Path:
    """The demo checkpoint folder with experts of ``width`` neurons (built once)."""
    src = demo_model_path()
    dst = root / f"demo-wide{width}-ckpt"
    if (dst / "config.json").is_file():
        return dst
    cfg = json.loads((src / "config.json").read_text())
    inter = cfg["intermediate_size"]
    if width < inter:
        raise SystemExit(f"--width {width} is below the demo's {inter} neurons")
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "config.json" and f.is_file():
            shutil.copy(f, tmp / f.name)
    g = torch.Generator().manual_seed(0)
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        extra = width - inter
        if name.endswith((".w1.weight", ".w3.weight")):  # gate, up: [I, D] -> [W, D]
            std = float(t.float().std())
            t = torch.cat([t, (torch.randn(extra, t.shape[1], generator=g) * std).to(t.dtype)])
        elif name.endswith(".w2.weight"):  # down: [D, I] -> [D, W], zero columns
            t = torch.cat([t, torch.zeros(t.shape[0], extra, dtype=t.dtype)], dim=1)
        out[name] = t.contiguous()
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg["intermediate_size"] = width
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tmp.rename(dst)
    return dst


def widened_demo_store(width: int = 4096, root: Path = DEFAULT_DIR, dtype: str = "f32") -> Path:
    """The store of the widened demo (built once, converted like the demo store)."""
    store = root / f"demo-wide{width}-{dtype}.store"
    if (store / "manifest.json").is_file():
        return store
    ckpt = widened_checkpoint(width, root)
    convert(ckpt, store, dtype=dtype, force=True, progress=True)
    return store


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=4096)
    ap.add_argument("--dir", default=str(DEFAULT_DIR))
    ap.add_argument("--dtype", default="f32")
    args = ap.parse_args()
    print(widened_demo_store(args.width, Path(args.dir), args.dtype))


if __name__ == "__main__":
    main()
