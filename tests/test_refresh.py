"""ChunkPool.refresh() and watch(): following a local store while it is written.

Reads are counted by a GatedStore over the LocalStore (chunk keys, in order) and by
``stats.bytes_fetched``; numpy arrays are the ground truth.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.images import write_pyramid
from support.teststores import GatedStore
from zarr.storage import LocalStore

import chunkpool.source
from chunkpool import ENTRY_OVERHEAD, Changes, ChunkPool, ChunkState, SourceError
from chunkpool.refresh import Watcher, next_wait

CHUNKS = (1, 16, 16)
GENEROUS = 30.0  # seconds: a deadline for waits, never a measure


@pytest.fixture
def movie(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A (t, y, x) OME-Zarr of 2 time points, 2 levels, one chunk file per (t, tile)."""
    data = ramp((2, 32, 32)) + 1  # no all-fill chunk
    write_pyramid(tmp_path / "m.zarr", data, chunks=CHUNKS, n_levels=2)
    return tmp_path / "m.zarr", data


def open_counted(path: Path, pools, **kwargs) -> tuple[ChunkPool, GatedStore]:
    store = GatedStore(LocalStore(path, read_only=True))
    node = zarr.open(store, mode="r")
    return pools(node, **kwargs), store


def hold_all(pool: ChunkPool, ref: str = "view", **kwargs) -> list:
    keys = [
        (scale.level, index)
        for scale in pool.multiscale_info
        for index in scale.iter_chunk_indices()
    ]
    locs = pool.get_chunks(keys, ref, **kwargs)
    pool.wait_for_chunks_to_load(GENEROUS)
    return locs


def append_time_point(path: Path, frame: np.ndarray) -> None:
    """What an acquisition does: grow every level along t by one and write the frame
    (and its block means)."""
    for level in range(2):
        arr = zarr.open_array(path / str(level), mode="r+")
        t = arr.shape[0]
        arr.resize((t + 1, *arr.shape[1:]))
        arr[t] = frame
        frame = frame.reshape(frame.shape[0] // 2, 2, frame.shape[1] // 2, 2).mean((1, 3))
        frame = frame.astype(arr.dtype)


def chunk_file(path: Path, level: int, index: tuple[int, ...]) -> Path:
    return path / str(level) / "c" / "/".join(map(str, index))


def bump_mtime(path: Path) -> None:
    """A rewrite as the file system sees it a moment later: the coarse clock Linux stamps
    files with may give two writes a few ms apart one mtime."""
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


def test_appended_time_point_is_taken_and_only_new_chunks_are_read(movie, pools):
    path, data = movie
    pool, store = open_counted(path, pools)
    old_locs = hold_all(pool)
    reads_before = len(store.rec.finished)
    fetched_before = pool.stats.bytes_fetched
    frame = (ramp((32, 32)) * 3 + 7).astype(data.dtype)

    append_time_point(path, frame)
    changes = pool.refresh()

    assert changes == Changes(grown={0: ((2, 32, 32), (3, 32, 32)), 1: ((2, 16, 16), (3, 16, 16))})
    assert changes.changed
    assert pool.multiscale_info.levels[0].shape == (3, 32, 32)
    assert pool.multiscale_info.levels[1].chunk_grid_shape == (3, 1, 1)
    assert store.rec.finished[reads_before:] == []  # metadata only
    # the old locations are still valid, their data untouched
    for loc in old_locs:
        assert loc.state is ChunkState.LOADED
    assert np.array_equal(old_locs[0].data, data[:1, :16, :16])

    new = [(0, (2, y, x)) for y in range(2) for x in range(2)] + [(1, (2, 0, 0))]
    locs = pool.get_chunks(new, "view")
    pool.wait_for_chunks_to_load(GENEROUS)
    for loc in locs[:4]:
        assert np.array_equal(loc.data[0], frame[loc.slices[1:]])
    expected_keys = {f"{level}/c/{'/'.join(map(str, idx))}" for level, idx in new}
    assert sorted(store.rec.finished[reads_before:]) == sorted(expected_keys)
    new_bytes = sum(os.path.getsize(chunk_file(path, level, idx)) for level, idx in new)
    assert pool.stats.bytes_fetched - fetched_before == new_bytes


@pytest.mark.parametrize("layout", ["ome", "sharded"])
def test_chunk_rewritten_in_place_reloads_alone_and_fires_on_load_again(tmp_path, pools, layout):
    data = ramp((2, 32, 32)) + 1
    if layout == "ome":
        path = tmp_path / "m.zarr"
        write_pyramid(path, data, chunks=CHUNKS, n_levels=2)
        arr_path, stored = path / "0", chunk_file(path, 0, (0, 0, 0))
    else:
        path = arr_path = tmp_path / "s.zarr"
        make_array(path, data, CHUNKS, shards=(1, 32, 32))
        stored = path / "c" / "0" / "0" / "0"
    pool, store = open_counted(path, pools)
    seen: list[np.ndarray] = []
    target = pool.get_chunk(0, (0, 0, 0), "view", load_handler=lambda loc: seen.append(loc.data))
    others = [
        pool.get_chunk(0, idx, "view", load_handler=lambda loc: seen.append(None))
        for idx in [(0, 0, 1), (1, 0, 0)]
    ]
    pool.wait_for_chunks_to_load(GENEROUS)
    assert len(seen) == 3
    reads_before = len(store.rec.finished)

    new_tile = np.full((16, 16), 4242, data.dtype)
    zarr.open_array(arr_path, mode="r+")[0, :16, :16] = new_tile
    bump_mtime(stored)
    # a sharded array stamps the shard file: its other held inner chunk reloads too
    same_file = [(0, (0, 0, 0))] + ([(0, (0, 0, 1))] if layout == "sharded" else [])
    store.rec.hold()  # the reloads wait: meanwhile the old data is served
    try:
        changes = pool.refresh()
        assert sorted(changes.rewritten) == same_file
        assert not changes.grown and not changes.reopened
        assert np.array_equal(target.data, data[:1, :16, :16])
    finally:
        store.rec.open_gate()
    pool.wait_for_chunks_to_load(GENEROUS)

    # on_load again = new data, for the reloaded ones only
    assert len(seen) == 3 + len(same_file) and np.array_equal(seen[3][0], new_tile)
    assert np.array_equal(target.data[0], new_tile)
    assert np.array_equal(others[0].data, data[:1, :16, 16:])
    if layout == "sharded":  # the shard's index (read again: the shard changed), 2 chunks
        assert store.rec.finished[reads_before:] == ["c/0/0/0"] * 3
    else:
        assert store.rec.finished[reads_before:] == ["0/c/0/0/0"]
    assert pool.refresh() == Changes()  # and it is not reloaded again


def test_cached_rewritten_chunk_is_dropped_and_missing_then_written_counts(tmp_path, pools):
    data = ramp((2, 32, 32)) + 1
    data[1, :16, :16] = 0  # a fill-value chunk: no file
    path = tmp_path / "m.zarr"
    write_pyramid(path, data, chunks=CHUNKS, n_levels=1)
    pool, _ = open_counted(path, pools, cache_size=10)
    missing = pool.get_chunk(0, (1, 0, 0), "view")
    cached = pool.get_chunk(0, (0, 0, 0), "view")
    pool.wait_for_chunks_to_load(GENEROUS)
    assert not chunk_file(path, 0, (1, 0, 0)).exists()
    assert np.array_equal(missing.data, np.zeros((1, 16, 16), data.dtype))
    pool.drop_chunk(0, (0, 0, 0), "view")
    destroyed = threading.Event()
    pool.get_chunk(0, (0, 0, 0), "other", destroy_handler=lambda loc: destroyed.set())
    pool.drop_chunk(0, (0, 0, 0), "other")
    assert pool.stats.chunks_cached == 1

    arr = zarr.open_array(path / "0", mode="r+")
    arr[1, :16, :16] = 9
    arr[0, :16, :16] = 8
    bump_mtime(chunk_file(path, 0, (0, 0, 0)))
    changes = pool.refresh()

    assert sorted(changes.rewritten) == [(0, (0, 0, 0)), (0, (1, 0, 0))]
    assert destroyed.is_set() and pool.stats.chunks_cached == 0
    pool.wait_for_chunks_to_load(GENEROUS)
    assert np.array_equal(missing.data, np.full((1, 16, 16), 9, data.dtype))
    again = pool.get_chunk(0, (0, 0, 0), "view")
    pool.wait_for_chunks_to_load(GENEROUS)
    assert again is not cached and np.array_equal(again.data, np.full((1, 16, 16), 8, data.dtype))


def test_unchanged_store_reads_metadata_only_and_stats_at_most_revalidate(
    movie, pools, monkeypatch
):
    path, _ = movie
    pool, store = open_counted(path, pools, revalidate=3)
    locs = hold_all(pool)
    assert len(locs) == 10
    reads_before = len(store.rec.finished)
    stamped: list[str] = []
    real = chunkpool.source.file_stamp
    monkeypatch.setattr(chunkpool.source, "file_stamp", lambda p: (stamped.append(p), real(p))[1])

    checked: list[set[str]] = []
    for _ in range(4):
        before = len(stamped)
        assert pool.refresh() == Changes()
        checked.append(set(stamped[before:]))
        assert len(stamped) - before <= 3
    assert store.rec.finished[reads_before:] == []
    assert pool.stats.loads == 10
    # oldest check first: three refreshes of 3 visit 9 different chunks, the fourth the last
    assert len(set().union(*checked[:3])) == 9
    assert len(set().union(*checked)) == 10


def test_shrink_reopens_without_crash_and_old_data_stays(movie, pools):
    path, data = movie
    pool, _ = open_counted(path, pools)
    locs = hold_all(pool)
    info = pool.multiscale_info
    for level in range(2):
        arr = zarr.open_array(path / str(level), mode="r+")
        arr.resize((1, *arr.shape[1:]))

    changes = pool.refresh()

    assert changes == Changes(reopened=True) and changes.changed
    assert pool.multiscale_info is info
    assert np.array_equal(locs[0].data, data[:1, :16, :16])
    assert pool.get_chunk(0, (1, 1, 1), "view").wait(GENEROUS) is not None


def test_half_written_metadata_one_warning_old_info_kept_then_recovers(movie, pools, caplog):
    path, data = movie
    pool, _ = open_counted(path, pools)
    hold_all(pool)
    info = pool.multiscale_info
    meta = path / "0" / "zarr.json"
    good = meta.read_bytes()
    meta.write_bytes(good[: len(good) // 2])

    with pytest.raises(SourceError):
        pool.refresh()
    assert pool.multiscale_info is info
    changes_seen: list[Changes] = []
    watcher = Watcher(pool, 1.0, changes_seen.append)  # ticked here: no thread, no timing
    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        for _ in range(3):
            assert watcher.tick()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "refresh failed" in warnings[0].getMessage()
    assert pool.multiscale_info is info

    meta.write_bytes(good)
    append_time_point(path, np.ones((32, 32), data.dtype))
    assert watcher.tick()
    assert len(changes_seen) == 1 and 0 in changes_seen[0].grown
    assert pool.multiscale_info.levels[0].shape[0] == 3


def test_watch_delivers_a_change_and_destroy_stops_its_thread(movie, pools):
    path, data = movie
    pool, _ = open_counted(path, pools)
    got: list[Changes] = []
    arrived = threading.Event()

    def on_change(changes: Changes) -> None:
        got.append(changes)
        arrived.set()

    pool.watch(0.02, on_change)
    (thread,) = [t for t in threading.enumerate() if t.name.startswith("chunkpool-watch")]
    append_time_point(path, np.ones((32, 32), data.dtype))
    assert arrived.wait(GENEROUS)
    assert got[0].grown[0] == ((2, 32, 32), (3, 32, 32))
    assert pool.get_chunk(0, (2, 1, 1), "view").wait(GENEROUS)[0, 0, 0] == 1

    pool.watch(0)  # stops it
    assert not thread.is_alive()
    pool.watch(0.02, on_change)
    (thread,) = [t for t in threading.enumerate() if t.name.startswith("chunkpool-watch")]
    pool.destroy()
    assert not thread.is_alive()


def test_append_into_a_cached_shard_index_reads_the_new_index(tmp_path, pools):
    """The shard holding t=0 gets t=1 written into it: its cached index (which says t=1
    is absent) must not serve the new chunks."""
    path = tmp_path / "s.zarr"
    first = ramp((1, 32, 32)) + 1
    make_array(path, first, CHUNKS, shards=(2, 32, 32))
    pool, _ = open_counted(path, pools)
    hold_all(pool)
    assert pool.stats.index_bytes > 0
    arr = zarr.open_array(path, mode="r+")
    arr.resize((2, 32, 32))
    arr[1] = 5
    bump_mtime(path / "c" / "0" / "0" / "0")

    changes = pool.refresh()

    assert changes.grown == {0: ((1, 32, 32), (2, 32, 32))}
    new = pool.get_chunks([(0, (1, y, x)) for y in range(2) for x in range(2)], "view")
    pool.wait_for_chunks_to_load(GENEROUS)
    for loc in new:
        assert np.array_equal(loc.data, np.full((1, 16, 16), 5, first.dtype))
    for loc in pool.iter_held("view"):
        if loc.index[0] == 0:
            assert np.array_equal(loc.data, first[loc.slices])


def test_taller_mosaic_reloads_the_old_edge_chunks(tmp_path, pools):
    """A plain array growing along y: the edge chunks cropped at the old edge grow."""
    path = tmp_path / "a.zarr"
    data = ramp((1, 24, 32)) + 1
    make_array(path, data, CHUNKS)
    pool, store = open_counted(path, pools)
    locs = hold_all(pool)
    edge = [loc for loc in locs if loc.index[1] == 1]
    assert [loc.data.shape for loc in edge] == [(1, 8, 16)] * 2
    taller = np.concatenate([data, np.full((1, 8, 32), 77, data.dtype)], axis=1)
    arr = zarr.open_array(path, mode="r+")
    arr.resize((1, 32, 32))
    arr[:, 24:] = 77
    reads_before = len(store.rec.finished)

    changes = pool.refresh()

    assert changes.grown == {0: ((1, 24, 32), (1, 32, 32))}
    assert sorted(changes.rewritten) == [(0, (0, 1, 0)), (0, (0, 1, 1))]
    pool.wait_for_chunks_to_load(GENEROUS)
    for loc in locs:
        assert np.array_equal(loc.data, taller[loc.slices])
    assert sorted(store.rec.finished[reads_before:]) == ["c/0/1/0", "c/0/1/1"]
    assert pool.memory_usage == sum(loc.data.nbytes for loc in locs) + 4 * ENTRY_OVERHEAD


def test_reload_in_polled_mode_wakes_and_delivers_the_new_data(movie, pools):
    path, data = movie
    pool, _ = open_counted(path, pools)
    woken = threading.Event()
    pool.enable_polled_load_handlers(woken.set)
    seen: list[np.ndarray] = []
    loc = pool.get_chunk(0, (1, 1, 0), "view", load_handler=lambda loc: seen.append(loc.data))
    assert woken.wait(GENEROUS)
    assert pool.run_pending_handlers() == 1
    woken.clear()

    zarr.open_array(path / "0", mode="r+")[1, 16:, :16] = 31
    bump_mtime(chunk_file(path, 0, (1, 1, 0)))
    assert pool.refresh().rewritten == ((0, (1, 1, 0)),)
    assert woken.wait(GENEROUS)
    assert pool.run_pending_handlers() == 1
    assert len(seen) == 2 and np.array_equal(seen[1], np.full((1, 16, 16), 31, data.dtype))
    assert np.array_equal(seen[0], data[1:2, 16:, :16]) and seen[1] is loc.data


def test_store_deleted_while_watched_keeps_what_it_had(movie, pools, caplog):
    path, data = movie
    pool, _ = open_counted(path, pools)
    locs = hold_all(pool)
    info = pool.multiscale_info
    shutil.rmtree(path)

    with pytest.raises(SourceError) as raised:
        pool.refresh()
    assert "\n" not in str(raised.value)
    watcher = Watcher(pool, 1.0)
    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        assert watcher.tick() and watcher.tick()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert pool.multiscale_info is info
    assert np.array_equal(locs[0].data, data[:1, :16, :16])


def test_on_change_that_raises_is_logged_and_watching_goes_on(movie, pools, caplog):
    path, data = movie
    pool, _ = open_counted(path, pools)
    calls: list[Changes] = []

    def bad(changes: Changes) -> None:
        calls.append(changes)
        raise RuntimeError("handler bug")

    watcher = Watcher(pool, 1.0, bad)
    assert watcher.tick() and calls == []  # nothing changed: not called
    append_time_point(path, np.ones((32, 32), data.dtype))
    with caplog.at_level(logging.ERROR, logger="chunkpool"):
        assert watcher.tick()
    assert len(calls) == 1 and "on_change" in caplog.records[-1].getMessage()
    append_time_point(path, np.ones((32, 32), data.dtype))
    assert watcher.tick() and len(calls) == 2


def test_follow_and_changes_yield_each_append(tmp_path: Path) -> None:
    """``chunkpool.follow(path)`` (a plain iterator, as the seed's walk_on_new_events) and
    ``pool.changes()`` (asyncio) yield a change for each appended time point."""
    import asyncio

    from chunkpool import follow

    path = tmp_path / "f.zarr"
    array = zarr.create_array(
        path, shape=(1, 8, 8), chunks=(1, 8, 8), dtype="uint8", dimension_names=["t", "y", "x"]
    )
    array[0] = 1
    writer = zarr.open_array(path, mode="r+")

    def append(t: int) -> None:
        writer.resize((t + 1, 8, 8))
        writer[t] = t

    seen = []
    changes = follow(str(path), interval=0.01)  # opened now: what follows is a change
    writing = threading.Thread(target=append, args=(1,))
    writing.start()
    for pool, change in changes:
        writing.join(30)  # (the change may be seen between the resize and the write)
        seen.append(change.grown[0][1])
        assert pool.multiscale_info.levels[0].shape == change.grown[0][1]
        assert int(pool.get_chunk(0, (len(seen), 0, 0)).wait(30)[0, 0, 0]) == len(seen)
        pool.drop_chunk(0, (len(seen), 0, 0))
        if len(seen) == 2:
            break
        writing = threading.Thread(target=append, args=(2,))
        writing.start()
    changes.close()  # (a for loop left by break does not close an iterator it was given)
    assert seen == [(2, 8, 8), (3, 8, 8)] and pool.destroyed  # opened here: destroyed

    async def watch_async() -> tuple:
        (pool,) = ChunkPool.from_zarr_node(str(path))  # opened before the append
        try:
            threading.Thread(target=append, args=(3,)).start()
            async for change in pool.changes(0.01):
                return change.grown[0][1]
        finally:
            pool.destroy()

    assert asyncio.run(asyncio.wait_for(watch_async(), 60)) == (4, 8, 8)


def test_refreshes_start_at_a_fixed_rate_and_an_overrun_is_followed_at_once() -> None:
    """The time a refresh takes does not stretch the period (new data waits for the
    next refresh at most ``interval``); one that overran is followed at once (a whole
    period more would leave what landed during it waiting for up to two)."""
    assert next_wait(10.0, 10.05, 0.25) == pytest.approx(0.20)  # starts 10.25
    assert next_wait(10.0, 10.0, 0.25) == pytest.approx(0.25)
    assert next_wait(10.0, 10.30, 0.25) == 0.0
    assert next_wait(10.0, 10.25, 0.25) == 0.0


def test_on_metadata_tells_a_growth_first_and_may_refresh_again(movie, pools):
    """``refresh(on_metadata=...)`` tells the grown levels before the revalidation; the
    handler may call ``refresh()`` itself (in its thread: no deadlock)."""
    path, data = movie
    pool, _ = open_counted(path, pools)
    hold_all(pool)
    frame = np.full((32, 32), 3, data.dtype)
    append_time_point(path, frame)
    early: list[Changes] = []
    inner: list[Changes] = []

    def on_metadata(changes: Changes) -> None:
        early.append(changes)
        assert pool.multiscale_info.levels[0].shape == (3, 32, 32)  # already taken
        inner.append(pool.refresh())

    outcome: list[Changes] = []
    refreshing = threading.Thread(target=lambda: outcome.append(pool.refresh(on_metadata)))
    refreshing.start()
    refreshing.join(GENEROUS)
    assert not refreshing.is_alive()
    grown = {0: ((2, 32, 32), (3, 32, 32)), 1: ((2, 16, 16), (3, 16, 16))}
    assert early == [Changes(grown=grown)] and outcome == [Changes(grown=grown)]
    assert inner == [Changes()]
    assert pool.refresh(on_metadata) == Changes() and len(early) == 1  # nothing grew
