"""Expert weight formats and compute kernels (pure functions, each with a slow reference)."""

from . import ggml_formats, quant  # noqa: F401  (register the gguf:, q8 and q4 formats)
from .formats import FORMATS, ExpertFormat, choose_group, expert_forward, get_format

__all__ = ["FORMATS", "ExpertFormat", "choose_group", "expert_forward", "get_format"]
