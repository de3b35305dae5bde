"""ChunkPool: data, refs, handlers, cache and budgets, failures, batch reads, stats."""

from __future__ import annotations

import asyncio
import gc
import threading

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore

from chunkpool import (
    ENTRY_OVERHEAD,
    ChunkCancelledError,
    ChunkIndexError,
    ChunkLoadError,
    ChunkManager,
    ChunkPool,
    ChunkState,
    PoolDestroyedError,
)

SHAPE = (100, 90)
CHUNKS = (30, 40)  # 4 x 3 chunks, cropped at both far edges


@pytest.fixture(params=["v2", "v3", "v3-sharded", "v2-F-order"])
def image(request, tmp_path):
    """A local uint16 array in each layout, with its numpy ground truth."""
    data = ramp(SHAPE)
    data[:30, :40] = 0  # an all-fill chunk: not written to the store
    kwargs = {
        "v2": {"zarr_format": 2},
        "v3": {},
        "v3-sharded": {"shards": (60, 80)},
        "v2-F-order": {"zarr_format": 2, "order": "F"},
    }[request.param]
    return make_array(tmp_path / "a.zarr", data, CHUNKS, **kwargs), data


def test_every_chunk_equals_numpy(pools, image):
    arr, data = image
    pool = pools(arr)
    scale = pool.multiscale_info.levels[0]
    locs = [pool.get_chunk(0, idx) for idx in scale.iter_chunk_indices()]
    pool.wait_for_chunks_to_load()
    for loc in locs:
        assert loc.state is ChunkState.LOADED
        np.testing.assert_array_equal(loc.data, data[loc.slices])
        assert loc.data.shape == scale.chunk_data_shape(loc.index)
        assert not loc.data.flags.writeable
    # each chunk: its data (the fill chunk: 1 item) and the entry's fixed cost; + indexes
    expected = sum(loc.nbytes for loc in locs[1:]) + 2 + len(locs) * ENTRY_OVERHEAD
    assert pool.memory_usage == expected + pool.stats.index_bytes


def test_missing_chunk_is_fill_value(pools, tmp_path):
    arr = zarr.create_array(
        tmp_path / "f.zarr", shape=(10, 10), chunks=(5, 5), dtype="int16", fill_value=-7
    )
    pool = pools(arr)
    data = pool.get_chunk(0, (1, 1)).wait()
    assert data.shape == (5, 5) and (data == -7).all()


def test_bad_index_and_level(pools, image):
    pool = pools(image[0])
    with pytest.raises(ChunkIndexError):
        pool.get_chunk(1, (0, 0))
    with pytest.raises(ChunkIndexError):
        pool.get_chunk(0, (4, 0))
    with pytest.raises(ChunkIndexError):
        pool.get_chunk(0, (0,))
    with pytest.raises(IndexError):  # ChunkIndexError is an IndexError too
        pool.drop_chunk(0, (-1, 0))


# -- refs -------------------------------------------------------------------------------


def test_refs_are_idempotent_and_counted(pools, image):
    pool = pools(image[0])
    loc = pool.get_chunk(0, (1, 1), "a")
    assert pool.get_chunk(0, (1, 1), "a") is loc
    pool.get_chunk(0, (1, 1), "b")
    assert loc.refs == {"a", "b"}
    pool.drop_chunk(0, (1, 1), "a")  # one drop releases a ref however often it got
    assert loc.refs == {"b"}
    pool.drop_chunk(0, (1, 1), "a")  # dropping what a ref does not hold: nothing
    assert loc.refs == {"b"}
    loc.wait()
    pool.drop_chunk(0, (1, 1), "b")
    assert loc.refs == set() and loc.state is ChunkState.DESTROYED
    assert pool.memory_usage == pool.stats.index_bytes  # (a sharded array's index stays)
    assert pool.get_chunk(0, (1, 1), "a") is not loc  # no cache: a new location


def test_handlers_fire_once_per_event_in_sync_mode(pools, image):
    pool = pools(image[0])
    events = []

    def handlers(tag):
        return {
            "load_handler": lambda loc: events.append((tag, "load", loc.index)),
            "drop_handler": lambda loc: events.append((tag, "drop", loc.index)),
            "destroy_handler": lambda loc: events.append((tag, "destroy", loc.index)),
        }

    loc = pool.get_chunk(0, (0, 1), "a", **handlers("a"))
    pool.get_chunk(0, (0, 1), "a", **handlers("a"))  # registers nothing twice
    pool.get_chunk(0, (0, 1), "b", **handlers("b"))
    assert events == []  # sync mode: load handlers run inside wait()
    loc.wait()
    loc.wait()
    assert sorted(events) == [("a", "load", (0, 1)), ("b", "load", (0, 1))]
    events.clear()
    pool.get_chunk(0, (0, 1), "c", **handlers("c"))  # already loaded: fires at next wait
    pool.wait_for_chunks_to_load()
    assert events == [("c", "load", (0, 1))]
    events.clear()
    pool.drop_chunk(0, (0, 1), "a")
    assert events == [("a", "drop", (0, 1))]
    events.clear()
    pool.destroy()
    assert sorted(events) == [
        ("a", "destroy", (0, 1)),
        ("b", "destroy", (0, 1)),
        ("b", "drop", (0, 1)),
        ("c", "destroy", (0, 1)),
        ("c", "drop", (0, 1)),
    ]


def test_async_handlers_run_on_the_loop_thread_in_order(pools, image):
    pool = pools(image[0])
    seen = []

    class Manager(ChunkManager):
        def on_load(self, loc):
            seen.append(("load", loc.index, threading.get_ident()))

        def on_drop(self, loc):
            seen.append(("drop", loc.index, threading.get_ident()))

        def on_destroy(self, loc):
            seen.append(("destroy", loc.index, threading.get_ident()))

    async def main():
        pool.enable_async_load_handlers("asyncio")
        manager = Manager(pool)
        scale = pool.multiscale_info.levels[0]
        for idx in scale.iter_chunk_indices():
            manager.get_chunk(0, idx)
        while sum(e[0] == "load" for e in seen) < scale.n_chunks:
            await asyncio.sleep(0.005)
        manager.drop_all()
        await asyncio.sleep(0.05)
        return threading.get_ident()

    loop_thread = asyncio.run(main())
    assert {e[2] for e in seen} == {loop_thread}
    n = pool.multiscale_info.levels[0].n_chunks
    assert [e[0] for e in seen] == ["load"] * n + ["drop", "destroy"] * n


def test_handler_that_raises_is_logged_and_pool_survives(pools, image, caplog):
    pool = pools(image[0])

    def bad(loc):
        raise ValueError("boom")

    pool.get_chunk(0, (0, 0), load_handler=bad, drop_handler=bad)
    pool.wait_for_chunks_to_load()
    pool.drop_chunk(0, (0, 0))
    raised = [r for r in caplog.records if r.exc_info and "boom" in str(r.exc_info[1])]
    assert len(raised) == 2
    assert pool.get_chunk(0, (1, 1)).wait().shape == CHUNKS


def test_handler_may_call_back_into_the_pool(pools, image):
    pool = pools(image[0])
    chained = []

    def load_next(loc):
        if loc.index == (0, 0):
            chained.append(pool.get_chunk(0, (0, 1), "chain"))
        pool.drop_chunk(*loc.key)

    pool.get_chunk(0, (0, 0), load_handler=load_next)
    pool.wait_for_chunks_to_load()
    assert chained and chained[0].loaded


# -- cache and memory -------------------------------------------------------------------


def test_cache_by_count_is_lru_and_serves_hits(pools, image):
    pool = pools(image[0], cache_size=2)
    for idx in [(0, 1), (0, 2), (1, 0)]:
        pool.get_chunk(0, idx).wait()
        pool.drop_chunk(0, idx)
    cached = {loc.index for loc in pool.iter_chunks()}
    assert cached == {(0, 2), (1, 0)}  # (0, 1) evicted first
    misses = pool.stats.misses
    assert pool.get_chunk(0, (0, 2)).loaded  # served at once from the cache
    assert pool.stats.misses == misses and pool.stats.hits >= 1
    assert pool.memory_usage == pool.stats.index_bytes + sum(
        loc.nbytes + ENTRY_OVERHEAD for loc in pool.iter_chunks()
    )


def test_cache_by_bytes(pools, image):
    nbytes = 30 * 40 * 2 + ENTRY_OVERHEAD  # what a cached chunk counts
    pool = pools(image[0], cache_bytes=2 * nbytes + 10)
    destroyed = []
    for idx in [(0, 1), (1, 0), (1, 1), (2, 0)]:
        pool.get_chunk(0, idx, destroy_handler=lambda loc: destroyed.append(loc.index)).wait()
        pool.drop_chunk(0, idx)
        assert pool.memory_usage - pool.stats.index_bytes <= 2 * nbytes + 10
    assert destroyed == [(0, 1), (1, 0)]
    assert pool.stats.cache_bytes == pool.memory_usage - pool.stats.index_bytes == 2 * nbytes


def test_pending_bytes_reported_apart(pools, image):
    arr, _ = image
    gated = zarr.open_array(GatedStore(arr.store), mode="r")
    gated.store.rec.hold()
    pool = pools(gated)
    locs = [pool.get_chunk(0, idx) for idx in [(1, 0), (1, 1)]]
    assert pool.memory_usage == 0
    assert pool.pending_bytes == sum(loc.nbytes for loc in locs)
    gated.store.rec.open_gate()
    pool.wait_for_chunks_to_load()
    assert pool.pending_bytes == 0
    assert pool.memory_usage == pool.stats.index_bytes + sum(
        loc.nbytes + ENTRY_OVERHEAD for loc in locs
    )


# -- failures ---------------------------------------------------------------------------


def test_failed_load_is_a_state_and_retried_later(pools, tmp_path):
    data = ramp((40, 40))
    arr = make_array(tmp_path / "c.zarr", data, (20, 20))
    bad = tmp_path / "c.zarr" / "c" / "1" / "0"
    good_bytes = bad.read_bytes()
    bad.write_bytes(b"this is not zstd")
    pool = pools(arr, cache_size=10)
    told = []
    locs = [pool.get_chunk(0, idx, load_handler=told.append) for idx in arr_chunks(pool)]
    with pytest.raises(ChunkLoadError) as info:
        pool.wait_for_chunks_to_load()
    assert list(info.value.failures) == [(0, (1, 0))]
    assert "level 0 chunk (1, 0)" in str(info.value)
    assert len(told) == 4  # the failed chunk's handler is told too
    failed = locs[2]
    assert failed.state is ChunkState.FAILED and failed.error is not None
    with pytest.raises(ChunkLoadError):
        _ = failed.data
    for loc in locs[:2] + locs[3:]:
        np.testing.assert_array_equal(loc.data, data[loc.slices])
    assert pool.stats.failures == 1
    pool.drop_chunk(0, (1, 0))  # a failed chunk is not cached...
    assert (0, (1, 0)) not in {loc.key for loc in pool.iter_chunks()}
    bad.write_bytes(good_bytes)
    again = pool.get_chunk(0, (1, 0))  # ...so a later request retries
    np.testing.assert_array_equal(again.wait(), data[20:, :20])


def arr_chunks(pool: ChunkPool):
    return list(pool.multiscale_info.levels[0].iter_chunk_indices())


def store_key_of(pool: ChunkPool, index: tuple[int, int]) -> tuple[str, set]:
    """The store key holding chunk ``index`` and every chunk read from that key (the
    inner chunks of its shard, when sharded)."""
    scale = pool.multiscale_info.levels[0]
    per = [
        s // c
        for s, c in zip(scale.shard_shape or scale.chunk_shape, scale.chunk_shape, strict=True)
    ]
    outer = tuple(i // n for i, n in zip(index, per, strict=True))
    key = scale.array.async_array.metadata.encode_chunk_key(outer)
    same = {
        idx
        for idx in arr_chunks(pool)
        if tuple(i // n for i, n in zip(idx, per, strict=True)) == outer
    }
    return key, same


def test_io_error_fails_only_that_chunk(pools, image):
    arr, _data = image
    gated = zarr.open_array(GatedStore(arr.store), mode="r")
    pool = pools(gated)
    victim, lost = store_key_of(pool, (2, 2))  # a shard's key fails all its chunks
    gated.store.rec.fail_keys.add(victim)
    locs = [pool.get_chunk(0, idx) for idx in arr_chunks(pool)]
    with pytest.raises(ChunkLoadError) as info:
        pool.wait_for_chunks_to_load()
    assert {index for _, index in info.value.failures} == lost
    assert sum(loc.loaded for loc in locs) == len(locs) - len(lost)


# -- batch reads ------------------------------------------------------------------------


def test_iter_data_in_order_with_backpressure(pools, image):
    arr, data = image
    gated = zarr.open_array(GatedStore(arr.store), mode="r")
    pool = pools(gated)
    keys = [(0, idx) for idx in arr_chunks(pool)][::-1]
    keys.insert(3, keys[0])  # a duplicate is served twice
    rec = gated.store.rec
    it = pool.iter_data(keys, max_ahead=3)
    first = next(it)
    scale = pool.multiscale_info.levels[0]
    np.testing.assert_array_equal(first, data[scale.chunk_slices(keys[0][1])])
    assert pool.stats.chunks_held <= 3  # never more than max_ahead requested
    got = [first, *it]
    assert len(got) == len(keys)
    for (_level, idx), arr_ in zip(keys, got, strict=True):
        np.testing.assert_array_equal(arr_, data[scale.chunk_slices(idx)])
    assert pool.stats.chunks_held == 0
    assert len(rec.started) >= len(set(keys))


def test_iter_data_cancels_when_dropped(pools, image):
    arr, _ = image
    gated = zarr.open_array(GatedStore(arr.store), mode="r")
    rec = gated.store.rec
    pool = pools(gated, io_concurrency=1)
    keys = [(0, idx) for idx in arr_chunks(pool)]
    it = pool.iter_data(keys, max_ahead=4)
    next(it)
    del it
    gc.collect()
    assert pool.stats.chunks_held == 0
    assert pool.stats.cancellations >= 1
    assert len(rec.started) < len(keys)


def test_iter_data_reraises_load_errors(pools, image):
    arr, _ = image
    gated = zarr.open_array(GatedStore(arr.store), mode="r")
    pool = pools(gated)
    victim, lost = store_key_of(pool, (3, 2))
    gated.store.rec.fail_keys.add(victim)
    assert (0, 0) not in lost
    it = pool.iter_data([(0, (0, 0)), (0, (3, 2)), (0, (1, 1))])
    next(it)
    with pytest.raises(ChunkLoadError):
        next(it)
    assert pool.stats.chunks_held == 0


# -- lifecycle and stats ----------------------------------------------------------------


def test_destroy_stops_everything(pools, image):
    pool = pools(image[0], cache_size=4)
    loc = pool.get_chunk(0, (3, 2))
    pool.get_chunk(0, (0, 0)).wait()
    pool.drop_chunk(0, (0, 0))
    pool.destroy()
    pool.destroy()  # twice is fine
    assert pool.memory_usage == 0 and list(pool.iter_chunks()) == []
    assert loc.state in (ChunkState.CANCELLED, ChunkState.DESTROYED)
    with pytest.raises(PoolDestroyedError):
        pool.get_chunk(0, (0, 0))
    if loc.state is ChunkState.CANCELLED:
        with pytest.raises(ChunkCancelledError):
            loc.wait()


def test_stats_snapshot(pools, image):
    arr, _ = image
    pool = pools(arr)
    for idx in arr_chunks(pool):
        pool.get_chunk(0, idx)
    pool.wait_for_chunks_to_load()
    s = pool.stats
    assert s.misses == 12 and s.loads == 12 and s.failures == 0
    assert s.bytes_loaded == sum(ramp(SHAPE).nbytes for _ in [0])
    assert 0 < s.latency_p50 <= s.latency_p90 <= s.latency_p99
    assert s.chunks_held == 12 and s.chunks_pending == 0
    assert s.bytes_fetched > 0
