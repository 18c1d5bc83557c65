"""A GGUF model as an expert store in the user cache directory, converted on first use.

``mer generate --model MODEL.gguf`` runs a GGUF file the way the demo runs its checkpoint
(``demo/store.py``): the file is converted once (with a progress bar) into a store under
``paths.cache_dir()/gguf/``, keyed by the file's resolved path, size, modification time and first
MiB, so a changed or replaced file is converted again and an unchanged one is reused.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..paths import cache_dir
from .gguf_file import GGUFFile


def _fingerprint(gf: GGUFFile) -> str:
    h = hashlib.sha256()
    for p in gf.parts:
        st = p.stat()
        h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def gguf_store_path(path: str | Path, requantize: str | None = None) -> Path:
    """The store for GGUF file ``path``, converting it on first use."""
    from .format import open_or_build
    from .gguf_convert import convert_gguf

    gf = GGUFFile(path)
    stem = gf.parts[0].name.removesuffix(".gguf")
    suffix = f"-{requantize}" if requantize else ""
    dst = cache_dir() / "gguf" / f"{stem}-{_fingerprint(gf)}{suffix}"
    return open_or_build(dst, str(path), lambda log: convert_gguf(path, dst, force=True, log=log,
                                                                requantize=requantize))
