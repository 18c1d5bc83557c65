"""Expert weight formats and compute kernels (pure functions, each with a slow reference)."""

from . import biased, ggml_formats, mxfp4, quant  # noqa: F401  (register the formats)
from .formats import FORMATS, ExpertFormat, choose_group, expert_forward, get_format

__all__ = ["FORMATS", "ExpertFormat", "choose_group", "expert_forward", "get_format"]
