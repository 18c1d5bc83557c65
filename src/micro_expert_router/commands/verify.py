"""``mer verify``: re-hash every expert extent of a store against its manifest."""

from __future__ import annotations

import argparse
import sys

HELP = "check every expert's checksum; exit non-zero naming each bad extent"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..store import Store

    store = Store.open(args.store)
    with tqdm(total=store.total_expert_bytes, unit="B", unit_scale=True, desc="verifying",
              disable=args.quiet, leave=False) as bar:  # fmt: skip
        bad = store.verify(progress=bar.update)
    for e in bad:
        print(f"BAD expert (layer {e.layer}, expert {e.expert}): {e.file} offset {e.offset} "
              f"length {e.length}: checksum mismatch", file=sys.stderr)  # fmt: skip
    n = len(store.experts)
    if bad:
        print(f"{len(bad)} of {n} experts are corrupt: reconvert the store", file=sys.stderr)
        return 1
    print(f"ok: {n} experts, {store.total_expert_bytes / 1e6:.1f} MB, all checksums match")
    return 0
