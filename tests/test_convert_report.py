"""The converter's error report is ``kernels/quality.py``'s: every expert's relative L2 error
recomputed with ``quality.expert_error`` from the checkpoint, and the summary (mean, max and the
worst expert per matrix kind) is ``quality.error_stats`` of them."""

from __future__ import annotations

import json

import pytest
from hf_models import save_hf_model

from micro_expert_router.checkpoint import Checkpoint
from micro_expert_router.kernels import choose_group, get_format, quality
from micro_expert_router.store import convert


@pytest.mark.parametrize(("model", "dtype"), [("mixtral", "q4"), ("qwen3moe-plain", "bf16")])
def test_conversion_report_is_quality_py(tmp_path, model, dtype):
    save_hf_model(model, tmp_path / "ckpt")
    lines: list[str] = []
    store = convert(tmp_path / "ckpt", tmp_path / "store", dtype=dtype, progress=False,
                    log=lines.append)  # fmt: skip
    report = json.loads((store.path / "conversion_report.json").read_text())
    fmt = get_format(dtype)
    ckpt = Checkpoint(tmp_path / "ckpt")
    group = choose_group(fmt, ckpt.args.expert_inter)
    want = {}
    for row in report["experts"]:
        layer, e = row["layer"], row["expert"]
        gate, up, down = ckpt.expert(layer, e)
        q = quality.expert_error(fmt, fmt.pack(gate, up, down, group), gate, up, down, group)
        assert (row["gate"], row["up"], row["down"]) == tuple(q)
        want[f"layer {layer} expert {e}"] = q
    ckpt.close()
    assert len(want) == len(store.experts)
    assert report["summary"] == quality.error_stats(want)
    worst = report["summary"]["down"]["worst"]
    assert worst in want and want[worst].down == report["summary"]["down"]["max"] > 0
    logged = "\n".join(lines)  # the expert summary, then (q4/q8 dense) the dense line
    assert all(line in logged for line in quality.error_summary(want))
