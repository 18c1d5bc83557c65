"""Converting a GGUF model into an expert store, losslessly.

Routed experts keep their GGUF blocks byte for byte, rearranged into the bundled groups of a
``gguf:GATE/UP/DOWN`` expert format (``kernels/ggml_formats.py``); stacked expert tensors are
split per expert. Dense tensors keep their GGUF type too: they are written, under their
HuggingFace names, to ``dense.gguf`` (a GGUF file; q/k rows of ``llama`` files un-permuted, whole
rows at a time), and the manifest's dense section says ``"format": "gguf"`` so that
``Store.load_dense`` hands them to ``gguf_dense.load_gguf_dense``. The tokenizer is rebuilt from
the ``tokenizer.ggml.*`` metadata (``gguf_tokenizer.py``).

A tensor of a type MER cannot compute on is an error naming it; with ``requantize="q8"`` it is
dequantized by gguf-py and requantized to Q8_0, and its error (relative L2) goes into
``conversion_report.json``. The folder is written as ``convert.py`` writes one: a hidden partial
folder, fsynced, renamed into place, the manifest renamed last.
"""

from __future__ import annotations

import json
import mmap
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import GGUFError, StoreError
from ..kernels import choose_group
from ..kernels.ggml import TYPES, BlockType
from ..kernels.ggml_formats import GGUFExperts
from ..kernels.quality import rel_l2
from .convert import EXPERT_FILE, _progress
from .experts import Packed, default_workers, write_extents
from .format import FORMAT_NAME, FORMAT_VERSION, Store, checksum, place_store
from .gguf_families import SplitKvB, kv_b
from .gguf_file import PAGE, GGUFFile, TensorInfo
from .gguf_model import dense_tensors, expert_tensors, model_args, unpermute_rows

DENSE_GGUF = "dense.gguf"
REQUANTIZE = ("q8",)
BATCH_BYTES = 32 << 20  # per stacked expert tensor and read
BUFFER = BATCH_BYTES + 2 * PAGE  # a read buffer: a batch and the pages around it


def is_gguf(path: str | Path) -> bool:
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == b"GGUF"


class _Source:
    """Reads tensors from the GGUF, requantizing unsupported types when asked."""

    def __init__(self, gf: GGUFFile, requantize: str | None, args: Any = None) -> None:
        if requantize is not None and requantize not in REQUANTIZE:
            raise StoreError(f"--requantize {requantize!r}: only {', '.join(REQUANTIZE)} is "
                             "supported")  # fmt: skip
        self.gf, self.requantize, self.args = gf, requantize, args
        self.report: list[dict[str, Any]] = []

    def type_of(self, t: TensorInfo) -> BlockType:
        if t.block is not None:
            return t.block
        if self.requantize is None:
            t.supported()  # raises the named error
        return TYPES["Q8_0"]

    def read(self, t: TensorInfo, start: int = 0, length: int | None = None,
             rows: int | None = None) -> bytes:  # fmt: skip
        """Bytes of ``t`` (a slice of it), in ``type_of(t)``."""
        data = self.gf.read(t, start, length)
        if t.block is not None:
            return data
        import gguf
        from gguf import quants

        k = t.shape[-1]
        if k % 32:
            raise GGUFError(f"{t.path}: tensor {t.name} ({t.type_name}) cannot be requantized "
                            f"to Q8_0: its rows of {k} weights are not whole blocks of "
                            "32")  # fmt: skip
        qt = gguf.GGMLQuantizationType(t.type_id)
        raw = np.frombuffer(data, dtype=np.uint8).reshape(-1, len(data) // (rows or 1))
        w = quants.dequantize(raw, qt).reshape(-1, k).astype(np.float32)
        q = quants.quantize(w, gguf.GGMLQuantizationType.Q8_0)
        back = quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
        self.report.append({"tensor": t.name, "from": t.type_name, "to": "Q8_0", "offset": start,
                            "rel_l2": rel_l2(torch.from_numpy(w), torch.from_numpy(back))})
        return q.tobytes()


def _write_dense(src: _Source, path: Path, items) -> list[list[Any]]:
    import gguf

    w = gguf.GGUFWriter(str(path), arch="mer-dense")
    index = []
    for name, shape, t, perm in items:
        n = shape[0] if len(shape) == 2 else 1
        if isinstance(t, SplitKvB):  # MLA's kv_b_proj, split by the converter: rebuilt
            raw, bt = kv_b(src.gf.read, t, src.args)
        else:
            bt = src.type_of(t)
            raw = np.frombuffer(src.read(t, rows=n), dtype=np.uint8).reshape(n, -1)
        if perm is not None:
            raw = raw[perm]  # whole rows of blocks: lossless
        byte_shape = list(raw.shape) if len(shape) == 2 else [raw.shape[1]]
        w.add_tensor(name, np.ascontiguousarray(raw).reshape(byte_shape),
                     raw_dtype=gguf.GGMLQuantizationType(bt.id))  # fmt: skip
        index.append([name, list(shape), bt.name])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return index


class _ExpertReader:
    """One expert's GGUF bytes (gate, up, down) and their types, on the converter's reader
    thread. Stacked expert tensors (``ffn_*_exps``) are read a batch of consecutive experts at a
    time, up to ``BATCH_BYTES`` per tensor, in three large sequential reads (``read_large``:
    O_DIRECT); the experts' parts are views into them, so nothing is copied before packing. While
    a batch is packed and written, the next one is read (one batch ahead, on its own thread)."""

    def __init__(self, src: _Source, args, keys: list[tuple[int, int]]) -> None:
        self.src, self.args, self.keys = src, args, keys
        self.index = {k: i for i, k in enumerate(keys)}
        self.batch: dict[tuple[int, int], tuple[tuple, tuple[str, ...]]] = {}
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="mer-convert-readahead")
        self.ahead: tuple[tuple[int, int], Future] | None = None
        self.lock = threading.Lock()
        self.free: list[mmap.mmap] = []  # read buffers of BUFFER bytes, reused
        self.left: dict[int, list] = {}  # batch id -> [experts not packed yet, its buffers]
        self.batch_of: dict[tuple[int, int], int] = {}

    def __call__(self, key: tuple[int, int]):
        if key not in self.batch:
            if self.ahead is not None and self.ahead[0] == key:
                got = self.ahead[1].result()
            else:
                got = self._read(*key)
            self.ahead = None
            self.batch.update(got)
            nxt = self.index[key] + len(got)
            if nxt < len(self.keys):
                self.ahead = (self.keys[nxt], self.pool.submit(self._read, *self.keys[nxt]))
        return self.batch.pop(key)

    def release(self, key: tuple[int, int]) -> None:
        """Expert ``key`` is packed: when its whole batch is, the batch's buffers are reused."""
        with self.lock:
            b = self.batch_of.pop(key, None)
            if b is None:
                return
            entry = self.left[b]
            entry[0] -= 1
            if entry[0] == 0:
                self.free.extend(entry[1])
                del self.left[b]

    def _buffer(self) -> mmap.mmap:
        with self.lock:
            return self.free.pop() if self.free else mmap.mmap(-1, BUFFER)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.ahead = None
        self.batch.clear()

    def _read(self, layer: int, first: int) -> dict:
        src, gf = self.src, self.src.gf
        tensors = expert_tensors(gf, layer, first, self.args)
        types = tuple(src.type_of(t).name for t, _, _ in tensors)
        if not all(t.name.endswith("_exps.weight") and t.block for t, _, _ in tensors):
            parts = tuple(src.read(t, off, n, rows=t.shape[-2]) for t, off, n in tensors)
            return {(layer, first): (parts, types)}  # one tensor per expert, or requantized
        n_max = max(n for _, _, n in tensors)
        count = max(1, min(BATCH_BYTES // n_max, self.args.n_experts - first))
        pooled = n_max * count + 2 * PAGE <= BUFFER
        bufs = [self._buffer() if pooled else None for _ in tensors]
        roles = [(gf.read_large(t, off, n * count, buf), n)
                 for (t, off, n), buf in zip(tensors, bufs, strict=True)]  # fmt: skip
        if pooled:
            with self.lock:
                self.left[self.index[(layer, first)]] = [count, bufs]
                for i in range(count):
                    self.batch_of[(layer, first + i)] = self.index[(layer, first)]
        return {(layer, first + i): (tuple(data[i * n : (i + 1) * n] for data, n in roles), types)
                for i in range(count)}  # fmt: skip


class _Packer:
    """One expert's blocks into the store format and their checksum (the packer threads)."""

    def __init__(self, fmt: GGUFExperts, args, group: int, per_expert: int,
                 release: Callable[[tuple[int, int]], None]) -> None:  # fmt: skip
        self.fmt, self.args, self.group, self.per_expert = fmt, args, group, per_expert
        self.release = release

    def __call__(self, i: int, key: tuple[int, int], read) -> Packed:
        parts, types = read
        a = self.args
        try:
            data = self.fmt.pack_blocks(parts, types, a.hidden_size, a.expert_inter,
                                        self.group).numpy()  # fmt: skip
        finally:
            del parts
            self.release(key)  # its read buffer may be reused from here on
        if len(data) != self.per_expert:
            raise StoreError(f"expert ({key[0]}, {key[1]}) packed into {len(data)} bytes, "
                             f"expected {self.per_expert}")  # fmt: skip
        return Packed(data, checksum(data), None)


def _expert_format(src: _Source, args) -> GGUFExperts:
    roles: list[set[str]] = [set(), set(), set()]
    for layer in range(args.n_layers):
        if args.moe_layers[layer]:
            for r, (t, _, _) in enumerate(expert_tensors(src.gf, layer, 0, args)):
                roles[r].add(src.type_of(t).name)
    return GGUFExperts(tuple(tuple(r) for r in roles))  # type: ignore[arg-type]


def convert_gguf(
    src: str | Path,
    dst: str | Path,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] | None = print,
    requantize: str | None = None,
) -> Store:
    """Convert GGUF file ``src`` (the first part of a split file) into a store at ``dst``."""
    from .gguf_tokenizer import write_tokenizer

    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    gf = GGUFFile(src)
    args = model_args(gf)
    if dst.exists() and not force:
        raise StoreError(f"{dst}: already exists; choose another destination or pass --force "
                         "to replace it")  # fmt: skip
    source = _Source(gf, requantize, args)
    gpt_oss = gf.arch == "gpt-oss"
    if gpt_oss:  # biases and the clamped SwiGLU: the GPT-OSS formats (gguf_gptoss.py)
        from . import gguf_gptoss

        fmt: Any = gguf_gptoss.expert_format(gf, args)
    else:
        fmt = _expert_format(source, args)
    group = choose_group(fmt, args.expert_inter)
    layout = fmt.layout_tag() if hasattr(fmt, "layout_tag") else fmt.name
    dense_items = [(n, s, t, unpermute_rows(gf, args, n)) for n, s, t in dense_tensors(gf, args)]
    dst.parent.mkdir(parents=True, exist_ok=True)
    for stale in dst.parent.glob(f".{dst.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by a killed conversion
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        dense_index = _write_dense(source, tmp / DENSE_GGUF, dense_items)
        keys = [(layer, e) for layer in range(args.n_layers) if args.moe_layers[layer]
                for e in range(args.n_experts)]  # fmt: skip
        per_expert = (args.expert_inter // group) * fmt.group_nbytes(args.hidden_size, group)
        bar = _progress(per_expert * len(keys), f"converting {src.name}", progress)
        with open(tmp / EXPERT_FILE, "wb") as f, bar:
            reader = _ExpertReader(source, args, keys)
            try:
                if gpt_oss:
                    pack: Any = gguf_gptoss.GptOssPacker(gf, fmt, args, group, per_expert,
                                                         reader.release)  # fmt: skip
                else:
                    pack = _Packer(fmt, args, group, per_expert, reader.release)
                entries, _ = write_extents(keys, reader, pack, f, workers=default_workers(),
                                           progress=bar.update)  # fmt: skip
            finally:
                reader.close()
            f.flush()
            os.fsync(f.fileno())
        copied = write_tokenizer(gf, tmp, log)
        lossless = not source.report
        (tmp / "conversion_report.json").write_text(json.dumps(
            {"expert_format": fmt.name, "lossless": lossless, "requantized": source.report},
            indent=1))  # fmt: skip
        manifest = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "model": args.to_dict(),
            "expert_format": fmt.name, "layout": layout, "group": group,
            "dense": {"file": DENSE_GGUF, "format": "gguf", "dtype": "gguf",
                      "tensors": dense_index},
            "expert_files": [EXPERT_FILE], "experts": entries,
            "source": str(src.resolve()), "source_format": "gguf",
            "torch_version": torch.__version__,
        }  # fmt: skip
        place_store(tmp, dst, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        gf.close()
    store = Store.open(dst)
    if log is not None:
        s = store.summary()
        kept = ("GGUF blocks unchanged" if not gpt_oss else
                "MXFP4 codes and exponents unchanged, in the checkpoint layout"
                if fmt.name.startswith("mxfp4") else "dequantized exactly")  # fmt: skip
        log(f"wrote {dst}: {s['architecture']}, {len(entries)} experts x "
            f"{s['expert_bytes'] / 1e6:.2f} MB ({fmt.name}, {s['groups_per_expert']} groups of "
            f"{group} neurons, {kept}); dense {s['dense_bytes'] / 1e6:.1f} MB in "
            f"their GGUF types; tokenizer: {', '.join(copied) or 'none'}; "
            f"{time.perf_counter() - t0:.1f} s")  # fmt: skip
        for r in source.report:
            log(f"requantized {r['tensor']} {r['from']} -> {r['to']}: relative L2 error "
                f"{r['rel_l2']:.2e} (lossy)")  # fmt: skip
    return store
