"""What a held chunk leaves for Python's garbage collector to track.

Every object the collector tracks that outlives a few allocations is walked again by
each older collection, and each one allocated counts towards the next collection: with
thousands of chunks held and thousands loaded a second, objects per chunk cost the
pool time of their own (about 20 µs per 128² chunk when a chunk left five). These
count the tracked objects a held chunk adds (``gc.get_objects``), nothing timed.
"""

from __future__ import annotations

import gc

import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore


@pytest.fixture
def grid(tmp_path):
    """1024 local chunks of 8 x 8."""
    return make_array(tmp_path / "g.zarr", ramp((256, 256)), (8, 8))


def keys_of(pool):
    return [(0, idx) for idx in pool.multiscale_info.levels[0].iter_chunk_indices()]


def tracked_per_chunk(before: int, n: int) -> float:
    gc.collect()
    return (len(gc.get_objects()) - before) / n


def test_a_loaded_chunk_leaves_its_location_and_its_datas_handle(pools, grid):
    """Held and loaded, without handlers: the location, the handle that returns its
    buffer and its KPI record (in the ring, which holds 2048), nothing more (no refs
    dict or ref entry tracked)."""
    pool = pools(grid)
    keys = keys_of(pool)
    pool.get_chunks(keys)  # a first round: the recycled buffers exist from then on
    pool.wait_for_chunks_to_load(timeout=60)
    pool.drop_chunks(keys)
    gc.collect()
    before = len(gc.get_objects())
    for level, index in keys:
        pool.get_chunk(level, index, priority=1.0)
    pool.wait_for_chunks_to_load(timeout=60)
    assert all(pool.get_chunk(*key).loaded for key in keys)
    assert tracked_per_chunk(before, len(keys)) <= 3.5
    pool.drop_chunks(keys)


def test_a_queued_chunk_leaves_its_location_its_job_and_its_heap_entry(pools, grid):
    """Waiting to load (its reads held back), without handlers: three tracked objects
    (no refs dict, ref entry or bound callback of its own)."""
    node = zarr.open_array(GatedStore(grid.store), mode="r")
    node.store.rec.hold()
    pool = pools(node)
    keys = keys_of(pool)
    gc.collect()
    before = len(gc.get_objects())
    try:
        for level, index in keys:
            pool.get_chunk(level, index, priority=1.0)
        assert tracked_per_chunk(before, len(keys)) <= 3.5
        pool.drop_chunks(keys)
    finally:
        node.store.rec.open_gate()


def test_refs_held_as_priorities_and_entries_rank_and_drop_alike(pools, grid):
    """A ref without handlers (held as its priority alone) and one with a drop handler
    (an entry) on one chunk: re-ranking either moves the chunk's priority, and each
    drop calls only the handlers registered."""
    node = zarr.open_array(GatedStore(grid.store), mode="r")
    node.store.rec.hold()
    pool = pools(node, io_concurrency=1)
    dropped = []
    try:
        pool.get_chunk(0, (0, 0), "blocker")
        node.store.rec.wait_started(1)
        loc = pool.get_chunk(0, (1, 1), "plain", priority=5)
        pool.get_chunk(0, (1, 1), "with", priority=7, drop_handler=dropped.append)
        assert loc.priority == 5
        pool.get_chunk(0, (1, 1), "plain", priority=9)  # re-ranked: a new number
        assert loc.priority == 7
        pool.get_chunk(0, (1, 1), "with", priority=2)  # re-ranked: the entry's
        assert loc.priority == 2
        pool.drop_chunk(0, (1, 1), "plain")
        assert dropped == [] and loc.refs == {"with"} and loc.priority == 2
        pool.drop_chunk(0, (1, 1), "with")
        assert dropped == [loc]
    finally:
        node.store.rec.open_gate()
