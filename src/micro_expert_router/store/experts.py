"""The converter's expert loop: read, pack, hash and write every routed expert, in parallel.

``write_experts`` runs a small pipeline over the experts in store order (layer, then expert):

- one reader thread reads each expert's tensors from the checkpoint with positional reads
  (``Checkpoint.expert``; the GIL is released while reading), up to ``2 * workers`` experts ahead
  of the writer, so a packer that finishes early finds the next expert read;
- ``workers`` threads pack experts into the store format (``ExpertFormat.pack``: torch ops, which
  release the GIL) and hash the packed bytes (xxh3); torch's own intra-op threads are set to one
  meanwhile, so that the workers, not torch, share out the cores;
- the calling thread writes the packed extents one after the other, each padded to the 4096-byte
  boundary, and advances the progress callback. Every ``WRITEBACK_BYTES`` it asks the kernel to
  start writing the range just written to disk (``sync_file_range``, asynchronous), so that the
  converter's closing fsync finds little left to write instead of gigabytes.

Experts come from ``read(layer, expert)`` (default ``Checkpoint.expert``: (gate, up, down)) and
are packed by the format's ``pack_expert`` when it has one (GPT-OSS: ``models/gpt_oss.read_expert``
gives MXFP4 blocks or float weights with biases, ``kernels/mxfp4`` and ``kernels/biased`` pack
them), else by ``pack(gate, up, down)``.

The bytes written do not depend on ``workers``: packing is a pure function of one expert's weights
and extents are written in store order, so one worker (a plain loop, no threads) and several
produce identical files. The relative L2 error report, which costs more than packing (a reference
unpack and float64 norms), runs on every ``error_every``-th expert only; ``sample_every`` picks
the default so that about ``ERROR_SAMPLES`` experts are measured, spread over all layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from ..checkpoint import Checkpoint
from ..errors import MERError, StoreError
from ..kernels import ExpertFormat
from ..kernels.biased import float_weights
from ..kernels.quality import expert_error
from .format import ALIGN, checksum

ExpertKey = tuple[int, int]  # (layer, expert)
ERROR_SAMPLES = 32  # experts measured by default for the conversion report
MAX_WORKERS = 4  # more packers than this only add memory (each holds one expert in float32)
WRITEBACK_BYTES = 64 << 20
_SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h: start writeback of the range's dirty pages, no wait


def default_workers() -> int:
    """Packing threads for this machine: one per usable core, at most ``MAX_WORKERS``."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def sample_every(n_experts: int, samples: int = ERROR_SAMPLES) -> int:
    """The stride that measures about ``samples`` of ``n_experts`` experts (1: all of them)."""
    return max(1, n_experts // samples)


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to ``n`` for the block (``None``: unchanged)."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def _sync_file_range() -> Callable[[int, int, int], None] | None:
    """libc's ``sync_file_range`` (Linux), ``None`` where there is none."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]

    def start(fd: int, offset: int, nbytes: int) -> None:
        fn(fd, offset, nbytes, _SYNC_FILE_RANGE_WRITE)  # a hint: failures change nothing

    return start


def start_writeback(path: Path) -> None:
    """Ask the kernel to start writing ``path``'s dirty pages to disk now (no wait)."""
    writeback = _sync_file_range()
    if writeback is not None:
        fd = os.open(path, os.O_RDONLY)
        try:
            writeback(fd, 0, 0)  # 0 bytes: to the end of the file
        finally:
            os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Packed:
    """One expert ready to write: its bytes, their hash and, if sampled, its error entry."""

    __slots__ = ("data", "xxh3", "error")

    def __init__(self, data: np.ndarray, xxh3: str, error: dict[str, Any] | None) -> None:
        self.data, self.xxh3, self.error = data, xxh3, error


def pack_expert(fmt: ExpertFormat, weights: Any, group: int) -> torch.Tensor:
    """One expert's bytes (1-D uint8): the format's ``pack_expert`` when it has one (experts with
    biases, blocks kept as they are), else ``pack(gate, up, down)``."""
    pack = getattr(fmt, "pack_expert", None)
    return pack(weights, group) if pack is not None else fmt.pack(*weights, group)


def _pack(
    fmt: ExpertFormat,
    group: int,
    per_expert: int,
    key: ExpertKey,
    weights: Any,
    measure: bool,
) -> Packed:
    try:
        packed = pack_expert(fmt, weights, group)  # [bytes] uint8
    except MERError as e:  # say which expert: the format's message cannot
        raise type(e)(f"expert {key[1]} of layer {key[0]}: {e}") from None
    if packed.numel() != per_expert:
        raise StoreError(f"format {fmt.name} packed expert {key} into {packed.numel()} bytes, "
                         f"expected {per_expert}")  # fmt: skip
    data = packed.numpy()
    error = None
    if measure:
        gate, up, down = float_weights(weights)  # [I, D], [I, D], [D, I]
        q = expert_error(fmt, packed, gate, up, down, group)
        error = {"layer": key[0], "expert": key[1], "gate": q.gate, "up": q.up, "down": q.down}
    return Packed(data, checksum(data), error)


def write_experts(
    ckpt: Checkpoint,
    fmt: ExpertFormat,
    group: int,
    keys: list[ExpertKey],
    f: BinaryIO,
    *,
    workers: int = 1,
    error_every: int = 1,
    file_index: int = 0,
    progress: Callable[[int], Any] | None = None,
    read: Callable[[int, int], Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write the experts ``keys`` into ``f`` (positioned at an ``ALIGN`` boundary) in order,
    reading each with ``read`` (default ``ckpt.expert``).

    Returns the manifest entries (file, offset, length, xxh3) and the error entries of the
    sampled experts (every ``error_every``-th, counting from the first).
    """
    if workers < 1 or error_every < 1:
        raise StoreError(f"workers ({workers}) and error_every ({error_every}) must be >= 1")
    a = ckpt.args
    read = read or ckpt.expert
    per_expert = (a.expert_inter // group) * fmt.group_nbytes(a.hidden_size, group)

    def pack(i: int, key: ExpertKey, weights) -> Packed:
        return _pack(fmt, group, per_expert, key, weights, i % error_every == 0)

    return write_extents(keys, lambda key: read(*key), pack, f, workers=workers,
                         file_index=file_index, progress=progress)  # fmt: skip


def write_extents(
    keys: list[ExpertKey],
    read: Callable[[ExpertKey], Any],
    pack: Callable[[int, ExpertKey, Any], Packed],
    f: BinaryIO,
    *,
    workers: int = 1,
    file_index: int = 0,
    progress: Callable[[int], Any] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The pipeline: ``read(key)`` on the reader thread, ``pack(i, key, what read returned)`` on
    the packer threads, the packed extents written into ``f`` in the order of ``keys`` (the
    GGUF converter uses it with its own read and pack). Returns the manifest entries and the
    error entries of the packed experts that carry one."""
    entries: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    writeback, synced = _sync_file_range(), f.tell()

    def write(key: ExpertKey, p: Packed) -> None:
        nonlocal synced
        offset = f.tell()
        f.write(p.data)
        f.write(b"\0" * (-len(p.data) % ALIGN))
        if writeback is not None and offset + len(p.data) - synced >= WRITEBACK_BYTES:
            f.flush()
            writeback(f.fileno(), synced, f.tell() - synced)
            synced = f.tell()
        entries.append({"layer": key[0], "expert": key[1], "file": file_index, "offset": offset,
                        "length": len(p.data), "xxh3": p.xxh3})  # fmt: skip
        if p.error is not None:
            errors.append(p.error)
        if progress is not None:
            progress(len(p.data))

    if workers == 1:  # the serial path: a plain loop
        for i, key in enumerate(keys):
            write(key, pack(i, key, read(key)))
        return entries, errors

    def pack_after_read(i: int, key: ExpertKey, done: Future) -> Packed:
        return pack(i, key, done.result())

    reader = ThreadPoolExecutor(1, thread_name_prefix="mer-convert-read")
    packers = ThreadPoolExecutor(workers, thread_name_prefix="mer-convert-pack")
    pending: deque[tuple[ExpertKey, Future]] = deque()
    try:
        with _torch_threads(1):
            for i, key in enumerate(keys):
                done = reader.submit(read, key)
                pending.append((key, packers.submit(pack_after_read, i, key, done)))
                if len(pending) >= 2 * workers:  # slack for a slow (measured) expert
                    done_key, fut = pending.popleft()
                    write(done_key, fut.result())
            while pending:
                done_key, fut = pending.popleft()
                write(done_key, fut.result())
    finally:
        for _, fut in pending:
            fut.cancel()
        reader.shutdown(wait=True, cancel_futures=True)
        packers.shutdown(wait=True, cancel_futures=True)
    return entries, errors
