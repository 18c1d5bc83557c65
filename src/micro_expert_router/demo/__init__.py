"""The bundled demo model: where it lives inside the installed package.

Owns only the location of ``demo/model/``, a Hugging Face checkpoint folder (``config.json``,
``model.safetensors``, tokenizer files) of a small Mixtral trained on Debian's fortune cookies by
``scripts/train_demo.py`` (figures and provenance: ``docs/demo-model.md``). Loading, converting
and running it is the engine's job, exactly as for a user's checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

_MODEL_DIR = Path(__file__).resolve().parent / "model"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json")


def demo_model_path() -> Path:
    """The folder of the bundled demo checkpoint; raises CheckpointError if files are missing."""
    missing = [name for name in _REQUIRED if not (_MODEL_DIR / name).is_file()]
    if missing:
        raise CheckpointError(
            f"the bundled demo model at {_MODEL_DIR} lacks {', '.join(missing)}: the package "
            "install is incomplete; reinstall micro-expert-router (pip install -e . from a full "
            "clone), or rebuild the folder with scripts/train_demo.py, or pass --model PATH"
        )
    return _MODEL_DIR
