"""Opening a remote source is bounded like reading its chunks (issue 7, 2b).

A server that accepts connections and never answers (the ``"stall"`` fault of the test
server) must not hold ``ChunkPool.from_zarr_node`` or the ``zarrscope --screenshot``
command: metadata reads have the same per-attempt timeout and retries as chunk reads, and
``--timeout`` bounds the whole command.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import threading
import time

import numpy as np
import pytest
from conftest import make_array, ramp
from support.httpserver import ZarrHTTPServer
from test_render import run_cli as run_command

from chunkpool import ChunkLoadError, ChunkPool, RetryPolicy, SourceError

FAST_RETRY = RetryPolicy(attempts=2, timeout=0.5, base_delay=0.05, max_delay=0.1)

#: The CLI's --timeout in these tests, and the bound on the whole command: a large
#: multiple of it (the interpreter, pygfx and wgpu start inside that bound too).
CLI_TIMEOUT = 2.0
CLI_BOUND = 60 * CLI_TIMEOUT


@pytest.fixture
def server(tmp_path):
    data = ramp((64, 64))
    make_array(tmp_path / "img.zarr", data, (32, 32))
    make_array(tmp_path / "v2.zarr", data, (32, 32), zarr_format=2)
    with ZarrHTTPServer(tmp_path) as srv:
        srv.data = data
        yield srv


def metadata_requests(server: ZarrHTTPServer) -> list:
    server.stall_release.set()  # let the stalled handlers (the client gave up) finish
    assert server.wait_idle(10)
    return [r for r in server.requests if "/c/" not in r.path and "/0." not in r.path]


@pytest.mark.parametrize("name", ["img.zarr", "v2.zarr"])
def test_opening_times_out_and_retries_like_chunk_reads(server, name):
    fault = server.add_fault("*", "stall")
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node(f"{server.url}/{name}", retry=FAST_RETRY)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{server.url}/{name}: ")
    assert f"timed out after {FAST_RETRY.attempts} attempts" in message
    # zarr asks for its metadata documents together: each was tried `attempts` times
    requests = metadata_requests(server)
    assert fault.hits == len(requests) > 0
    paths = [r.path for r in requests]
    assert all(paths.count(path) == FAST_RETRY.attempts for path in paths), paths


def test_a_stalled_metadata_read_is_retried_and_the_image_opens(server):
    server.add_fault("*/zarr.json", "stall", times=1)
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/img.zarr", retry=FAST_RETRY)
    try:
        loc = pool.get_chunk(0, (1, 0))
        np.testing.assert_array_equal(loc.wait(timeout=30), server.data[loc.slices])
    finally:
        pool.destroy()
    requests = metadata_requests(server)
    assert [r.fault for r in requests if r.path.endswith("/zarr.json")][:2] == ["stall", None]


@pytest.mark.parametrize("disk_cache", [False, True])
def test_chunk_reads_are_retried_once_per_attempt_not_twice(server, tmp_path, disk_cache):
    """Metadata and chunk reads share one retry mechanism, with or without the disk cache
    between the pool and the network: a failing chunk costs ``attempts`` requests."""
    server.add_fault("*/img.zarr/c/1/1", "500")
    options = {"disk_cache": tmp_path / "cache"} if disk_cache else {}
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/img.zarr", retry=FAST_RETRY, **options)
    try:
        pool.get_chunk(0, (1, 1))
        with pytest.raises(ChunkLoadError, match=f"after {FAST_RETRY.attempts} attempts"):
            pool.wait_for_chunks_to_load()
    finally:
        pool.destroy()
    server.wait_idle()
    assert len([r for r in server.requests if r.path.endswith("/c/1/1")]) == FAST_RETRY.attempts


def test_a_pool_on_an_already_open_node_still_retries(server):
    """A node opened elsewhere (zarr's own fsspec store, no chunkpool wrapper) gets the
    pool's policy for its chunk reads."""
    import zarr

    from chunkpool import read_multiscales

    server.add_fault("*/img.zarr/c/0/1", "503", times=1)
    node = zarr.open(f"{server.url}/img.zarr", mode="r")
    (info,) = read_multiscales(node, "img")
    pool = ChunkPool(info, retry=FAST_RETRY)
    try:
        loc = pool.get_chunk(0, (0, 1))
        np.testing.assert_array_equal(loc.wait(timeout=30), server.data[loc.slices])
    finally:
        pool.destroy()
    server.wait_idle()
    assert len([r for r in server.requests if r.path.endswith("/c/0/1")]) == 2


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """``zarrscope ARGS`` in a subprocess, bounded by CLI_BOUND (TimeoutExpired fails)."""
    return run_command(*args, timeout=CLI_BOUND)


def assert_one_timeout_line(
    result: subprocess.CompletedProcess[str], *, watchdog: bool = False
) -> None:
    """Status 1 and one line saying the command did not load in time; ``watchdog``:
    whether the process was ended by the watchdog (a read nothing could interrupt)
    rather than by every wait giving up at the deadline."""
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("zarrscope: error: ")
    assert f"did not load within {CLI_TIMEOUT:g} s" in lines[0]
    assert ("a read never returned" in lines[0]) == watchdog, lines[0]


@pytest.mark.render
def test_cli_timeout_bounds_opening_a_server_that_never_answers(server, tmp_path):
    server.add_fault("*", "stall")
    out = tmp_path / "out.png"
    result = run_cli(
        f"{server.url}/img.zarr", "--screenshot", str(out), "--timeout", f"{CLI_TIMEOUT:g}"
    )
    assert_one_timeout_line(result)
    assert not out.exists()
    assert any(r.fault == "stall" for r in metadata_requests(server))


@pytest.mark.render
def test_cli_timeout_bounds_loading_after_a_quick_open(server, tmp_path):
    """Metadata comes at once, every chunk read stalls: opening succeeds, and what is left
    of --timeout is what loading gets."""
    server.add_fault("*/c/*", "stall")
    out = tmp_path / "out.png"
    result = run_cli(
        f"{server.url}/img.zarr", "--screenshot", str(out), "--timeout", f"{CLI_TIMEOUT:g}"
    )
    assert_one_timeout_line(result)
    assert not out.exists()


@pytest.mark.render
def test_cli_timeout_bounds_a_local_read_that_never_returns(tmp_path):
    """A chunk file that is a FIFO: its synchronous read never returns and nothing can
    interrupt it, yet the command ends soon after --timeout with one line."""
    make_array(tmp_path / "img.zarr", ramp((64, 64)), (32, 32), compressors=None)
    chunk = tmp_path / "img.zarr" / "c" / "0" / "0"
    chunk.unlink()
    os.mkfifo(chunk)
    out = tmp_path / "out.png"
    result = run_cli(
        str(tmp_path / "img.zarr"), "--screenshot", str(out), "--timeout", f"{CLI_TIMEOUT:g}"
    )
    # opening waits for no chunk (no contrast sample): the view is not settled at the
    # deadline, which is the one line; closing then waits for the read that never
    # returns, and the watchdog ends the process (status 1, nothing more printed)
    assert_one_timeout_line(result, watchdog=False)
    assert not out.exists()


def test_destroy_ends_the_fetch_tasks_it_cancels(server):
    """Chunk reads stalled on the server: destroy() cancels their tasks on zarr's loop
    and returns once they have ended, so none is left pending there (at exit Python
    would print "Task was destroyed but it is pending!" for each)."""
    server.add_fault("*/c/*", "stall")
    retry = RetryPolicy(attempts=1, timeout=600)  # the reads stall until destroyed
    (pool,) = ChunkPool.from_zarr_node(f"{server.url}/img.zarr", retry=retry)
    indices = list(pool.multiscale_info.levels[0].iter_chunk_indices())
    locs = [pool.get_chunk(0, index) for index in indices]
    deadline = time.monotonic() + 30
    while server.in_flight < len(locs):  # every read is stalled at the server
        assert time.monotonic() < deadline, f"only {server.in_flight} reads reached the server"
        threading.Event().wait(0.01)
    loop = pool._sources[0].io_loop()
    pool.destroy()

    async def fetch_tasks() -> list[str]:
        return [repr(t) for t in asyncio.all_tasks() if "_fetch_async" in repr(t.get_coro())]

    assert asyncio.run_coroutine_threadsafe(fetch_tasks(), loop).result(30) == []
    assert all(loc.state.value == "cancelled" for loc in locs)
