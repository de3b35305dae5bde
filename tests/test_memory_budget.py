"""The memory budget (chunkpool.budget) and the accounting under it (issue 12).

Admission order, waiting, eviction and release are observed by counting reads in a
gated store (tests/support/teststores.py), never by timing; the per-entry overhead is
checked against tracemalloc; sparse images are soaked against the process's RSS.
"""

from __future__ import annotations

import gc
import os
import threading
import tracemalloc

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore

from chunkpool import (
    ENTRY_OVERHEAD,
    ChunkLoadError,
    ChunkPool,
    ChunkState,
    MemoryBudget,
    MemoryBudgetError,
    read_multiscales,
)

CHUNK = (8, 8)
NBYTES = 8 * 8 * 2  # a uint16 chunk's data
CHARGE = NBYTES + ENTRY_OVERHEAD  # what a loaded chunk (or a load's reservation) counts
DEADLINE = 30.0


def gated_array(n: int = 8) -> zarr.Array:
    """A (8n, 8) uint16 ramp in memory, read through a gated, counting store: chunk
    (i, 0) is read as key ``c/i/0``."""
    arr = make_array(zarr.storage.MemoryStore(), ramp((8 * n, 8)), CHUNK)
    return zarr.open_array(GatedStore(arr.store), mode="r")


def started(arr: zarr.Array) -> list[int]:
    """The chunk rows whose reads started, in order."""
    return [int(key.split("/")[1]) for key in arr.store.rec.started]


class Events:
    """Handler calls, by kind, as (ref, chunk row)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: dict[str, list[tuple[str, int]]] = {"load": [], "drop": [], "destroy": []}

    def handlers(self, ref: str) -> dict:
        def record(kind):
            def handler(loc):
                with self.lock:
                    self.calls[kind].append((ref, loc.index[0]))

            return handler

        return {f"{kind}_handler": record(kind) for kind in ("load", "drop", "destroy")}


def hold(pool, rows, ref="v", priority=0.0, events=None):
    kwargs = events.handlers(ref) if events is not None else {}
    return [pool.get_chunk(0, (r, 0), ref, priority=priority, **kwargs) for r in rows]


def loaded(pool, locs) -> None:
    pool.wait_for_chunks_to_load(DEADLINE)
    assert all(loc.state is ChunkState.LOADED for loc in locs), [loc.state for loc in locs]


def assert_within(pool) -> None:
    budget = pool.memory_budget
    assert pool.memory_usage <= budget.limit and budget.used <= budget.limit


# -- waiting, admission order, reservations -----------------------------------------------


def test_requests_over_budget_wait_unstarted_most_urgent_first(pools):
    arr = gated_array()
    arr.store.rec.hold()
    pool = pools(arr, memory_budget=2 * CHARGE)
    locs = {p: pool.get_chunk(0, (p, 0), priority=p) for p in (0, 1)}
    arr.store.rec.wait_started(2, DEADLINE)  # both admitted, being read: no victims
    locs.update({p: pool.get_chunk(0, (p, 0), priority=p) for p in (3, 2)})
    assert [p for p, loc in locs.items() if loc.over_budget] == [3, 2]
    assert locs[3].state is ChunkState.PENDING and locs[2].state is ChunkState.PENDING
    assert pool.stats.over_budget == 2 and pool.stats.reserved_bytes == 2 * CHARGE
    assert pool.memory_usage == 2 * CHARGE  # loads count from their admission
    assert_within(pool)
    arr.store.rec.release(2)
    pool.wait_for_chunks_to_load(DEADLINE)  # returns: what waits cannot start by itself
    assert sorted(started(arr)) == [0, 1]  # nothing over budget was ever read
    assert pool.stats.reserved_bytes == 0 and pool.memory_usage == 2 * CHARGE
    pool.drop_chunk(0, (0, 0))  # room: the most urgent waiting request goes first
    arr.store.rec.release(1)
    pool.wait_for_chunks_to_load(DEADLINE)
    assert started(arr)[2:] == [2] and locs[2].loaded and locs[3].over_budget
    assert_within(pool)


def test_a_more_urgent_request_releases_the_least_urgent_held_chunk(pools):
    arr = gated_array()
    events = Events()
    pool = pools(arr, memory_budget=3 * CHARGE)
    prefetch = hold(pool, [0], "prefetch", priority=9, events=events)
    hold(pool, [1], "prefetch", priority=5, events=events)
    visible = hold(pool, [2], "view", priority=0, events=events)
    loaded(pool, prefetch + visible)
    (new,) = hold(pool, [3], "view", priority=1, events=events)
    loaded(pool, [new])
    # the least urgent held chunk (priority 9) went to its holder's drop handler
    assert prefetch[0].state is ChunkState.DESTROYED and not prefetch[0].refs
    assert ("prefetch", 0) in events.calls["drop"] and ("prefetch", 0) in events.calls["destroy"]
    assert events.calls["drop"] == [("prefetch", 0)]  # and nothing else
    assert pool.stats.budget_releases == 1 and pool.stats.over_budget == 0
    assert_within(pool)


def test_equal_priority_never_releases_and_the_request_waits(pools):
    arr = gated_array()
    events = Events()
    pool = pools(arr, memory_budget=2 * CHARGE)
    held = hold(pool, [0, 1], "view", priority=0, events=events)
    loaded(pool, held)
    (waiting,) = hold(pool, [2], "other", priority=0, events=events)
    pool.wait_for_chunks_to_load(DEADLINE)
    assert waiting.over_budget and events.calls["drop"] == []
    assert all(loc.loaded for loc in held) and started(arr) == [0, 1]
    # re-ranking the waiting request above a held one makes that one give way
    pool.get_chunk(0, (2, 0), "other", priority=-1)
    loaded(pool, [waiting])
    assert events.calls["drop"] == [("view", 1)]  # the later of the two equals
    assert_within(pool)


def test_a_held_chunk_reranked_down_gives_way(pools):
    arr = gated_array()
    events = Events()
    pool = pools(arr, memory_budget=2 * CHARGE)
    held = hold(pool, [0, 1], "view", priority=0, events=events)
    loaded(pool, held)
    (waiting,) = hold(pool, [2], "view", priority=3, events=events)
    pool.wait_for_chunks_to_load(DEADLINE)
    assert waiting.over_budget
    pool.get_chunk(0, (0, 0), "view", priority=7)  # now less urgent than the request
    loaded(pool, [waiting])
    assert events.calls["drop"] == [("view", 0)] and held[1].loaded


def test_a_queued_load_goes_back_to_waiting_unseen_by_its_holders(pools):
    arr = gated_array()
    arr.store.rec.hold()
    events = Events()
    pool = pools(arr, memory_budget=2 * CHARGE, io_concurrency=1, cpu_workers=1)
    (stuck,) = hold(pool, [0], "prefetch", priority=5, events=events)
    arr.store.rec.wait_started(1, DEADLINE)  # (0) is being read: in use, no victim
    (queued,) = hold(pool, [1], "prefetch", priority=6, events=events)
    assert not queued.over_budget and pool.stats.reserved_bytes == 2 * CHARGE
    (urgent,) = hold(pool, [2], "view", priority=0, events=events)
    assert queued.over_budget and not urgent.over_budget  # (1) never started
    assert queued.refs == {"prefetch"} and events.calls["drop"] == []
    arr.store.rec.open_gate()
    loaded(pool, [stuck, urgent])
    assert started(arr) == [0, 2] and queued.over_budget  # (0) outranks (1): it waits
    pool.drop_chunk(0, (0, 0), "prefetch")
    loaded(pool, [queued])
    assert started(arr) == [0, 2, 1]
    assert_within(pool)


def test_cached_chunks_are_evicted_first_oldest_first(pools):
    arr = gated_array()
    events = Events()
    pool = pools(arr, memory_budget=3 * CHARGE, cache_size=10)
    for row in (0, 1):
        loaded(pool, hold(pool, [row], "v", events=events))
        pool.drop_chunk(0, (row, 0), "v")
    held = hold(pool, [2], "prefetch", priority=9, events=events)
    loaded(pool, held)
    assert pool.stats.chunks_cached == 2
    new = hold(pool, [3], "view", priority=0, events=events)
    loaded(pool, new)
    # the oldest cached chunk made room; the held one, though less urgent, stays
    assert events.calls["destroy"] == [("v", 0)] and held[0].loaded
    assert pool.stats.budget_releases == 0 and pool.stats.chunks_cached == 1
    assert_within(pool)


def test_one_budget_shared_by_two_pools(pools):
    budget = MemoryBudget(2 * CHARGE)
    a, b = gated_array(), gated_array()
    events = Events()
    pool_a = pools(a, memory_budget=budget)
    pool_b = pools(b, memory_budget=budget)
    prefetch = hold(pool_a, [0, 1], "a", priority=5, events=events)
    loaded(pool_a, prefetch)
    (visible,) = hold(pool_b, [0], "b", priority=0, events=events)
    loaded(pool_b, [visible])
    # the other pool's less urgent chunk (the later of two equals) made the room
    assert events.calls["drop"] == [("a", 1)] and prefetch[0].loaded
    assert budget.used == pool_a.memory_usage + pool_b.memory_usage <= budget.limit
    (waits,) = hold(pool_b, [1], "b", priority=5, events=events)
    assert waits.over_budget and budget.over_budget == 1
    pool_a.destroy()  # room: the other pool's request starts
    loaded(pool_b, [waits])
    assert budget.used == pool_b.memory_usage == 2 * CHARGE


def test_a_chunk_larger_than_the_budget_fails_at_once(pools):
    arr = gated_array()
    pool = pools(arr, memory_budget=CHARGE - 1)
    loc = pool.get_chunk(0, (0, 0))
    assert loc.state is ChunkState.FAILED and isinstance(loc.error, MemoryBudgetError)
    assert "memory budget" in str(loc.error) and "\n" not in str(loc.error)
    with pytest.raises(ChunkLoadError):
        pool.wait_for_chunks_to_load(DEADLINE)
    assert started(arr) == [] and pool.memory_usage == 0


def test_fill_value_chunks_free_their_reservation(pools):
    # an absent chunk reserves its full size, then counts one item: room for the next
    arr = zarr.create_array(zarr.storage.MemoryStore(), shape=(64, 8), chunks=CHUNK, dtype="uint16")
    pool = pools(arr, memory_budget=CHARGE + ENTRY_OVERHEAD + 2)
    first, second = hold(pool, [0, 1])
    loaded(pool, [first, second])
    assert pool.memory_usage == 2 * (ENTRY_OVERHEAD + 2)
    assert_within(pool)


def test_without_a_budget_nothing_waits(pools):
    arr = gated_array()
    pool = pools(arr)
    locs = hold(pool, range(8))
    loaded(pool, locs)
    stats = pool.stats
    assert stats.memory_budget is None and stats.over_budget == 0 and stats.reserved_bytes == 0
    assert pool.memory_usage == 8 * CHARGE


def test_the_bound_holds_at_every_moment(pools):
    """Many requests at shifting priorities from two threads, sampled continuously."""
    arr = gated_array(64)
    limit = 5 * CHARGE
    pool = pools(arr, memory_budget=limit, cache_size=8)
    seen: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            seen.append(pool.memory_usage)

    def user(ref, seed):
        rng = np.random.default_rng(seed)
        for _ in range(300):
            row = int(rng.integers(64))
            if rng.random() < 0.6:
                pool.get_chunk(0, (row, 0), ref, priority=float(rng.integers(5)))
            else:
                pool.drop_chunk(0, (row, 0), ref)

    sampler = threading.Thread(target=sample)
    sampler.start()
    users = [threading.Thread(target=user, args=(f"u{i}", i)) for i in range(2)]
    for t in users:
        t.start()
    for t in users:
        t.join(DEADLINE)
    pool.wait_for_chunks_to_load(DEADLINE)
    stop.set()
    sampler.join(DEADLINE)
    assert seen and max(seen) <= limit
    assert_within(pool)


# -- issue 12: what is counted is what is used --------------------------------------------


def sparse_pool(**kwargs) -> ChunkPool:
    """A pool on a 4000 x 4000 uint16 image of (4, 4) chunks, none of them written."""
    arr = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(4000, 4000), chunks=(4, 4), dtype="uint16"
    )
    (info,) = read_multiscales(arr, "sparse")
    return ChunkPool(info, **kwargs)


def test_entry_overhead_is_what_an_entry_costs():
    """ENTRY_OVERHEAD within 1.5x of what a cached absent chunk really costs (traced),
    held with the three handlers a viewer registers."""
    pool = sparse_pool(cache_size=1 << 20)
    n = 10_000
    try:
        noop = lambda loc: None  # noqa: E731
        keys = [(0, (i // 1000, i % 1000)) for i in range(n + 1000)]
        pool.get_chunks(keys[:1000], "v")  # warm up: threads, the fill view
        pool.wait_for_chunks_to_load(DEADLINE)
        pool.drop_chunks(keys[:1000], "v")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for start in range(1000, n + 1000, 1000):
                batch = keys[start : start + 1000]
                pool.get_chunks(
                    batch, "v", load_handler=noop, drop_handler=noop, destroy_handler=noop
                )
                pool.wait_for_chunks_to_load(DEADLINE)
                pool.drop_chunks(batch, "v")
            gc.collect()
            per_entry = (tracemalloc.get_traced_memory()[0] - before) / n
        finally:
            tracemalloc.stop()
        assert pool.stats.chunks_cached == n + 1000
    finally:
        pool.destroy()
    assert per_entry / 1.5 <= ENTRY_OVERHEAD <= per_entry * 1.5, per_entry


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: RSS that a soak may add beyond its bound: allocator slack, the pool's threads.
FIXED_OVERHEAD = 16 << 20


@pytest.mark.parametrize("bound", ["cache_bytes", "memory_budget"])
def test_sparse_soak_rss_stays_within_the_bound(bound, capsys):
    """100,000 distinct empty chunks requested and dropped: the process grows by at
    most 1.2x the configured bound, plus a fixed overhead."""
    limit = 4 << 20
    kwargs = {"cache_bytes": limit}
    if bound == "memory_budget":
        kwargs["memory_budget"] = limit
    pool = sparse_pool(**kwargs)
    try:
        keys = [(0, (i // 1000, i % 1000)) for i in range(101_000)]
        pool.get_chunks(keys[:1000], "v")  # warm up: threads, the fill view
        pool.wait_for_chunks_to_load(DEADLINE)
        pool.drop_chunks(keys[:1000], "v")
        gc.collect()
        start = peak = rss()
        for first in range(1000, 101_000, 1000):
            batch = keys[first : first + 1000]
            pool.get_chunks(batch, "v")
            pool.wait_for_chunks_to_load(DEADLINE)
            pool.drop_chunks(batch, "v")
            peak = max(peak, rss())
            assert pool.memory_usage <= limit
        gc.collect()
        end = rss()
        assert pool.stats.misses >= 100_000
    finally:
        pool.destroy()
    with capsys.disabled():
        print(
            f"\nsparse soak ({bound}={limit >> 20} MiB): RSS start {start / 2**20:.1f} MiB, "
            f"peak {peak / 2**20:.1f} MiB, end {end / 2**20:.1f} MiB"
        )
    assert peak - start <= 1.2 * limit + FIXED_OVERHEAD


SHARDS = 12
INDEX_BYTES = 32 * 32 * 16  # one shard's index: 16 bytes per inner chunk


def sharded_array(path) -> zarr.Array:
    """(256 * SHARDS, 256) uint16, shards of 32 x 32 inner chunks of 8 x 8 (16 KiB of
    index each), one inner chunk written per shard."""
    arr = zarr.create_array(
        path, shape=(256 * SHARDS, 256), chunks=CHUNK, shards=(256, 256), dtype="uint16"
    )
    for s in range(SHARDS):
        arr[256 * s, 0] = s + 1
    return arr


@pytest.mark.parametrize("budget", [None, 40 * INDEX_BYTES])
def test_shard_indexes_are_bounded_in_bytes_and_counted(pools, tmp_path, budget):
    arr = sharded_array(tmp_path / "s.zarr")
    bound = 4 * INDEX_BYTES + 4096
    pool = pools(arr, index_cache_bytes=bound, memory_budget=budget)
    for s in range(SHARDS):
        loc = pool.get_chunk(0, (32 * s, 0))  # the first inner chunk of shard s
        assert loc.wait(DEADLINE)[0, 0] == s + 1
        stats = pool.stats
        assert 0 < stats.index_bytes <= bound
        assert stats.memory_usage == stats.index_bytes + (s + 1) * CHARGE
        if budget is not None:
            assert stats.memory_usage <= budget
    # the indexes kept are the most recent ones: re-reading the last shard reads no index
    assert pool.stats.index_bytes >= 4 * INDEX_BYTES
    fetched = pool.stats.bytes_fetched
    pool.get_chunk(0, (32 * (SHARDS - 1) + 1, 0)).wait(DEADLINE)
    assert pool.stats.bytes_fetched == fetched  # (an absent inner chunk: no read at all)
