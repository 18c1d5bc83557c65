"""Where the engine keeps files it makes for the user: the converted demo store, recorded demo
traces and the compiled native kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MER_CACHE_DIR``, else ``$XDG_CACHE_HOME/micro-expert-router``, else
    ``~/.cache/micro-expert-router`` (not created here)."""
    root = os.environ.get("MER_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "micro-expert-router"
