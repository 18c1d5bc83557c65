"""RMSNorm, the one norm the supported families use: ``kernels.layer_ops.rms_norm`` (native
for float32 activations, else transformers' expression), re-exported so every block and
``model.py`` normalize through the same function."""

from __future__ import annotations

from ..kernels.layer_ops import rms_norm

__all__ = ["rms_norm"]
