"""The converter's parallel expert loop (store/experts.py): same bytes whatever the number of
workers, the error report sampled as stated, and a failing expert stopping the run cleanly."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from hf_models import ARCH_CONFIGS, run_cli
from safetensors.torch import load_file, save_file

from micro_expert_router.checkpoint import Checkpoint
from micro_expert_router.errors import ConfigError
from micro_expert_router.kernels import get_format
from micro_expert_router.store import convert
from micro_expert_router.store.experts import sample_every

FILES = ("experts-00000.bin", "dense.safetensors", "manifest.json")


def save_q4_model(folder, seed=0):
    """A tiny Qwen3-MoE (3 layers x 6 experts) with dimensions q4 accepts (multiples of 32)."""
    import transformers

    cls, kwargs = ARCH_CONFIGS["qwen3moe"]
    cfg = getattr(transformers, cls)(**{**kwargs, "moe_intermediate_size": 64})
    torch.manual_seed(seed)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(folder)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_q4_model(folder)
    return folder


@pytest.mark.parametrize("dtype", ["q4", "f32"])
def test_parallel_conversion_is_byte_identical_to_the_serial_path(ckpt, tmp_path, dtype):
    stores = {w: convert(ckpt, tmp_path / f"w{w}", dtype=dtype, progress=False, log=None,
                         workers=w, error_every=1)
              for w in (1, 2, 3)}  # fmt: skip
    for w in (2, 3):
        for name in FILES:
            assert (stores[w].path / name).read_bytes() == (stores[1].path / name).read_bytes(), (
                w, name)  # fmt: skip
    # and the serial path writes what the format's own pack makes of each expert
    s, src, fmt = stores[2], Checkpoint(ckpt, note=None), get_format(dtype)
    with open(s.path / "experts-00000.bin", "rb") as f:
        for (layer, e), entry in s.experts.items():
            f.seek(entry.offset)
            want = fmt.pack(*src.expert(layer, e), s.group).numpy().tobytes()
            assert f.read(entry.length) == want, (layer, e)
    assert s.verify() == []


def test_error_report_is_sampled_and_says_so(ckpt, tmp_path):
    lines: list[str] = []
    s = convert(ckpt, tmp_path / "s", dtype="q4", progress=False, log=lines.append,
                error_every=4)  # fmt: skip
    report = json.loads((s.path / "conversion_report.json").read_text())
    n = len(s.experts)  # 18, in store order: (0, 0) .. (0, 5), (1, 0) ..
    assert (report["sampled_every"], report["sampled"], report["of"]) == (4, 5, n)
    order = sorted(s.experts)
    assert [(x["layer"], x["expert"]) for x in report["experts"]] == order[::4]
    assert all(0 < x[k] < 0.2 for x in report["experts"] for k in ("gate", "up", "down"))
    assert any(f"over 5 experts (1 in 4 of {n})" in line for line in lines)
    full = convert(ckpt, tmp_path / "all", dtype="q4", progress=False, log=None)  # default
    assert json.loads((full.path / "conversion_report.json").read_text())["sampled"] == n
    assert sample_every(1024) == 32 and sample_every(18) == 1


def test_a_bad_expert_midway_stops_every_thread_and_leaves_no_store(ckpt, tmp_path):
    bad = tmp_path / "bad"
    save_q4_model(bad)
    tensors = load_file(str(bad / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.4.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    before, torch_threads = set(threading.enumerate()), torch.get_num_threads()
    with pytest.raises(ConfigError, match="expert 4 of layer 1: q4: up weights contain NaN"):
        convert(bad, tmp_path / "out", dtype="q4", progress=False, log=None, workers=2)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("mer-")]
    assert torch.get_num_threads() == torch_threads  # restored, not left at the pipeline's 1


def test_cli_refuses_zero_workers_or_sampling(ckpt, tmp_path):
    for flag in ("--workers", "--error-every"):
        p = run_cli("convert", ckpt, tmp_path / "out", "--quiet", flag, "0")
        assert p.returncode == 2 and f"{flag} must be at least 1" in p.stderr
    assert not (tmp_path / "out").exists()
