"""The on-disk expert store: format (``format.py``: manifest, reader, verification) and the
converter from HuggingFace checkpoints (``convert.py``). Layout and rules: ``docs/store.md``."""

from .convert import convert
from .format import FORMAT_NAME, FORMAT_VERSION, ExpertEntry, Store

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "ExpertEntry", "Store", "convert"]
