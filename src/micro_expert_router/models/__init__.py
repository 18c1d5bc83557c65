"""The building blocks of the forward pass, and the families assembled from them.

Blocks (shared by every family; see docs/design.md, "Model families and blocks"):

- ``norms.py``: RMSNorm.
- ``rope.py``: RoPE config keys, cos/sin tables (default, linear, YaRN), rotate-half or
  interleaved application over all or part of a head.
- ``mla.py``: multi-head latent attention with its compressed KV cache (absorbed and expanded
  decode). Grouped-query attention lives in ``model.py`` (``Transformer.qkv``/``attend``).
- ``routing.py``: routers (softmax top-k; DeepSeek's grouped / noaux_tc with softmax or sigmoid
  scores).

Families: a family file (``deepseek.py``, ``glm4_moe.py``) reads its config.json keys into
``ModelArgs`` fields (``config(cfg, where, kw)``) and, where its tensors differ from the GQA
layout, names them (``attention_shapes``). ``config.ArchSpec.family`` names the file; the
original four families need none.
"""

from __future__ import annotations

import importlib
from typing import Any


def family_module(family: str) -> Any:
    return importlib.import_module(f"{__name__}.{family}")


def family_config(family: str, cfg: dict[str, Any], where: str, kw: dict[str, Any]) -> dict:
    """The ModelArgs fields family ``family`` sets from its config keys (over ``kw``)."""
    return family_module(family).config(cfg, where, kw)


def transformer(args: Any, *rest: Any, **kw: Any) -> Any:
    """The model for ``args`` (``model.Transformer``'s arguments): the family's own
    ``transformer`` factory when its file has one, else ``Transformer``."""
    family = args.spec.family
    make = getattr(family_module(family), "transformer", None) if family else None
    if make is None:
        from ..model import Transformer

        make = Transformer
    return make(args, *rest, **kw)
