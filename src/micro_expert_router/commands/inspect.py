"""``mer inspect``: summarize an expert store."""

from __future__ import annotations

import argparse
import json

HELP = "summarize an expert store (model, expert format, sizes, files)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("store", help="store folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(args: argparse.Namespace) -> int:
    from ..store import Store

    s = Store.open(args.store).summary()
    if args.json:
        print(json.dumps(s))
        return 0
    width = max(len(k) for k in s)
    for k, v in s.items():
        if isinstance(v, int) and k.endswith("bytes"):
            v = f"{v:,} bytes ({v / 1e6:.2f} MB)"
        print(f"{k:<{width}}  {v}")
    return 0
