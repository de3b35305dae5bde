"""Remote reads under faults: 404s, 5xx, resets, stalls, cancellation, credentials, and
the persistent disk cache, against a real HTTP server on loopback."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
from conftest import make_array, ramp
from support.httpserver import ZarrHTTPServer

from chunkpool import (
    ChunkLoadError,
    ChunkPool,
    ChunkReadError,
    ChunkState,
    RetryPolicy,
    SourceError,
)
from chunkpool.diskcache import INDEX_NAME
from chunkpool.retry import is_transient

FAST_RETRY = RetryPolicy(attempts=3, timeout=1.0, base_delay=0.05, max_delay=0.2)
#: Seconds the slow server waits before each answer: what a test that must not wait for
#: answers stays far below, however loaded the machine.
SLOW_SERVER = 60.0


@pytest.fixture
def server(tmp_path):
    data = ramp((128, 128))
    make_array(tmp_path / "img.zarr", data, (32, 32))
    with ZarrHTTPServer(tmp_path) as srv:
        srv.data = data
        yield srv


def open_pool(url: str, **kwargs) -> ChunkPool:
    kwargs.setdefault("retry", FAST_RETRY)
    (pool,) = ChunkPool.from_zarr_node(url, **kwargs)
    return pool


def chunk_requests(server: ZarrHTTPServer, key: str) -> list:
    server.wait_idle()
    return [r for r in server.requests if r.path.endswith(key)]


def test_404_chunk_is_the_fill_value(server):
    (server.root / "img.zarr" / "c" / "1" / "2").unlink()
    pool = open_pool(f"{server.url}/img.zarr")
    try:
        data = pool.get_chunk(0, (1, 2)).wait()
        assert (data == 0).all() and data.shape == (32, 32)
    finally:
        pool.destroy()


@pytest.mark.parametrize("kind", ["500", "503", "reset", "stall"])
def test_transient_faults_are_retried(server, kind):
    server.add_fault("*/img.zarr/c/2/3", kind, times=2)
    pool = open_pool(f"{server.url}/img.zarr")
    try:
        loc = pool.get_chunk(0, (2, 3))
        np.testing.assert_array_equal(loc.wait(timeout=20), server.data[loc.slices])
        server.stall_release.set()  # let stalled requests (the client gave up) finish
        assert len(chunk_requests(server, "/c/2/3")) == 3  # two faults, then the answer
    finally:
        server.stall_release.set()
        pool.destroy()


def test_persistent_failure_marks_the_chunk_failed_then_a_later_visit_retries(server):
    server.add_fault("*/img.zarr/c/0/1", "500")
    pool = open_pool(f"{server.url}/img.zarr")
    try:
        locs = [pool.get_chunk(0, (0, j)) for j in range(4)]
        with pytest.raises(ChunkLoadError) as info:
            pool.wait_for_chunks_to_load()
        assert list(info.value.failures) == [(0, (0, 1))]
        err = locs[1].error
        assert isinstance(err, ChunkReadError)
        assert "HTTP error 500" in str(err) and "after 3 attempts" in str(err)
        assert len(chunk_requests(server, "/c/0/1")) == FAST_RETRY.attempts
        assert all(loc.loaded for loc in locs if loc is not locs[1])
        # the viewer drops the failed tile when it leaves the view; a later visit retries
        server.clear_faults()
        pool.drop_chunk(0, (0, 1))
        again = pool.get_chunk(0, (0, 1))
        np.testing.assert_array_equal(again.wait(), server.data[again.slices])
    finally:
        pool.destroy()


def test_permanent_errors_are_not_retried(server):
    server.add_fault("*/img.zarr/c/3/3", "403")
    pool = open_pool(f"{server.url}/img.zarr")
    try:
        loc = pool.get_chunk(0, (3, 3))
        with pytest.raises(ChunkLoadError, match="permission denied"):
            loc.wait()
        assert len(chunk_requests(server, "/c/3/3")) == 1
        assert loc.state is ChunkState.FAILED
    finally:
        pool.destroy()


def test_transient_classification():
    import aiohttp

    def http(status: int) -> aiohttp.ClientResponseError:
        return aiohttp.ClientResponseError(None, (), status=status)  # type: ignore[arg-type]

    assert is_transient(http(500)) and is_transient(http(503)) and is_transient(http(429))
    assert not is_transient(http(403)) and not is_transient(http(400))
    assert is_transient(TimeoutError()) and is_transient(ConnectionResetError())
    assert not is_transient(PermissionError()) and not is_transient(ValueError())


def test_credentials_never_appear_in_errors_or_logs(server, caplog):
    server.add_fault("*/img.zarr/c/1/1", "500")
    url = server.url.replace("http://", "http://alice:s3cr3t-pw@") + "/img.zarr"
    caplog.set_level(logging.DEBUG, logger="chunkpool")
    pool = open_pool(url)
    try:
        assert "s3cr3t" not in pool.multiscale_info.source
        pool.get_chunk(0, (1, 1))
        with pytest.raises(ChunkLoadError) as info:
            pool.wait_for_chunks_to_load()
        text = str(info.value) + repr(info.value.failures) + caplog.text
        assert "HTTP error 500" in text
        assert "s3cr3t" not in text and "alice" not in text
    finally:
        pool.destroy()


def test_dropping_cancels_in_flight_http_requests(server):
    pool = open_pool(f"{server.url}/img.zarr", remote_io_concurrency=16)
    try:
        server.add_fault("*/c/*", "stall")  # no answer until released
        server.reset_stats()
        for i in range(4):
            for j in range(4):
                pool.get_chunk(0, (i, j))
        deadline = time.monotonic() + 30
        while server.in_flight < 16:  # every request sent and waiting for its answer
            assert time.monotonic() < deadline, server.in_flight
            time.sleep(0.01)
        dropped_at = time.monotonic()
        for i in range(4):
            for j in range(4):
                pool.drop_chunk(0, (i, j))
        assert pool.stats.cancellations == 16
        while pool.stats.chunks_fetching:  # the client has given every request up
            assert time.monotonic() < deadline, pool.stats
            time.sleep(0.01)
        server.stall_release.set()  # answered now, to a client that has gone
        assert server.wait_idle(10)
        chunks = [r for r in server.requests if "/c/" in r.path]
        assert len(chunks) == 16
        completed_after = [r for r in chunks if r.end > dropped_at and not r.client_disconnected]
        assert completed_after == []  # every request in flight was abandoned by the client
        assert pool.stats.cancellations == 16
    finally:
        pool.destroy()


def test_destroy_with_1000_pending_remote_loads_is_quick(tmp_path):
    make_array(tmp_path / "big.zarr", ramp((320, 320)), (10, 10))  # 1024 chunks
    with ZarrHTTPServer(tmp_path) as srv:
        pool = open_pool(f"{srv.url}/big.zarr")
        srv.latency = SLOW_SERVER
        for index in pool.multiscale_info.levels[0].iter_chunk_indices():
            pool.get_chunk(0, index)
        assert pool.stats.chunks_pending == 1024
        started = time.perf_counter()
        pool.destroy()
        assert time.perf_counter() - started < SLOW_SERVER / 2  # it waited for no answer


def test_unreachable_host_is_one_clear_message():
    with ZarrHTTPServer(".") as srv:
        url = srv.url
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node(f"{url}/img.zarr")
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{url}/img.zarr: ")


def test_disk_cache_serves_a_revisited_dataset_without_the_server(tmp_path):
    data = ramp((96, 96))
    make_array(tmp_path / "srv" / "img.zarr", data, (32, 32), shards=(64, 64))
    cache = tmp_path / "cache"
    with ZarrHTTPServer(tmp_path / "srv") as srv:
        url = f"{srv.url}/img.zarr"
        pool = open_pool(url, disk_cache=cache, disk_cache_bytes=1 << 20)
        for loc in [
            pool.get_chunk(0, idx) for idx in pool.multiscale_info.levels[0].iter_chunk_indices()
        ]:
            np.testing.assert_array_equal(loc.wait(), data[loc.slices])
        pool.destroy()
    # the server is gone: metadata, shard indexes and chunks all come from disk
    pool = open_pool(url, disk_cache=cache, disk_cache_bytes=1 << 20)
    try:
        for loc in [
            pool.get_chunk(0, idx) for idx in pool.multiscale_info.levels[0].iter_chunk_indices()
        ]:
            np.testing.assert_array_equal(loc.wait(), data[loc.slices])
    finally:
        pool.destroy()


def test_disk_cache_stays_within_its_byte_budget(tmp_path):
    make_array(tmp_path / "srv" / "img.zarr", ramp((256, 256)), (32, 32), compressors=None)
    budget = 20 * 32 * 32 * 2  # room for 20 of the 64 uncompressed chunks
    with ZarrHTTPServer(tmp_path / "srv") as srv:
        pool = open_pool(
            f"{srv.url}/img.zarr", disk_cache=tmp_path / "cache", disk_cache_bytes=budget
        )
        try:
            for idx in pool.multiscale_info.levels[0].iter_chunk_indices():
                pool.get_chunk(0, idx)
            pool.wait_for_chunks_to_load()
        finally:
            pool.destroy()
    entries = (p for p in (tmp_path / "cache").rglob("*") if not p.name.startswith(INDEX_NAME))
    files = [p for p in entries if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= budget
    assert 15 <= len(files) <= 22


@pytest.mark.render
def test_closing_the_viewer_with_1000_pending_remote_loads_is_quick(tmp_path):
    """A slow server never holds the viewer: with over 1000 tile loads in flight or
    queued, frames still come, and closing waits for no answer."""
    from viewer import Viewer

    make_array(tmp_path / "big.zarr", ramp((1024, 2048), "uint8"), (16, 16))
    with ZarrHTTPServer(tmp_path) as srv:
        viewer = Viewer(
            f"{srv.url}/big.zarr",
            None,
            size=(1024, 512),
            show_hud=False,
            colormap="gray",
            clim=(0, 255),
        )
        srv.latency = SLOW_SERVER
        viewer.show_region(0, 0, 1024, 512)  # 1:1: 64 x 32 tiles of 16², none cached
        started = time.perf_counter()
        viewer.screenshot()
        assert time.perf_counter() - started < SLOW_SERVER / 2  # it did not wait for data
        assert viewer.pool.stats.chunks_pending >= 1000
        started = time.perf_counter()
        viewer.close()
        assert time.perf_counter() - started < SLOW_SERVER / 2
