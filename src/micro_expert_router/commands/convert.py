"""``mer convert``: a HuggingFace checkpoint folder into an expert store."""

from __future__ import annotations

import argparse

HELP = "convert a HuggingFace MoE checkpoint folder or a GGUF file into an expert store"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="checkpoint folder (config.json + *.safetensors), or a GGUF "
                   "file (the first part of a split one), converted losslessly")  # fmt: skip
    p.add_argument("dst", help="store folder to create")
    p.add_argument("--dtype", default="f32",
                   help="expert format: f32, bf16 (and q8, q4 where available)")  # fmt: skip
    p.add_argument("--dense", default=None,
                   help="dense weights (attention, shared experts, lm_head, embeddings): f32, "
                   "bf16, q8 or q4; default: the expert format (f32, bf16, q8, q4). Routers and "
                   "norms stay exact")  # fmt: skip
    p.add_argument("--force", action="store_true", help="replace an existing destination")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--requantize", choices=["q8"], default=None,
                   help="GGUF only: turn tensors of block types MER does not compute on into "
                   "Q8_0 (lossy; the error is reported per tensor)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None,
                   help="expert packing threads (default: one per core, at most 4); the output "
                        "is the same for any value")  # fmt: skip
    p.add_argument("--error-every", type=int, default=None, metavar="N",
                   help="measure the conversion error of every N-th expert (default: about 32 "
                        "experts over all layers; 1: every expert)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..kernels import FORMATS
    from ..store import convert
    from ..store.dense import choose_dense
    from ..store.gguf_convert import convert_gguf, is_gguf

    if is_gguf(args.src) or str(args.src).endswith(".gguf"):
        convert_gguf(args.src, args.dst, force=args.force, progress=not args.quiet,
                     requantize=args.requantize)  # fmt: skip
        return 0
    if args.requantize is not None:
        raise ConfigError("--requantize applies to GGUF files only")
    if args.dtype not in FORMATS:
        raise ConfigError(f"--dtype {args.dtype!r} is not a known expert format; choose one of "
                          f"{', '.join(sorted(FORMATS))}")  # fmt: skip
    for flag, value in (("--workers", args.workers), ("--error-every", args.error_every)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be at least 1, got {value}")
    choose_dense(args.dense, args.dtype)  # a bad --dense fails before any work
    convert(args.src, args.dst, dtype=args.dtype, force=args.force, progress=not args.quiet,
            dense=args.dense, workers=args.workers, error_every=args.error_every)  # fmt: skip
    return 0
