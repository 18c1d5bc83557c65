"""The bundled demo model as an expert store, made on first use.

``mer generate`` with no ``--model`` runs the demo the way a user runs a large model: the bundled
checkpoint is converted once into a store under the user's cache directory
(``$MER_CACHE_DIR``, else ``$XDG_CACHE_HOME/micro-expert-router``, else
``~/.cache/micro-expert-router``), keyed by a hash of the checkpoint so an updated package never
reuses a stale store, and then streamed with a cache budget of a quarter of its expert bytes.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..paths import cache_dir
from . import demo_model_path

DEMO_CACHE_FRACTION = 0.25  # default expert-cache budget, as a fraction of the expert bytes


def _fingerprint(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        p = folder / name
        st = p.stat()
        h.update(f"{name}:{st.st_size}:".encode())
        with open(p, "rb") as f:
            h.update(f.read(1 << 20))  # size + first MiB identifies a shipped model well enough
    return h.hexdigest()[:12]


def demo_store_path(dtype: str = "f32") -> Path:
    """The demo store, converting the bundled checkpoint on first use."""
    from ..store import convert
    from ..store.format import open_or_build

    src = demo_model_path()
    dst = cache_dir() / f"demo-{dtype}-{_fingerprint(src)}"
    return open_or_build(dst, "the bundled demo model",
                         lambda log: convert(src, dst, dtype=dtype, force=True, log=log))


def default_cache_bytes(store_path: Path) -> int:
    from ..store import Store

    return int(Store.open(store_path).total_expert_bytes * DEMO_CACHE_FRACTION)
