"""Fault injection: disk errors, short reads, O_DIRECT refused, files truncated or removed under a
running engine, pool exhaustion, Ctrl-C at random moments, a disk that fills during conversion.

Faults go through the real code paths: ``os.preadv`` (the reader's syscall) is wrapped to fail or
shorten the n-th call and otherwise does the real read; expert files are truncated or removed on
disk; Ctrl-C is a real SIGINT; a full disk is the process's file-size limit (``RLIMIT_FSIZE``,
so ``write`` fails with EFBIG) or ``fsync`` failing with ENOSPC. After each fault: the error is an
``MERError`` with a message (or the ``KeyboardInterrupt`` itself), every pool slot not held by the
cache is free, the next call gives the reference tokens, and closing the engine leaves no file
descriptor or I/O thread behind. A conversion that fails leaves nothing ``Store.open`` accepts
and a rerun succeeds. (SIGKILL during conversion: ``test_store.py``'s
``test_killed_conversion_leaves_nothing_loadable``.) The fault points are drawn from a seeded
``random.Random``, so a failure replays.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import random
import resource
import shutil
import signal
import threading
import time
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hf_models import save_hf_model

import micro_expert_router as mer
from micro_expert_router.errors import BudgetError, MERError, PoolTimeout, ReadError, StoreError
from micro_expert_router.io import DirectReader
from micro_expert_router.store import Store, convert

IDS = [3, 17, 42, 5, 99, 64, 8, 21]
N_TOKENS = 6
RNG = random.Random(17)
EIO_POINTS = sorted(RNG.random() for _ in range(6))  # fractions of a run's preadv calls
TRANSIENT_POINTS = sorted(RNG.random() for _ in range(4))
SHORT_POINTS = sorted(RNG.random() for _ in range(4))
EINVAL_POINTS = sorted(RNG.random() for _ in range(4))
TRUNCATE_POINTS = [(RNG.randrange(N_TOKENS - 1), RNG.uniform(0.05, 0.5)) for _ in range(4)]
SIGINT_POINTS = sorted(RNG.random() for _ in range(12))  # fractions of a run's wall time
FSIZE_POINTS = sorted(RNG.random() for _ in range(4))  # fractions of the bytes a store takes
CONFIGS = {"whole": {"split": 1.0}, "split": {"split": 0.5}}  # cache: a quarter of the experts


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    # the model is tiny: on a loaded 2-core machine, two OpenMP threads make each call ~50x
    # slower (they spin against the other processes) without changing a bit of the result
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    save_hf_model("mixtral", root / "ckpt")
    store = convert(root / "ckpt", root / "store", progress=False, log=None)
    with mer.load(root / "store") as engine:
        ref = run(engine)
    return root, store.total_expert_bytes, ref


def run(engine) -> list[int]:
    return [s.token for s in engine.generate(IDS, N_TOKENS, temperature=0, stop_at_eos=False)]


def options(made, config: str) -> dict:
    _, total, _ = made
    return {"cache_bytes": total // 4, "io_threads": 2, **CONFIGS[config]}


def fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def io_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("mer-io")]


def pools_settled(provider, timeout: float = 10.0) -> None:
    """Wait for reads a fault left in flight; then every slot not held by the cache is free."""
    pools = [provider.pool, *provider.top_pools.values()]
    deadline = time.monotonic() + timeout
    while True:
        held = Counter(id(provider.cache.peek(k).lease.pool) for k in provider.cache.keys())
        out = {p.name: (p.total - p.free_count, held[id(p)]) for p in pools}
        if all(leased == cached for leased, cached in out.values()) and not provider.staged:
            return
        assert time.monotonic() < deadline, f"slots still out (leased, cached): {out}"
        time.sleep(0.01)


@contextmanager
def engine_under_fault(store: Path, **opts):
    """An engine whose close must give back every fd and I/O thread it took."""
    before = fds()
    engine = mer.load(store, **opts)
    try:
        yield engine
    finally:
        engine.close()
    assert not io_threads(), "an I/O thread outlived the engine"
    assert fds() == before, f"file descriptors leaked: {sorted(fds() - before)}"


def recovered(engine, ref: list[int]) -> None:
    """After a fault: the pool is whole and the next call works."""
    pools_settled(engine.provider)
    assert run(engine) == ref
    pools_settled(engine.provider)


def named(e: BaseException) -> None:
    assert isinstance(e, MERError) and len(str(e)) > 20, repr(e)


class Preadv:
    """The real ``os.preadv``, counted; ``rule(n, fd, bufs, pos)`` may replace call ``n``'s
    outcome (return a count or raise) or return None to let the real read happen."""

    def __init__(self, monkeypatch) -> None:
        self.real = os.preadv
        self.calls = 0
        self.lock = threading.Lock()
        self.rule = None
        monkeypatch.setattr(os, "preadv", self)

    def __call__(self, fd, bufs, pos):
        with self.lock:
            self.calls += 1
            n = self.calls
        rule = self.rule
        out = rule(n, fd, bufs, pos) if rule is not None else None
        return self.real(fd, bufs, pos) if out is None else out

    def at(self, fraction: float, total: int) -> int:
        """The call number ``fraction`` of the way through a run of ``total`` calls, from now."""
        return self.calls + 1 + min(int(fraction * total), total - 1)


_CALLS: dict[str, int] = {}


def calls_per_run(made, config: str, monkeypatch) -> int:
    if config not in _CALLS:
        with monkeypatch.context() as m:
            counter = Preadv(m)
            with mer.load(made[0] / "store", **options(made, config)) as engine:
                loaded = counter.calls  # the dense weights are read at load, with preadv too
                run(engine)
            _CALLS[config] = counter.calls - loaded
    return _CALLS[config]


def is_direct(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT)


# -- reads -------------------------------------------------------------------------------------
@pytest.mark.parametrize("point", range(len(EIO_POINTS)))
def test_persistent_eio_at_random_points(made, monkeypatch, point):
    root, _, ref = made
    config = ["whole", "split"][point % 2]
    total = calls_per_run(made, config, monkeypatch)
    preadv = Preadv(monkeypatch)
    with engine_under_fault(root / "store", **options(made, config)) as engine:
        start = preadv.at(EIO_POINTS[point], total)
        preadv.rule = lambda n, *_: _raise(errno.EIO) if n >= start else None
        with pytest.raises(ReadError, match=r"experts-00000.bin at offset \d+ .* failed after 3 "
                                            "retries: Input/output error") as e:  # fmt: skip
            run(engine)
        named(e.value)
        preadv.rule = None  # the disk is back
        recovered(engine, ref)


def _raise(code: int):
    raise OSError(code, os.strerror(code))


@pytest.mark.parametrize("point", range(len(TRANSIENT_POINTS)))
def test_transient_eio_is_retried_invisibly(made, monkeypatch, point):
    root, _, ref = made
    total = calls_per_run(made, "whole", monkeypatch)
    preadv = Preadv(monkeypatch)
    with engine_under_fault(root / "store", **options(made, "whole")) as engine:
        start = preadv.at(TRANSIENT_POINTS[point], total)
        preadv.rule = lambda n, *_: _raise(errno.EIO) if start <= n < start + 2 else None
        assert run(engine) == ref
        assert engine.provider.reader.stats.retries == 2
        recovered(engine, ref)


@pytest.mark.parametrize("point", range(len(SHORT_POINTS)))
def test_short_reads_at_random_points_are_completed(made, monkeypatch, point):
    root, _, ref = made
    total = calls_per_run(made, "split", monkeypatch)
    preadv = Preadv(monkeypatch)
    rng = random.Random(point)

    def short(n, fd, bufs, pos):
        if not start <= n < start + 5:
            return None
        buf = memoryview(bufs[0])
        k = rng.randrange(1, len(buf)) if len(buf) > 1 else 1
        m = max(4096, k // 4096 * 4096) if is_direct(fd) else k  # O_DIRECT reads whole pages
        return min(preadv.real(fd, [buf[:m]], pos), k)  # the kernel may return fewer bytes

    with engine_under_fault(root / "store", **options(made, "split")) as engine:
        start = preadv.at(SHORT_POINTS[point], total)
        preadv.rule = short
        assert run(engine) == ref
        recovered(engine, ref)


@pytest.mark.parametrize("point", range(len(EINVAL_POINTS)))
def test_o_direct_refused_mid_run_falls_back(made, monkeypatch, caplog, point):
    root, _, ref = made
    config = ["whole", "split"][point % 2]
    total = calls_per_run(made, config, monkeypatch)
    preadv = Preadv(monkeypatch)
    with engine_under_fault(root / "store", **options(made, config)) as engine:
        start = preadv.at(EINVAL_POINTS[point], total)
        preadv.rule = lambda n, fd, *_: (
            _raise(errno.EINVAL) if n >= start and is_direct(fd) else None
        )
        with caplog.at_level(logging.WARNING, logger="micro_expert_router.io.reader"):
            assert run(engine) == ref
        reader = engine.provider.reader
        assert reader.fallback_files == [str(root / "store" / "experts-00000.bin")]
        assert sum("O_DIRECT is not supported" in r.message for r in caplog.records) == 1
        recovered(engine, ref)


# -- files changed under a running engine ----------------------------------------------------
@pytest.mark.parametrize("point", range(len(TRUNCATE_POINTS)))
def test_expert_file_truncated_while_generating(made, tmp_path, point):
    root, _, ref = made
    step, keep = TRUNCATE_POINTS[point]
    store = copy_store(root / "store", tmp_path)
    f = store / "experts-00000.bin"
    original = f.read_bytes()
    config = ["whole", "split"][point % 2]
    with engine_under_fault(store, **{**options(made, config), "cache_bytes": 0}) as engine:
        gen = engine.generate(IDS, N_TOKENS, temperature=0, stop_at_eos=False)
        with pytest.raises(ReadError, match=r"experts-00000.bin is truncated: expected") as e:
            for i, _ in enumerate(gen):
                if i == step:
                    os.truncate(f, int(keep * len(original)))
        named(e.value)
        f.write_bytes(original)  # the file is repaired in place (same inode, fd still open)
        recovered(engine, ref)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_expert_file_removed_before_its_first_read(made, tmp_path, config):
    # submit() cannot open the file: before the fix, a whole read surfaced as AttributeError
    # ('NoneType' object has no attribute 'done') and its slot came back only through the gc;
    # a split miss lost its top slot the same way
    root, _, ref = made
    store = copy_store(root / "store", tmp_path)
    f = store / "experts-00000.bin"
    with engine_under_fault(store, **options(made, config)) as engine:
        moved = f.rename(store / "elsewhere.bin")
        with pytest.raises(ReadError, match=r"cannot open .*experts-00000.bin for reading") as e:
            run(engine)
        named(e.value)
        moved.rename(f)
        recovered(engine, ref)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_corrupt_experts_are_never_cached(made, tmp_path, config):
    # before the fix, a layer left by an error offered every read that had completed to the
    # cache, computed or not: the corrupt expert itself was cached without a view, and the next
    # call crashed on it (TypeError) instead of naming it again
    root, _, ref = made
    store = copy_store(root / "store", tmp_path)
    extents = [e for (layer, _), e in Store.open(store).experts.items() if layer == 0]
    original = {}
    with open(extents[0].file, "r+b") as f:
        for e in extents:  # one flipped byte in each expert of the first layer
            f.seek(e.offset + 100)
            original[e.offset] = f.read(1)
            f.seek(e.offset + 100)
            f.write(bytes([original[e.offset][0] ^ 0xFF]))
    opts = {**options(made, config), "cache_bytes": None, "verify": True}
    with engine_under_fault(store, **opts) as engine:
        for _ in range(2):
            with pytest.raises(StoreError, match=r"expert \(0, \d\) .* fails its checksum") as e:
                run(engine)
            named(e.value)
            pools_settled(engine.provider)
        with open(extents[0].file, "r+b") as f:
            for offset, b in original.items():
                f.seek(offset + 100)
                f.write(b)
        recovered(engine, ref)


def test_expert_file_removed_after_it_was_opened_keeps_working(made, tmp_path):
    root, _, ref = made
    store = copy_store(root / "store", tmp_path)
    with engine_under_fault(store, **{**options(made, "whole"), "cache_bytes": 0}) as engine:
        gen = engine.generate(IDS, N_TOKENS, temperature=0, stop_at_eos=False)
        tokens = [next(gen).token]
        (store / "experts-00000.bin").unlink()  # the reader holds the file open: the bytes stay
        tokens += [s.token for s in gen]
        assert tokens == ref
        recovered(engine, ref)


def test_split_store_without_cache_room_streams(made):
    # found by this suite: with split < 1 and no cache budget there is no top pool, and the
    # split-miss path looked one up (KeyError) instead of reading the whole extent
    root, _, ref = made
    with engine_under_fault(root / "store", **{**options(made, "split"), "cache_bytes": 0}) as e:
        assert not e.provider.top_pools
        assert run(e) == ref
        recovered(e, ref)


def copy_store(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "store"
    shutil.copytree(src, dst)
    return dst


# -- pool exhaustion and Ctrl-C -----------------------------------------------------------------
@pytest.mark.parametrize("config", list(CONFIGS))
def test_pool_exhaustion_is_a_named_timeout(made, config):
    # with a split layer the top read is already submitted when the bottom's lease times out:
    # before the fix, settling that miss raised AttributeError and lost both slots
    root, _, ref = made
    with engine_under_fault(root / "store", **options(made, config)) as engine:
        p = engine.provider
        p.lease_timeout_s = 0.2
        held = [p.pool.lease() for _ in range(p.pool.free_count)]  # someone holds every slot
        with pytest.raises(PoolTimeout, match=r"all \d+ slots of buffer pool 'experts'") as e:
            run(engine)
        assert isinstance(e.value, BudgetError)
        named(e.value)
        for lease in held:
            lease.release()
        recovered(engine, ref)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_ctrl_c_while_waiting_for_a_slot(made, config):
    root, _, ref = made
    with engine_under_fault(root / "store", **options(made, config)) as engine:
        p = engine.provider
        p.lease_timeout_s = None  # waits for ever: only Ctrl-C gets it out
        held = [p.pool.lease() for _ in range(p.pool.free_count)]
        assert interrupted(lambda: run(engine), delay_s=0.3)
        for lease in held:
            lease.release()
        recovered(engine, ref)


def interrupted(fn, delay_s: float) -> bool:
    """Run ``fn`` with a real SIGINT sent to this process after ``delay_s``; True if it was
    interrupted (False if it finished first). The signal never escapes into the test."""
    timer = threading.Timer(delay_s, os.kill, (os.getpid(), signal.SIGINT))
    hit = False
    # Python's own handler (KeyboardInterrupt), whatever an earlier test in this process set
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        timer.start()
        try:
            fn()
        finally:
            timer.cancel()
            timer.join()
            for _ in range(100):  # a signal sent just now is handled at a call boundary
                _breath()
    except KeyboardInterrupt:
        hit = True
    finally:
        signal.signal(signal.SIGINT, previous)
    timer.join()
    return hit


def _breath() -> None:
    pass


@pytest.mark.parametrize("point", range(len(SIGINT_POINTS)))
def test_ctrl_c_at_random_moments_of_generate(made, point):
    root, _, ref = made
    config = ["whole", "split"][point % 2]
    with engine_under_fault(root / "store", **options(made, config)) as engine:
        t0 = time.perf_counter()
        assert run(engine) == ref  # warm, and the length of one call
        took = time.perf_counter() - t0
        engine.provider.cache.clear()  # misses again, so the interrupt can land in a read
        interrupted(lambda: run(engine), delay_s=SIGINT_POINTS[point] * took)
        recovered(engine, ref)


# -- the engine is not built -------------------------------------------------------------------
def test_failed_load_closes_the_provider(made, monkeypatch):
    # an error after the provider is built (here: a bad prefetch spec) closed nothing before
    readers = []
    real_init = DirectReader.__init__

    def tracked(self, *a, **k):
        real_init(self, *a, **k)
        readers.append(self)

    monkeypatch.setattr(DirectReader, "__init__", tracked)
    with pytest.raises(MERError, match="unknown predictor 'nonsense'"):
        mer.load(made[0] / "store", prefetch="nonsense")
    # the dense weights' loader has a reader of its own, closed after the load
    assert readers and all(r._closed for r in readers)


# -- a disk that fills during conversion --------------------------------------------------------
def converted_cleanly_after(fault, made, tmp_path) -> None:
    """``fault()`` converts under a fault: a named error, nothing openable left; a rerun works."""
    root = made[0]
    dst = tmp_path / "out"
    with pytest.raises(StoreError, match=r"out: writing the store failed \(.+\)") as e:
        fault(lambda: convert(root / "ckpt", dst, progress=False, log=None))
    named(e.value)
    assert not dst.exists() and not list(tmp_path.glob(".out.partial-*"))
    with pytest.raises(StoreError):
        Store.open(dst)
    store = convert(root / "ckpt", dst, progress=False, log=None)
    assert store.verify() == [] and (dst / "manifest.json").is_file()


@pytest.mark.parametrize("point", range(len(FSIZE_POINTS)))
def test_disk_full_while_writing_a_store(made, tmp_path, point):
    # the file-size limit makes write() fail with EFBIG once a file passes `limit` bytes, as a
    # full disk fails it with ENOSPC (Python ignores SIGXFSZ, so the write returns the error)
    store = made[0] / "store"
    biggest = max(f.stat().st_size for f in store.iterdir())
    limit = max(1, int(FSIZE_POINTS[point] * biggest))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

    def fault(do):
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
        try:
            do()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))

    converted_cleanly_after(fault, made, tmp_path)


def test_enospc_at_every_fsync_of_a_conversion(made, tmp_path, monkeypatch):
    # a delayed-allocation file system reports a full disk at fsync: fail each fsync in turn
    real, calls = os.fsync, []
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd))[1])
    convert(made[0] / "ckpt", tmp_path / "count", progress=False, log=None)
    n = len(calls)
    assert n >= 4  # dense, experts, manifest, folders
    for point in range(1, n + 1):
        out = tmp_path / f"p{point}"
        out.mkdir()
        count = [0]

        def failing(fd, point=point, count=count):
            count[0] += 1
            if count[0] == point:
                _raise(errno.ENOSPC)
            return real(fd)

        def fault(do, failing=failing):
            with monkeypatch.context() as m:
                m.setattr(os, "fsync", failing)
                do()

        converted_cleanly_after(fault, made, out)
