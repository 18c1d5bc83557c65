"""Tests for io: BufferPool leases and DirectReader reads, against plain buffered reads."""

from __future__ import annotations

import errno
import gc
import logging
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from micro_expert_router.errors import BudgetError, PoolTimeout, ReadError
from micro_expert_router.io import (
    ALIGN,
    DEMAND,
    PREFETCH,
    BufferPool,
    DirectReader,
    LeaseError,
    leak_report,
)

FILE_BYTES = 300_000  # not a multiple of 4096: the last block is partial


def write_random(path: Path, n: int, seed: int = 0) -> bytes:
    data = np.random.default_rng(seed).bytes(n)
    path.write_bytes(data)
    return data


def buffered(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.fixture(scope="module")
def datafile(tmp_path_factory) -> tuple[Path, bytes]:
    path = tmp_path_factory.mktemp("io") / "data.bin"
    return path, write_random(path, FILE_BYTES)


# -- BufferPool ------------------------------------------------------------------------------


def test_slots_are_page_aligned_and_rounded_up():
    pool = BufferPool(3, 5000)
    assert pool.slot_bytes == 8192 and pool.total == 3 and pool.free_count == 3
    leases = [pool.lease() for _ in range(3)]
    for lease in leases:
        assert lease.numpy().ctypes.data % ALIGN == 0
        assert lease.nbytes == 8192
    assert pool.free_count == 0
    assert len({lease.index for lease in leases}) == 3
    for lease in leases:
        lease.release()
    assert pool.free_count == 3


def test_views_share_the_slot_memory():
    pool = BufferPool(2, 4096)
    with pool.lease() as a, pool.lease() as b:
        a.numpy()[:] = 7
        b.numpy()[:] = 9
        assert a.torch(16, 8).tolist() == [7] * 16
        assert bytes(b.memoryview(4)) == b"\x09" * 4
        t = a.torch(10, 100)
        t[:] = 3
        assert a.numpy()[100:110].tolist() == [3] * 10 and a.numpy()[110] == 7
        assert a.torch(0).numel() == 0 and t.dtype == torch.uint8
        with pytest.raises(LeaseError, match="outside"):
            a.memoryview(4096, 1)


def test_refcount_returns_slot_on_last_release():
    pool = BufferPool(1, 4096)
    lease = pool.lease()
    assert lease.retain() is lease and lease.refs == 2
    lease.release()
    assert pool.free_count == 0 and not lease.released
    lease.release()
    assert pool.free_count == 1 and lease.released


def test_double_release_and_use_after_release_raise():
    pool = BufferPool(1, 4096)
    lease = pool.lease()
    lease.release()
    with pytest.raises(LeaseError, match="double release"):
        lease.release()
    with pytest.raises(LeaseError):
        lease.retain()
    with pytest.raises(LeaseError):
        lease.memoryview()
    assert pool.free_count == 1


def test_context_manager_releases_on_error():
    pool = BufferPool(1, 4096)
    with pytest.raises(ValueError), pool.lease():
        assert pool.free_count == 0
        raise ValueError("boom")
    assert pool.free_count == 1


def test_exhausted_pool_times_out_with_advice():
    pool = BufferPool(2, 4096, name="experts")
    held = [pool.lease(), pool.lease()]
    t0 = time.monotonic()
    with pytest.raises(PoolTimeout, match=r"all 2 slots .*'experts'.*raise the pool size"):
        pool.lease(timeout=0.1)
    assert 0.09 <= time.monotonic() - t0 < 2
    assert pool.try_lease() is None
    for lease in held:
        lease.release()


def test_waiting_lease_gets_a_slot_released_by_another_thread():
    pool = BufferPool(1, 4096)
    held = pool.lease()
    threading.Timer(0.05, held.release).start()
    with pool.lease(timeout=5):
        assert pool.free_count == 0


def test_bad_pool_sizes_are_budget_errors():
    with pytest.raises(BudgetError, match="at least one slot"):
        BufferPool(0, 4096)


def test_dropped_lease_is_reclaimed_with_a_warning_and_reported():
    pool = BufferPool(2, 4096, name="dropme")
    with pytest.warns(ResourceWarning, match="without release"):
        pool.lease()  # dropped at once
        gc.collect()
    assert pool.free_count == 2
    report = leak_report()
    assert any("'dropme'" in line and "reclaimed" in line for line in report)
    assert not [line for line in leak_report() if "'dropme'" in line]  # reported once


def test_leak_report_catches_a_lease_dropped_with_its_pool():
    with pytest.warns(ResourceWarning):
        BufferPool(1, 4096, name="gone").lease()  # lease and pool both die here
        gc.collect()
    assert any("'gone'" in line and "reclaimed" in line for line in leak_report())


def test_leak_report_names_a_leased_slot():
    pool = BufferPool(2, 4096, name="held")
    lease = pool.lease()
    assert any("'held'" in line and "1 of 2 slots still leased" in line for line in leak_report())
    lease.release()


def test_abandoned_generator_returns_its_slot():
    pool = BufferPool(1, 4096)

    def steps():
        with pool.lease() as lease:
            while True:
                yield lease.nbytes

    gen = steps()
    next(gen)
    assert pool.free_count == 0
    del gen
    gc.collect()
    assert pool.free_count == 1


def test_leak_fixture_fails_a_test_that_leaks(tmp_path):
    conftest = Path(__file__).with_name("conftest.py").read_text()
    (tmp_path / "conftest.py").write_text(conftest)
    (tmp_path / "test_leaky.py").write_text(
        "from micro_expert_router.io import BufferPool\n"
        "KEEP = []\n"
        "def test_leaks():\n"
        "    pool = BufferPool(2, 4096, name='leaky')\n"
        "    KEEP.append(pool.lease())\n"
        "def test_clean():\n"
        "    with BufferPool(1, 4096).lease():\n"
        "        pass\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert run.returncode != 0
    # test_leaks errors at teardown (pytest counts its call as passed); test_clean is not blamed
    assert "2 passed, 1 error" in run.stdout and "ERROR test_leaky.py::test_leaks" in run.stdout
    assert "leaked buffer-pool slots" in run.stdout and "'leaky'" in run.stdout


# -- DirectReader: bytes ------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    offset=st.integers(0, FILE_BYTES - 1),
    length=st.integers(1, 40_000),
    chunk=st.sampled_from([4096, 8192, 20480]),
)
def test_reads_match_buffered_reads(datafile, offset, length, chunk):
    path, data = datafile
    length = min(length, FILE_BYTES - offset)
    pool = BufferPool(1, 48 * 1024)
    with DirectReader(threads=2, chunk_bytes=chunk) as reader, pool.lease() as lease:
        res = reader.read(path, offset, length, lease)
        assert res.start == offset % ALIGN and res.length == length
        assert bytes(res.memoryview()) == buffered(path, offset, length)
        assert reader.fallback_files == []


def test_dest_offset_and_views(datafile):
    path, data = datafile
    pool = BufferPool(1, 64 * 1024)
    with DirectReader(threads=2) as reader, pool.lease() as lease:
        res = reader.submit(path, 5000, 9000, lease, dest=8192).result(timeout=10)
        assert res.start == 8192 + 5000 - 4096
        assert res.numpy().tobytes() == data[5000:14000]
        assert res.torch().numpy().tobytes() == data[5000:14000]


def test_slot_too_small_is_a_budget_error(datafile):
    path, _ = datafile
    pool = BufferPool(1, 8192)
    with DirectReader() as reader, pool.lease() as lease:
        with pytest.raises(BudgetError, match="slot holds 8192 bytes"):
            reader.submit(path, 100, 8192, lease)  # aligned range is 12288 bytes
        assert lease.refs == 1


def test_missing_file_is_a_read_error(tmp_path):
    pool = BufferPool(1, 4096)
    with DirectReader() as reader, pool.lease() as lease:
        with pytest.raises(ReadError, match="nope.bin"):
            reader.submit(tmp_path / "nope.bin", 0, 10, lease)


def test_counters(datafile):
    path, _ = datafile
    pool = BufferPool(1, 64 * 1024)
    with DirectReader(chunk_bytes=8192) as reader, pool.lease() as lease:
        reader.read(path, 100, 20_000, lease)
        reader.read(path, 0, 4096, lease)
        s = reader.stats
        assert (s.reads, s.chunks, s.bytes_read, s.retries) == (2, 4, 20480 + 4096, 0)
        assert s.read_s > 0


# -- DirectReader: errors --------------------------------------------------------------------------


def test_short_reads_are_completed(datafile, monkeypatch):
    path, data = datafile
    real = os.preadv
    calls = []

    def short(fd, bufs, offset):  # at most one block per call
        calls.append(offset)
        return real(fd, [bufs[0][:ALIGN]], offset)

    monkeypatch.setattr(os, "preadv", short)
    pool = BufferPool(1, 64 * 1024)
    with DirectReader(threads=1, chunk_bytes=64 * 1024) as reader, pool.lease() as lease:
        res = reader.read(path, 300, 30_000, lease)
        assert bytes(res.memoryview()) == data[300:30_300]
    assert len(calls) == 8  # 32768 bytes, 4096 at a time


def test_buffered_short_reads_of_odd_sizes_are_completed(datafile, monkeypatch):
    path, data = datafile
    real = os.preadv
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, off: real(fd, [bufs[0][:1000]], off))
    pool = BufferPool(1, 64 * 1024)
    with DirectReader(direct=False) as reader, pool.lease() as lease:
        assert bytes(reader.read(path, 10, 9000, lease).memoryview()) == data[10:9010]


def test_eio_is_retried(datafile, monkeypatch):
    path, data = datafile
    real = os.preadv
    failures = [errno.EIO, errno.EINTR]

    def flaky(fd, bufs, offset):
        if failures:
            raise OSError(failures.pop(0), "injected")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", flaky)
    pool = BufferPool(1, 16 * 1024)
    with DirectReader(threads=1, backoff_s=0.001) as reader, pool.lease() as lease:
        assert bytes(reader.read(path, 0, 5000, lease).memoryview()) == data[:5000]
        assert reader.stats.retries == 2


def test_persistent_eio_names_file_and_offset(datafile, monkeypatch):
    path, _ = datafile

    def broken(fd, bufs, offset):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "preadv", broken)
    pool = BufferPool(1, 16 * 1024)
    with DirectReader(threads=1, retries=2, backoff_s=0.001) as reader, pool.lease() as lease:
        with pytest.raises(ReadError, match=rf"{path.name} at offset 8192 .*after 2 retries"):
            reader.read(path, 8192, 100, lease)
        assert reader.stats.retries == 2


def test_truncated_file_names_expected_and_actual_length(tmp_path):
    path = tmp_path / "short.bin"
    data = write_random(path, 10_000)
    pool = BufferPool(1, 16 * 1024)
    with DirectReader() as reader, pool.lease() as lease:
        with pytest.raises(
            ReadError,
            match=r"short.bin is truncated: expected 4096 bytes at "
            r"offset 8192 .*10000 bytes long, so only 1808",
        ):
            reader.read(path, 8192, 4096, lease)
        with pytest.raises(ReadError, match="truncated"):
            reader.read(path, 12288, 10, lease)  # wholly past the end
        # the last, partial block is fine when the request stays inside the file
        assert bytes(reader.read(path, 9000, 1000, lease).memoryview()) == data[9000:]


# -- DirectReader: fallback ---------------------------------------------------------------------


def _refuses_o_direct(path: str) -> bool:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_DIRECT))
    except OSError as e:
        return e.errno == errno.EINVAL
    return False


def test_tmpfs_falls_back_to_buffered_and_says_so_once(caplog):
    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm")
    paths = [shm / f"mer-test-io-{os.getpid()}-{i}.bin" for i in range(2)]
    try:
        datas = [write_random(p, 20_000, seed=i) for i, p in enumerate(paths)]
        if not _refuses_o_direct(str(paths[0])):
            pytest.skip("/dev/shm accepts O_DIRECT here")
        pool = BufferPool(1, 32 * 1024)
        with caplog.at_level(logging.WARNING, logger="micro_expert_router.io.reader"):
            with DirectReader() as reader, pool.lease() as lease:
                for p, d in zip(paths, datas, strict=True):
                    for off in (0, 777, 12_000):
                        got = reader.read(p, off, 5000, lease)
                        assert bytes(got.memoryview()) == d[off : off + 5000]
                assert sorted(reader.fallback_files) == sorted(map(str, paths))
        said = [r for r in caplog.records if "O_DIRECT is not supported" in r.getMessage()]
        assert len(said) == 1 and str(paths[0]) in said[0].getMessage()
    finally:
        for p in paths:
            p.unlink(missing_ok=True)


def test_open_refusing_o_direct_falls_back_and_says_so_once(tmp_path, monkeypatch, caplog):
    # Linux >= 6.6 tmpfs accepts O_DIRECT, so the test above may skip: refuse it the way older
    # tmpfs does (EINVAL from open) to exercise the same path on any machine.
    real_open = os.open

    def no_direct(path, flags, *args):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    paths = [tmp_path / f"f{i}.bin" for i in range(2)]
    datas = [write_random(p, 20_000, seed=i) for i, p in enumerate(paths)]
    monkeypatch.setattr(os, "open", no_direct)
    real_fadvise, advised = os.posix_fadvise, []

    def fadvise(fd, offset, length, advice):
        advised.append(advice)
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    pool = BufferPool(1, 32 * 1024)
    with caplog.at_level(logging.WARNING), DirectReader() as reader, pool.lease() as lease:
        for p, d in zip(paths, datas, strict=True):
            for off in (0, 777, 12_000):
                assert bytes(reader.read(p, off, 5000, lease).memoryview()) == d[off : off + 5000]
        assert sorted(reader.fallback_files) == sorted(map(str, paths))
    said = [r.getMessage() for r in caplog.records if "O_DIRECT is not supported" in r.getMessage()]
    assert len(said) == 1 and "open with O_DIRECT returned EINVAL" in said[0]
    assert advised == [os.POSIX_FADV_DONTNEED] * 6  # the page cache is let go after each read


def test_einval_on_first_direct_read_falls_back(datafile, monkeypatch, caplog):
    path, data = datafile
    real = os.preadv
    refused = []

    def refuse_once(fd, bufs, offset):
        if not refused:
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, bufs, offset)

    monkeypatch.setattr(os, "preadv", refuse_once)
    pool = BufferPool(1, 16 * 1024)
    with caplog.at_level(logging.WARNING), DirectReader(threads=1) as reader:
        with pool.lease() as lease:
            assert bytes(reader.read(path, 50, 5000, lease).memoryview()) == data[50:5050]
        assert reader.fallback_files == [str(path)]
    assert sum("O_DIRECT is not supported" in r.getMessage() for r in caplog.records) == 1


# -- DirectReader: scheduling ---------------------------------------------------------------------


class Gate:
    """A fake preadv that records offsets and blocks the first call until opened."""

    def __init__(self, monkeypatch):
        self.real = os.preadv
        self.order: list[int] = []
        self.entered = threading.Event()
        self.opened = threading.Event()
        monkeypatch.setattr(os, "preadv", self)

    def __call__(self, fd, bufs, offset):
        self.order.append(offset)
        if len(self.order) == 1:
            self.entered.set()
            self.opened.wait(10)
        return self.real(fd, bufs, offset)


def test_demand_reads_go_before_queued_prefetches(datafile, monkeypatch):
    path, data = datafile
    gate = Gate(monkeypatch)
    pool = BufferPool(5, 16 * 1024)
    with DirectReader(threads=1, chunk_bytes=4096) as reader:
        leases = [pool.lease() for _ in range(5)]
        futs = [reader.submit(path, 0, 100, leases[0])]
        assert gate.entered.wait(10)
        futs.append(reader.submit(path, 4096, 12288, leases[1], priority=PREFETCH))
        futs.append(reader.submit(path, 65536, 100, leases[2], priority=PREFETCH))
        futs.append(reader.submit(path, 81920, 100, leases[3], priority=DEMAND))
        futs.append(reader.submit(path, 98304, 100, leases[4], priority=DEMAND))
        gate.opened.set()
        for f in futs:
            f.result(timeout=10)
        for lease in leases:
            lease.release()
    assert gate.order == [0, 81920, 98304, 4096, 8192, 12288, 65536]


def test_cancel_before_start_keeps_the_callers_reference(datafile, monkeypatch):
    path, data = datafile
    gate = Gate(monkeypatch)
    pool = BufferPool(2, 16 * 1024)
    with DirectReader(threads=1) as reader:
        first, second = pool.lease(), pool.lease()
        running = reader.submit(path, 0, 100, first)
        assert gate.entered.wait(10)
        queued = reader.submit(path, 4096, 100, second, priority=PREFETCH)
        assert second.refs == 2  # the caller's and the read's
        assert queued.cancel() and second.refs == 1
        assert not running.cancel()  # already in the kernel
        first.release()  # the caller may let go early: the read still holds the slot
        assert pool.free_count == 0
        gate.opened.set()
        running.result(timeout=10)
        assert first.released and pool.free_count == 1
        second.release()
    assert pool.free_count == 2 and gate.order == [0]


def test_prefetch_runs_only_while_no_demand_read_is_in_the_kernel(datafile, monkeypatch):
    path, data = datafile
    gate = Gate(monkeypatch)
    pool = BufferPool(2, 16 * 1024)
    with DirectReader(threads=4) as reader:
        a, b = pool.lease(), pool.lease()
        demand = reader.submit(path, 0, 100, a)
        assert gate.entered.wait(10)
        pre = reader.submit(path, 8192, 100, b, priority=PREFETCH)
        time.sleep(0.2)  # three idle workers: none may start the prefetch beside the demand read
        assert gate.order == [0] and not pre.done()
        gate.opened.set()
        assert bytes(pre.result(timeout=10).memoryview()) == data[8192:8292]
        demand.result(timeout=10)
        assert gate.order == [0, 8192]
        assert reader.stats.busy_s > 0 and reader.stats.busy_bps > 0
        a.release()
        b.release()


def test_promote_moves_a_queued_prefetch_ahead(datafile, monkeypatch):
    path, data = datafile
    gate = Gate(monkeypatch)
    pool = BufferPool(3, 16 * 1024)
    with DirectReader(threads=1) as reader:
        leases = [pool.lease() for _ in range(3)]
        demand = reader.submit(path, 0, 100, leases[0])
        assert gate.entered.wait(10)
        first = reader.submit(path, 16384, 100, leases[1], priority=PREFETCH)
        needed = reader.submit(path, 32768, 100, leases[2], priority=PREFETCH)
        reader.promote(needed)
        gate.opened.set()
        for f in (demand, first, needed):
            f.result(timeout=10)
        assert gate.order == [0, 32768, 16384]
        for lease in leases:
            lease.release()


def test_abort_skips_the_chunks_of_a_running_read(datafile, monkeypatch):
    path, data = datafile
    gate = Gate(monkeypatch)
    pool = BufferPool(1, 64 * 1024)
    with DirectReader(threads=1, chunk_bytes=4096) as reader:
        lease = pool.lease()
        fut = reader.submit(path, 0, 4 * 4096, lease, priority=PREFETCH)
        assert gate.entered.wait(10)  # its first chunk is in the kernel
        reader.abort(fut)
        lease.release()  # the read keeps the slot until its chunk is out of the kernel
        assert pool.free_count == 0
        gate.opened.set()
        with pytest.raises(ReadError, match="aborted"):
            fut.result(timeout=10)
        assert gate.order == [0]  # the other three chunks never ran
    assert pool.free_count == 1


def test_close_cancels_queued_reads_and_closes_files(datafile, monkeypatch):
    path, data = datafile
    fds_before = len(os.listdir("/proc/self/fd"))
    gate = Gate(monkeypatch)
    pool = BufferPool(2, 16 * 1024)
    reader = DirectReader(threads=1)
    a, b = pool.lease(), pool.lease()
    running = reader.submit(path, 0, 100, a)
    assert gate.entered.wait(10)
    queued = reader.submit(path, 4096, 100, b)
    threading.Timer(0.05, gate.opened.set).start()
    reader.close()
    assert running.result(timeout=0) and queued.cancelled()
    assert a.refs == 1 and b.refs == 1
    a.release()
    b.release()
    assert len(os.listdir("/proc/self/fd")) == fds_before
    with pool.lease() as c, pytest.raises(RuntimeError, match="after close"):
        reader.submit(path, 0, 100, c)


def test_dropped_reader_closes_its_files(datafile):
    path, _ = datafile
    fds_before = len(os.listdir("/proc/self/fd"))
    pool = BufferPool(1, 8192)
    reader = DirectReader(threads=1)
    with pool.lease() as lease:
        reader.read(path, 0, 100, lease)
    assert len(os.listdir("/proc/self/fd")) == fds_before + 1
    del reader
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) == fds_before


def test_dropped_lease_is_returned_even_when_warnings_are_errors():
    # the slot goes back (under the pool lock) before the ResourceWarning, so a filter that
    # turns the warning into an exception (pytest -W error) cannot lose it
    pool = BufferPool(2, 4096, name="strict")
    raised, hook = [], sys.unraisablehook
    sys.unraisablehook = lambda u: raised.append(u.exc_type)  # what __del__ raised
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ResourceWarning)
            lease = pool.lease()
            del lease
            gc.collect()
    finally:
        sys.unraisablehook = hook
    assert raised == [ResourceWarning]
    assert pool.free_count == pool.total and pool.reclaimed == 1
    assert any("reclaimed by the garbage collector" in line for line in leak_report())


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    pytest.skip(f"/proc/self/status has no {field}")


def test_pool_is_private_memory_populated_up_front():
    """The region is anonymous memory faulted in when the pool is made, not shmem faulted by the
    first read into each slot (docs/io.md: a miss into a fresh slot cost 10x the CPU)."""
    anon, shmem = _status_kib("RssAnon"), _status_kib("RssShmem")
    pool = BufferPool(8, 2**20, name="populated")
    try:
        assert _status_kib("RssAnon") - anon >= 8 * 1024 - 64  # every page already resident
        assert _status_kib("RssShmem") - shmem < 64
    finally:
        pool.close()
    assert _status_kib("RssAnon") - anon < 1024  # close() unmapped it
