"""Manifests and safetensors headers that parse but are wrong: each gives a ``StoreError`` (or a
``CheckpointError`` for a checkpoint's shard) naming the file and the problem, never a Python
exception of another type. One case per finding of issue 17's review, plus the neighbours the
section checkers cover."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hf_models import save_hf_model

from micro_expert_router.checkpoint import Checkpoint, read_safetensors_header
from micro_expert_router.errors import CheckpointError, StoreError
from micro_expert_router.store import Store, convert


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    save_hf_model("mixtral", root / "ckpt")
    convert(root / "ckpt", root / "store", progress=False, log=None)
    return root


@pytest.fixture
def store(made, tmp_path):
    """A fresh copy of the store (its expert file hard-linked: the tests edit only the rest)."""
    dst = tmp_path / "store"
    dst.mkdir()
    for f in (made / "store").iterdir():
        if f.suffix == ".bin":
            os.link(f, dst / f.name)
        else:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def edit_manifest(store, edit):
    path = store / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))


def swap_offsets(m):
    a, b = m["experts"][0], m["experts"][1]
    b["offset"] = a["offset"]


def set_first(key, value):
    return lambda m: m["experts"][0].update({key: value})


CASES = {
    # the review's findings
    "group zero": (lambda m: m.update(group=0), r"group: .* >= 1, not 0"),
    "group a string": (lambda m: m.update(group="abc"), r"group: .*not 'abc'"),
    "dense a string": (lambda m: m.update(dense="dense.safetensors"), r"dense: expected an obj"),
    "dense a list": (lambda m: m.update(dense=[1]), r"dense: expected an object"),
    "experts an object": (lambda m: m.update(experts={}), r"experts: expected a list"),
    "negative offset": (set_first("offset", -4096), r"experts: entry 0: .*>= 0"),
    "version a string": (lambda m: m.update(version="1"), r"bad store format version '1'"),
    "overlapping extents": (swap_offsets, r"experts \(\d+, \d+\) and \(\d+, \d+\) overlap"),
    # neighbours
    "group not dividing the width": (lambda m: m.update(group=7), r"does not divide"),
    "bool offset": (set_first("offset", True), r"entry 0: .*whole numbers"),
    "float offset": (set_first("offset", 4096.5), r"entry 0: .*whole numbers"),
    "file index -1": (set_first("file", -1), r"entry 0: .*>= 0"),
    "file index out of range": (set_first("file", 3), r"file index 3 is out of range"),
    "xxh3 a number": (set_first("xxh3", 12), r"xxh3 12 is not 16 hex digits"),
    "entry a list": (lambda m: m["experts"].__setitem__(0, [0, 0]), r"entry 0 must be an obj"),
    "duplicate expert": (
        lambda m: m["experts"][1].update(layer=m["experts"][0]["layer"],
                                         expert=m["experts"][0]["expert"]),
        r"does not name every routed expert once"),
    "expert file outside the store": (
        lambda m: m.update(expert_files=["../elsewhere.bin"]), r"expert_files: .*file names"),
    "dense file outside the store": (
        lambda m: m["dense"].update(file="/etc/passwd"), r"dense: file .* inside the store"),
    "dense dtype unknown": (lambda m: m["dense"].update(dtype="int3"), r"dense: dtype 'int3'"),
    "dense without dtype": (lambda m: m["dense"].pop("dtype"), r"dense: field 'dtype' is miss"),
    "model a list": (lambda m: m.update(model=[]), r"model: expected an object"),
    "model hidden_size a string": (
        lambda m: m["model"].update(hidden_size="64"), r"'hidden_size' = '64' is not of type"),
    "model n_layers zero": (lambda m: m["model"].update(n_layers=0), r"'n_layers' = 0 must be"),
    "model unknown key": (lambda m: m["model"].update(colour=1), r"unknown model argument"),
    "moe_layers too short": (
        lambda m: m["model"].update(moe_layers=[True]), r"moe_layers must flag each"),
    "expert_format a list": (lambda m: m.update(expert_format=["f32"]), r"expert_format: "),
    "layout a number": (lambda m: m.update(layout=3), r"layout: expected a layout tag"),
    "table too short": (lambda m: m["experts"].pop(), r"has \d+ entries, the model has \d+"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(CASES))
def test_malformed_manifest_is_a_store_error(store, name):
    edit, message = CASES[name]
    edit_manifest(store, edit)
    with pytest.raises(StoreError, match=message) as e:
        Store.open(store)
    assert "manifest.json" in str(e.value)


def test_version_string_is_not_called_newer(store):
    edit_manifest(store, lambda m: m.update(version="1"))
    with pytest.raises(StoreError) as e:
        Store.open(store)
    assert "newer" not in str(e.value)


def test_unreadable_manifest_is_a_store_error(store):
    # /proc/self/mem is a regular file whose read at offset 0 fails with EIO: a real OSError
    # from a real read (chmod would not do, the tests may run as root)
    (store / "manifest.json").unlink()
    (store / "manifest.json").symlink_to("/proc/self/mem")
    with pytest.raises(StoreError, match=r"cannot read the manifest \(Input/output error\)"):
        Store.open(store)


def write_header(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HEADERS = {
    "a JSON list": ([1, 2], r"a JSON list, not an object"),
    "a JSON string": ("x", r"a JSON str, not an object"),
    "an entry without data_offsets": ({"t": {"dtype": "F32", "shape": [2]}},
                                      r"tensor t has no valid data_offsets"),
    "an entry that is a number": ({"t": 5}, r"tensor t has no dtype, shape"),
    "end before start": ({"t": {**F32_2, "data_offsets": [8, 0]}},
                         r"tensor t ends \(byte 0\) before it starts \(byte 8\)"),
    "negative offset": ({"t": {**F32_2, "data_offsets": [-8, 0]}}, r"no valid data_offsets"),
    "size not the shape's": ({"t": {**F32_2, "shape": [3]}}, r"spans 8 bytes but its shape"),
    "shape of strings": ({"t": {**F32_2, "shape": ["2"]}}, r"no valid shape"),
    "overlapping tensors": ({"t": F32_2, "u": F32_2}, r"tensors t and u overlap"),
    "beyond the file": ({"t": {**F32_2, "shape": [4], "data_offsets": [0, 16]}},
                        r"tensor t ends at byte \d+ but the file has"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(HEADERS))
def test_malformed_dense_header_is_a_store_error(store, name):
    header, message = HEADERS[name]
    write_header(store / "dense.safetensors", header, b"\0" * 8)
    s = Store.open(store)
    with pytest.raises(StoreError, match=message):
        s.load_dense(torch.float32)


@pytest.mark.parametrize("name", list(HEADERS))
def test_malformed_checkpoint_header_is_a_checkpoint_error(made, tmp_path, name):
    header, message = HEADERS[name]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_bytes((made / "ckpt" / "config.json").read_bytes())
    write_header(ckpt / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=message):
        Checkpoint(ckpt)


def test_good_headers_still_read(made):
    h = read_safetensors_header(made / "store" / "dense.safetensors")
    assert h and all(t["nbytes"] > 0 for t in h.values())
    assert Checkpoint(made / "ckpt").weight_map
