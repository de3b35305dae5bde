"""ChunkPool over HTTP and S3, against real servers on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.httpserver import ZarrHTTPServer
from support.s3server import S3Server

from chunkpool import ChunkLoadError, ChunkPool, ChunkState, SourceError


@pytest.fixture
def served(tmp_path):
    """A directory of arrays behind a threaded HTTP/1.1 server with Range support."""
    data = ramp((96, 80))
    make_array(tmp_path / "plain.zarr", data, (32, 32))
    make_array(tmp_path / "v2.zarr", data, (32, 32), zarr_format=2)
    make_array(tmp_path / "sharded.zarr", data, (16, 16), shards=(48, 32))
    with ZarrHTTPServer(tmp_path) as server:
        yield server, data


def load_all(pool: ChunkPool) -> list:
    scale = pool.multiscale_info.levels[0]
    locs = [pool.get_chunk(0, idx) for idx in scale.iter_chunk_indices()]
    pool.wait_for_chunks_to_load()
    return locs


@pytest.mark.parametrize("name", ["plain.zarr", "v2.zarr", "sharded.zarr"])
def test_http_source_loads_every_chunk(served, name):
    server, data = served
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/{name}")
    try:
        assert not pool._sources[0].is_sync  # an async store: reads run on zarr's loop
        for loc in load_all(pool):
            np.testing.assert_array_equal(loc.data, data[loc.slices])
    finally:
        pool.destroy()


def test_sharded_http_reads_each_index_once_and_only_inner_chunks(served):
    server, _ = served
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/sharded.zarr")
    try:
        server.reset_stats()
        locs = load_all(pool)
        server.wait_idle()
        chunk_reads = [r for r in server.requests if "/c/" in r.path]
        n_shards, n_inner = 2 * 3, len(locs)
        index_reads = [r for r in chunk_reads if r.range and r.range.startswith("bytes=-")]
        assert len(index_reads) == n_shards  # one index read per shard, however many chunks
        assert len(chunk_reads) == n_shards + n_inner  # then one range read per inner chunk
        assert all(r.status == 206 for r in chunk_reads)
        assert pool.stats.bytes_fetched == server.bytes_sent - sum(
            r.bytes_sent for r in server.requests if "/c/" not in r.path
        )
    finally:
        pool.destroy()


def test_http_server_error_fails_only_that_chunk(served):
    server, _ = served
    server.add_fault("*/plain.zarr/c/1/1", "500")
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/plain.zarr")
    try:
        scale = pool.multiscale_info.levels[0]
        locs = [pool.get_chunk(0, idx) for idx in scale.iter_chunk_indices()]
        with pytest.raises(ChunkLoadError) as info:
            pool.wait_for_chunks_to_load()
        assert list(info.value.failures) == [(0, (1, 1))]
        assert [loc.index for loc in locs if loc.state is ChunkState.FAILED] == [(1, 1)]
    finally:
        pool.destroy()


def test_s3_source(tmp_path):
    data = ramp((64, 64), "int16")
    make_array(tmp_path / "img.zarr", data, (32, 32))
    with S3Server() as s3:
        s3.create_bucket("pool-test")
        s3.upload_dir(tmp_path / "img.zarr", "pool-test", "img.zarr")
        (pool,) = ChunkPool.from_zarr_node(
            "s3://pool-test/img.zarr", storage_options=s3.storage_options()
        )
        try:
            for loc in load_all(pool):
                np.testing.assert_array_equal(loc.data, data[loc.slices])
        finally:
            pool.destroy()


@pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")
def test_remote_group_pyramid(tmp_path):
    """A plain group of arrays served over HTTP (which cannot list directories, so its
    metadata is consolidated) is a pyramid ordered by size."""
    root = zarr.open_group(tmp_path / "pyr.zarr", mode="w")
    full = ramp((64, 64))
    root.create_array("big", data=full, chunks=(32, 32))
    root.create_array("small", data=full[::2, ::2], chunks=(32, 32))
    zarr.consolidate_metadata(tmp_path / "pyr.zarr")
    with ZarrHTTPServer(tmp_path) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/pyr.zarr")
        try:
            assert [s.shape for s in pool.multiscale_info.levels] == [(64, 64), (32, 32)]
            np.testing.assert_array_equal(pool.get_chunk(1, (0, 0)).wait(), full[::2, ::2])
        finally:
            pool.destroy()


def test_s3_credentials_from_the_environment(tmp_path, monkeypatch):
    """No storage options: s3fs finds the endpoint and keys in the usual AWS_* variables,
    and neither the key nor the secret shows in names or errors."""
    data = ramp((32, 32), "int16")
    make_array(tmp_path / "img.zarr", data, (16, 16))
    with S3Server() as s3:
        s3.create_bucket("env-creds")
        s3.upload_dir(tmp_path / "img.zarr", "env-creds", "img.zarr")
        env = s3.env()
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        (pool,) = ChunkPool.from_zarr_node("s3://env-creds/img.zarr")
        try:
            assert pool.multiscale_info.source == "s3://env-creds/img.zarr"
            np.testing.assert_array_equal(pool.get_chunk(0, (1, 1)).wait(), data[16:, 16:])
        finally:
            pool.destroy()
        with pytest.raises(SourceError) as info:
            ChunkPool.from_zarr_node("s3://env-creds/missing.zarr")
        assert env["AWS_SECRET_ACCESS_KEY"] not in str(info.value)
