"""ChunkPool.refresh() over HTTP (ETag / Last-Modified, conditional requests) and S3 (ETag),
and the disk cache's revalidation and offline mode.

The servers' own records count what crossed the wire (requests, body bytes); numpy
arrays are the ground truth. Stores are rewritten on disk and served from there (HTTP),
or uploaded again (S3: moto's ETag is the MD5 of an object's bytes, so an unchanged file
uploaded again keeps its ETag).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.httpserver import ZarrHTTPServer
from support.images import write_pyramid
from support.s3server import S3Server
from test_refresh import hold_all

from chunkpool import Changes, ChunkPool, ChunkState, RetryPolicy, SourceError
from chunkpool.refresh import Watcher

CHUNKS = (1, 16, 16)
GENEROUS = 30.0  # seconds: a deadline for waits, never a measure
METADATA = ("zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata")
BUCKET = "refresh-remote"


class Remote:
    """One store under ``root`` served over HTTP or S3, and what its server recorded."""

    def __init__(self, kind: str, root: Path, s3: S3Server | None, prefix: str):
        self.kind, self.root, self._s3, self._prefix = kind, root, s3, prefix
        self._http: ZarrHTTPServer | None = None
        if kind == "http":
            self._http = ZarrHTTPServer(root.parent)
            self._http.start()

    def url(self) -> str:
        if self._http is not None:
            return f"{self._http.url}/{self.root.name}"
        return f"s3://{BUCKET}/{self._prefix}"

    def options(self) -> dict[str, Any] | None:
        return None if self._s3 is None else self._s3.storage_options()

    def publish(self) -> None:
        """Make what is on disk under ``root`` what the server serves."""
        if self._s3 is not None:
            self._s3.upload_dir(self.root, BUCKET, self._prefix)

    def requests(self) -> list[Any]:
        server: Any = self._http if self._http is not None else self._s3
        assert server.wait_idle(GENEROUS)
        return server.requests

    def reset(self) -> None:
        server: Any = self._http if self._http is not None else self._s3
        assert server.wait_idle(GENEROUS)
        server.reset_stats()

    def stop(self) -> None:
        if self._http is not None:
            self._http.stop()


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


_counter = iter(range(1 << 30))


@pytest.fixture(params=["http", "s3"])
def remote(request, tmp_path) -> Iterator[Remote]:
    """A factory-to-be: ``remote.root`` is written by the test, then ``remote.publish()``."""
    s3 = request.getfixturevalue("s3") if request.param == "s3" else None
    r = Remote(request.param, tmp_path / "m.zarr", s3, f"t{next(_counter)}/m.zarr")
    yield r
    r.stop()


def is_meta(path: str) -> bool:
    return path.rsplit("/", 1)[-1] in METADATA


def chunk_requests(records: list[Any]) -> list[Any]:
    return [r for r in records if not is_meta(r.path)]


def key_of(path: str) -> str:
    """A record's path relative to the store (``0/c/1/0/0``)."""
    return path.split("m.zarr/", 1)[1]


def chunk_file(root: Path, level: int, index: tuple[int, ...]) -> Path:
    return root / str(level) / "c" / "/".join(map(str, index))


def open_pool(remote: Remote, **kwargs: Any) -> ChunkPool:
    (pool,) = ChunkPool.from_zarr_node(remote.url(), storage_options=remote.options(), **kwargs)
    return pool


def append_time_point(root: Path, frame: np.ndarray) -> None:
    for level in range(2):
        arr = zarr.open_array(root / str(level), mode="r+")
        t = arr.shape[0]
        arr.resize((t + 1, *arr.shape[1:]))
        arr[t] = frame
        frame = frame.reshape(frame.shape[0] // 2, 2, frame.shape[1] // 2, 2).mean((1, 3))
        frame = frame.astype(arr.dtype)


def movie(remote: Remote) -> np.ndarray:
    data = ramp((2, 32, 32)) + 1
    write_pyramid(remote.root, data, chunks=CHUNKS, n_levels=2)
    remote.publish()
    return data


def test_appended_time_point_reads_only_new_chunks_and_metadata(remote):
    data = movie(remote)
    pool = open_pool(remote, revalidate=4)
    try:
        old = hold_all(pool)
        frame = (ramp((32, 32)) * 3 + 7).astype(data.dtype)
        append_time_point(remote.root, frame)
        remote.publish()
        remote.reset()

        changes = pool.refresh()

        assert changes == Changes(
            grown={0: ((2, 32, 32), (3, 32, 32)), 1: ((2, 16, 16), (3, 16, 16))}
        )
        refresh_records = remote.requests()
        checks = chunk_requests(refresh_records)
        # the held chunks' objects are revalidated (the bound: 4), no chunk body is read
        assert len(checks) == 4 and {r.status for r in checks} == {
            304 if remote.kind == "http" else 200
        }
        assert all(r.method == "HEAD" and r.bytes_sent == 0 for r in checks)
        assert all(loc.state is ChunkState.LOADED for loc in old)

        remote.reset()
        new = [(0, (2, y, x)) for y in range(2) for x in range(2)] + [(1, (2, 0, 0))]
        locs = pool.get_chunks(new, "view")
        pool.wait_for_chunks_to_load(GENEROUS)
        for loc in locs[:4]:
            assert np.array_equal(loc.data[0], frame[loc.slices[1:]])
        reads = remote.requests()
        expected = {f"{level}/c/{'/'.join(map(str, idx))}" for level, idx in new}
        assert sorted(key_of(r.path) for r in reads) == sorted(expected)
        new_bytes = sum(chunk_file(remote.root, level, idx).stat().st_size for level, idx in new)
        meta_bytes = sum(
            r.bytes_sent for r in refresh_records if is_meta(r.path) and r.status < 400
        )
        meta_size = sum(
            (remote.root / p).stat().st_size for p in ("zarr.json", "0/zarr.json", "1/zarr.json")
        )
        # what was read: successful bodies (S3 answers the v2 names zarr asks for with
        # a 404 whose body is an XML error document, which is not the store's data)
        wire = sum(r.bytes_sent for r in reads + refresh_records if r.status < 400)
        assert sum(r.bytes_sent for r in reads) == new_bytes
        assert wire <= 1.2 * (new_bytes + meta_size) and meta_bytes <= meta_size * 1.2
    finally:
        pool.destroy()


def test_chunk_rewritten_in_place_reloads_alone_and_its_holder_sees_new_data(remote):
    data = movie(remote)
    pool = open_pool(remote)
    try:
        seen: list[Any] = []
        lock = threading.Lock()
        reloaded = threading.Event()

        def on_load(loc):
            with lock:
                seen.append((loc.key, None if loc.data is None else loc.data.copy()))
                if len(seen) > 10:
                    reloaded.set()

        locs = hold_all(pool, load_handler=on_load)
        assert len(seen) == 10
        new_tile = np.full((16, 16), 4242, data.dtype)
        zarr.open_array(remote.root / "0", mode="r+")[0, :16, :16] = new_tile
        remote.publish()
        remote.reset()

        changes = pool.refresh()

        assert changes.rewritten == ((0, (0, 0, 0)),)
        assert not changes.grown and not changes.reopened
        pool.wait_for_chunks_to_load(GENEROUS)
        assert reloaded.wait(GENEROUS)
        with lock:
            assert len(seen) == 11 and seen[10][0] == (0, (0, 0, 0))
            assert np.array_equal(seen[10][1][0], new_tile)
        target = next(loc for loc in locs if loc.key == (0, (0, 0, 0)))
        assert np.array_equal(target.data[0], new_tile)
        records = remote.requests()
        bodies = [r for r in chunk_requests(records) if r.method == "GET"]
        assert [key_of(r.path) for r in bodies] == ["0/c/0/0/0"]  # exactly that one again
        assert len(chunk_requests(records)) == 10 + 1  # one check per held object, one read
        remote.reset()
        assert pool.refresh() == Changes()  # and it is not reloaded again
        assert not [r for r in chunk_requests(remote.requests()) if r.method == "GET"]
    finally:
        pool.destroy()


def test_unchanged_store_costs_metadata_and_at_most_revalidate_bodiless_checks(remote):
    movie(remote)
    pool = open_pool(remote, revalidate=3)
    try:
        hold_all(pool)
        checked: list[set[str]] = []
        for _ in range(4):
            remote.reset()
            assert pool.refresh() == Changes()
            records = remote.requests()
            checks = chunk_requests(records)
            assert len(checks) <= 3 and all(r.bytes_sent == 0 for r in checks)
            if remote.kind == "http":  # a conditional request, answered "not modified"
                assert all(r.conditional and r.status == 304 for r in checks)
            # the rest is metadata (zarr also asks for the v2 names, absent here)
            assert "zarr.json" in {r.path.rsplit("/", 1)[-1] for r in records if is_meta(r.path)}
            checked.append({key_of(r.path) for r in checks})
        assert pool.stats.loads == 10
        # oldest check first: three refreshes of 3 visit 9 different objects, the fourth the last
        assert len(set().union(*checked[:3])) == 9
        assert len(set().union(*checked)) == 10
    finally:
        pool.destroy()


def test_sharded_rewrite_over_http_reloads_that_shards_chunks_only(tmp_path):
    data = ramp((2, 32, 32)) + 1
    root = tmp_path / "m.zarr"
    make_array(root, data, CHUNKS, shards=(1, 32, 32))
    with ZarrHTTPServer(tmp_path) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/m.zarr")
        try:
            hold_all(pool)
            new_tile = np.full((16, 16), 99, data.dtype)
            zarr.open_array(root, mode="r+")[0, :16, :16] = new_tile
            assert server.wait_idle(GENEROUS)
            server.reset_stats()

            changes = pool.refresh()

            # the unit is the shard: its held inner chunks reload, the other shard's not
            assert sorted(changes.rewritten) == [(0, (0, y, x)) for y in range(2) for x in range(2)]
            pool.wait_for_chunks_to_load(GENEROUS)
            assert server.wait_idle(GENEROUS)
            gets = [r for r in server.requests if r.method == "GET" and "/c/" in r.path]
            assert {r.path for r in gets} == {"/m.zarr/c/0/0/0"}
            assert len(gets) == 1 + 4  # its index once, then its four inner chunks
            loc = pool.get_chunk(0, (0, 0, 0), "view")
            assert np.array_equal(loc.data[0], new_tile)
            assert np.array_equal(pool.get_chunk(0, (1, 0, 0), "view").data, data[1:, :16, :16])
        finally:
            pool.destroy()


def test_disk_cache_revalidates_then_serves_offline_with_one_warning(tmp_path, caplog):
    data = ramp((2, 32, 32)) + 1
    root = tmp_path / "srv" / "m.zarr"
    write_pyramid(root, data, chunks=CHUNKS, n_levels=2)
    cache = tmp_path / "cache"
    retry = RetryPolicy(attempts=2, timeout=5.0, base_delay=0.01, max_delay=0.02)
    with ZarrHTTPServer(root.parent) as server:
        url = f"{server.url}/m.zarr"
        (first,) = ChunkPool.from_zarr_node(url, disk_cache=cache, retry=retry)
        hold_all(first)
        first.destroy()
        new_tile = np.full((16, 16), 777, data.dtype)
        zarr.open_array(root / "0", mode="r+")[0, :16, :16] = new_tile
        assert server.wait_idle(GENEROUS)
        server.reset_stats()

        # at open, the cached metadata is revalidated (conditional, not modified)
        (pool,) = ChunkPool.from_zarr_node(url, disk_cache=cache, retry=retry)
        try:
            assert server.wait_idle(GENEROUS)
            opened = server.requests
            assert opened and all(is_meta(r.path) and r.status in (304, 404) for r in opened)
            assert any(r.status == 304 for r in opened)
            server.reset_stats()
            locs = hold_all(pool)
            assert server.wait_idle(GENEROUS) and server.requests == []  # all from disk
            target = next(loc for loc in locs if loc.key == (0, (0, 0, 0)))
            assert np.array_equal(target.data, data[:1, :16, :16])  # stale, until revalidated

            changes = pool.refresh()

            assert changes.rewritten == ((0, (0, 0, 0)),)
            pool.wait_for_chunks_to_load(GENEROUS)
            assert np.array_equal(target.data[0], new_tile)
            assert server.wait_idle(GENEROUS)
            gets = [r for r in server.requests if r.method == "GET" and not is_meta(r.path)]
            assert [key_of(r.path) for r in gets] == ["0/c/0/0/0"]

            # offline: every request is reset; the pool serves what it has, one warning
            server.add_fault("*", "reset")
            with caplog.at_level(logging.INFO, logger="chunkpool"):
                for _ in range(3):
                    assert pool.refresh() == Changes()
                offline = [r for r in caplog.records if "offline" in r.getMessage()]
                assert len(offline) == 1 and offline[0].levelno == logging.WARNING
                message = offline[0].getMessage()
                assert "cached" in message and "m.zarr" in message and "\n" not in message
                assert all(loc.state is ChunkState.LOADED for loc in locs)
                assert np.array_equal(target.data[0], new_tile)
                # a new pool opens from the cache while offline
                (again,) = ChunkPool.from_zarr_node(url, disk_cache=cache, retry=retry)
                try:
                    assert np.array_equal(
                        again.get_chunk(0, (0, 0, 1)).wait(GENEROUS), data[:1, :16, 16:]
                    )
                finally:
                    again.destroy()

                server.clear_faults()
                assert pool.refresh() == Changes()
                back = [
                    r for r in caplog.records if "online" in r.getMessage().replace("offline", "")
                ]
                assert len(back) == 1
                assert len([r for r in caplog.records if "offline" in r.getMessage()]) == 1
        finally:
            pool.destroy()
    shutil.rmtree(cache)


@pytest.mark.parametrize("first", ["smaller", "larger"])
def test_inner_chunk_of_a_shard_rewritten_since_its_index_was_cached_reads_the_new_index(
    tmp_path, first
):
    """No refresh in between: the range read's ETag differs from the cached index's (or
    its range is past the shard's new end: 416), so the index is read again before the
    chunk is trusted."""
    data = ramp((1, 32, 32)) + 1
    root = tmp_path / "m.zarr"
    make_array(root, data, CHUNKS, shards=(1, 32, 32))
    with ZarrHTTPServer(tmp_path) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/m.zarr")
        try:
            assert np.array_equal(pool.get_chunk(0, (0, 0, 0)).wait(GENEROUS), data[:, :16, :16])
            new = data.copy()
            # the first inner chunk compresses to fewer or more bytes: every later one moves
            noise = np.random.default_rng(1).integers(0, 60000, (16, 16), dtype=data.dtype)
            new[0, :16, :16] = 5 if first == "smaller" else noise
            new[0, 16:, 16:] = 6
            zarr.open_array(root, mode="r+")[...] = new
            later = pool.get_chunk(0, (0, 1, 1)).wait(GENEROUS)
            assert np.array_equal(later, new[:, 16:, 16:])
        finally:
            pool.destroy()


def wait_for(condition, what: str) -> None:
    """Until ``condition()`` (polled), within GENEROUS seconds."""
    deadline = time.monotonic() + GENEROUS
    while not condition():
        assert time.monotonic() < deadline, f"not within {GENEROUS} s: {what}"
        time.sleep(0.005)


@pytest.fixture
def http_movie(tmp_path) -> Iterator[tuple[ZarrHTTPServer, Path, np.ndarray]]:
    """A 2-level (t, y, x) OME-Zarr of 2 time points over HTTP."""
    root = tmp_path / "m.zarr"
    data = ramp((2, 32, 32)) + 1
    write_pyramid(root, data, chunks=CHUNKS, n_levels=2)
    with ZarrHTTPServer(tmp_path) as server:
        yield server, root, data


def test_a_remote_refresh_sends_its_metadata_reads_and_checks_at_once(http_movie):
    """zarr reads a group's document before its levels' and a refresh revalidated after
    reading the metadata: three round trips. Here every request is held by the server
    until all are in: the documents the last refresh read and the checks are asked for
    at once (one round trip), and the image's arrays stay on the pool's own store."""
    server, root, _ = http_movie
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/m.zarr", revalidate=3)
    try:
        hold_all(pool)
        store = pool.multiscale_info.levels[0].array.store
        assert pool.refresh() == Changes()  # learns what a refresh reads
        assert server.wait_idle(GENEROUS)
        server.reset_stats()
        assert pool.refresh() == Changes()
        assert server.wait_idle(GENEROUS)
        documents = [r for r in server.requests if is_meta(r.path)]
        assert {key_of(r.path) for r in documents} >= {"zarr.json", "0/zarr.json", "1/zarr.json"}
        server.reset_stats()
        append_time_point(root, np.full((32, 32), 5, np.uint16))
        server.add_fault(lambda path: True, "stall")
        outcome: list[Changes] = []
        refreshing = threading.Thread(target=lambda: outcome.append(pool.refresh()))
        refreshing.start()
        try:
            wait_for(lambda: server.in_flight >= len(documents) + 3, "every request in")
        finally:
            server.stall_release.set()
            refreshing.join(GENEROUS)
        assert not refreshing.is_alive()
        assert outcome == [
            Changes(grown={0: ((2, 32, 32), (3, 32, 32)), 1: ((2, 16, 16), (3, 16, 16))})
        ]
        for level in pool.multiscale_info.levels:
            assert level.array.store is store
        server.clear_faults()
        assert pool.get_chunk(0, (2, 1, 1), "view").wait(GENEROUS)[0, 0, 0] == 5
    finally:
        pool.destroy()


def test_a_watch_tells_a_growth_before_the_revalidation_answers(http_movie):
    """The checks held by the server: the growth is told (and its chunks can load)
    meanwhile; the rewritten chunk the checks then find is told in a second call."""
    server, root, _ = http_movie
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/m.zarr")
    try:
        hold_all(pool)
        told: list[Changes] = []
        first = threading.Event()

        def on_change(changes: Changes) -> None:
            told.append(changes)
            first.set()

        watcher = Watcher(pool, 1.0, on_change)  # ticked here: no thread, no timing
        zarr.open_array(root / "0", mode="r+")[0, :16, :16] = 77  # a rewrite in place
        append_time_point(root, np.full((32, 32), 5, np.uint16))
        server.add_fault("*/c/[01]/*", "stall")  # the checks (t = 0, 1), not t = 2
        ticking = threading.Thread(target=lambda: told.append(watcher.tick(early=True)))
        ticking.start()
        try:
            assert first.wait(GENEROUS)
            assert told[0].grown[0] == ((2, 32, 32), (3, 32, 32)) and not told[0].rewritten
            assert pool.get_chunk(0, (2, 1, 1), "view").wait(GENEROUS)[0, 0, 0] == 5
            assert ticking.is_alive()  # still waiting for its checks
        finally:
            server.stall_release.set()
            ticking.join(GENEROUS)
        assert not ticking.is_alive()
        assert told[1:] == [Changes(rewritten=((0, (0, 0, 0)),)), True]
        pool.wait_for_chunks_to_load(GENEROUS)
        loc = pool.get_chunk(0, (0, 0, 0), "view")
        assert (loc.wait(GENEROUS) == 77).all()
    finally:
        pool.destroy()


def test_half_written_remote_metadata_fails_a_refresh_then_it_recovers(http_movie):
    """The documents read ahead serve what the server said: a half-written one is a
    SourceError (nothing taken); once whole, the next refresh reads it and takes it."""
    server, root, _ = http_movie
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/m.zarr")
    try:
        info = pool.multiscale_info
        assert pool.refresh() == Changes()
        append_time_point(root, np.full((32, 32), 5, np.uint16))
        document = (root / "0" / "zarr.json").read_bytes()
        (root / "0" / "zarr.json").write_bytes(document[: len(document) // 2])
        with pytest.raises(SourceError):
            pool.refresh()
        assert pool.multiscale_info is info
        (root / "0" / "zarr.json").write_bytes(document)
        assert pool.refresh().grown[0] == ((2, 32, 32), (3, 32, 32))
    finally:
        pool.destroy()
