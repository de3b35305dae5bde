"""The lean per-chunk path: no thread hand-off per local chunk, the decode backlog still
bounds memory, recycled buffers are never reused while viewed, lazy futures.

These pin what makes the pool fast (see chunkpool/README.md, "Loading") without timing
anything: hand-offs are counted, the memory bound is read from the pool's counters, and
buffer reuse is checked against numpy ground truth.
"""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore

from chunkpool import ChunkCancelledError, ChunkIndexError, ChunkLoadError, ChunkState, scheduler
from chunkpool.buffers import BufferPool
from chunkpool.workers import Workers


@pytest.fixture(params=["v3", "v3-sharded"])
def grid(request, tmp_path):
    """1024 local chunks of 8 x 8 (zstd), unsharded or in 64 x 64 shards."""
    data = ramp((256, 256))
    kwargs = {"shards": (64, 64)} if request.param == "v3-sharded" else {}
    return make_array(tmp_path / "g.zarr", data, (8, 8), **kwargs), data


def all_keys(pool):
    return [(0, idx) for idx in pool.multiscale_info.levels[0].iter_chunk_indices()]


def test_local_chunks_load_without_a_thread_hand_off_each(pools, grid, monkeypatch):
    """Reading a local chunk and decoding it happen in one IO thread, which goes on to
    the next job itself: the old pool handed every chunk over twice (to an IO thread,
    then to a decoder thread), 2048 hand-offs for these 1024 chunks."""
    arr, data = grid
    hand_offs = []
    submit = Workers.submit

    def counting_submit(self, fn, *args):
        hand_offs.append(fn)
        submit(self, fn, *args)

    monkeypatch.setattr(Workers, "submit", counting_submit)
    pool = pools(arr)
    keys = all_keys(pool)
    locs = [pool.get_chunk(level, index) for level, index in keys]
    pool.wait_for_chunks_to_load()
    for loc in locs:
        np.testing.assert_array_equal(loc.data, data[loc.slices])
    # a burst wakes a few threads (at most io_concurrency at a time); not one per chunk
    assert len(hand_offs) <= len(keys) // 4, len(hand_offs)


def test_blocked_decodes_stop_new_fetches(pools, tmp_path):
    """The decode backlog bounds memory also when IO threads decode what they read:
    while the decoders are stuck, at most ``decode_backlog`` fetched chunks (plus the
    reads already in flight) exist, however many are requested."""
    data = ramp((64, 64))
    arr = make_array(tmp_path / "d.zarr", data, (4, 4))  # 256 chunks
    io, backlog = 4, 2  # cpu_workers=1: decode_backlog = 2
    pool = pools(arr, io_concurrency=io, cpu_workers=1)
    source = pool._sources[0]
    decode, fetch = source.decode, source.fetch_sync
    gate = threading.Event()
    fetches = []

    def stuck_decode(index, raw):
        assert gate.wait(30), "the test never opened the gate"
        return decode(index, raw)

    def counted_fetch(index, *args):
        fetches.append(index)
        return fetch(index, *args)

    source.decode = stuck_decode
    source.fetch_sync = counted_fetch
    source.native = None  # (the reads this test gates and counts are Python's)
    locs = [pool.get_chunk(0, idx) for _, idx in all_keys(pool)]
    deadline = time.monotonic() + 30
    while True:  # until no read is in flight and the backlog is full: nothing can start
        stats = pool.stats
        if stats.chunks_fetching == 0 and stats.chunks_decoding >= backlog:
            break
        assert time.monotonic() < deadline, stats
        time.sleep(0.001)
    assert len(fetches) <= backlog + io - 1, len(fetches)
    assert stats.chunks_decoding <= backlog + io - 1
    assert stats.chunks_waiting == len(locs) - len(fetches)
    gate.set()
    pool.wait_for_chunks_to_load(timeout=60)
    for loc in locs:
        np.testing.assert_array_equal(loc.data, data[loc.slices])
    assert sorted(fetches) == sorted(loc.index for loc in locs)  # each read once


def test_recycled_buffer_is_never_reused_while_a_view_lives(pools, grid):
    """A chunk's memory goes back to the free list only when no array views it: views
    of a dropped chunk keep their values while every other chunk is loaded (into
    recycled buffers) and dropped, over and over."""
    arr, data = grid
    pool = pools(arr)
    keys = all_keys(pool)
    first = pool.get_chunk(0, (3, 5), "viewer")
    first.wait()
    expected = data[first.slices].copy()
    views = [first.data[1:, ::2], first.data.T, np.asarray(first.data)]
    raw = memoryview(first.data)
    pool.drop_chunk(0, (3, 5), "viewer")  # destroyed: no cache
    del first
    gc.collect()
    for _ in range(3):
        for level, index in keys:
            pool.get_chunk(level, index)
        pool.wait_for_chunks_to_load()
        pool.drop_chunks(keys)
    np.testing.assert_array_equal(views[0], expected[1:, ::2])
    np.testing.assert_array_equal(views[1], expected.T)
    np.testing.assert_array_equal(views[2], expected)
    np.testing.assert_array_equal(np.frombuffer(raw, expected.dtype).reshape(8, 8), expected)
    assert pool.stats.recycled_bytes > 0  # the other chunks' buffers did come back


def test_buffer_returns_once_and_only_when_every_view_is_gone():
    """The handle's finaliser gives the buffer back exactly once: not while a view (or
    an array derived from the handle itself) lives, and not again when such a derived
    array dies."""
    buffers = BufferPool(64 << 20)  # room for every spare of the arena
    buffer = buffers.take(128)
    base_free = buffers.free_bytes
    data = buffers.hand_out(buffer, np.dtype("uint16"), (8, 8))
    data[...] = 7
    view = data[2:4]
    handle = data.base.base  # the private handle, reachable from any view
    derived = handle[10:20]  # an array of the handle's own type, viewing the buffer
    del data, handle
    gc.collect()
    assert buffers.free_bytes == base_free  # the view still uses it
    del derived
    gc.collect()
    assert buffers.free_bytes == base_free  # a derived array dying gives nothing back
    assert (view == 7).all()
    del view
    gc.collect()
    assert buffers.free_bytes == base_free + 128  # now, and once
    first, second = buffers.take(128), buffers.take(128)
    assert not np.shares_memory(first, second)


def test_future_asked_for_late_is_resolved_like_an_early_one(pools, tmp_path):
    """Futures are made on demand: one asked for after the load (or failure, or
    cancellation) is already resolved the same way an early one would be."""
    data = ramp((16, 16))
    arr = make_array(tmp_path / "f.zarr", data, (8, 8))
    (tmp_path / "f.zarr" / "c" / "1" / "1").write_bytes(b"not zstd")
    pool = pools(arr)
    early = pool.get_chunk(0, (0, 1)).future
    loaded, failed = pool.get_chunk(0, (0, 0)), pool.get_chunk(0, (1, 1))
    with pytest.raises(ChunkLoadError):
        pool.wait_for_chunks_to_load()
    np.testing.assert_array_equal(early.result(timeout=30), data[:8, 8:])
    np.testing.assert_array_equal(loaded.future.result(timeout=0), data[:8, :8])
    assert failed.future.exception(timeout=0) is failed.error is not None
    store = GatedStore(arr.store)
    store.rec.hold()  # no read finishes: the chunk is cancelled while pending
    held = pools(zarr.open_array(store, mode="r"))
    pending = held.get_chunk(0, (1, 0))
    store.rec.wait_started(1)
    held.drop_chunk(0, (1, 0))
    assert pending.state is ChunkState.CANCELLED
    assert pending.future.cancelled()
    with pytest.raises(ChunkCancelledError):
        pending.wait()
    store.rec.open_gate()


def test_benchmark_script_runs(capsys, monkeypatch):
    """tests/benchmarks/bench_pool.py keeps working (one tiny round of every case;
    it checks the pool's and the references' data itself)."""
    import importlib
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parent / "benchmarks"))
    bench = importlib.import_module("bench_pool")
    results = bench.main(["--size", "256", "--chunks", "64,128", "--rounds", "1"])
    assert len(bench.main(["--size", "256", "--chunks", "128", "--rounds", "1", "--bulk"])) == 2
    assert [label for label, _ in results] == [
        "64² chunks, unsharded",
        "128² chunks, unsharded",
        "64² chunks, sharded 256²",
        "128² chunks, sharded 256²",
    ]
    assert "pool/tensorstore" in capsys.readouterr().out


def batching_pool(pools, arr, monkeypatch, **kwargs):
    """A pool whose IO threads take jobs in batches (as they do on page-cache reads):
    batches are taken once fetch and decode times are measured and reads are fast
    enough; here any measured read is fast enough."""
    monkeypatch.setattr(scheduler, "BATCH_FETCH_RATIO", float("inf"))
    pool = pools(arr, **kwargs)
    warm = all_keys(pool)[:8]
    pool.get_chunks(warm)
    pool.wait_for_chunks_to_load()
    pool.drop_chunks(warm)
    assert pool._scheduler._batching  # what the tests using this pool are about
    return pool


class GatedFetches:
    """Wraps a source's ``fetch_sync``: records the chunks fetched, in order, and
    holds the fetch of ``stuck`` until ``gate`` is set."""

    def __init__(self, source, stuck):
        self.fetch = source.fetch_sync
        self.stuck = stuck
        self.gate = threading.Event()
        self.started = threading.Event()
        self.order: list[tuple[int, ...]] = []
        source.fetch_sync = self
        source.native = None  # (the reads it gates are Python's)

    def __call__(self, index, *args):
        self.order.append(index)
        if index == self.stuck:
            self.started.set()
            assert self.gate.wait(30), "the test never opened the gate"
        return self.fetch(index, *args)


def test_batches_are_taken_best_first(pools, grid, monkeypatch):
    """With one CPU slot, one IO thread takes batch after batch: each is the best
    waiting jobs at the time it is taken, so reads follow the priorities (re-ranked
    ones included) exactly as single jobs do."""
    arr, data = grid
    # (one IO thread: no other takes jobs from a batch held up at the gate)
    pool = batching_pool(pools, arr, monkeypatch, cpu_workers=1, io_concurrency=1)
    gated = GatedFetches(pool._sources[0], stuck=(0, 0))
    pool.get_chunk(0, (0, 0), priority=-10)  # its batch holds the only slot
    assert gated.started.wait(30)
    rng = np.random.default_rng(3)
    indices = [(i, j) for i in range(4, 8) for j in range(10)]
    priorities = [float(p) for p in rng.permutation(len(indices))]
    locs = pool.get_chunks([(0, idx) for idx in indices], priority=priorities)
    pool.get_chunk(0, indices[-1], priority=-5)  # re-ranked: first after (0, 0)
    gated.gate.set()
    pool.wait_for_chunks_to_load(timeout=60)
    expected = [indices[-1]] + [
        idx for _, idx in sorted(zip(priorities, indices, strict=True)) if idx != indices[-1]
    ]
    assert gated.order == [(0, 0), *expected]
    for loc in locs:
        np.testing.assert_array_equal(loc.data, data[loc.slices])


def test_job_dropped_while_its_batch_runs_is_discarded(pools, grid, monkeypatch):
    """Jobs of a batch that are dropped while the batch runs are never read (or their
    data is thrown away): they end cancelled, fire no load handler, and leave no
    pending bytes; the rest of the batch loads."""
    arr, data = grid
    # (one IO thread: no other takes jobs from the batch held up at the gate)
    pool = batching_pool(pools, arr, monkeypatch, cpu_workers=1, io_concurrency=1)
    gated = GatedFetches(pool._sources[0], stuck=(2, 0))
    loaded = []
    keys = [(0, (2, j)) for j in range(8)]  # one batch (the first is held)
    locs = pool.get_chunks(keys, "view", load_handler=loaded.append)
    assert gated.started.wait(30)
    dropped = keys[1::2]
    pool.drop_chunks(dropped, "view")
    gated.gate.set()
    pool.wait_for_chunks_to_load(timeout=60)
    for key, loc in zip(keys, locs, strict=True):
        if key in dropped:
            assert loc.state is ChunkState.CANCELLED and not loc.loaded
        else:
            np.testing.assert_array_equal(loc.data, data[loc.slices])
    assert sorted(loc.key for loc in loaded) == sorted(set(keys) - set(dropped))
    assert not set(idx for _, idx in dropped) & set(gated.order[1:])  # never read
    stats = pool.stats
    assert stats.pending_bytes == 0 and stats.chunks_pending == 0
    assert stats.chunks_held == len(keys) - len(dropped)


def test_read_that_hangs_holds_up_no_other_job_of_its_batch(pools, grid, monkeypatch):
    """A read that does not return (a FIFO, a stuck network filesystem) holds up only
    its own chunk: another IO thread takes the other jobs of the stuck batch."""
    arr, data = grid
    pool = batching_pool(pools, arr, monkeypatch, cpu_workers=2)
    gated = GatedFetches(pool._sources[0], stuck=(3, 0))
    keys = [(0, (3, j)) for j in range(8)]
    locs = pool.get_chunks(keys)
    assert gated.started.wait(30)
    try:
        for loc in locs[1:]:
            np.testing.assert_array_equal(loc.wait(timeout=30), data[loc.slices])
        assert not locs[0].loaded
    finally:
        gated.gate.set()
    np.testing.assert_array_equal(locs[0].wait(timeout=30), data[locs[0].slices])


def test_get_chunks_is_get_chunk_for_many(pools, grid):
    """``get_chunks`` holds like ``get_chunk`` per key (refs, handlers, data), checks
    every key before holding any, and takes one priority or one per key."""
    arr, data = grid
    pool = pools(arr)
    keys = all_keys(pool)[:20]
    with pytest.raises(ChunkIndexError):
        pool.get_chunks([*keys, (0, (999, 0))], "a")
    assert pool.stats.chunks_held == 0
    with pytest.raises(ValueError):
        pool.get_chunks(keys, "a", priority=[1.0, 2.0])
    loaded = []
    locs = pool.get_chunks(keys, "a", priority=range(20), load_handler=loaded.append)
    again = pool.get_chunks([(level, list(index)) for level, index in keys], "b", priority=1)
    assert [loc.key for loc in locs] == keys
    assert all(a is b for a, b in zip(locs, again, strict=True))
    pool.wait_for_chunks_to_load()
    assert sorted(loc.key for loc in loaded) == sorted(keys)
    for loc in locs:
        assert loc.refs == {"a", "b"}
        np.testing.assert_array_equal(loc.data, data[loc.slices])
    assert pool.stats.misses == 20 and pool.stats.hits == 20
