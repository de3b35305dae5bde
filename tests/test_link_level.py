"""A level chosen for the link: the pool's link estimate, the shaped test server, and
the viewer's choice of the first level to show (pure logic) and its settled picture.

The shaped server (``ZarrHTTPServer(bandwidth=..., latency=...)``) is one link shared by
every response in flight, as a network is; the pool measures what its loads achieve over
it (``pool.stats.link``); the tile set shows first the level whose missing visible bytes
arrive within a time budget, then refines, and settles on exactly the ideal level.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr
from conftest import make_array
from support.httpserver import ZarrHTTPServer

from chunkpool import ChunkPool, LinkEstimate
from chunkpool.stats import LinkEstimator

# -- the shaped server: one link for all ----------------------------------------------------


def test_bandwidth_is_one_link_shared_by_concurrent_responses(tmp_path: Path) -> None:
    """Four concurrent 100 kB responses through a 400 kB/s link take 1 s together (a
    per-connection limit would let each take 0.25 s), and share it: none is done
    before most of the total has crossed."""
    (tmp_path / "blob.bin").write_bytes(bytes(100_000))
    ends: list[float] = []
    with ZarrHTTPServer(tmp_path, bandwidth=400_000) as server:

        def get() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            conn.request("GET", "/blob.bin")
            assert len(conn.getresponse().read()) == 100_000
            ends.append(time.monotonic())
            conn.close()

        threads = [threading.Thread(target=get) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert server.wait_idle(10)
        assert server.bytes_sent == 400_000
    assert len(ends) == 4
    assert max(ends) - started >= 0.95  # 400 kB at 400 kB/s, never less
    assert min(ends) - started >= 0.7  # taking turns, not one after the other


def test_stop_cuts_paced_responses_short(tmp_path: Path) -> None:
    """A link busy for a minute (many slow responses queued on it) stops at once."""
    (tmp_path / "blob.bin").write_bytes(bytes(200_000))
    server = ZarrHTTPServer(tmp_path, bandwidth=20_000)
    server.start()
    conns = []
    for _ in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("GET", "/blob.bin")
        conns.append(conn)
    deadline = time.monotonic() + 10
    while server.in_flight < 6 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert server.in_flight == 6
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5  # not the minute the bodies would take
    assert server.in_flight == 0
    for conn in conns:
        conn.close()


# -- the link estimate ------------------------------------------------------------------------


def fair_share(est: LinkEstimator, t: float, n: int, nbytes: int, rate: float, lat: float) -> float:
    """Record ``n`` loads of ``nbytes`` requested together at ``t`` on a link of
    ``rate`` shared evenly (each gets rate / n: they all end together); their end."""
    end = t + lat + n * nbytes / rate
    for _ in range(n):
        est.record(t, end, nbytes)
    return end


def test_estimator_finds_latency_and_throughput() -> None:
    """Batches of 1 to 16 loads requested together on a 1 MB/s, 50 ms link shared by
    the loads in flight: both numbers come back, though no load took only the
    latency and each took longer the more shared the link."""
    est = LinkEstimator()
    t = 0.0
    for n in (1, 8, 3, 16, 2, 4):
        t = fair_share(est, t, n, 100_000, 1e6, 0.05) + 1.0  # idle between batches
    link = est.estimate(0.5)
    assert link is not None
    assert link.samples == 34
    assert link.throughput == pytest.approx(1e6, rel=0.01)
    assert link.latency == pytest.approx(0.05, rel=0.01)
    assert link.fetched_per_loaded == 0.5
    assert link.seconds(200_000) == pytest.approx(0.25, rel=0.01)
    assert link.seconds(0) == 0.0


def test_estimator_counts_loads_in_flight_together_not_one_after_another() -> None:
    """A pipeline of single loads, each requested as the one before ends, on a
    2 MB/s, 100 ms link: the link is not shared, and the fit says so."""
    est = LinkEstimator()
    t = 0.0
    for i in range(40):
        nbytes = 50_000 * (1 + i % 4)
        t = fair_share(est, t, 1, nbytes, 2e6, 0.1)
    link = est.estimate(1.0)
    assert link is not None
    assert link.throughput == pytest.approx(2e6, rel=0.01)
    assert link.latency == pytest.approx(0.1, rel=0.01)


def test_no_estimate_before_loads_tell_the_bandwidth() -> None:
    est = LinkEstimator()
    assert est.estimate(1.0) is None
    for i in range(20):
        est.record(i, i + 0.1, 100)  # all alike: latency or transfer, no telling
    assert est.estimate(1.0) is None


@pytest.fixture
def noise_array(tmp_path: Path) -> Path:
    """64 incompressible chunks of 32 kB (uint8 noise, no compression)."""
    data = np.random.default_rng(0).integers(0, 256, (8 * 128, 8 * 256), dtype=np.uint8)
    make_array(tmp_path / "noise.zarr", data, (128, 256), compressors=None)
    return tmp_path


def test_pool_measures_the_shaped_link(noise_array: Path) -> None:
    """Over a 2 MB/s, 100 ms link, batches of 1 to 16 concurrent loads: the pool's
    estimate is the link's, within a factor."""
    with ZarrHTTPServer(noise_array) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/noise.zarr")
        try:
            assert pool.stats.link is None  # nothing loaded yet
            server.latency, server.bandwidth = 0.1, 2e6
            indices = list(pool.multiscale_info.levels[0].iter_chunk_indices())
            for n in (1, 16, 4, 12, 2):
                batch, indices = indices[:n], indices[n:]
                for index in batch:
                    pool.get_chunk(0, index)
                pool.wait_for_chunks_to_load(timeout=60)
            link = pool.stats.link
            assert isinstance(link, LinkEstimate)
            assert link == pool.link_estimate
            assert 2e6 / 1.5 <= link.throughput <= 2e6 * 1.5
            assert 0.05 <= link.latency <= 0.4
            assert link.fetched_per_loaded == pytest.approx(1.0)  # no compression
        finally:
            pool.destroy()


def test_loaded_among_counts_held_and_cached(noise_array: Path) -> None:
    node = zarr.open_array(noise_array / "noise.zarr", mode="r")
    (pool,) = ChunkPool.from_zarr_node(node, cache_size=8)
    try:
        pool.get_chunk(0, (0, 0), ref="a")
        pool.get_chunk(0, (0, 1), ref="a")
        pool.wait_for_chunks_to_load()
        pool.drop_chunk(0, (0, 1), ref="a")  # cached now
        keys = [(0, (0, 0)), (0, (0, 1)), (0, (0, 2))]
        assert pool.loaded_among(keys) == {(0, (0, 0)), (0, (0, 1))}
    finally:
        pool.destroy()
