"""The checkpoint reader: positional reads from threads, fused expert tensors read one expert at a
time, and safetensors headers that lie."""

from __future__ import annotations

import json
import struct
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from hf_models import save_hf_model
from safetensors.torch import load_file, save_file

from micro_expert_router.checkpoint import Checkpoint
from micro_expert_router.errors import CheckpointError


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    f = tmp_path_factory.mktemp("ckpt")
    save_hf_model("qwen3moe", f)  # 3 layers x 6 experts, per-expert tensors
    return f


def test_reads_equal_safetensors_and_are_thread_safe(folder):
    ref = load_file(str(folder / "model.safetensors"))
    ck = Checkpoint(folder, note=None)
    names = sorted(ref)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ck.get, names * 3))
    for name, t in zip(names * 3, got, strict=True):
        assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), name
    ck.close()


def test_fused_expert_tensors_read_one_expert(folder, tmp_path):
    ref = load_file(str(folder / "model.safetensors"))
    ck = Checkpoint(folder, note=None)
    a = ck.args
    fused = {k: v for k, v in ref.items() if ".experts." not in k}
    for layer in range(a.n_layers):
        p = f"model.layers.{layer}.mlp.experts"
        fused[f"{p}.gate_up_proj"] = torch.stack([
            torch.cat([ref[f"{p}.{e}.gate_proj.weight"], ref[f"{p}.{e}.up_proj.weight"]])
            for e in range(a.n_experts)])  # [E, 2I, D]  # fmt: skip
        fused[f"{p}.down_proj"] = torch.stack(
            [ref[f"{p}.{e}.down_proj.weight"] for e in range(a.n_experts)]
        )  # [E, D, I]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(fused, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    fk = Checkpoint(tmp_path, note=None)
    for layer in range(a.n_layers):
        for e in range(a.n_experts):
            for x, y in zip(fk.expert(layer, e), ck.expert(layer, e), strict=True):
                assert torch.equal(x, y), (layer, e)
    assert fk.expert_names(1, 4) == [("model.layers.1.mlp.experts.gate_up_proj", 4),
                                     ("model.layers.1.mlp.experts.down_proj", 4)]  # fmt: skip


def rewrite_header(src, dst, edit):
    raw = src.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    dst.write_bytes(struct.pack("<Q", len(h)) + h + raw[8 + n :])


@pytest.mark.parametrize(("edit", "message"), [
    (lambda h: h["lm_head.weight"].update(shape=[3, 3]), "of F32 needs 36"),
    (lambda h: h["lm_head.weight"].pop("data_offsets"), "lm_head.weight has no valid data_offsets"),
    (lambda h: h["lm_head.weight"].update(data_offsets=[8, 4]), r"ends \(byte 4\) before"),
    (lambda h: h["lm_head.weight"].update(dtype="F4"), "dtype F4, which MER cannot read"),
])  # fmt: skip
def test_lying_headers_are_named(folder, tmp_path, edit, message):
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    rewrite_header(folder / "model.safetensors", tmp_path / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(tmp_path, note=None).get("lm_head.weight")
