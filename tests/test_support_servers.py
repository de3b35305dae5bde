"""Tests of the loopback test servers in ``tests/support`` (HTTP with fault injection, moto S3).

The rest of the suite trusts these servers to measure clients (request counts, bytes, cancelled
requests) and to fail on cue, so each behaviour is checked here from a real client.
"""

from __future__ import annotations

import asyncio
import errno
import http.client
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import numpy as np
import obstore.store
import pytest
import s3fs
import zarr
import zarr.storage
from support.httpserver import FaultKind, ZarrHTTPServer
from support.s3server import S3Server

BLOB_SIZE = 100_000
BLOB = np.random.default_rng(0).integers(0, 256, BLOB_SIZE, dtype=np.uint8).tobytes()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A served directory: a binary blob, a JSON file and a subdirectory."""
    (tmp_path / "blob.bin").write_bytes(BLOB)
    (tmp_path / "meta.json").write_text('{"a": 1}')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "empty").write_bytes(b"")
    return tmp_path


@pytest.fixture
def server(root: Path) -> Iterator[ZarrHTTPServer]:
    with ZarrHTTPServer(root) as srv:
        yield srv


Connect = Callable[..., http.client.HTTPConnection]


@pytest.fixture
def connect() -> Iterator[Connect]:
    """``connect(server, timeout=5.0)`` opens an ``http.client`` connection, closed at teardown."""
    opened: list[http.client.HTTPConnection] = []

    def make(srv: ZarrHTTPServer, timeout: float = 5.0) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=timeout)
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        conn.close()


def fetch(
    conn: http.client.HTTPConnection, path: str, method: str = "GET", **headers: str
) -> tuple[http.client.HTTPResponse, bytes]:
    conn.request(method, path, headers=headers)
    response = conn.getresponse()
    return response, response.read()


# -- HTTP semantics --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("range_header", "first", "last"),
    [
        ("bytes=10-19", 10, 19),
        ("bytes=99990-", 99990, BLOB_SIZE - 1),
        ("bytes=-7", BLOB_SIZE - 7, BLOB_SIZE - 1),
        ("bytes=5-999999", 5, BLOB_SIZE - 1),
        ("bytes=-999999", 0, BLOB_SIZE - 1),
    ],
)
def test_range_requests_are_byte_exact(
    server: ZarrHTTPServer, range_header: str, first: int, last: int, connect: Connect
) -> None:
    response, body = fetch(connect(server), "/blob.bin", Range=range_header)
    assert response.status == 206
    assert response.headers["Content-Range"] == f"bytes {first}-{last}/{BLOB_SIZE}"
    assert int(response.headers["Content-Length"]) == last - first + 1
    assert body == BLOB[first : last + 1]


def test_full_get_and_ignored_multi_range(server: ZarrHTTPServer, connect: Connect) -> None:
    conn = connect(server)
    for headers in ({}, {"Range": "bytes=0-1,5-6"}):
        response, body = fetch(conn, "/blob.bin", **headers)
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/octet-stream"
        assert int(response.headers["Content-Length"]) == BLOB_SIZE
        assert body == BLOB


@pytest.mark.parametrize(
    ("path", "range_header"),
    [("/blob.bin", f"bytes={BLOB_SIZE}-"), ("/blob.bin", "bytes=-0"), ("/sub/empty", "bytes=0-")],
)
def test_unsatisfiable_range_is_416(
    server: ZarrHTTPServer, path: str, range_header: str, connect: Connect
) -> None:
    conn = connect(server)
    response, body = fetch(conn, path, Range=range_header)
    assert response.status == 416
    assert response.headers["Content-Range"].startswith("bytes */")
    assert len(body) == int(response.headers["Content-Length"])
    # The error kept the connection usable.
    assert fetch(conn, "/meta.json")[1] == b'{"a": 1}'


def test_head_and_json_content_type(server: ZarrHTTPServer, connect: Connect) -> None:
    conn = connect(server)
    response, body = fetch(conn, "/meta.json", method="HEAD")
    assert (response.status, body) == (200, b"")
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["Content-Length"] == "8"
    response, body = fetch(conn, "/blob.bin", method="HEAD", Range="bytes=-7")
    assert (response.status, body, response.headers["Content-Length"]) == (206, b"", "7")


@pytest.mark.parametrize("path", ["/missing", "/sub", "/sub/", "/", "/../../etc/passwd"])
def test_missing_files_and_directories_are_404(
    server: ZarrHTTPServer, path: str, connect: Connect
) -> None:
    conn = connect(server)
    response, body = fetch(conn, path)
    assert response.status == 404
    assert len(body) == int(response.headers["Content-Length"])
    sock = conn.sock
    assert sock is not None
    assert fetch(conn, "/meta.json")[0].status == 200
    assert conn.sock is sock


def test_keep_alive_reuses_the_connection(server: ZarrHTTPServer, connect: Connect) -> None:
    conn = connect(server)
    assert fetch(conn, "/blob.bin", Range="bytes=0-9")[1] == BLOB[:10]
    sock = conn.sock
    assert sock is not None
    assert fetch(conn, "/meta.json")[1] == b'{"a": 1}'
    assert conn.sock is sock


# -- injected behaviour ----------------------------------------------------------------------


def test_latency_is_added_and_adjustable(server: ZarrHTTPServer, connect: Connect) -> None:
    conn = connect(server)
    server.latency = 3.0
    t0 = time.monotonic()
    fetch(conn, "/meta.json")
    assert time.monotonic() - t0 >= 3.0
    server.latency = 0
    t0 = time.monotonic()
    fetch(conn, "/meta.json")
    assert time.monotonic() - t0 < 3.0  # (a bound a loaded machine still keeps)


def test_bandwidth_limits_each_response(server: ZarrHTTPServer, connect: Connect) -> None:
    server.bandwidth = 400_000
    t0 = time.monotonic()
    body = fetch(connect(server), "/blob.bin")[1]
    elapsed = time.monotonic() - t0
    assert body == BLOB
    assert 0.2 <= elapsed < 10  # 100 kB at 400 kB/s = 0.25 s, never less


@pytest.mark.parametrize("kind", ["500", "503"])
def test_status_faults_with_times_limit(server: ZarrHTTPServer, kind: FaultKind) -> None:
    rule = server.add_fault("*.json", kind, times=2)
    for _ in range(2):
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(f"{server.url}/meta.json", timeout=5)
        assert info.value.code == int(kind)
        info.value.close()
    with urllib.request.urlopen(f"{server.url}/meta.json", timeout=5) as response:
        assert response.read() == b'{"a": 1}'
    with urllib.request.urlopen(f"{server.url}/blob.bin", timeout=5) as response:
        assert response.read() == BLOB
    assert (rule.hits, rule.remaining) == (2, 0)
    assert server.wait_idle(2)
    assert [r.status for r in server.requests] == [int(kind), int(kind), 200, 200]


def test_fault_predicate_and_clear(server: ZarrHTTPServer, connect: Connect) -> None:
    rule = server.add_fault(lambda path: path.endswith(".bin"), "503")
    conn = connect(server)
    assert fetch(conn, "/blob.bin")[0].status == 503
    assert fetch(conn, "/meta.json")[0].status == 200
    server.clear_faults()
    assert fetch(conn, "/blob.bin")[0].status == 200
    assert rule.hits == 1


def test_invalid_fault_arguments_are_rejected(server: ZarrHTTPServer) -> None:
    with pytest.raises(ValueError, match="kind"):
        server.add_fault("*", "404")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="times"):
        server.add_fault("*", "500", times=0)


def test_reset_fault_resets_the_connection(server: ZarrHTTPServer, connect: Connect) -> None:
    server.add_fault("/blob.bin", "reset", times=1)
    with pytest.raises(ConnectionResetError) as info:
        fetch(connect(server), "/blob.bin")
    # A real RST (ECONNRESET), not an orderly close (http.client.RemoteDisconnected).
    assert info.value.errno == errno.ECONNRESET
    assert fetch(connect(server), "/blob.bin")[1] == BLOB
    assert server.wait_idle(2)
    record = server.requests[0]
    assert (record.fault, record.status, record.bytes_sent) == ("reset", None, 0)


def test_reset_fault_seen_by_aiohttp(server: ZarrHTTPServer) -> None:
    server.add_fault("/meta.json", "reset")

    async def read() -> bytes:
        async with aiohttp.ClientSession() as session, session.get(f"{server.url}/meta.json") as r:
            return await r.read()

    with pytest.raises(aiohttp.ClientOSError) as info:
        asyncio.run(read())
    assert info.value.errno == errno.ECONNRESET


def test_stall_times_out_client_and_is_recorded_as_abandoned(
    server: ZarrHTTPServer, connect: Connect
) -> None:
    server.add_fault("/blob.bin", "stall", times=1)
    conn = connect(server, timeout=0.3)
    with pytest.raises(TimeoutError):
        fetch(conn, "/blob.bin")
    conn.close()
    assert server.in_flight == 1
    server.stall_release.set()
    assert server.wait_idle(2)
    (record,) = server.requests
    assert record.fault == "stall"
    assert record.client_disconnected
    assert (record.status, record.bytes_sent) == (None, 0)


def test_stall_release_lets_the_request_complete(server: ZarrHTTPServer, connect: Connect) -> None:
    server.add_fault("/meta.json", "stall")
    t0 = time.monotonic()
    threading.Timer(0.2, server.stall_release.set).start()
    response, body = fetch(connect(server), "/meta.json")
    assert (response.status, body) == (200, b'{"a": 1}')
    assert time.monotonic() - t0 >= 0.2


def test_stop_is_prompt_with_stalled_and_idle_connections(root: Path, connect: Connect) -> None:
    srv = ZarrHTTPServer(root)
    srv.start()
    srv.add_fault("/blob.bin", "stall")
    idle = connect(srv)
    fetch(idle, "/meta.json")  # leaves a keep-alive connection whose handler waits for more
    assert srv.wait_idle(2)
    errors: list[BaseException] = []

    def stalled_client() -> None:
        try:
            fetch(connect(srv, timeout=10), "/blob.bin")
        except BaseException as exc:
            errors.append(exc)

    client = threading.Thread(target=stalled_client)
    client.start()
    deadline = time.monotonic() + 2
    while srv.in_flight == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert srv.in_flight == 1
    t0 = time.monotonic()
    srv.stop()
    assert time.monotonic() - t0 < 2
    client.join(2)
    assert srv.wait_idle(0)
    assert isinstance(errors[0], ConnectionError)  # closed unanswered
    stalled = srv.requests[-1]
    assert (stalled.path, stalled.fault, stalled.status) == ("/blob.bin", "stall", None)
    srv.stop()  # idempotent


# -- accounting ------------------------------------------------------------------------------


def test_accounting_counts_requests_and_bytes(server: ZarrHTTPServer, connect: Connect) -> None:
    conn = connect(server)
    fetch(conn, "/blob.bin", Range="bytes=0-99")
    fetch(conn, "/meta.json", method="HEAD")
    fetch(conn, "/missing")
    assert server.wait_idle(2)
    records = server.requests
    assert [(r.method, r.path, r.range, r.status) for r in records] == [
        ("GET", "/blob.bin", "bytes=0-99", 206),
        ("HEAD", "/meta.json", None, 200),
        ("GET", "/missing", None, 404),
    ]
    assert [r.bytes_sent for r in records[:2]] == [100, 0]
    assert server.bytes_sent == sum(r.bytes_sent for r in records)
    assert all(r.start <= r.end and not r.client_disconnected for r in records)
    server.reset_stats()
    assert (server.requests, server.bytes_sent) == ([], 0)


def test_client_leaving_mid_body_is_recorded(server: ZarrHTTPServer, connect: Connect) -> None:
    server.bandwidth = 200_000
    conn = connect(server)
    conn.request("GET", "/blob.bin")
    response = conn.getresponse()
    assert len(response.read(10_000)) == 10_000
    conn.close()
    response.close()
    assert server.wait_idle(2)
    (record,) = server.requests
    assert record.client_disconnected
    assert record.status == 200
    assert 10_000 <= record.bytes_sent < BLOB_SIZE


def test_cancelled_aiohttp_request_is_seen_as_disconnected(server: ZarrHTTPServer) -> None:
    server.latency = 0.3

    async def read_with_timeout() -> None:
        async with aiohttp.ClientSession() as session:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.1), session.get(f"{server.url}/blob.bin") as r:
                    await r.read()

    asyncio.run(read_with_timeout())
    assert server.wait_idle(2)
    (record,) = server.requests
    assert record.client_disconnected
    assert (record.status, record.bytes_sent) == (None, 0)
    assert record.end - record.start >= 0.3


# -- end to end with zarr --------------------------------------------------------------------


@pytest.fixture
def zarr_data(tmp_path: Path) -> np.ndarray:
    """A sharded uint16 zarr v3 array at ``tmp_path/img.zarr`` (sharding exercises ranges)."""
    data = np.arange(40 * 30, dtype=np.uint16).reshape(40, 30)
    array = zarr.create_array(
        store=str(tmp_path / "img.zarr"),
        shape=data.shape,
        chunks=(10, 10),
        shards=(20, 20),
        dtype=data.dtype,
    )
    array[:] = data
    return data


def test_zarr_over_http_with_fsspec(tmp_path: Path, zarr_data: np.ndarray) -> None:
    with ZarrHTTPServer(tmp_path) as srv:
        store = zarr.storage.FsspecStore.from_url(f"{srv.url}/img.zarr", read_only=True)
        np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], zarr_data)
        assert srv.wait_idle(2)
        ranges = [r.range for r in srv.requests if r.status == 206]
    assert any(r is not None and r.startswith("bytes=-") for r in ranges)  # shard index


def test_zarr_over_http_with_obstore(tmp_path: Path, zarr_data: np.ndarray) -> None:
    with ZarrHTTPServer(tmp_path) as srv:
        # obstore refuses plain http:// unless allow_http is set.
        http_store = obstore.store.HTTPStore.from_url(
            f"{srv.url}/img.zarr", client_options={"allow_http": True}
        )
        store = zarr.storage.ObjectStore(http_store, read_only=True)
        np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], zarr_data)


def test_s3_server_starts_quickly() -> None:
    # Runs before the module's other S3 tests, so the first request also pays for moto's
    # backend initialisation and botocore's model loading (the imports are already done).
    t0 = time.monotonic()
    with S3Server() as server:
        server.create_bucket("startup-probe")
        assert time.monotonic() - t0 < 3


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_image(
    s3: S3Server, tmp_path: Path, zarr_data: np.ndarray, request: pytest.FixtureRequest
) -> tuple[str, np.ndarray]:
    """Upload ``img.zarr`` to a bucket named after the test; returns ``(bucket, data)``."""
    bucket = request.node.name.replace("_", "-")[:63].lower()
    s3.create_bucket(bucket)
    assert s3.upload_dir(tmp_path / "img.zarr", bucket, "/images/img.zarr/") == 5
    return bucket, zarr_data


def test_zarr_over_s3_with_s3fs(s3: S3Server, s3_image: tuple[str, np.ndarray]) -> None:
    bucket, data = s3_image
    store = zarr.storage.FsspecStore.from_url(
        f"s3://{bucket}/images/img.zarr", storage_options=s3.storage_options(), read_only=True
    )
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)


def test_zarr_over_s3_with_obstore(s3: S3Server, s3_image: tuple[str, np.ndarray]) -> None:
    bucket, data = s3_image
    s3_store = obstore.store.S3Store(
        bucket,
        prefix="images/img.zarr",
        endpoint=s3.endpoint_url,
        access_key_id="testing",
        secret_access_key="testing",
        region="us-east-1",
        client_options={"allow_http": True},
    )
    store = zarr.storage.ObjectStore(s3_store, read_only=True)
    np.testing.assert_array_equal(zarr.open_array(store, mode="r")[:], data)


def test_s3_env_configures_s3fs_and_obstore(
    s3: S3Server, s3_image: tuple[str, np.ndarray], monkeypatch: pytest.MonkeyPatch
) -> None:
    bucket, _ = s3_image
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    key = f"{bucket}/images/img.zarr/zarr.json"
    expected = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True).cat(key)
    assert s3fs.S3FileSystem(skip_instance_cache=True).cat(key) == expected
    from_env = obstore.store.S3Store(bucket)
    assert bytes(obstore.get(from_env, "images/img.zarr/zarr.json").bytes()) == expected


def test_s3_reset_removes_buckets(s3: S3Server) -> None:
    s3.create_bucket("to-be-reset")
    fs = s3fs.S3FileSystem(**s3.storage_options(), skip_instance_cache=True)
    assert "to-be-reset" in fs.ls("")
    s3.reset()
    fs.invalidate_cache()
    assert "to-be-reset" not in fs.ls("")
