"""Throughput of ChunkPool over HTTP against tensorstore and raw GET+decode, in one run.

The same arrays as ``bench_pool`` (uint16 zstd Zarr v3, 128² to 512² chunks, unsharded
and 2048² shards), served by the test HTTP server (``tests/support/httpserver.py``) in
its own process on loopback, with no added latency (its handler reading only the
requested bytes: :class:`LeanHandler`), and read whole with three methods
in paired rounds that alternate their order (``bench_pool.paired_rounds``):

- ``chunkpool``: one pool on the URL, every chunk requested, waited for, dropped;
- ``tensorstore``: one concurrent ``read()`` per chunk through its ``http`` kvstore
  driver (zarr3; sharded too: tensorstore reads the shard index and the inner chunks
  with byte-range GETs);
- ``raw``: the practical floor, :data:`RAW_THREADS` plain threads, each with its own
  keep-alive connection, GETting its share of the chunk files (sharded: each shard's
  index with a suffix range, then each inner chunk's byte range) and zstd-decoding them,
  with no per-chunk bookkeeping.

Reported as in ``bench_pool``: the pool's throughput over each reference's (median and
quartiles of the per-round ratios) and CPU time per chunk. The server shares the
machine's cores with the client, as a local object store would.

    python tests/benchmarks/bench_pool_http.py [--rounds 7] [--size 4096]
"""

from __future__ import annotations

import argparse
import http.client
import multiprocessing
import os
import statistics
import struct
import sys
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np
from numcodecs import Zstd

TESTS = Path(__file__).resolve().parents[1]
for _path in (TESTS, TESTS / "benchmarks"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from bench_pool import Case, cases, make_data, ratio, run_case  # noqa: E402
from support.httpserver import (  # noqa: E402
    ZarrHTTPServer,
    _content_type,
    _Handler,
    _parse_range,
)

if TYPE_CHECKING:
    from tests.benchmarks.figures import Figure

#: Threads (each with its own connection) of the raw method: a small pool, since each
#: mostly waits on the server.
RAW_THREADS = 8
#: Seconds the parent waits for the server process to start.
SERVER_START_TIMEOUT = 60.0


@dataclass
class HttpCase(Case):
    """A :class:`bench_pool.Case` read over HTTP at ``url``."""

    url: str = ""

    @property
    def source(self) -> str:
        return self.url

    @property
    def kvstore(self) -> dict[str, str]:
        return {"driver": "http", "base_url": self.url}


class LeanHandler(_Handler):
    """The test server's handler, reading only the bytes a request asks for.

    The test server reads a whole file and digests it for its ``ETag`` on every
    request (a rewrite within one tick of the clock must change it), which costs a
    shard's size per inner-chunk range: that, not the clients, would be measured. A
    read-only benchmark store needs neither, as an object store spends neither. Its
    answers go out at once (``TCP_NODELAY``), not held for the client's delayed ACK."""

    disable_nagle_algorithm = True

    def _respond_file(
        self, path: str, range_header: str | None, send_body: bool, bandwidth: Any, out: Any
    ) -> None:
        file = self.server._resolve(path)
        if file is None:
            self._respond_text(404, "not found\n", send_body, out)
            return
        stat = file.stat()
        span = _parse_range(range_header, stat.st_size)
        if span == "unsatisfiable":
            self._respond_text(416, "range not satisfiable\n", send_body, out)
            return
        first, last = span if span is not None else (0, stat.st_size - 1)
        headers = {
            "Content-Type": _content_type(file),
            "Accept-Ranges": "bytes",
            "ETag": f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"',
        }
        status = 200
        if span is not None:
            status = 206
            headers["Content-Range"] = f"bytes {first}-{last}/{stat.st_size}"
        length = last - first + 1
        body = b""
        if send_body and length > 0:
            with open(file, "rb") as f:
                body = os.pread(f.fileno(), length, first)
        self._send(status, headers, length, body, bandwidth, out)


def serve(root: str, conn: Any) -> None:
    """(In the server's process.) Serve ``root`` without latency (:class:`LeanHandler`)
    until told to stop, forgetting the records of served requests every second (they
    would grow)."""
    with ZarrHTTPServer(root) as server:
        server.RequestHandlerClass = LeanHandler
        conn.send(server.url)
        while not conn.poll(1.0):
            server.reset_stats()


def raw_http_method(case: Case, threads: int) -> Callable[[], None]:
    """Plain threads with keep-alive connections, each GETting and decoding a strided
    share of the chunks (sharded: each thread first reads the indexes of its share of
    the shards, then, all of them read, its share of all inner chunks, so that few
    shards still keep every thread busy)."""
    assert isinstance(case, HttpCase)
    zstd = Zstd()
    c = case.chunk
    dtype = case.data.dtype
    base = urlsplit(case.url)

    def decode(raw: bytes) -> np.ndarray:
        return np.frombuffer(zstd.decode(raw), dtype).reshape(c, c)

    def get(conn: http.client.HTTPConnection, name: str, byte_range: str | None = None) -> bytes:
        headers = {"Range": byte_range} if byte_range else {}
        conn.request("GET", f"{base.path}/{name}", headers=headers)
        answer = conn.getresponse()
        body = answer.read()
        assert answer.status in (200, 206), (answer.status, name)
        return body

    def connect() -> http.client.HTTPConnection:
        return http.client.HTTPConnection(base.hostname, base.port, timeout=60)

    if case.shard is None:
        names = [f"c/{i}/{j}" for i, j in case.keys]
    else:
        per = case.shard // c
        n_shards = case.data.shape[0] // case.shard
        names = [f"c/{i}/{j}" for i in range(n_shards) for j in range(n_shards)]
        index_bytes = per * per * 16 + 4  # (offset, length) uint64 pairs + crc32c
        inner = [(name, k) for name in names for k in range(per * per)]
    indexes: dict[str, tuple[int, ...]] = {}

    def read_index(conn: http.client.HTTPConnection, name: str) -> tuple[int, ...]:
        return struct.unpack(f"<{2 * per * per}Q", get(conn, name, f"bytes=-{index_bytes}")[:-4])

    def work(t: int, indexed: threading.Barrier) -> None:
        conn = connect()
        try:
            if case.shard is None:
                for name in names[t::threads]:
                    decode(get(conn, name))
                return
            for name in names[t::threads]:
                indexes[name] = read_index(conn, name)
            indexed.wait(60)
            for name, k in inner[t::threads]:
                offset, length = indexes[name][2 * k : 2 * k + 2]
                decode(get(conn, name, f"bytes={offset}-{offset + length - 1}"))
        finally:
            conn.close()

    check = connect()
    try:  # the layout assumed above is the real one
        if case.shard is None:
            first = decode(get(check, names[0]))
        else:
            offset, length = read_index(check, names[0])[:2]
            first = decode(get(check, names[0], f"bytes={offset}-{offset + length - 1}"))
        assert np.array_equal(first, case.data[:c, :c])
    finally:
        check.close()

    def run() -> None:
        indexes.clear()
        indexed = threading.Barrier(threads)
        workers = [threading.Thread(target=work, args=(t, indexed)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()

    return run


class Served:
    """The test HTTP server on a directory, in a process of its own (a context manager;
    its ``url`` is the directory's)."""

    def __init__(self, root: Path) -> None:
        context = multiprocessing.get_context("spawn")
        self._conn, theirs = context.Pipe()
        self._process = context.Process(target=serve, args=(str(root), theirs), daemon=True)

    def __enter__(self) -> str:
        self._process.start()
        if not self._conn.poll(SERVER_START_TIMEOUT):
            self._process.kill()
            raise TimeoutError(f"the test HTTP server did not start in {SERVER_START_TIMEOUT} s")
        return self._conn.recv()

    def __exit__(self, *exc: object) -> None:
        self._conn.send(None)
        self._process.join(30)
        if self._process.is_alive():
            self._process.kill()


def measure(
    size: int,
    rounds: int,
    chunks: list[int],
    layouts: list[str],
    report: Callable[[Case, dict[str, list[float]], dict[str, list[float]]], None],
) -> None:
    """Every case over HTTP; ``report(case, times, cpu)`` for each."""
    data = make_data(size)
    with tempfile.TemporaryDirectory(prefix="zarrscope-bench-http-") as tmp:
        local = cases(Path(tmp), data, chunks, layouts)
        with Served(Path(tmp)) as url:
            for case in local:
                served = HttpCase(
                    case.path, case.data, case.chunk, case.shard, f"{url}/{case.path.name}"
                )
                times, cpu = run_case(served, rounds, RAW_THREADS, raw=raw_http_method)
                report(served, times, cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--chunks", default="128,256,512", help="chunk sizes, comma-separated")
    parser.add_argument("--layouts", default="unsharded,sharded", help="unsharded and/or sharded")
    parser.add_argument("--size", type=int, default=4096, help="the array is size x size")
    args = parser.parse_args()
    print(
        f"over HTTP (loopback, no added latency), {args.size}² uint16 zstd, {args.rounds} paired"
        f" rounds; raw = {RAW_THREADS} threads GET+decode"
    )

    def report(case: Case, times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
        med = {name: statistics.median(t) * 1000 for name, t in times.items()}
        t1, t2, t3 = ratio(times["chunkpool"], times["tensorstore"])
        r1, r2, r3 = ratio(times["chunkpool"], times["raw"])
        print(
            f"{case.label:28s} pool {med['chunkpool']:7.1f} ms, ts {med['tensorstore']:7.1f},"
            f" raw {med['raw']:7.1f}; pool/tensorstore {t2:.2f} [{t1:.2f}..{t3:.2f}],"
            f" pool/raw {r2:.2f} [{r1:.2f}..{r3:.2f}]",
            flush=True,
        )

    measure(
        args.size,
        args.rounds,
        [int(c) for c in args.chunks.split(",")],
        args.layouts.split(","),
        report,
    )


def collect(quick: bool = False) -> list[Figure]:
    """Pool throughput over HTTP against tensorstore's and raw threads', as figures."""
    from bench_pool import throughput_figures

    size, rounds = (2048, 2) if quick else (4096, 5)
    figures: list[Figure] = []

    def report(case: Case, times: dict[str, list[float]], cpu: dict[str, list[float]]) -> None:
        note = (
            f"{size}² uint16 zstd over loopback HTTP (test server, own process), no added"
            f" latency; tensorstore: http kvstore; raw: {RAW_THREADS} threads"
        )
        figures.extend(throughput_figures("pool throughput, HTTP", case, times, cpu, note, {}))
        print(f"  {case.label}: {figures[-3].ratio:.2f} of tensorstore", flush=True)

    measure(size, rounds, [128, 256, 512], ["unsharded", "sharded"], report)
    return figures


if __name__ == "__main__":
    main()
