"""Remote reading benchmark: fsspec vs obstore, in-flight window, view settle time.

Measures, against loopback servers that this script starts in a child process (so the
servers' CPU and GIL do not count against the clients):

1. **Clients.** The same chunk set loaded by ``ChunkPool.from_zarr_node(node)`` where
   ``node`` was opened with zarr's sync API on an ``FsspecStore`` (aiohttp / s3fs) or a
   zarr ``ObjectStore`` around an obstore ``HTTPStore`` / ``S3Store``: HTTP without
   injected latency (throughput), HTTP with 50 ms latency, S3 (moto) without and with
   50 ms latency; for S3 also s3fs tuned (no HEAD before each GET, 32 pooled
   connections). Wall time, the client process's CPU time per chunk (``getrusage``:
   fetch + decode + pool; a local-store load of the same chunks gives the decode-only
   floor), the requests, the peak number in flight and the TCP connections the server
   saw. The data are checked once against numpy ground truth.
2. **In-flight window.** ``remote_io_concurrency`` in 4..128 at 50 ms latency for 160
   chunks (a 1920 x 1080 view of 256² tiles in 2 channels plus its prefetch ring): time
   in round trips (RTT = the injected latency) beside the ideal ``ceil(160 / N)``, and
   the distinct client ports (connections) the server saw and requests per connection
   (keep-alive reuse).
3. **View settle.** The real viewer, offscreen, on an OME-Zarr sample (2 channels, 256²
   chunks) served with 50 ms latency: ``show_region`` of a 1920 x 1080 region at 1:1,
   then ``wait_settled`` (v50). Beside it: the viewer settling the same region with no
   latency (v0), and a fresh pool loading only the view's visible chunks with 50 ms and
   with no latency (p50, p0; p0 is the transfer + decode time). ``v50 - p0`` in RTTs is
   "settle time minus transfer time"; ``v50 - v0`` is what latency alone costs the
   viewer; ``v0 - p0`` is the viewer's own (GPU-side, bookkeeping) time. Regions are
   "aligned" (8 x 5 tiles per channel, 80 chunks) or "worst" (9 x 6, 108 chunks: the
   most such a view can touch), each new to the viewer (nothing cached). One more
   fsspec viewer runs with its pool's window raised to 64 (a candidate default).
4. **Sharding.** A 256²-in-2048² sharded array over HTTP: the inner chunks of a
   1920 x 1080 window, bytes sent by the server vs bytes needed (the inner chunks'
   stored sizes plus one shard index per shard), and requests vs ideal (one per inner
   chunk plus one index read per shard); and the time at 50 ms.
5. **Cancellation.** With 1 s latency, 100 chunks requested and all dropped after
   0.2 s: of the requests the server received, how many it still answered in full after
   the drop (wasted transfer) and how many it found disconnected by the client; and how
   many started after the drop (queued loads should never start).
6. **Errors** (not timed): what a 403, a persistent 500, a transient 503 and a
   connection reset become (message, requests made, time) through each client, with
   ``RetryPolicy(attempts=2, timeout=2 s)`` (1 s with ``--quick``).

Reading it: the machine is shared and noisy, so every number is a median over rounds,
and the variants of one measurement run interleaved in each round (round-robin, order
rotated), so noise hits them alike; ``[a..b]`` is the range of the per-round ratio.
Compare ratios and RTT counts rather than absolute times. Loopback has no TCP/TLS
handshake cost: a new connection on a real network costs 1-3 RTTs more, which this
benchmark cannot show (it favours clients that open more connections).

    python tests/benchmarks/bench_remote.py [--quick] [--rounds N]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import math
import multiprocessing
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import zarr
from zarr.storage import FsspecStore, LocalStore, ObjectStore

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.httpserver import RequestRecord, ZarrHTTPServer  # noqa: E402

from chunkpool import ChunkPool, RetryPolicy, read_multiscales  # noqa: E402

RTT = 0.050  # the injected latency, seconds
SIDE, CHUNK, SHARD = 4096, 256, 2048  # the test arrays: 16 x 16 chunks, 2 x 2 shards
W, H = 1920, 1080  # the view
CLIENTS = ("fsspec", "obstore")
BUCKET = "bench"
S3_KEY = S3_SECRET = "testing"  # tests/support/s3server.py's fixed credentials
S3_REGION = "us-east-1"

Key = tuple[int, tuple[int, ...]]


# -- the servers' process ----------------------------------------------------------------


class _PortTrackingServer(ZarrHTTPServer):
    """ZarrHTTPServer that also records the client port of each connection and request."""

    def __init__(self, root: str | os.PathLike[str], **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self._ports = threading.local()
        self._log_lock = threading.Lock()
        self.log: list[tuple[int, RequestRecord]] = []
        self.accepted: list[int] = []  # client ports of new connections

    def process_request_thread(self, request: Any, client_address: tuple[str, int]) -> None:
        self._ports.port = client_address[1]
        with self._log_lock:
            self.accepted.append(client_address[1])
        super().process_request_thread(request, client_address)

    def _request_finished(self, record: RequestRecord) -> None:
        with self._log_lock:
            self.log.append((getattr(self._ports, "port", 0), record))
        super()._request_finished(record)

    def reset_stats(self) -> None:
        with self._log_lock:
            self.log.clear()
            self.accepted.clear()
        super().reset_stats()


class _WsgiTap:
    """WSGI middleware in front of moto: injected latency, and a log of client ports."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.latency = 0.0
        self.lock = threading.Lock()
        self.log: list[tuple[int, str, str, float, float]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        start = time.monotonic()
        if self.latency:
            time.sleep(self.latency)
        body = self.app(environ, start_response)
        with self.lock:
            port = int(environ.get("REMOTE_PORT") or 0)
            method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
            self.log.append((port, method, path, start, time.monotonic()))
        return body


def _server_process(conn: Any) -> None:
    """Child process: runs servers and answers the parent's commands until "stop"."""
    http: dict[str, _PortTrackingServer] = {}
    s3: Any = None
    tap: _WsgiTap | None = None
    try:
        while True:
            cmd, *args = conn.recv()
            try:
                if cmd == "stop":
                    conn.send(("ok", None))
                    return
                if cmd == "http":
                    root, latency = args
                    server = _PortTrackingServer(root, latency=latency)
                    server.start()
                    http[server.url] = server
                    result: Any = server.url
                elif cmd == "s3":
                    from support.s3server import S3Server

                    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's access log
                    s3 = S3Server()
                    s3.start()
                    wsgi = s3._server._server  # werkzeug server; its app is looked up per request
                    tap = wsgi.app = _WsgiTap(wsgi.app)
                    s3.create_bucket(BUCKET)
                    for local_dir, prefix in args[0]:
                        s3.upload_dir(local_dir, BUCKET, prefix)
                    result = s3.endpoint_url
                elif cmd == "latency":
                    key, seconds = args
                    if key in http:
                        http[key].latency = seconds
                    else:
                        assert tap is not None
                        tap.latency = seconds
                    result = None
                elif cmd == "fault":
                    key, pattern, kind, times = args
                    http[key].add_fault(pattern, kind, times)
                    result = None
                elif cmd == "reset":
                    (key,) = args
                    if key in http:
                        http[key].clear_faults()
                        http[key].reset_stats()
                    else:
                        assert tap is not None
                        with tap.lock:
                            tap.log.clear()
                    result = None
                elif cmd == "log":
                    key, idle_timeout = args
                    if key in http:
                        server = http[key]
                        server.wait_idle(idle_timeout)
                        with server._log_lock:
                            log = [(port, *_record_tuple(r)) for port, r in server.log]
                            accepted = list(server.accepted)
                        result = (log, accepted, server.bytes_sent)
                    else:
                        assert tap is not None
                        with tap.lock:
                            result = (list(tap.log), [], 0)
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", result))
            except Exception as err:
                conn.send(("error", f"{type(err).__name__}: {err}"))
    finally:
        for server in http.values():
            server.stop()
        if s3 is not None:
            s3.stop()


def _record_tuple(r: RequestRecord) -> tuple:
    return (
        r.method,
        r.path,
        r.range,
        r.status,
        r.bytes_sent,
        r.start,
        r.end,
        r.client_disconnected,
    )


class Req(NamedTuple):
    """One request the server finished (times are time.monotonic(), shared by processes)."""

    port: int
    method: str
    path: str
    range: str | None
    status: int | None
    bytes_sent: int
    start: float
    end: float
    disconnected: bool

    @property
    def is_chunk(self) -> bool:
        return "/c/" in self.path

    @property
    def completed(self) -> bool:
        return self.status is not None and not self.disconnected


class Log(NamedTuple):
    requests: list[Req]
    accepted: list[int]
    bytes_sent: int

    @property
    def chunk_requests(self) -> list[Req]:
        return [r for r in self.requests if r.is_chunk]

    def connections(self) -> int:
        """Distinct client ports among the chunk requests."""
        return len({r.port for r in self.chunk_requests})

    def peak_in_flight(self) -> int:
        """The most chunk requests the server was handling at once."""
        events = sorted(
            [(r.start, 1) for r in self.chunk_requests] + [(r.end, -1) for r in self.chunk_requests]
        )
        peak = now = 0
        for _, delta in events:
            now += delta
            peak = max(peak, now)
        return peak


class Servers:
    """The parent's handle on the servers' child process."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_server_process, args=(child,), daemon=True)
        self._proc.start()
        self._lock = threading.Lock()

    def call(self, *cmd: Any) -> Any:
        with self._lock:
            self._conn.send(cmd)
            status, result = self._conn.recv()
        if status != "ok":
            raise RuntimeError(f"server process: {result}")
        return result

    def http(self, root: Path, latency: float = 0.0) -> str:
        return self.call("http", str(root), latency)

    def latency(self, key: str, seconds: float) -> None:
        self.call("latency", key, seconds)

    def reset(self, key: str) -> None:
        self.call("reset", key)

    def log(self, key: str, idle_timeout: float = 5.0) -> Log:
        records, accepted, sent = self.call("log", key, idle_timeout)
        if records and len(records[0]) == 5:  # moto: (port, method, path, start, end)
            reqs = [Req(p, m, path, None, 200, 0, t0, t1, False) for p, m, path, t0, t1 in records]
        else:
            reqs = [Req(*r) for r in records]
        return Log(sorted(reqs, key=lambda r: r.start), accepted, sent)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.call("stop")
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()


# -- helpers -----------------------------------------------------------------------------


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def rtts(seconds: float) -> str:
    return f"{seconds / RTT:.1f} RTT"


def ratio_text(num: Sequence[float], den: Sequence[float]) -> str:
    """Ratio of medians, and the range of the per-round ratios."""
    per_round = [a / b for a, b in zip(num, den, strict=True)]
    return f"{median(num) / median(den):.2f} [{min(per_round):.2f}..{max(per_round):.2f}]"


def rotated(items: Sequence[Any], k: int) -> list[Any]:
    k %= len(items)
    return list(items[k:]) + list(items[:k])


def open_store(client: str, url: str) -> Any:
    """A fresh read-only zarr store for an http:// or s3:// URL through ``client``."""
    if url.startswith("s3://"):
        raise ValueError("use open_s3_store")
    if client == "fsspec":
        # skip_instance_cache: a fresh aiohttp session, so connections are counted anew
        return FsspecStore.from_url(
            url, read_only=True, storage_options={"skip_instance_cache": True}
        )
    from obstore.store import HTTPStore

    return ObjectStore(HTTPStore.from_url(url, client_options={"allow_http": True}), read_only=True)


def open_s3_store(client: str, endpoint: str, prefix: str) -> Any:
    """A fresh read-only zarr store for ``s3://bench/<prefix>`` on the moto server.

    ``fsspec`` is s3fs as chunkpool.stores opens it (only the endpoint and keys added);
    ``fsspec-tuned`` adds ``max_concurrency=1`` (s3fs otherwise sends a HEAD before each
    whole-object GET, to decide on a multi-part download) and
    ``max_pool_connections=32`` (botocore's default pool holds 10 connections).
    """
    if client.startswith("fsspec"):
        options: dict[str, Any] = {
            "endpoint_url": endpoint,
            "key": S3_KEY,
            "secret": S3_SECRET,
            "client_kwargs": {"region_name": S3_REGION},
            "skip_instance_cache": True,
        }
        if client == "fsspec-tuned":
            options["max_concurrency"] = 1
            options["config_kwargs"] = {"max_pool_connections": 32}
        return FsspecStore.from_url(
            f"s3://{BUCKET}/{prefix}", read_only=True, storage_options=options
        )
    from obstore.store import S3Store

    store = S3Store(
        BUCKET,
        prefix=prefix,
        endpoint=endpoint,
        access_key_id=S3_KEY,
        secret_access_key=S3_SECRET,
        region=S3_REGION,
        client_options={"allow_http": True},
    )
    return ObjectStore(store, read_only=True)


def close_store(store: Any) -> None:
    """Close an fsspec store's client session (aiohttp warns about unclosed ones)."""
    if not isinstance(store, FsspecStore):
        return
    from zarr.core.sync import sync

    fs = store.fs
    with contextlib.suppress(Exception):
        session = getattr(fs, "_session", None)  # HTTPFileSystem
        if session is not None:
            sync(session.close())
        client = getattr(fs, "_s3", None)  # S3FileSystem
        if client is not None:
            sync(client.close())


def timed_load(
    node: Any,
    keys: Sequence[Key],
    *,
    concurrency: int = 32,
    truth: np.ndarray | None = None,
    **pool_kwargs: Any,
) -> tuple[float, float, ChunkPool]:
    """(wall seconds, CPU seconds) for a fresh pool on ``node`` to load ``keys``.

    Returns the destroyed pool too (for its stats). With ``truth``, every chunk is
    compared with it.
    """
    (pool,) = ChunkPool.from_zarr_node(node, remote_io_concurrency=concurrency, **pool_kwargs)
    try:
        return (*_load(pool, keys, truth), pool)
    finally:
        pool.destroy()


def _load(pool: ChunkPool, keys: Sequence[Key], truth: np.ndarray | None) -> tuple[float, float]:
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    locs = [pool.get_chunk(level, index) for level, index in keys]
    pool.wait_for_chunks_to_load()
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    if truth is not None:
        for loc in locs:
            if not np.array_equal(loc.data, truth[loc.slices]):
                raise AssertionError(f"chunk {loc.key} differs from the ground truth")
    return wall, cpu


def grid_keys(rows: Iterable[int], cols: Iterable[int]) -> list[Key]:
    cols = list(cols)
    return [(0, (iy, ix)) for iy in rows for ix in cols]


# -- data --------------------------------------------------------------------------------


def make_data(root: Path) -> np.ndarray:
    """A plain and a sharded 4096² uint16 zstd array of one noisy ramp; returns the data."""
    rng = np.random.default_rng(0)
    ramp = np.add.outer(np.arange(SIDE, dtype=np.uint32), np.arange(SIDE, dtype=np.uint32))
    data = (ramp % 4000).astype(np.uint16) + rng.integers(0, 64, (SIDE, SIDE), dtype=np.uint16)
    zstd = zarr.codecs.ZstdCodec(level=3)
    common: dict[str, Any] = {"shape": data.shape, "dtype": data.dtype, "compressors": zstd}
    plain = zarr.create_array(root / "plain.zarr", chunks=(CHUNK, CHUNK), **common)
    plain[...] = data
    sharded = zarr.create_array(
        root / "sharded.zarr", chunks=(CHUNK, CHUNK), shards=(SHARD, SHARD), **common
    )
    sharded[...] = data
    return data


def stored_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and "/c/" in p.as_posix())


# -- 1. clients --------------------------------------------------------------------------


@dataclass
class Runs:
    """Per-round measurements of one variant."""

    wall: list[float]
    cpu: list[float]
    conns: list[int]
    reqs: list[int]
    peak: list[int]

    @classmethod
    def new(cls) -> Runs:
        return cls([], [], [], [], [])

    def add(self, wall: float, cpu: float, log: Log) -> None:
        self.wall.append(wall)
        self.cpu.append(cpu)
        self.conns.append(log.connections())
        self.reqs.append(len(log.chunk_requests))
        self.peak.append(log.peak_in_flight())


def bench_clients(
    servers: Servers, root: Path, truth: np.ndarray, rounds: int, s3_chunks: int
) -> None:
    http_keys = grid_keys(range(SIDE // CHUNK), range(SIDE // CHUNK))
    s3_keys = http_keys[:s3_chunks]
    stored = stored_bytes(root / "plain.zarr")
    per_chunk = stored / len(http_keys)
    url = servers.http(root)
    endpoint = servers.call("s3", [(str(root / "plain.zarr"), "plain.zarr")])
    s3_key = f"s3:{endpoint}"
    s3_clients = [*CLIENTS, "fsspec-tuned"]
    cases: list[tuple[str, str, float, list[str], list[Key]]] = [
        ("http, no latency", "http", 0.0, list(CLIENTS), http_keys),
        ("http, 50 ms", "http", RTT, list(CLIENTS), http_keys),
        ("s3 (moto), no latency", "s3", 0.0, s3_clients, s3_keys),
        ("s3 (moto), 50 ms", "s3", RTT, s3_clients, s3_keys),
    ]
    verified: set[str] = set()
    results: dict[tuple[str, str], Runs] = {}
    # decode-only reference: the same chunks from a local store
    local = zarr.open_array(store=LocalStore(root / "plain.zarr", read_only=True), mode="r")
    local_cpu = [timed_load(local, http_keys, truth=truth)[1] for _ in range(rounds)]
    for r in range(rounds):
        for label, proto, latency, clients, keys in cases:
            server_key = url if proto == "http" else s3_key
            servers.latency(server_key, latency)
            for client in rotated(clients, r):
                if proto == "http":
                    store = open_store(client, f"{url}/plain.zarr")
                else:
                    store = open_s3_store(client, endpoint, "plain.zarr")
                node = zarr.open_array(store=store, mode="r")
                check = f"{proto}/{client}" not in verified
                servers.reset(server_key)
                wall, cpu, _ = timed_load(node, keys, truth=truth if check else None)
                verified.add(f"{proto}/{client}")
                results.setdefault((label, client), Runs.new()).add(
                    wall, cpu, servers.log(server_key)
                )
                close_store(store)
        servers.latency(url, 0.0)
        servers.latency(s3_key, 0.0)

    print(
        f"\n1. fsspec vs obstore: chunks of {CHUNK}x{CHUNK} uint16 zstd "
        f"({per_chunk / 1024:.0f} KiB stored each), remote_io_concurrency=32, "
        f"median of {rounds} rounds; o/f = obstore/fsspec"
    )
    print(
        f"   {'case':<22} {'chunks':>6}  {'fsspec':>17} {'obstore':>17}  {'o/f time [range]':<17}"
        f" {'CPU ms/chunk f|o':<16} {'requests f|o':<12} {'peak f|o':<8} conns f|o"
    )

    def cell(runs: Runs, latency: float, n: int) -> str:
        t = median(runs.wall)
        extra = rtts(t) if latency else f"{per_chunk * n / t / 1e6:.0f} MB/s"
        return f"{ms(t)} {extra:>9}"

    def pair(f: Sequence[float], o: Sequence[float], fmt: str = ".0f") -> str:
        return f"{median(f):{fmt}}|{median(o):{fmt}}"

    for label, _, latency, clients, keys in cases:
        n = len(keys)
        f, o = results[(label, "fsspec")], results[(label, "obstore")]
        cpu_f = [c / n * 1e3 for c in f.cpu]
        cpu_o = [c / n * 1e3 for c in o.cpu]
        print(
            f"   {label:<22} {n:>6}  {cell(f, latency, n):>17} {cell(o, latency, n):>17}  "
            f"{ratio_text(o.wall, f.wall):<17} {pair(cpu_f, cpu_o, '.2f'):<16} "
            f"{pair(f.reqs, o.reqs):<12} {pair(f.peak, o.peak):<8} {pair(f.conns, o.conns)}"
        )
        if "fsspec-tuned" in clients:
            t = results[(label, "fsspec-tuned")]
            cpu_t = median(c / n * 1e3 for c in t.cpu)
            print(
                f"     fsspec-tuned: {cell(t, latency, n)}, tuned/fsspec time "
                f"{ratio_text(t.wall, f.wall)}, CPU {cpu_t:.2f} ms/chunk, requests "
                f"{median(t.reqs):.0f}, peak {median(t.peak):.0f}"
            )
    n = len(http_keys)
    print(
        f"   local store, same {n} chunks (decode + pool only): "
        f"{median(local_cpu) / n * 1e3:.2f} CPU ms/chunk. Ideal at 50 ms: ceil(n/32) RTT "
        f"= {math.ceil(n / 32)} (http), {math.ceil(len(s3_keys) / 32)} (s3). moto answers "
        f"'Connection: close': one connection per S3 request, whatever the client"
    )
    print(
        "   fsspec-tuned = s3fs with max_concurrency=1 (no HEAD before each GET) and "
        "config_kwargs max_pool_connections=32 (botocore's default is 10)"
    )
    print(f"   data verified against numpy: {', '.join(sorted(verified))}")


# -- 2. in-flight window sweep -----------------------------------------------------------


def bench_sweep(servers: Servers, root: Path, rounds: int, windows: Sequence[int]) -> None:
    keys = grid_keys(range(10), range(16))  # 160 chunks
    url = servers.http(root, latency=RTT)
    results: dict[tuple[int, str], Runs] = {}
    reqs_per_conn: dict[tuple[int, str], list[float]] = {}
    for r in range(rounds):
        for window in rotated(windows, r):
            for client in rotated(CLIENTS, r):
                store = open_store(client, f"{url}/plain.zarr")
                node = zarr.open_array(store=store, mode="r")
                servers.reset(url)
                wall, cpu, _ = timed_load(node, keys, concurrency=window)
                log = servers.log(url)
                close_store(store)
                results.setdefault((window, client), Runs.new()).add(wall, cpu, log)
                reqs_per_conn.setdefault((window, client), []).append(
                    len(log.chunk_requests) / max(1, log.connections())
                )
    print(
        f"\n2. remote_io_concurrency sweep: {len(keys)} chunks at {ms(RTT)} latency, "
        f"median of {rounds} rounds; conns = distinct client ports, req/conn = keep-alive reuse"
    )
    print(
        f"   {'N':>4} {'ideal':>7}   {'fsspec':>16} {'conns':>5} {'req/conn':>8}"
        f"   {'obstore':>16} {'conns':>5} {'req/conn':>8}   obstore/fsspec"
    )
    for window in windows:
        cells = []
        for client in CLIENTS:
            runs = results[(window, client)]
            t = median(runs.wall)
            cells.append(
                f"{ms(t):>7} {rtts(t):>8} {median(runs.conns):>5.0f}"
                f" {median(reqs_per_conn[(window, client)]):>8.1f}"
            )
        f, o = results[(window, "fsspec")], results[(window, "obstore")]
        ideal = f"{math.ceil(len(keys) / window)} RTT"
        print(f"   {window:>4} {ideal:>7}   {cells[0]}   {cells[1]}   {ratio_text(o.wall, f.wall)}")


# -- 3. view settle ----------------------------------------------------------------------


def view_regions(size: int, count: int) -> list[tuple[str, int, int]]:
    """Up to ``count`` 1920 x 1080 regions at 1:1, alternately "aligned" (8 x 5 tiles)
    and "worst" (9 x 6 tiles), whose visible tiles are disjoint from every earlier
    region's visible tiles and prefetch ring (so nothing is cached yet)."""
    tiles = size // CHUNK
    chosen: list[tuple[str, int, int]] = []
    taken: list[tuple[int, int, int, int]] = []  # visible + ring, in tiles
    kinds = {"aligned": (0, 0), "worst": (200, 230)}
    for i in range(count):
        kind = ("aligned", "worst")[i % 2]
        ox, oy = kinds[kind]
        placed = False
        for ty in range(tiles):
            for tx in range(tiles):
                x0, y0 = tx * CHUNK + ox, ty * CHUNK + oy
                if x0 + W > size or y0 + H > size:
                    continue
                vis = (x0 // CHUNK, -(-(x0 + W) // CHUNK), y0 // CHUNK, -(-(y0 + H) // CHUNK))
                if any(
                    vis[0] < t[1] and t[0] < vis[1] and vis[2] < t[3] and t[2] < vis[3]
                    for t in taken
                ):
                    continue
                chosen.append((kind, x0, y0))
                taken.append((vis[0] - 1, vis[1] + 1, vis[2] - 1, vis[3] + 1))
                placed = True
                break
            if placed:
                break
        if not placed:
            break
    return chosen


def visible_keys(viewer: Any) -> list[Key]:
    """The chunks of the visible tiles at the view's level (what settling waits for)."""
    layer = viewer.layer
    level = layer.levels[layer.target_level]
    view = layer.view
    iy0, iy1, ix0, ix1 = level.tile_range(view.y0, view.y1, view.x0, view.x1)
    keys = []
    for display in layer.displays:
        if display.visible:
            for iy in range(iy0, iy1):
                for ix in range(ix0, ix1):
                    index, _ = viewer.plane.chunk_and_selection(
                        level.level, iy, ix, display.index, layer.position
                    )
                    keys.append((level.level, index))
    return keys


def wait_pool_idle(viewer: Any, timeout: float = 20.0) -> None:
    """Let the prefetch ring finish, so the next jump starts from a quiet pool."""
    deadline = time.monotonic() + timeout
    while viewer.pool.stats.chunks_pending and time.monotonic() < deadline:
        viewer.settled()
        time.sleep(0.01)


def bench_viewer(servers: Servers, tmp: Path, size: int, rounds: int) -> None:
    if not os.environ.get("XDG_RUNTIME_DIR"):  # else the Vulkan loader complains on stderr
        runtime = tmp / "xdg"
        runtime.mkdir(mode=0o700, exist_ok=True)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)
    from sample_data import make_sample
    from viewer import Viewer

    t0 = time.perf_counter()
    sample_root = tmp / "sample"
    make_sample(sample_root / "sample.zarr", size=size)
    made = time.perf_counter() - t0
    urls = {RTT: servers.http(sample_root, latency=RTT), 0.0: servers.http(sample_root)}
    # (client, latency, remote_io_concurrency); the last one shows a larger default
    Variant = tuple[str, float, int]
    variants: list[Variant] = [(c, lat, 32) for lat in (RTT, 0.0) for c in CLIENTS]
    variants.append(("fsspec", RTT, 64))
    viewers: dict[Variant, Any] = {}
    infos: dict[Variant, Any] = {}
    stores = []
    try:
        for variant in variants:
            client, latency, window = variant
            url = f"{urls[latency]}/sample.zarr"
            store = open_store(client, url)  # for the pool-alone runs (and obstore's viewer)
            stores.append(store)
            options = {"remote_io_concurrency": window}
            if client == "fsspec":  # the default path: the viewer opens the URL itself
                viewer = Viewer(url, None, size=(W, H), show_hud=False, pool_options=options)
            else:
                node = zarr.open_group(store=store, mode="r")
                viewer = Viewer(node, None, size=(W, H), show_hud=False, pool_options=options)
            viewers[variant] = viewer
            (infos[variant],) = read_multiscales(zarr.open_group(store=store, mode="r"), client)
            viewer.wait_settled()  # warm up at the fitted (coarse) view
            wait_pool_idle(viewer)
        regions = view_regions(size, rounds)
        settle: dict[tuple[str, Variant], list[float]] = {}
        alone: dict[tuple[str, Variant], list[float]] = {}
        requests: dict[tuple[str, Variant], list[int]] = {}
        counts: dict[str, int] = {}
        for r, (kind, x0, y0) in enumerate(regions):
            keys: list[Key] = []
            for variant in rotated(variants, r):
                viewer, latency = viewers[variant], variant[1]
                servers.reset(urls[latency])
                viewer.show_region(x0, y0, x0 + W, y0 + H)
                t0 = time.perf_counter()
                if not viewer.wait_settled(30):
                    raise RuntimeError(f"{variant} viewer did not settle at ({x0}, {y0})")
                settle.setdefault((kind, variant), []).append(time.perf_counter() - t0)
                assert viewer.layer.target_level == 0
                keys = visible_keys(viewer)
                wait_pool_idle(viewer)
                log = servers.log(urls[latency])
                requests.setdefault((kind, variant), []).append(len(log.chunk_requests))
            counts[kind] = len(keys)
            for variant in rotated(variants, r):
                pool = ChunkPool(infos[variant], remote_io_concurrency=variant[2])
                try:
                    wall, _ = _load(pool, keys, None)
                finally:
                    pool.destroy()
                alone.setdefault((kind, variant), []).append(wall)
    finally:
        for viewer in viewers.values():
            viewer.close()
        for store in stores:
            close_store(store)

    print(
        f"\n3. settle a {W}x{H} view at 1:1 (viewer, offscreen; sample {size}², 2 channels, "
        f"256² chunks, generated in {made:.0f} s), latency {ms(RTT)}; medians over regions"
    )
    print(
        "   v50/v0: viewer show_region -> wait_settled at 50/0 ms latency; p50/p0: a fresh pool "
        "loading just the visible chunks (p0 = transfer + decode, no latency)"
    )
    for kind in ("aligned", "worst"):
        if kind not in counts:
            continue
        n, rounds_done = counts[kind], sum(1 for k in regions if k[0] == kind)
        print(
            f"   {kind} regions: {n} visible chunks (ideal ceil({n}/32) = {math.ceil(n / 32)} "
            f"RTT, ceil({n}/64) = {math.ceil(n / 64)} RTT), {rounds_done} rounds"
        )
        for client in CLIENTS:
            v50, v0 = settle[(kind, (client, RTT, 32))], settle[(kind, (client, 0.0, 32))]
            p50, p0 = alone[(kind, (client, RTT, 32))], alone[(kind, (client, 0.0, 32))]
            print(
                f"     {client:<7} N=32: v50 {ms(median(v50)):>6} ({rtts(median(v50))}), "
                f"v0 {ms(median(v0)):>6}, p50 {ms(median(p50)):>6} ({rtts(median(p50))}), "
                f"p0 {ms(median(p0)):>6} => v50-p0 {rtts(median(_minus(v50, p0)))}, "
                f"v50-v0 {rtts(median(_minus(v50, v0)))}, p50-p0 {rtts(median(_minus(p50, p0)))}; "
                f"viewer's own time v0-p0 {ms(median(_minus(v0, p0)))}; "
                f"requests {median(requests[(kind, (client, RTT, 32))]):.0f}"
            )
        v64, p64 = settle[(kind, ("fsspec", RTT, 64))], alone[(kind, ("fsspec", RTT, 64))]
        p0 = alone[(kind, ("fsspec", 0.0, 32))]
        print(
            f"     fsspec  N=64: v50 {ms(median(v64)):>6} ({rtts(median(v64))}), "
            f"p50 {ms(median(p64)):>6} ({rtts(median(p64))}) => v50-p0 "
            f"{rtts(median(_minus(v64, p0)))}, p50-p0 {rtts(median(_minus(p64, p0)))}; "
            f"v50(N=64)/v50(N=32) "
            f"{ratio_text(v64, settle[(kind, ('fsspec', RTT, 32))])}"
        )


def _minus(a: Sequence[float], b: Sequence[float]) -> list[float]:
    return [x - y for x, y in zip(a, b, strict=True)]


# -- 4. sharding -------------------------------------------------------------------------


def shard_index(path: Path, per_shard: int) -> np.ndarray:
    """(offset, nbytes) per inner chunk from a shard file's index (at its end, + crc32c)."""
    size = per_shard * per_shard * 16 + 4
    with path.open("rb") as f:
        f.seek(-size, os.SEEK_END)
        raw = f.read(size)
    return np.frombuffer(raw[:-4], "<u8").reshape(per_shard, per_shard, 2)


def bench_sharding(servers: Servers, root: Path, truth: np.ndarray, rounds: int) -> None:
    x0, y0 = 1000, 1500  # a window across the corner of 4 shards
    rows = range(y0 // CHUNK, -(-(y0 + H) // CHUNK))
    cols = range(x0 // CHUNK, -(-(x0 + W) // CHUNK))
    keys = grid_keys(rows, cols)
    per = SHARD // CHUNK
    needed = 0
    shards = {(iy // per, ix // per) for _, (iy, ix) in keys}
    for sy, sx in shards:
        index = shard_index(root / "sharded.zarr" / "c" / str(sy) / str(sx), per)
        needed += index.nbytes + 4
        for _, (iy, ix) in keys:
            if (iy // per, ix // per) == (sy, sx):
                needed += int(index[iy % per, ix % per, 1])
    url = servers.http(root)
    lines = {}
    for client in CLIENTS:  # bytes and requests, no latency
        store = open_store(client, f"{url}/sharded.zarr")
        node = zarr.open_array(store=store, mode="r")
        servers.reset(url)
        timed_load(node, keys, truth=truth)
        reqs = servers.log(url).chunk_requests
        close_store(store)
        sent = sum(r.bytes_sent for r in reqs)
        index_reads = sum(1 for r in reqs if r.range and r.range.startswith("bytes=-"))
        lines[client] = (
            f"bytes sent {sent:>9,} vs needed {needed:>9,} ({sent / needed:.3f}x); "
            f"requests {len(reqs)} ({index_reads} index reads) vs ideal {len(keys) + len(shards)}"
        )
    servers.latency(url, RTT)
    walls: dict[str, list[float]] = {c: [] for c in CLIENTS}
    for r in range(rounds):  # time at 50 ms, fresh store and pool each time
        for client in rotated(CLIENTS, r):
            store = open_store(client, f"{url}/sharded.zarr")
            node = zarr.open_array(store=store, mode="r")
            walls[client].append(timed_load(node, keys)[0])
            close_store(store)
    servers.latency(url, 0.0)
    ideal = 1 + math.ceil(len(keys) / 32)  # the index reads hold their slots while waited on
    print(
        f"\n4. sharded over HTTP ({CHUNK}² inner chunks in {SHARD}² shards): a {W}x{H} window "
        f"= {len(keys)} inner chunks in {len(shards)} shards; time at {ms(RTT)}: median of "
        f"{rounds}, ideal about {ideal} RTT (index, then the inner chunks)"
    )
    for client in CLIENTS:
        t = median(walls[client])
        print(f"   {client:<8} {lines[client]}; at 50 ms {ms(t)} ({rtts(t)})")
    print(f"   obstore/fsspec time at 50 ms: {ratio_text(walls['obstore'], walls['fsspec'])}")


# -- 5. cancellation ---------------------------------------------------------------------


def bench_cancel(servers: Servers, root: Path, rounds: int) -> None:
    keys = grid_keys(range(7), range(16))[:100]
    url = servers.http(root)
    latency, drop_after, wait_after = 1.0, 0.2, 2.0
    rows: dict[str, list[tuple[int, ...]]] = {}
    for r in range(rounds):
        for client in rotated(CLIENTS, r):
            store = open_store(client, f"{url}/plain.zarr")
            node = zarr.open_array(store=store, mode="r")
            (pool,) = ChunkPool.from_zarr_node(node)
            servers.latency(url, latency)
            servers.reset(url)
            try:
                for level, index in keys:
                    pool.get_chunk(level, index)
                time.sleep(drop_after)
                dropped_at = time.monotonic()
                for level, index in keys:
                    pool.drop_chunk(level, index)
                cancellations = pool.stats.cancellations
                time.sleep(wait_after)
                log = servers.log(url, idle_timeout=latency + 2)
            finally:
                pool.destroy()
                servers.latency(url, 0.0)
                close_store(store)
            reqs = log.chunk_requests
            before = [q for q in reqs if q.start < dropped_at]
            late = [q for q in reqs if q.start >= dropped_at]
            rows.setdefault(client, []).append(
                (
                    len(before),
                    sum(1 for q in before if q.completed and q.end > dropped_at),
                    sum(1 for q in before if q.disconnected),
                    len(late),
                    sum(1 for q in late if q.completed),
                    cancellations,
                    sum(q.bytes_sent for q in reqs if q.end > dropped_at),
                )
            )
    print(
        f"\n5. cancellation: {len(keys)} chunks requested at {latency:.0f} s latency "
        f"(the default window), all dropped after {drop_after} s, then {wait_after} s "
        f"wait; per round:"
    )
    for client in CLIENTS:
        for got, done, gone, late, late_done, cancelled, sent in rows[client]:
            print(
                f"   {client:<8} in flight at drop {got:>3}: answered in full after the drop "
                f"{done:>3} ({sent:,} bytes), found disconnected {gone:>3}; started after the "
                f"drop {late} ({late_done} answered in full); pool cancellations {cancelled}"
            )


# -- 6. errors ---------------------------------------------------------------------------


def bench_errors(servers: Servers, root: Path, timeout: float) -> None:
    url = servers.http(root)
    policy = RetryPolicy(attempts=2, timeout=timeout, base_delay=0.01, max_delay=0.05)
    cases = [
        ("403", (0, 0), "403", None),
        ("500 always", (0, 1), "500", None),
        ("503 x1 then ok", (0, 2), "503", 1),
        ("reset x1 then ok", (0, 3), "reset", 1),
    ]
    print(f"\n6. errors through the pool with {policy}:")
    logging.getLogger("chunkpool").setLevel(logging.CRITICAL)
    for client in CLIENTS:
        store = open_store(client, f"{url}/plain.zarr")
        node = zarr.open_array(store=store, mode="r")
        for label, index, fault, times in cases:
            servers.reset(url)
            servers.call("fault", url, f"*/plain.zarr/c/{index[0]}/{index[1]}", fault, times)
            (pool,) = ChunkPool.from_zarr_node(node, retry=policy)
            t0 = time.perf_counter()
            loc = pool.get_chunk(0, index)
            with contextlib.suppress(Exception):
                loc.wait(30)
            wall = time.perf_counter() - t0
            error = loc.error
            pool.destroy()
            n = len(servers.log(url).chunk_requests)
            outcome = "ok" if error is None else " ".join(str(error).split())
            if len(outcome) > 150:
                outcome = outcome[:149] + "…"
            print(f"   {client:<8} {label:<17} {n:>2} requests {ms(wall):>7}: {outcome}")
        servers.reset(url)
        close_store(store)


# -- main --------------------------------------------------------------------------------


def _versions() -> str:
    from importlib.metadata import version

    names = ("zarr", "fsspec", "aiohttp", "s3fs", "obstore")
    return ", ".join(f"{n} {version(n)}" for n in names)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, smaller sample")
    parser.add_argument("--rounds", type=int, help="rounds per measurement (default 5, quick 2)")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 5)
    started = time.perf_counter()
    print(
        f"bench_remote ({'quick' if args.quick else 'full'}): {os.cpu_count()} CPUs; "
        f"{_versions()}; servers in a child process on 127.0.0.1; RTT = injected latency"
    )
    servers = Servers()
    try:
        with tempfile.TemporaryDirectory(prefix="bench_remote_") as tmp:
            root = Path(tmp)
            truth = make_data(root)
            sections: list[tuple[str, Callable[[], None]]] = [
                (
                    "clients",
                    lambda: bench_clients(servers, root, truth, rounds, 64 if args.quick else 128),
                ),
                (
                    "sweep",
                    lambda: bench_sweep(
                        servers,
                        root,
                        1 if args.quick else max(2, rounds - 2),
                        (4, 8, 16, 32, 64, 128),
                    ),
                ),
                (
                    "viewer",
                    lambda: bench_viewer(servers, root, 4096 if args.quick else 8192, 2 * rounds),
                ),
                ("sharding", lambda: bench_sharding(servers, root, truth, rounds)),
                ("cancel", lambda: bench_cancel(servers, root, 1 if args.quick else 2)),
                ("errors", lambda: bench_errors(servers, root, 1.0 if args.quick else 2.0)),
            ]
            for name, run in sections:
                t0 = time.perf_counter()
                run()
                print(f"   [{name}: {time.perf_counter() - t0:.0f} s]")
    finally:
        servers.close()
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
