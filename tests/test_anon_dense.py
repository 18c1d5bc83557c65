"""Dense weights in anonymous memory (io/bulk.py, store/dense.py): after ``load`` nothing maps
the store's files, the tensors hold exactly the stored bytes (so generation is bit-for-bit what
the mapped load gave), ``read_ranges`` fills unaligned ranges through small windows and
cleans up on errors, and ``generate`` reports major faults per decode token."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from hf_models import save_hf_model
from safetensors import safe_open

import micro_expert_router as mer
from micro_expert_router.engine import Summary
from micro_expert_router.errors import ReadError, StoreError
from micro_expert_router.io import DirectReader
from micro_expert_router.io.bulk import read_ranges
from micro_expert_router.kernels.dense_quant import Q4Blocked, from_parts
from micro_expert_router.model import Transformer
from micro_expert_router.store import convert
from micro_expert_router.store.dense import PART_DTYPES


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt")
    save_hf_model("qwen2moe", folder)
    return folder


def _mapped(folder) -> list[str]:
    """Lines of /proc/self/maps that map a file of ``folder``."""
    root = str(folder.resolve())
    with open("/proc/self/maps") as f:
        return [line for line in f if root in line]


def _mapped_dense(store, dtype):
    """The dense weights the way they were loaded before (safetensors over a mapping)."""
    entry, fmt = store.manifest["dense"], store.dense_format
    qset = set(entry.get("quantized", []))
    out = {}
    with safe_open(str(store.dense_file), framework="pt") as f:
        for name in f.keys():
            base, _, sfx = name.rpartition(".")
            if base in qset:
                if sfx == PART_DTYPES[fmt][0][0]:
                    out[base] = from_parts(fmt, {s: f.get_tensor(f"{base}.{s}").clone()
                                                 for s, _ in PART_DTYPES[fmt]})  # fmt: skip
            else:
                out[name] = f.get_tensor(name).to(dtype).clone()
    return out


@pytest.mark.parametrize("dense", ["f32", "bf16", "q4"])
def test_dense_is_anonymous_and_bit_identical(ckpt, tmp_path, dense):
    store = convert(ckpt, tmp_path / "s", dtype="q8", dense=dense, progress=False, log=None)
    with mer.load(store.path, dtype="float32") as eng:
        assert _mapped(store.path) == [], "a store file is still mapped after load"
        want = _mapped_dense(store, torch.float32)
        assert set(want) == set(eng.model.w)
        for name, w in want.items():
            got = eng.model.w[name]
            if isinstance(w, torch.Tensor):
                assert got.dtype == w.dtype and torch.equal(got, w), name
            elif isinstance(got, Q4Blocked):  # repacked in RAM for the decode GEMV
                exp = type(w)(*(t.clone() for t in w.parts().values())).blocked()
                assert torch.equal(got.packed, exp.packed), name
                assert torch.equal(got.sz.contiguous(), exp.sz), name
            else:
                for key, part in w.parts().items():
                    assert torch.equal(got.parts()[key], part), f"{name}.{key}"
        ids = [3, 1, 4, 1, 5]
        logits = eng.logits(ids)
        streamed = [s.token for s in eng.generate(ids, max_tokens=6, temperature=0)]
        m = eng.model  # the same engine over the old, mapped load: the same bits everywhere
        eng.model = Transformer(eng.args, want, m.provider, m.dtype, m.max_context, m.kv_dtype)
        try:
            assert (eng.logits(ids) == logits).all()
            assert [s.token for s in eng.generate(ids, max_tokens=6, temperature=0)] == streamed
        finally:
            eng.model = m


def test_generate_reports_major_faults_per_token(ckpt, tmp_path):
    store = convert(ckpt, tmp_path / "s", dtype="q4", progress=False, log=None)
    with mer.load(store.path) as eng:
        summary = Summary()
        for step in eng.generate([1, 2, 3], max_tokens=5, temperature=0, stop_at_eos=False):
            assert step.major_faults >= 0
            summary.add(step)
    d = summary.as_dict()
    assert d["decode_major_faults"] <= d["major_faults"]
    assert d["major_faults_per_token"] == d["decode_major_faults"] / 4


def _file(tmp_path, n: int):
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=gen)
    path = tmp_path / "blob.bin"
    path.write_bytes(data.numpy().tobytes())
    return path, data


@pytest.mark.parametrize("window", [4096, 3 * 4096, 1 << 20])
def test_read_ranges_fills_unaligned_ranges(tmp_path, window):
    path, data = _file(tmp_path, 200_003)
    spans = [(7, 1000), (1007, 5), (20_000, 33_333), (100_001, 4096), (150_000, 50_003), (90, 0)]
    dests = [torch.empty(n // 2, dtype=torch.bfloat16) if n % 2 == 0 and n else
             torch.empty(n, dtype=torch.uint8) for _, n in spans]  # fmt: skip
    ranges = list(zip([o for o, _ in spans[::-1]], dests[::-1], strict=True))  # any order
    done: list[int] = []
    got = read_ranges(path, ranges, done.append, window_bytes=window, slots=2)
    assert sorted(done) == list(range(len(spans))) and done[0] == 0  # the empty one first
    ends = [ranges[i][0] + ranges[i][1].nbytes for i in done]
    assert ends[1:] == sorted(ends[1:])  # completion in order of the ranges' ends
    for off, dst in ranges:
        assert torch.equal(dst.view(-1).view(torch.uint8), data[off : off + dst.nbytes])
    assert got >= sum(n for _, n in spans)


def test_read_ranges_truncated_file_is_a_named_error(tmp_path):
    path, _ = _file(tmp_path, 10_000)
    reader = DirectReader(threads=2)
    try:
        with pytest.raises(ReadError, match="truncated"):
            read_ranges(path, [(0, torch.empty(8_000, dtype=torch.uint8)),
                               (9_000, torch.empty(5_000, dtype=torch.uint8))],
                        reader=reader, window_bytes=4096, slots=3)  # fmt: skip
    finally:
        reader.close()  # the autouse fixture then checks no slot is still leased


def test_read_ranges_rejects_overlaps(tmp_path):
    path, _ = _file(tmp_path, 10_000)
    with pytest.raises(ValueError, match="overlap"):
        read_ranges(path, [(0, torch.empty(100, dtype=torch.uint8)),
                           (50, torch.empty(100, dtype=torch.uint8))])  # fmt: skip


def test_dense_loads_where_o_direct_is_refused(ckpt, tmp_path, monkeypatch):
    store = convert(ckpt, tmp_path / "s", dtype="q8", dense="q8", progress=False, log=None)
    want = _mapped_dense(store, torch.float32)
    real_open = os.open

    def no_direct(path, flags, *args):  # a filesystem that refuses O_DIRECT (tmpfs)
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    monkeypatch.setattr(os, "open", no_direct)
    got = store.load_dense(torch.float32)
    for name, w in want.items():
        if isinstance(w, torch.Tensor):
            assert torch.equal(got[name], w)
        else:
            assert all(torch.equal(got[name].parts()[k], p) for k, p in w.parts().items())


def test_truncated_dense_file_is_a_store_error(ckpt, tmp_path):
    store = convert(ckpt, tmp_path / "s", dtype="q8", progress=False, log=None)
    size = store.dense_file.stat().st_size
    with open(store.dense_file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(StoreError, match="dense"):
        store.load_dense(torch.float32)
