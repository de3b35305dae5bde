"""The pool's lifecycle under hostile conditions: reads that never return, and event
loops that are missing, stopped or closed.

Blocked reads are made deterministic with a FIFO as a chunk file (``open`` blocks until
a writer appears), a gated store, or a ``preadv`` held on an Event; the test learns that
the read has started from a spy, never from a sleep, and unblocks it only after
``destroy()`` returned. Every pool thread must then end by itself.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import weakref

import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore

from chunkpool import ChunkCancelledError, ChunkPool, ChunkPoolError, ChunkState, native
from chunkpool.errors import EventLoopError

#: Generous bound on any wait for a signal (loaded CI machines are slow).
DEADLINE = 30.0


def pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("chunkpool-")]


def join_pool_threads() -> None:
    """Wait (bounded) until every pool thread has ended by itself."""
    for thread in pool_threads():
        thread.join(DEADLINE)
    assert not pool_threads(), f"pool threads still running: {pool_threads()}"


def abandon_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "chunkpool" and r.levelno == logging.WARNING and "abandoned" in r.message
    ]


# -- 2c: destroy() is bounded whatever a read does ------------------------------------------


def destroy_abandoning_chunk_0(pool: ChunkPool, caplog: pytest.LogCaptureFixture) -> None:
    """``pool.destroy`` returns in time, with one WARNING naming the one stuck thread and
    its chunk, level 0 chunk (0, 0)."""
    caplog.set_level(logging.WARNING, logger="chunkpool")
    pool.destroy(timeout=0.2)
    (record,) = abandon_records(caplog)
    assert "1 thread" in record.message and "level 0 chunk (0, 0)" in record.message


@pytest.mark.timeout(60)
def test_destroy_returns_while_a_fifo_chunk_blocks_its_read(pools, tmp_path, monkeypatch, caplog):
    make_array(tmp_path / "a.zarr", ramp((16, 16)), (8, 8))
    fifo = str(tmp_path / "a.zarr" / "c" / "0" / "0")
    os.remove(fifo)
    os.mkfifo(fifo)  # opening it for reading blocks until a writer comes
    real_open = os.open
    entered = threading.Event()

    def spy_open(path, flags, *args, **kwargs):
        if os.fspath(path) == fifo:
            entered.set()
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy_open)
    pool = pools(zarr.open_array(tmp_path / "a.zarr", mode="r"), io_concurrency=1, cpu_workers=1)
    loaded = []
    loc = pool.get_chunk(0, (0, 0), load_handler=loaded.append)
    try:
        assert entered.wait(DEADLINE)
        destroy_abandoning_chunk_0(pool, caplog)
        assert loc.state is ChunkState.CANCELLED and loc.future.cancelled()
        with pytest.raises(ChunkCancelledError):
            loc.wait()
    finally:
        if entered.is_set():  # a reader is in (or entering) open(): let it return
            os.close(real_open(fifo, os.O_WRONLY))
    join_pool_threads()
    assert loaded == [] and not loc.loaded and loc.state is ChunkState.CANCELLED
    assert pool.stats.loads == 0 and pool.stats.failures == 0 and pool.memory_usage == 0


@pytest.mark.timeout(60)
def test_destroy_abandons_reads_stuck_in_a_sync_store_by_default(pools, caplog):
    arr = make_array(zarr.storage.MemoryStore(), ramp((16, 16)), (8, 8))
    store = GatedStore(arr.store)
    store.rec.hold()  # every chunk read waits at the gate, which opens only at the end
    pool = pools(zarr.open_array(store, mode="r"), io_concurrency=2, cpu_workers=1)
    loaded = []
    locs = [pool.get_chunk(0, idx, load_handler=loaded.append) for idx in [(0, 0), (0, 1), (1, 0)]]
    waited: list[BaseException] = []

    def waiter() -> None:
        try:
            locs[0].wait()
        except BaseException as err:
            waited.append(err)

    consumer = threading.Thread(target=waiter)
    try:
        store.rec.wait_started(2)
        # the waits a user calls with a timeout are bounded by it
        with pytest.raises(TimeoutError):
            locs[0].wait(timeout=0.01)
        with pytest.raises(TimeoutError):
            pool.wait_for_chunks_to_load(timeout=0.01)
        consumer.start()
        caplog.set_level(logging.WARNING, logger="chunkpool")
        pool.destroy()  # the default timeout: a few seconds
        consumer.join(DEADLINE)
        assert not consumer.is_alive() and isinstance(waited[0], ChunkCancelledError)
        (record,) = abandon_records(caplog)
        assert "2 threads" in record.message
        assert "level 0 chunk (0, 0)" in record.message
        assert "level 0 chunk (0, 1)" in record.message
        assert "(1, 0)" not in record.message  # it was waiting in the queue, not stuck
        for loc in locs:
            assert loc.state is ChunkState.CANCELLED and loc.future.cancelled()
    finally:
        store.rec.open_gate()
    join_pool_threads()
    assert len(store.rec.finished) == 2  # the stuck reads did return, and were discarded
    assert loaded == [] and not any(loc.loaded for loc in locs)
    assert pool.stats.loads == 0 and pool.memory_usage == 0


@pytest.mark.timeout(60)
def test_a_late_read_into_a_recycled_buffer_is_discarded(pools, tmp_path, monkeypatch, caplog):
    # 128 KiB chunks: local reads of this size go into recycled buffers with preadv
    arr = make_array(tmp_path / "big.zarr", ramp((256, 512)), (256, 256), compressors=None)
    real_preadv = os.preadv
    entered, release = threading.Event(), threading.Event()

    def stuck_preadv(fd, buffers, offset, *args):
        entered.set()
        assert release.wait(DEADLINE)  # a network filesystem that stopped answering
        return real_preadv(fd, buffers, offset, *args)

    monkeypatch.setattr(os, "preadv", stuck_preadv)
    monkeypatch.setattr(native, "AVAILABLE", False)  # (its reads are not os.preadv's)
    pool = pools(arr, io_concurrency=1, cpu_workers=1)
    loc = pool.get_chunk(0, (0, 0))
    try:
        assert entered.wait(DEADLINE)
        destroy_abandoning_chunk_0(pool, caplog)
    finally:
        release.set()
    join_pool_threads()
    assert loc.state is ChunkState.CANCELLED and not loc.loaded
    # the buffer the late read filled went nowhere: the destroyed pool recycles nothing
    assert pool.stats.recycled_bytes == 0 and pool.memory_usage == 0


def test_destroy_timeout_must_be_a_finite_non_negative_number(pools):
    arr = make_array(zarr.storage.MemoryStore(), ramp((8, 8)), (8, 8))
    pool = pools(arr)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout"):
            pool.destroy(timeout=bad)
    assert not pool.destroyed
    pool.destroy(timeout=0)
    assert pool.destroyed


# -- 3c: async handlers never queue for a loop that does not run ----------------------------


def test_asyncio_handlers_without_a_running_loop_are_refused(pools):
    arr = make_array(zarr.storage.MemoryStore(), ramp((16, 16)), (8, 8))
    pool = pools(arr)
    with pytest.raises(EventLoopError, match="no asyncio event loop is running") as info:
        pool.enable_async_load_handlers("asyncio")
    assert isinstance(info.value, ChunkPoolError) and isinstance(info.value, RuntimeError)
    # nothing changed: load handlers still run in wait(), in this thread
    ran = []
    pool.get_chunk(0, (0, 0), load_handler=lambda loc: ran.append(threading.get_ident())).wait()
    assert ran == [threading.get_ident()]


def _load_and_drop(pool, indices, handler) -> list[weakref.ref]:
    """Load then drop each chunk (no cache): weak refs to the locations let go."""
    refs = []
    for idx in indices:
        loc = pool.get_chunk(0, idx, load_handler=handler, drop_handler=handler)
        loc.wait()
        pool.drop_chunk(0, idx)
        refs.append(weakref.ref(loc))
        del loc
    return refs


def _dropped_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "chunkpool" and r.levelno == logging.WARNING and "dropped" in r.message
    ]


@pytest.mark.timeout(60)
def test_handlers_of_a_loop_that_stopped_are_dropped_not_queued(pools, caplog):
    arr = make_array(zarr.storage.MemoryStore(), ramp((32, 32)), (8, 8))
    pool = pools(arr)
    loop = asyncio.new_event_loop()
    try:
        # given before the loop runs: calls wait for it, then run on it
        pool.enable_async_load_handlers(loop.call_soon_threadsafe)
        first = loop.create_future()
        loc = pool.get_chunk(0, (0, 0), load_handler=lambda loc: first.set_result(loc.index))
        assert loop.run_until_complete(asyncio.wait_for(first, DEADLINE)) == (0, 0)
        del loc
        # the loop has stopped: calls for it must not pile up (nor keep chunks alive)
        caplog.set_level(logging.WARNING, logger="chunkpool")
        late = []
        refs = _load_and_drop(pool, [(i, j) for i in range(4) for j in range(4)][1:], late.append)
        gc.collect()
        assert [r() for r in refs] == [None] * len(refs)
        assert late == []
        (record,) = _dropped_records(caplog)
        assert "not running" in record.message
    finally:
        loop.close()


@pytest.mark.timeout(60)
def test_handlers_of_a_loop_closed_with_calls_pending_are_dropped(pools, caplog):
    arr = make_array(zarr.storage.MemoryStore(), ramp((32, 32)), (8, 8))
    pool = pools(arr)
    loop = asyncio.new_event_loop()
    pool.enable_async_load_handlers(loop.call_soon_threadsafe)  # a loop that will never run
    late = []
    refs = _load_and_drop(pool, [(0, 0)], late.append)  # its calls are scheduled on the loop
    loop.close()  # and are gone with it
    caplog.set_level(logging.WARNING, logger="chunkpool")
    refs += _load_and_drop(pool, [(i, j) for i in range(4) for j in range(4)][1:], late.append)
    gc.collect()
    assert [r() for r in refs] == [None] * len(refs)
    assert late == []
    (record,) = _dropped_records(caplog)
    assert "closed" in record.message
