"""The expert store: conversion, layout rules, verification and every kind of bad store."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from hf_models import run_cli, save_hf_model

import micro_expert_router as mer
from micro_expert_router.checkpoint import Checkpoint
from micro_expert_router.errors import MERError, StoreError
from micro_expert_router.store import Store, convert


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_hf_model("qwen2moe", folder)
    return folder


@pytest.fixture
def store(ckpt, tmp_path):
    return convert(ckpt, tmp_path / "store", progress=False, log=None).path


def test_layout_aligned_bundled_and_checksummed(ckpt, store):
    s = Store.open(store)
    src = Checkpoint(ckpt)
    a = s.args
    for (layer, e), entry in s.experts.items():
        assert entry.offset % 4096 == 0
        with open(entry.file, "rb") as f:
            f.seek(entry.offset)
            buf = torch.frombuffer(bytearray(f.read(entry.length)), dtype=torch.uint8)
        gate, up, down = s.format.unpack(buf, a.hidden_size, a.expert_inter, s.group)
        g0, u0, d0 = src.expert(layer, e)
        assert torch.equal(gate, g0) and torch.equal(up, u0) and torch.equal(down, d0)
    assert s.verify() == []
    p = run_cli("verify", store)
    assert p.returncode == 0 and "all checksums match" in p.stdout
    p = run_cli("inspect", store, "--json")
    assert json.loads(p.stdout)["architecture"] == "Qwen2MoeForCausalLM"


def test_flipped_byte_named_by_verify_and_refused_on_load(store):
    s = Store.open(store)
    victim = s.experts[(2, 5)]
    with open(victim.file, "r+b") as f:
        f.seek(victim.offset + 1000)
        b = f.read(1)
        f.seek(victim.offset + 1000)
        f.write(bytes([b[0] ^ 0x10]))
    p = run_cli("verify", store)
    assert p.returncode == 1
    assert "layer 2, expert 5" in p.stderr and str(victim.offset) in p.stderr
    engine = mer.load(store, cache_bytes=0, verify=True)
    with pytest.raises(StoreError, match=r"expert \(2, 5\) .* fails its checksum"):
        for _ in range(50):  # route until expert (2, 5) is needed
            engine.logits(list(range(0, 128)))
    engine.close()
    p = run_cli("generate", "--model", store, "--prompt-ids", ",".join(map(str, range(128))),
            "--max-tokens", "1", "--verify", "--cache-mb", "0")  # fmt: skip
    assert p.returncode != 0 and "fails its checksum" in p.stderr


def test_truncated_expert_file(store):
    f = store / "experts-00000.bin"
    os.truncate(f, f.stat().st_size - 5000)
    with pytest.raises(StoreError, match="experts-00000.bin: truncated"):
        mer.load(store)
    p = run_cli("generate", "--model", store, "--prompt-ids", "1")
    assert p.returncode != 0 and "truncated" in p.stderr


@pytest.mark.parametrize("edit,message", [
    (lambda m: m.pop("experts"), "missing key.*experts"),
    (lambda m: m.pop("group"), "missing key.*group"),
    (lambda m: m.update(version=99), "version 99 is newer"),
    (lambda m: m.update(format="something-else"), "not an MER expert store"),
    (lambda m: m.update(expert_format="q3"), "unknown expert format 'q3'"),
])  # fmt: skip
def test_bad_manifest(store, edit, message):
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(StoreError, match=message):
        mer.load(store)
    p = run_cli("inspect", store)
    assert p.returncode != 0 and "manifest.json" in p.stderr


def test_not_a_store(tmp_path):
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "manifest.json").write_text("[1, 2")
    with pytest.raises(StoreError, match="not valid JSON"):
        Store.open(tmp_path / "junk")
    p = run_cli("verify", tmp_path)
    assert p.returncode != 0 and "not an expert store" in p.stderr


def test_existing_destination_needs_force(ckpt, store):
    with pytest.raises(StoreError, match="already exists"):
        convert(ckpt, store, log=None, progress=False)
    convert(ckpt, store, force=True, log=None, progress=False)
    Store.open(store)


def test_killed_conversion_leaves_nothing_loadable(tmp_path):
    # a checkpoint big enough that conversion takes a while
    big = tmp_path / "big"
    save_hf_model("qwen3moe", big)
    cfg = json.loads((big / "config.json").read_text())
    cfg.update(hidden_size=256, moe_intermediate_size=512, num_experts=32, head_dim=64,
               num_hidden_layers=4)  # fmt: skip
    import transformers

    model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen3MoeConfig(**cfg))
    model.save_pretrained(big)
    dst = tmp_path / "out"
    cmd = [sys.executable, "-m", "micro_expert_router.cli", "convert", big, dst, "--quiet",
           "--force"]  # fmt: skip
    subprocess.run(cmd, check=True, capture_output=True, timeout=300)
    reference = json.loads((dst / "manifest.json").read_text())["experts"]
    total = (dst / "experts-00000.bin").stat().st_size

    def partial():
        return next(iter(tmp_path.glob(".out.partial-*")), None)

    def expert_bytes():
        p = partial()
        f = p / "experts-00000.bin" if p else None
        return f.stat().st_size if f and f.exists() else 0

    moments = {  # kill as soon as the conversion reaches each of these points
        "folder created": lambda: partial() is not None,
        "first experts written": lambda: expert_bytes() > 0,
        "half the experts written": lambda: expert_bytes() > total // 2,
        # one look at the partial folder: it may be renamed into place between two
        "manifest being put in place": lambda: (
            (p := partial()) is not None and (p / "manifest.json.partial").exists()
        ) or dst.exists(),
    }  # fmt: skip
    refused = 0
    for name, reached in moments.items():
        # (with an existing store, --force keeps the old one valid until the new one is
        # renamed into place; start from none so any loadable folder is this run's own)
        shutil.rmtree(dst, ignore_errors=True)
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not reached():
            time.sleep(0.0005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for folder in [dst, *tmp_path.glob(".out.partial-*")]:
            if not folder.exists():
                continue
            try:
                mer.load(folder).close()
            except MERError:
                refused += 1
                continue
            # it loaded: then the kill came after the conversion had finished, and the store
            # must be the complete one, every extent intact
            assert folder == dst, name
            assert json.loads((dst / "manifest.json").read_text())["experts"] == reference
            assert Store.open(dst).verify() == []
    assert refused >= 2, "the kills did not land inside the conversion"
    p = run_cli("convert", big, dst, "--quiet", "--force")
    assert p.returncode == 0, p.stderr
    assert not list(tmp_path.glob(".out.partial-*"))
    assert Store.open(dst).verify() == []
