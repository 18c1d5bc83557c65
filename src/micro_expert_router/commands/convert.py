"""``mer convert``: a HuggingFace checkpoint folder into an expert store."""

from __future__ import annotations

import argparse

HELP = "convert a HuggingFace MoE checkpoint folder into an expert store"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder (config.json + *.safetensors)")
    p.add_argument("dst", help="store folder to create")
    p.add_argument("--dtype", default="f32",
                   help="expert format: f32, bf16 (and q8, q4 where available)")  # fmt: skip
    p.add_argument("--dense", default=None,
                   help="dense weights (attention, shared experts, lm_head, embeddings): f32, "
                   "bf16, q8 or q4; default: the expert format (f32, bf16, q8, q4). Routers and "
                   "norms stay exact")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..kernels import FORMATS
    from ..store import convert
    from ..store.dense import choose_dense

    if args.dtype not in FORMATS:
        raise ConfigError(f"--dtype {args.dtype!r} is not a known expert format; choose one of "
                          f"{', '.join(sorted(FORMATS))}")  # fmt: skip
    choose_dense(args.dense, args.dtype)  # a bad --dense fails before any work
    convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet,
            dense=args.dense)  # fmt: skip
    return 0
