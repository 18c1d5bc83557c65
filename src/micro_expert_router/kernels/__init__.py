"""Expert weight formats and compute kernels (pure functions, each with a slow reference)."""

from .formats import FORMATS, ExpertFormat, choose_group, expert_forward, get_format

__all__ = ["FORMATS", "ExpertFormat", "choose_group", "expert_forward", "get_format"]
