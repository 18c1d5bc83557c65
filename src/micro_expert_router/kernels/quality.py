"""How much a quantized format loses: per-tensor weight error and model-level quality metrics.

- ``expert_error``: relative L2 error ``||w_q - w|| / ||w||`` of gate, up and down of one packed
  expert, computed from the format's reference ``unpack``; ``error_stats`` and
  ``error_summary`` condense many of them into the converter's report and the lines it prints
  (the one implementation: ``store/convert.py`` calls these).
- ``roundtrip``: the dense weights a format actually computes with (quantize, then dequantize),
  for evaluating a model "fake-quantized" in float32.
- ``top1_agreement`` and ``perplexity``: next-token agreement with a float32 reference and
  perplexity on held-out text, from logits (the acceptance metrics for q8 and q4).

Legend: I intermediate, D hidden, N positions, V vocabulary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import NamedTuple

import torch

from ..errors import ConfigError
from .formats import ExpertFormat


class QuantError(NamedTuple):
    """Relative L2 error of each weight matrix of one expert."""

    gate: float
    up: float
    down: float


def rel_l2(exact: torch.Tensor, approx: torch.Tensor) -> float:
    """``||approx - exact|| / ||exact||`` in float64 (0 if both are zero, inf if only exact is)."""
    if exact.shape != approx.shape:
        raise ConfigError(f"cannot compare shapes {tuple(exact.shape)} and {tuple(approx.shape)}")
    e, a = exact.double(), approx.double()
    num, den = float(torch.linalg.vector_norm(a - e)), float(torch.linalg.vector_norm(e))
    if den == 0:
        return 0.0 if num == 0 else math.inf
    return num / den


def expert_error(
    fmt: ExpertFormat,
    buf: torch.Tensor,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    group: int,
) -> QuantError:
    """Error of a packed expert ``buf`` against the dense weights it was packed from."""
    inter, hidden = gate.shape
    qg, qu, qd = fmt.unpack(buf, hidden, inter, group)
    return QuantError(rel_l2(gate, qg), rel_l2(up, qu), rel_l2(down, qd))


def roundtrip(
    fmt: ExpertFormat, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dequantized ``(gate [I, D], up [I, D], down [D, I])`` float32 after packing with ``fmt``."""
    inter, hidden = gate.shape
    return fmt.unpack(fmt.pack(gate, up, down, group), hidden, inter, group)


def error_stats(errors: Mapping[str, QuantError]) -> dict[str, dict[str, float | str]]:
    """Per matrix kind: ``mean`` and ``max`` relative L2 over experts and the ``worst`` one's
    name (the converter's ``conversion_report.json`` summary)."""
    out: dict[str, dict[str, float | str]] = {}
    for kind in QuantError._fields:
        vals = {name: getattr(e, kind) for name, e in errors.items()}
        worst = max(vals, key=vals.__getitem__) if vals else ""
        out[kind] = {"mean": sum(vals.values()) / len(vals) if vals else 0.0,
                     "max": vals[worst] if vals else 0.0, "worst": worst}  # fmt: skip
    return out


def error_summary(errors: Mapping[str, QuantError]) -> list[str]:
    """One line per matrix kind: mean and max relative L2 over experts, and where the max is."""
    if not errors:
        return ["no experts quantized"]
    return [f"{kind:>4}: relative L2 error mean {st['mean']:.4f}, max {st['max']:.4f} "
            f"({st['worst']}), {len(errors)} experts"
            for kind, st in error_stats(errors).items()]  # fmt: skip


def top1_agreement(ref_logits: torch.Tensor, test_logits: torch.Tensor) -> float:
    """Fraction of positions whose argmax token is the same: ``[..., V]`` each."""
    if ref_logits.shape != test_logits.shape or ref_logits.numel() == 0:
        raise ConfigError(
            f"logit shapes differ or are empty: {tuple(ref_logits.shape)} vs "
            f"{tuple(test_logits.shape)}"
        )
    same = ref_logits.argmax(-1) == test_logits.argmax(-1)
    return float(same.double().mean())


def perplexity(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """``exp(mean(-log p(target)))`` over positions: logits ``[N, V]``, targets ``[N]`` (token
    ids; the caller shifts them so that row i predicts targets[i])."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1] or targets.numel() == 0:
        raise ConfigError(
            f"perplexity needs logits [N, V] and targets [N], got {tuple(logits.shape)} and "
            f"{tuple(targets.shape)}"
        )
    logp = torch.log_softmax(logits.double(), dim=-1)  # [N, V]
    nll = -logp.gather(1, targets.long()[:, None]).mean()
    return float(torch.exp(nll))
