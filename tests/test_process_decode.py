"""``ChunkPool(..., decode="processes")``: chunks decoded by worker processes into shared
memory are those zarr-python reads; a codec that crashes fails its chunk only; nothing is
left in /dev/shm, nor running, after destroy(); the scheduler's rules still hold.

The codecs in ``support.pycodecs`` are registered in this process only (as an
application registers its own): the workers get them by unpickling the arrays'
metadata. Each test's pool starts at most two workers (~25 ms each from the
forkserver, which starts once per session).
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support import pycodecs
from support.pycodecs import PyXor, PyXorV3
from support.teststores import AsyncGatedStore, GatedStore

from chunkpool import (
    ChunkDecodeError,
    ChunkLoadError,
    ChunkPool,
    ChunkReadError,
    ChunkState,
    DecodeWorkerError,
    procdecode,
    read_multiscales,
)
from chunkpool import scheduler as scheduler_module
from chunkpool import source as source_module
from chunkpool.procdecode import PROCESS_NAME, SEGMENT_PREFIX, SHM_DIR

WAIT = 30.0  # generous deadline of every wait on a signal here


def segments() -> list[str]:
    """This process's shared-memory segments in /dev/shm."""
    mine = f"{SEGMENT_PREFIX}{os.getpid()}-"
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(mine))


def workers() -> list[Any]:
    """The decode worker processes running now."""
    return [p for p in multiprocessing.active_children() if p.name == PROCESS_NAME]


@pytest.fixture
def ppools() -> Iterator[Callable[..., ChunkPool]]:
    """``ppools(node, **kwargs)``: a pool decoding in (at most 2) processes. After the
    test all are destroyed, and then no decode worker runs, no chunkpool thread is
    left, and /dev/shm holds no segment of this process: as before the test."""
    before = segments()
    made: list[ChunkPool] = []

    def make(node: Any, **kwargs: Any) -> ChunkPool:
        (info,) = read_multiscales(node, "test")
        kwargs.setdefault("decode", "processes")
        kwargs.setdefault("decode_processes", 2)
        pool = ChunkPool(info, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.destroy()
    assert workers() == []
    assert [t.name for t in threading.enumerate() if t.name.startswith("chunkpool-")] == []
    assert segments() == before


def in_shared_memory(data: np.ndarray) -> bool:
    """Whether ``data`` views a memory map (the pool's shared segments)."""
    base = data
    while isinstance(base, np.ndarray):
        base = base.base
    return isinstance(base, mmap.mmap)


def load_all(pool: ChunkPool) -> list[Any]:
    scale = pool.multiscale_info.levels[0]
    grid = scale.chunk_grid_shape
    locs = [pool.get_chunk(0, idx, "t") for idx in np.ndindex(*grid)]
    with contextlib.suppress(ChunkLoadError):  # each test looks at its failures
        pool.wait_for_chunks_to_load()
    return locs


def _v3_sharded(path: Path, data: np.ndarray) -> zarr.Array:
    return make_array(path, data, (32, 32), shards=(64, 64))


LAYOUTS: dict[str, Callable[[Path, np.ndarray], zarr.Array]] = {
    "v2 zstd": lambda p, d: make_array(p, d, (32, 32), zarr_format=2),
    "v2 F-order blosc": lambda p, d: make_array(
        p, d, (32, 32), zarr_format=2, order="F", compressors=numcodecs.Blosc()
    ),
    "v2 delta + python compressor": lambda p, d: make_array(
        p, d, (32, 32), zarr_format=2, filters=[numcodecs.Delta(d.dtype)], compressors=PyXor()
    ),
    "v3 zstd": lambda p, d: make_array(p, d, (32, 32)),
    "v3 sharded zstd": _v3_sharded,
    "v3 big-endian python + gzip": lambda p, d: make_array(
        p,
        d,
        (32, 32),
        serializer=zarr.codecs.BytesCodec(endian="big"),
        compressors=[PyXorV3(), zarr.codecs.GzipCodec()],
    ),
    "v3 sharded, async store": lambda p, d: zarr.open_array(
        AsyncGatedStore(_v3_sharded(p, d).store), mode="r"
    ),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_data_equals_zarr_read(ppools, tmp_path, layout):
    arr = LAYOUTS[layout](tmp_path / "a.zarr", ramp((80, 100)))  # edge chunks on both axes
    pool = ppools(arr)
    locs = load_all(pool)
    for loc in locs:
        expected = arr[loc.slices]
        assert loc.error is None, loc.error
        assert loc.data.dtype == expected.dtype and loc.data.shape == expected.shape
        np.testing.assert_array_equal(loc.data, expected)
        assert not loc.data.flags.writeable
        assert in_shared_memory(loc.data), loc.index  # decoded there, not copied back
    assert 1 <= len(pool._processes.pids) <= 2


def test_a_big_endian_level_decodes_to_native_chunks(ppools, tmp_path):
    """A level stored big-endian: its chunks come back in native byte order, the
    level's dtype, as in thread mode (a worker's reply says only how a chunk lies in
    its buffer: the main process knows the dtype and shape it must have)."""
    data = ramp((80, 100)).astype(">u2")
    arr = make_array(tmp_path / "a.zarr", data, (32, 32), zarr_format=2)
    pool = ppools(arr)
    assert pool.multiscale_info.levels[0].dtype == np.dtype("=u2")
    for loc in load_all(pool):
        assert loc.error is None, loc.error
        assert loc.data.dtype == np.dtype("=u2") and loc.data.shape == data[loc.slices].shape
        np.testing.assert_array_equal(loc.data, data[loc.slices])
        assert in_shared_memory(loc.data), loc.index


def test_held_data_is_never_rewritten(ppools, tmp_path):
    """A chunk's array stays what it was while anyone holds it, even after the pool let
    it go and recycled buffers went on to other chunks decoded by other processes."""
    data = ramp((128, 128))
    arr = make_array(tmp_path / "a.zarr", data, (32, 32))
    pool = ppools(arr)
    kept = pool.get_chunk(0, (0, 0), "t").wait()
    pool.drop_chunk(0, (0, 0), "t")
    for _ in range(3):  # every other chunk, its buffers recycled each round
        locs = [pool.get_chunk(0, idx, "t") for idx in np.ndindex(4, 4) if idx != (0, 0)]
        pool.wait_for_chunks_to_load()
        for loc in locs:
            np.testing.assert_array_equal(loc.data, data[loc.slices])
        del loc
        pool.drop_chunks([(0, loc.index) for loc in locs], "t")
        del locs
    assert pool._buffers.reused > 0  # buffers did go round
    np.testing.assert_array_equal(kept, data[:32, :32])


def _python_codec_array(path: Path, data: np.ndarray) -> zarr.Array:
    return make_array(path, data, (32, 32), zarr_format=2, compressors=PyXor())


def _overwrite(arr: zarr.Array, idx: tuple[int, ...], content: bytes) -> None:
    key = arr.async_array.metadata.encode_chunk_key(idx)
    (Path(arr.store.root) / key).write_bytes(content)


def test_a_crashing_codec_fails_only_its_chunk(ppools, tmp_path):
    data = ramp((128, 128), "uint8")
    arr = _python_codec_array(tmp_path / "a.zarr", data)
    crashes = {
        (1, 1): (pycodecs.SEGV, "killed by SIGSEGV"),
        (2, 2): (pycodecs.EXIT3, "exit code 3"),
        (0, 3): (pycodecs.NOMEM, "ran out of memory (MemoryError: test codec out of memory)"),
    }
    for idx, (marker, _) in crashes.items():
        _overwrite(arr, idx, marker)
    pool = ppools(arr)
    locs = load_all(pool)
    for loc in locs:
        if loc.index in crashes:
            reason = crashes[loc.index][1]
            assert isinstance(loc.error, DecodeWorkerError), loc.error
            assert loc.error.exit_reason == reason
            message = str(loc.error)
            assert message.startswith(f"test/{loc.index[0]}.{loc.index[1]}: decode worker (pid ")
            assert reason in message
        else:  # the others all loaded, by the workers that replaced the dead ones
            assert loc.error is None, loc.error
            np.testing.assert_array_equal(loc.data, data[loc.slices])
    processes = pool._processes
    assert processes.lost == 3 and processes.started >= 4
    assert len(processes.pids) <= 2
    assert set(segments()) == pool._buffers._live  # the pool's own: workers make none
    # and the pool goes on: a chunk loaded again comes from a live worker
    pool.drop_chunk(0, (0, 0), "t")
    np.testing.assert_array_equal(pool.get_chunk(0, (0, 0), "u").wait(), data[:32, :32])


def test_a_wrong_size_decode_fails_as_in_threads(ppools, tmp_path):
    """A valid frame of the wrong size fails with the same message in both modes."""
    data = ramp((64, 64))
    zstd = make_array(tmp_path / "z.zarr", data, (32, 32), zarr_format=2)
    _overwrite(zstd, (1, 0), numcodecs.Zstd().encode(data[:16, :32].tobytes()))
    python = _python_codec_array(tmp_path / "p.zarr", data)
    _overwrite(python, (0, 1), PyXor().encode(b"\1" * 2047))
    for arr, idx in [(zstd, (1, 0)), (python, (0, 1))]:
        errors = []
        for mode in ("threads", "processes"):
            pool = ppools(arr, decode=mode, decode_processes=None if mode == "threads" else 2)
            loc = pool.get_chunk(0, idx, "t")
            with pytest.raises(ChunkLoadError):
                loc.wait()
            assert type(loc.error) is ChunkDecodeError
            errors.append(str(loc.error))
        assert errors[0] == errors[1]
        assert "expected" in errors[1]


def test_pending_loads_still_start_in_priority_order(ppools, tmp_path):
    data = ramp((128, 128))
    grid = make_array(tmp_path / "g.zarr", data, (32, 32))
    store = GatedStore(grid.store)
    store.rec.hold()
    arr = zarr.open_array(store, mode="r")
    rec = store.rec
    pool = ppools(arr, io_concurrency=1, cpu_workers=1)
    first = pool.get_chunk(0, (0, 0), priority=-1)  # occupies the single IO slot
    rec.wait_started(1)
    rng = random.Random(1)
    indices = [(i, j) for i in range(1, 4) for j in range(4)]
    priorities = rng.sample(range(100), len(indices))
    for idx, p in zip(indices, priorities, strict=True):
        pool.get_chunk(0, idx, priority=p)
    order = [idx for _, idx in sorted(zip(priorities, indices, strict=True))]
    rec.open_gate()
    pool.wait_for_chunks_to_load()
    key = arr.async_array.metadata.encode_chunk_key
    assert rec.started == [key((0, 0))] + [key(idx) for idx in order]
    for loc in [first, *(pool.get_chunk(0, idx) for idx in indices)]:
        np.testing.assert_array_equal(loc.data, data[loc.slices])


class _Gate:
    """A FIFO a worker's decode waits at (``pycodecs.GATE``): :meth:`wait_entered`
    returns once the worker is inside the decode, :meth:`open` lets it go on."""

    def __init__(self, path: Path):
        self.path = path
        os.mkfifo(path)
        self._entered = threading.Event()
        self._fd: int | None = None
        self._thread = threading.Thread(target=self._open, daemon=True)
        self._thread.start()

    def marker(self) -> bytes:
        return pycodecs.GATE + bytes(self.path) + b"\0"

    def _open(self) -> None:
        self._fd = os.open(self.path, os.O_WRONLY)  # returns once the worker opened it
        self._entered.set()

    def wait_entered(self) -> None:
        assert self._entered.wait(WAIT), "the decode never reached the gate"

    def open(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def close(self) -> None:
        """Unblock the opener thread if no worker ever came (then end it)."""
        if not self._entered.is_set():
            os.close(os.open(self.path, os.O_RDONLY | os.O_NONBLOCK))
        self._thread.join(WAIT)
        self.open()


@pytest.fixture
def gate(tmp_path) -> Iterator[_Gate]:
    g = _Gate(tmp_path / "gate.fifo")
    yield g
    g.close()


def test_a_chunk_dropped_while_a_worker_decodes_it_is_discarded(ppools, tmp_path, gate):
    data = ramp((128, 128), "uint8")
    arr = _python_codec_array(tmp_path / "a.zarr", data)
    _overwrite(arr, (0, 0), gate.marker() + PyXor().encode(data[:32, :32].tobytes()))
    pool = ppools(arr, decode_processes=1)
    events: list[str] = []
    loc = pool.get_chunk(
        0,
        (0, 0),
        "t",
        load_handler=lambda loc: events.append("load"),
        destroy_handler=lambda loc: events.append("destroy"),
    )
    gate.wait_entered()  # the worker is decoding it
    pool.drop_chunk(0, (0, 0), "t")
    assert loc.state is ChunkState.CANCELLED and events == ["destroy"]
    gate.open()
    # the one worker finishes the discarded decode, then serves the next chunk
    np.testing.assert_array_equal(pool.get_chunk(0, (1, 1), "t").wait(), data[32:64, 32:64])
    assert events == ["destroy"] and loc.state is ChunkState.CANCELLED
    assert pool._processes.lost == 0


def _one_worker_batches(ppools: Callable[..., ChunkPool], arr: zarr.Array) -> tuple:
    """A pool of ``arr`` (4 x 4 chunks) through a recording store, with one IO thread,
    one CPU slot and one worker, its loads measured (so that reads are taken in
    batches): the pool and the store."""
    store = GatedStore(arr.store)
    pool = ppools(zarr.open_array(store, mode="r"), io_concurrency=1, cpu_workers=1)
    pool._processes.size = 1
    grid = [(0, idx) for idx in np.ndindex(4, 4)]
    for _ in range(2):
        pool.get_chunks(grid, "warm")
        pool.wait_for_chunks_to_load()
        pool.drop_chunks(grid, "warm")
    return pool, store


@pytest.mark.parametrize("decode", ["threads", "processes"])
def test_batches_are_larger_in_process_mode(ppools, tmp_path, decode):
    """A batch (one wait for its worker, one publication) takes at most MAX_BATCH page-
    cached chunks in thread mode, and up to PROCESS_MAX_BATCH in process mode, where
    each batch costs the worker and the thread a sleep and a wake-up."""
    arr = make_array(tmp_path / "a.zarr", ramp((64, 64)), (8, 8))  # 64 chunks
    kwargs = {"decode": "threads", "decode_processes": None} if decode == "threads" else {}
    pool = ppools(arr, io_concurrency=1, cpu_workers=1, **kwargs)
    grid = [(0, idx) for idx in np.ndindex(8, 8)]
    scheduler = pool._scheduler
    take, sizes = scheduler._take_batch, []

    def recording() -> Any:
        batch = take()
        if batch is not None:
            sizes.append(len(batch.pending))
        return batch

    scheduler._take_batch = recording
    for _ in range(3):  # (the first loads measure the typical read and decode)
        pool.get_chunks(grid, "t")
        pool.wait_for_chunks_to_load(WAIT)
        pool.drop_chunks(grid, "t")
    if decode == "threads":
        assert max(sizes) == scheduler_module.MAX_BATCH
    else:
        assert scheduler_module.MAX_BATCH < max(sizes) <= scheduler_module.PROCESS_MAX_BATCH


def test_jobs_whose_files_the_worker_reads_go_in_groups(ppools, tmp_path, monkeypatch):
    """A batch's jobs whose files the worker reads go down its pipe in groups of
    SEND_GROUP (the first at once, the last group's rest when the thread waits): fewer
    messages than jobs, and every chunk loads."""
    data = ramp((64, 64))
    arr = make_array(tmp_path / "a.zarr", data, (8, 8))  # 64 chunks
    sent: list[int] = []
    send = procdecode._Worker.send

    def counting(worker: Any, message: tuple) -> None:
        sent.append(len(message[0]))
        send(worker, message)

    monkeypatch.setattr(procdecode._Worker, "send", counting)
    pool = ppools(arr, io_concurrency=1, cpu_workers=1)
    for _ in range(3):
        locs = load_all(pool)
        pool.drop_chunks([loc.key for loc in locs], "t")
    for loc in load_all(pool):
        np.testing.assert_array_equal(loc.data, data[loc.slices])
    assert sum(sent) == 4 * 64 and max(sent) == procdecode.SEND_GROUP
    assert len(sent) < 4 * 64 / 2


def test_a_batch_is_read_while_its_worker_decodes_and_a_crash_fails_one_chunk(
    ppools, tmp_path, gate
):
    """One IO thread, one CPU slot, one worker: while the worker decodes a batch's first
    chunk, the thread reads the others and queues them to it (it does not wait for each
    decode). The worker then dies on the second: that chunk alone fails, naming the exit
    reason; the first was decoded before, and the third, queued behind the crash and
    never started, loads from the worker that replaces it."""
    data = ramp((128, 128), "uint8")
    arr = _python_codec_array(tmp_path / "a.zarr", data)
    pool, store = _one_worker_batches(ppools, arr)
    first, crash, third = (0, 0), (0, 1), (0, 2)
    _overwrite(arr, first, gate.marker() + PyXor().encode(data[:32, :32].tobytes()))
    _overwrite(arr, crash, pycodecs.SEGV)
    key = arr.async_array.metadata.encode_chunk_key
    seen = len(store.rec.started)
    locs = pool.get_chunks([(0, first), (0, crash), (0, third)], "t")
    gate.wait_entered()  # the worker is inside the first decode, held
    started = store.rec.wait_started(seen + 3, timeout=WAIT)[seen:]
    assert started == [key(first), key(crash), key(third)]
    gate.open()
    with contextlib.suppress(ChunkLoadError):
        pool.wait_for_chunks_to_load()
    np.testing.assert_array_equal(locs[0].data, data[:32, :32])
    error = locs[1].error
    assert isinstance(error, DecodeWorkerError) and error.exit_reason == "killed by SIGSEGV"
    assert str(error).startswith("test/0.1: decode worker (pid ")
    np.testing.assert_array_equal(locs[2].data, data[:32, 64:96])
    assert pool._processes.lost == 1 and pool._processes.started == 2


def test_a_decode_past_the_timeout_is_killed_and_the_next_in_its_batch_loads(
    ppools, tmp_path, gate
):
    """A batch's first decode never ends: its worker is killed after ``timeout`` and
    that chunk fails saying so; the chunk queued behind it loads from a new worker."""
    data = ramp((128, 128), "uint8")
    arr = _python_codec_array(tmp_path / "a.zarr", data)
    pool, store = _one_worker_batches(ppools, arr)
    pool._processes.timeout = 2.0
    _overwrite(arr, (0, 0), gate.marker())  # never opened
    seen = len(store.rec.started)
    stuck, behind = pool.get_chunks([(0, (0, 0)), (0, (0, 1))], "t")
    gate.wait_entered()
    store.rec.wait_started(seen + 2, timeout=WAIT)  # both read, in one batch
    with contextlib.suppress(ChunkLoadError):
        pool.wait_for_chunks_to_load()
    error = stuck.error
    assert isinstance(error, DecodeWorkerError), error
    assert error.exit_reason == "killed by SIGKILL"
    assert str(error).endswith(") did not finish within 2 s and was killed")
    np.testing.assert_array_equal(behind.data, data[:32, 32:64])
    assert pool._processes.lost == 1 and pool._processes.started == 2


def test_destroy_stops_a_worker_stuck_in_a_decode(ppools, tmp_path, gate):
    data = ramp((128, 128), "uint8")
    arr = _python_codec_array(tmp_path / "a.zarr", data)
    _overwrite(arr, (0, 0), gate.marker())
    pool = ppools(arr)
    pool.get_chunk(0, (0, 0), "t")
    np.testing.assert_array_equal(pool.get_chunk(0, (1, 1), "t").wait(), data[32:64, 32:64])
    gate.wait_entered()  # a worker waits at the gate, never opened
    assert len(workers()) == 2 and segments()
    pool.destroy()
    assert workers() == [] and segments() == []


def test_a_grown_level_decodes_in_processes_too(ppools, tmp_path):
    data = ramp((64, 64))
    arr = make_array(tmp_path / "a.zarr", data, (32, 32))
    pool = ppools(arr)
    arr.resize((96, 64))
    arr[64:] = data[:32] + 1
    assert pool.refresh().grown
    new = pool.get_chunk(0, (2, 0), "t").wait()
    np.testing.assert_array_equal(new, data[:32, :32] + 1)
    assert in_shared_memory(new)


def _chunk_file(root: Path, arr: zarr.Array, index: tuple[int, ...]) -> Path:
    return root / arr.metadata.encode_chunk_key(index)


def test_workers_read_the_chunk_files_and_a_rewritten_one_reloads(ppools, tmp_path, monkeypatch):
    """This process reads no chunk file of a local level (the workers do): it takes
    each file's lstat only, the stamp a refresh compares. With its reads made to fail,
    every chunk loads; a chunk rewritten in place then reloads, alone."""
    data = ramp((64, 64))
    root = tmp_path / "a.zarr"
    arr = make_array(root, data, (32, 32))

    def no_read(*args: Any) -> None:
        raise AssertionError("a chunk file read in the application's process")

    monkeypatch.setattr(source_module._LocalReader, "pread", no_read)
    pool = ppools(zarr.open_array(root, mode="r"))
    locs = load_all(pool)
    for loc in locs:
        assert loc.error is None, loc.error
        np.testing.assert_array_equal(loc.data, data[loc.slices])
        assert in_shared_memory(loc.data)
    assert pool.stats.bytes_fetched == sum(
        os.path.getsize(_chunk_file(root, arr, loc.index)) for loc in locs
    )

    zarr.open_array(root, mode="r+")[:32, :32] = 4242
    stored = _chunk_file(root, arr, (0, 0))
    st = os.stat(stored)  # (a later mtime: the clock may give both writes one)
    os.utime(stored, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert pool.refresh().rewritten == ((0, (0, 0)),)
    pool.wait_for_chunks_to_load(WAIT)
    assert (locs[0].data == 4242).all()
    np.testing.assert_array_equal(locs[1].data, data[locs[1].slices])


def test_a_file_gone_when_its_worker_reads_it_is_a_missing_chunk(ppools, tmp_path, monkeypatch):
    """A chunk file deleted after this process saw it (lstat), before its worker read
    it: the chunk is missing, the fill value, as in thread mode."""
    data = ramp((64, 64))
    root = tmp_path / "a.zarr"
    arr = make_array(root, data, (32, 32), fill_value=9)
    gone, kept = arr.metadata.encode_chunk_key((1, 1)), arr.metadata.encode_chunk_key((0, 0))
    (root / gone).unlink()
    status = source_module._LocalReader.status
    monkeypatch.setattr(  # it was there when this process looked
        source_module._LocalReader,
        "status",
        lambda self, key: status(self, kept if key == gone else key),
    )
    pool = ppools(zarr.open_array(root, mode="r"))
    for loc in load_all(pool):
        assert loc.error is None, loc.error
        expected = np.full((32, 32), 9, data.dtype) if loc.index == (1, 1) else data[loc.slices]
        np.testing.assert_array_equal(loc.data, expected)


def test_a_chunk_linked_out_of_the_store_fails_also_when_its_worker_reads_it(
    ppools, tmp_path, monkeypatch
):
    """A chunk file that is a link out of the store's root fails its chunk with the
    ChunkReadError of thread mode, naming the link, not its target: seen as a link by
    this process (which then reads it itself, as thread mode does), or become one
    after this process saw a plain file there (the worker's read applies the same
    rule)."""
    data = ramp((64, 64))
    root, outside = tmp_path / "a.zarr", tmp_path / "elsewhere"
    arr = make_array(root, data, (32, 32))
    decoy = make_array(outside / "decoy.zarr", data[::-1].copy(), (32, 32))
    linked = arr.metadata.encode_chunk_key((1, 0))
    (root / linked).unlink()
    (root / linked).symlink_to(_chunk_file(outside / "decoy.zarr", decoy, (1, 0)))
    plain = os.lstat(_chunk_file(root, arr, (0, 0)))

    def check(pool: ChunkPool) -> None:
        for loc in load_all(pool):
            if loc.index != (1, 0):
                np.testing.assert_array_equal(loc.data, data[loc.slices])
                continue
            assert isinstance(loc.error, ChunkReadError), loc.error
            assert f"{linked!r} is a symbolic link out of the store; not followed" in str(loc.error)
            assert "elsewhere" not in str(loc.error)

    check(ppools(zarr.open_array(root, mode="r")))
    status = source_module._LocalReader.status
    monkeypatch.setattr(  # a plain file when this process looked
        source_module._LocalReader,
        "status",
        lambda self, key: plain if key == linked else status(self, key),
    )
    check(ppools(zarr.open_array(root, mode="r")))


def test_decode_mode_is_checked(tmp_path):
    arr = make_array(tmp_path / "a.zarr", ramp((8, 8)), (4, 4))
    (info,) = read_multiscales(arr, "test")
    with pytest.raises(ValueError, match="decode must be"):
        ChunkPool(info, decode="fibers")
    with pytest.raises(ValueError, match="decode_processes needs"):
        ChunkPool(info, decode_processes=2)
    with pytest.raises(ValueError, match="decode_processes must be"):
        ChunkPool(info, decode="processes", decode_processes=0)


def test_segments_of_a_killed_process_are_swept(monkeypatch):
    """A process killed outright (SIGKILL: no cleanup) leaves its segments; the next
    pool of this mode in another process unlinks them, and only those of dead pids."""
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    dead_pid = int(dead.stdout)
    stale = Path(SHM_DIR, f"{SEGMENT_PREFIX}{dead_pid}-0-test")
    alive = Path(SHM_DIR, f"{SEGMENT_PREFIX}{os.getpid()}-999999-test")
    for path in (stale, alive):
        path.write_bytes(b"x")
    try:
        monkeypatch.setattr(procdecode, "_swept", False)
        procdecode.SharedBuffers(0).close()
        assert not stale.exists() and alive.exists()
    finally:
        for path in (stale, alive):
            path.unlink(missing_ok=True)
