"""Priority order, cancellation and bounded concurrency, proven by counting real reads.

The stores here hold every chunk read at a gate the test opens one read at a time, so
the order in which reads *start* is observable without relying on timing.
"""

from __future__ import annotations

import random
import time

import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import AsyncGatedStore, GatedStore

from chunkpool import ChunkState


def chunk_key(arr: zarr.Array, idx: tuple[int, ...]) -> str:
    return arr.async_array.metadata.encode_chunk_key(idx)


@pytest.fixture
def grid(tmp_path):
    """A 16 x 16 grid of small chunks on local disk."""
    return make_array(tmp_path / "g.zarr", ramp((64, 64)), (4, 4))


def gated(arr: zarr.Array, store_cls=GatedStore) -> zarr.Array:
    store = store_cls(arr.store)
    store.rec.hold()
    return zarr.open_array(store, mode="r")


def test_pending_loads_start_in_priority_order(pools, grid):
    arr = gated(grid)
    rec = arr.store.rec
    pool = pools(arr, io_concurrency=1)
    pool.get_chunk(0, (0, 0), priority=-1)  # occupies the single IO slot
    rec.wait_started(1)
    rng = random.Random(1)
    indices = [(i, j) for i in range(1, 4) for j in range(4)]
    priorities = rng.sample(range(100), len(indices))
    for idx, p in zip(indices, priorities, strict=True):  # requested in another order
        pool.get_chunk(0, idx, priority=p)
    # re-ranking a waiting chunk moves it: the last one requested goes first
    pool.get_chunk(0, indices[-1], priority=-5)
    order = [indices[-1]] + [
        idx for _, idx in sorted(zip(priorities, indices, strict=True)) if idx != indices[-1]
    ]
    rec.open_gate()
    pool.wait_for_chunks_to_load()
    assert rec.started == [chunk_key(arr, (0, 0))] + [chunk_key(arr, idx) for idx in order]


def test_equal_priorities_load_in_request_order(pools, grid):
    arr = gated(grid)
    pool = pools(arr, io_concurrency=1)
    indices = [(3, 1), (0, 2), (2, 2), (1, 0), (0, 0)]
    for idx in indices:
        pool.get_chunk(0, idx)
    arr.store.rec.open_gate()
    pool.wait_for_chunks_to_load()
    assert arr.store.rec.started == [chunk_key(arr, idx) for idx in indices]


def test_chunk_loads_at_its_most_urgent_refs_priority(pools, grid):
    arr = gated(grid)
    rec = arr.store.rec
    pool = pools(arr, io_concurrency=1)
    pool.get_chunk(0, (0, 0))
    rec.wait_started(1)
    pool.get_chunk(0, (1, 1), "a", priority=10)
    pool.get_chunk(0, (2, 2), "a", priority=5)
    loc = pool.get_chunk(0, (1, 1), "b", priority=1)
    assert loc.priority == 1
    rec.open_gate()
    pool.wait_for_chunks_to_load()
    assert rec.started[1:] == [chunk_key(arr, (1, 1)), chunk_key(arr, (2, 2))]


def test_dropped_queued_loads_never_start(pools, grid):
    """simplezarr ran 64 dropped loads before 8 new ones; here they never run."""
    arr = gated(grid)
    rec = arr.store.rec
    io = 4
    pool = pools(arr, io_concurrency=io)
    events = []
    old = [(i, j) for i in range(8) for j in range(8)]
    for idx in old:
        pool.get_chunk(
            0,
            idx,
            load_handler=lambda loc: events.append(("load", loc.index)),
            destroy_handler=lambda loc: events.append(("destroy", loc.index)),
        )
    rec.wait_started(io)
    for idx in old:
        pool.drop_chunk(0, idx)
    new = [(15, j) for j in range(8)]
    for idx in new:
        pool.get_chunk(0, idx)
    rec.open_gate()
    pool.wait_for_chunks_to_load()
    old_keys = {chunk_key(arr, idx) for idx in old}
    assert sum(k in old_keys for k in rec.started) == io  # only those already in flight
    assert {chunk_key(arr, idx) for idx in new} <= set(rec.finished)
    assert sorted(events) == sorted(("destroy", idx) for idx in old)  # never a load
    assert pool.stats.cancellations == len(old)


def test_in_flight_async_reads_are_cancelled(pools, grid):
    arr = gated(grid, AsyncGatedStore)
    rec = arr.store.rec
    pool = pools(arr, remote_io_concurrency=4)
    locs = [pool.get_chunk(0, (0, j)) for j in range(8)]
    rec.wait_started(4)
    for loc in reversed(locs):  # the queued ones first, then the 4 in flight
        pool.drop_chunk(0, loc.index)
    deadline = time.monotonic() + 5
    while len(rec.cancelled) < 4 and time.monotonic() < deadline:
        time.sleep(0.005)
    rec.open_gate()
    time.sleep(0.05)
    assert len(rec.cancelled) == 4 and rec.finished == []
    assert len(rec.started) == 4  # the 4 that were queued never started
    assert all(loc.state is ChunkState.CANCELLED for loc in locs)
    # the pool still works after cancelling
    assert pool.get_chunk(0, (5, 5)).wait().shape == (4, 4)


def test_in_flight_window_is_bounded(pools, grid):
    for store_cls, kwarg in [
        (GatedStore, "io_concurrency"),
        (AsyncGatedStore, "remote_io_concurrency"),
    ]:
        arr = gated(grid, store_cls)
        rec = arr.store.rec
        pool = pools(arr, **{kwarg: 3})
        for j in range(16):
            pool.get_chunk(0, (1, j))
        rec.wait_started(3)
        time.sleep(0.1)
        assert len(rec.started) == 3
        stats = pool.stats
        assert stats.chunks_fetching == 3 and stats.chunks_waiting == 13
        rec.open_gate()
        pool.wait_for_chunks_to_load()
        assert len(rec.finished) == 16


def test_slow_async_reads_do_not_block_the_caller(pools, grid):
    arr = gated(grid, AsyncGatedStore)
    pool = pools(arr)
    t0 = time.perf_counter()
    for i in range(16):
        for j in range(16):
            pool.get_chunk(0, (i, j))
    # requesting never waits on IO: the reads are held at the gate, so a wait would
    # never end (the test's timeout); this bound only makes such a failure quick
    assert time.perf_counter() - t0 < 30
    arr.store.rec.open_gate()
    pool.wait_for_chunks_to_load()


def test_dropping_a_batch_never_starts_its_queued_loads(pools, grid):
    """Cancelling in-flight reads frees slots; a batch drop cancels the queued ones of
    the same batch first, so none of them slips into a freed slot."""
    for _ in range(5):
        arr = gated(grid, AsyncGatedStore)
        rec = arr.store.rec
        pool = pools(arr, remote_io_concurrency=4)
        indices = [(2, j) for j in range(16)]
        for idx in indices:
            pool.get_chunk(0, idx)
        rec.wait_started(4)
        pool.drop_chunks([(0, idx) for idx in indices])  # in-flight ones first
        time.sleep(0.1)
        assert len(rec.started) == 4 and rec.finished == []
        assert pool.stats.cancellations == 16
        rec.open_gate()
