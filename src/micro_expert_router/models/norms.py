"""RMSNorm, the one norm the supported families use (transformers' ``*RMSNorm``: float32
statistics, the weight applied in the input's dtype)."""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """``x [..., N]`` normalized over its last dim, times ``w [N]``."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return w * xf.to(x.dtype)
