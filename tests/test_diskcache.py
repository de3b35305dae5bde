"""The persistent disk cache under hostile conditions: many processes and threads on one
cache directory with a small budget, corrupt entries, crash leftovers, a corrupt index, an
unusable directory, and two identities reading one URL.

The fake remote is a local directory behind :class:`AsyncGatedStore`, which records every
read that reaches it: "exactly one refetch" is counted, not guessed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import multiprocessing
import os
import queue
import random
import sqlite3
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import s3fs
import zarr
from conftest import make_array, ramp
from support.httpserver import ZarrHTTPServer
from support.s3server import S3Server
from support.teststores import AsyncGatedStore
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import LocalStore

from chunkpool import ChunkPool
from chunkpool.diskcache import INDEX_NAME, DiskCacheStore
from chunkpool.stores import open_node

LOCATION = "https://data.invalid/img.zarr"  # the name of the fake remote
ENTRY = 4096  # bytes of each fake remote object
RANGES: list[ByteRequest | None] = [
    None,
    RangeByteRequest(0, 1024),
    RangeByteRequest(1000, 3000),
    OffsetByteRequest(2048),
    SuffixByteRequest(512),
]


def make_remote(root: Path, n: int = 24, seed: int = 0) -> dict[str, bytes]:
    """``n`` objects ``c/0/<i>`` of random bytes under ``root``; returns key -> bytes."""
    rng = random.Random(seed)
    objects = {}
    for i in range(n):
        key = f"c/0/{i}"
        objects[key] = rng.randbytes(ENTRY)
        (root / "c" / "0").mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(objects[key])
    return objects


def expected(data: bytes, byte_range: ByteRequest | None) -> bytes:
    if byte_range is None:
        return data
    if isinstance(byte_range, RangeByteRequest):
        return data[byte_range.start : byte_range.end]
    if isinstance(byte_range, OffsetByteRequest):
        return data[byte_range.offset :]
    assert isinstance(byte_range, SuffixByteRequest)
    return data[-byte_range.suffix :]


def open_cache(remote: Path, cache: Path, budget: int = 1 << 20, **kwargs) -> DiskCacheStore:
    """A disk cache over the fake remote; ``store._store.rec.started`` lists remote reads."""
    return DiskCacheStore(
        AsyncGatedStore(LocalStore(remote, read_only=True)),
        cache,
        budget,
        location=LOCATION,
        **kwargs,
    )


def get(store: DiskCacheStore, key: str, byte_range: ByteRequest | None = None) -> bytes | None:
    """``store.get`` on a loop of its own, in a daemon thread: a read that hangs fails the
    test (after a minute) instead of hanging it."""
    done: concurrent.futures.Future[bytes | None] = concurrent.futures.Future()

    def run() -> None:
        try:
            buf = asyncio.run(store.get(key, default_buffer_prototype(), byte_range))
            done.set_result(None if buf is None else buf.to_bytes())
        except BaseException as err:
            done.set_exception(err)

    threading.Thread(target=run, daemon=True).start()
    return done.result(timeout=60)


def remote_reads(store: DiskCacheStore, key: str) -> int:
    return store._store.rec.started.count(key)


def is_index_file(path: Path) -> bool:
    return path.name.startswith(INDEX_NAME)


def entry_files(cache: Path) -> set[Path]:
    """Every file (or directory standing where an entry should be) below ``cache`` that is
    not the index: the data entries, plus any temp file or stray marker."""
    found = set()
    for path in cache.rglob("*"):
        if is_index_file(path):
            continue
        if path.is_file() or (
            path.is_dir() and path.parent != cache and path.parent.parent != cache
        ):
            found.add(path)
    return found


def bytes_on_disk(cache: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(cache):
        for name in files:
            if not name.startswith(INDEX_NAME):
                with contextlib.suppress(FileNotFoundError):  # evicted while we walked
                    total += os.stat(os.path.join(dirpath, name)).st_size
    return total


# --- many processes and threads -------------------------------------------------------


ROUNDS, BATCHES, BATCH = 8, 8, 8  # per worker: reopen the cache 8 times, 512 reads


def _hammer(remote: str, cache: str, budget: int, seed: int, go, results) -> None:
    """One viewer process: reopen the cache every round (as a new viewer would) and read
    random keys and ranges, 8 at a time (so in several threads); report (reads, remote
    reads, failures). Every outcome is reported, whatever happens."""
    logging.disable(logging.WARNING)  # expected noise (e.g. skipped writes) stays quiet
    objects = {key: (Path(remote) / key).read_bytes() for key in make_keys()}
    keys = [*objects, "c/9/missing"]  # and one the remote does not have
    rng = random.Random(seed)
    failures: list[str] = []
    reads = fetched = 0

    async def one(store: DiskCacheStore, key: str, byte_range: ByteRequest | None) -> None:
        nonlocal reads
        try:
            buf = await store.get(key, default_buffer_prototype(), byte_range)
        except Exception as err:  # a failed read: the remote would have served it
            failures.append(f"{key} {byte_range}: {type(err).__name__}: {err}")
            return
        reads += 1
        want = expected(objects[key], byte_range) if key in objects else None
        if (None if buf is None else buf.to_bytes()) != want:
            failures.append(f"{key} {byte_range}: wrong bytes")

    async def main() -> None:
        nonlocal fetched
        for _round in range(ROUNDS):
            try:
                store = open_cache(Path(remote), Path(cache), budget)
            except Exception as err:
                failures.append(f"open: {type(err).__name__}: {err}")
                continue
            for _batch in range(BATCHES):
                picks = [(rng.choice(keys), rng.choice(RANGES)) for _ in range(BATCH)]
                await asyncio.gather(*(one(store, key, rng_) for key, rng_ in picks))
            fetched += len(store._store.rec.started)
            store.close()

    try:
        if not go.wait(60):
            raise TimeoutError("never told to start")
        asyncio.run(main())
    except BaseException as err:
        failures.append(f"worker: {type(err).__name__}: {err}")
    finally:
        results.put((reads, fetched, failures))


def make_keys(n: int = 24) -> list[str]:
    return [f"c/0/{i}" for i in range(n)]


def _locked_bytes_on_disk(db: sqlite3.Connection, cache: Path) -> int:
    """The bytes of the entries, counted while holding the index's write lock: every change
    to the files happens under that lock, so this is one consistent instant."""
    db.execute("BEGIN IMMEDIATE")
    try:
        return bytes_on_disk(cache)
    finally:
        db.execute("ROLLBACK")


def test_two_processes_share_one_cache_within_its_budget(tmp_path):
    """Two viewer processes (spawned, each with several reader threads) read through one
    cache directory whose budget holds a fraction of what they read: every read returns the
    remote's bytes, and the bytes on disk stay within the budget whenever sampled and at the
    end, where the index accounts for exactly the bytes on disk."""
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    make_remote(remote)
    budget = 6 * ENTRY  # a quarter of the 24 objects' bytes: eviction all the time
    ctx = multiprocessing.get_context("spawn")
    go, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(str(remote), str(cache), budget, seed, go, results))
        for seed in (1, 2)
    ]
    for proc in procs:
        proc.start()
    open_cache(remote, cache, budget).close()  # the index exists before the first sample
    go.set()
    samples, outcomes = [], []
    db = sqlite3.connect(cache / INDEX_NAME, timeout=30, isolation_level=None)
    try:
        deadline = time.monotonic() + 240
        while len(outcomes) < len(procs):
            assert time.monotonic() < deadline, "the workers did not report"
            assert any(p.is_alive() for p in procs) or not results.empty(), "a worker died"
            samples.append(_locked_bytes_on_disk(db, cache))
            with contextlib.suppress(queue.Empty):  # paced by the workers' own reports
                outcomes.append(results.get(timeout=0.05))
    finally:
        db.close()
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
    failures = [f for _reads, _fetched, fails in outcomes for f in fails]
    assert failures == [], failures[:10]
    assert [reads for reads, _f, _x in outcomes] == [ROUNDS * BATCHES * BATCH] * 2
    assert all(fetched > 0 for _r, fetched, _x in outcomes)
    assert len(samples) >= 3, "the workers finished before the disk could be sampled"
    assert max(samples) <= budget + ENTRY
    store = open_cache(remote, cache, budget)  # nothing for its sweep to repair
    try:
        stats = store.stats
        assert (stats.temp_files_removed, stats.strays_removed, stats.healed) == (0, 0, 0)
        assert stats.bytes == bytes_on_disk(cache) <= budget  # the index is the truth
    finally:
        store.close()


def test_datasets_in_one_directory_share_its_budget(tmp_path):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    objects = make_remote(remote, n=10)
    budget = 6 * ENTRY
    stores = [
        DiskCacheStore(LocalStore(remote), cache, budget, location=f"https://host/{name}.zarr")
        for name in ("a", "b")
    ]
    for store in stores:
        for key, data in objects.items():
            assert get(store, key) == data
            assert bytes_on_disk(cache) <= budget
    assert {store.stats.bytes for store in stores} == {budget}
    for store in stores:
        store.close()


# --- corrupt entries ------------------------------------------------------------------


def corrupt(entry: Path, kind: str) -> None:
    data = entry.read_bytes()
    if kind == "truncated":
        entry.write_bytes(data[: len(data) // 2])
    elif kind == "garbage":
        entry.write_bytes(bytes(b ^ 0x5A for b in data))  # same length, other bytes
    elif kind == "zero-length":
        entry.write_bytes(b"")
    elif kind == "directory":
        entry.unlink()
        entry.mkdir()
        (entry / "something").write_bytes(b"x")
    elif kind == "fifo":  # reading it would block forever
        entry.unlink()
        os.mkfifo(entry)
    elif kind == "absent-marker":  # a cached 404 that contradicts the data entry
        entry.unlink()
        entry.with_name(entry.name + ".absent").write_bytes(b"")
    else:
        raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["truncated", "garbage", "zero-length", "directory", "fifo", "absent-marker"]
)
def test_a_corrupt_entry_is_refetched_once_then_served_again(tmp_path, kind):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    objects = make_remote(remote, n=2)
    key, byte_range = "c/0/1", RangeByteRequest(100, 2100)
    want = expected(objects[key], byte_range)
    store = open_cache(remote, cache)
    assert get(store, key, byte_range) == want
    (entry,) = entry_files(cache)
    store.close()
    corrupt(entry, kind)

    store = open_cache(remote, cache)  # a later viewer
    try:
        assert get(store, key, byte_range) == want
        assert remote_reads(store, key) == 1  # detected, and refetched
        assert get(store, key, byte_range) == want
        assert remote_reads(store, key) == 1  # and cached again
        assert store.stats.healed == 1
    finally:
        store.close()
    store = open_cache(remote, cache)
    try:
        assert get(store, key, byte_range) == want
        assert remote_reads(store, key) == 0
        assert entry_files(cache) == {entry} and entry.is_file()  # nothing stray is left
    finally:
        store.close()


def test_a_cached_absence_is_served_without_asking_again(tmp_path):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    make_remote(remote, n=1)
    for expected_reads in (1, 0):
        store = open_cache(remote, cache)
        assert get(store, "c/7/7") is None
        assert remote_reads(store, "c/7/7") == expected_reads
        store.close()


def test_an_entry_vanishing_between_index_and_read_is_a_miss(tmp_path):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    objects = make_remote(remote, n=1)
    store = open_cache(remote, cache)
    try:
        assert get(store, "c/0/0") == objects["c/0/0"]
        (entry,) = entry_files(cache)
        entry.unlink()  # another process evicted it, say
        assert get(store, "c/0/0") == objects["c/0/0"]
        assert remote_reads(store, "c/0/0") == 2
        assert entry.is_file()
    finally:
        store.close()


def test_a_corrupt_cached_zarr_json_is_refetched(tmp_path):
    data = ramp((64, 64))
    make_array(tmp_path / "srv" / "img.zarr", data, (32, 32))
    cache = tmp_path / "cache"
    with ZarrHTTPServer(tmp_path / "srv") as srv:
        url = f"{srv.url}/img.zarr"
        node, _name = open_node(url, disk_cache=cache)
        meta = (tmp_path / "srv" / "img.zarr" / "zarr.json").read_bytes()
        (cached,) = [p for p in entry_files(cache) if p.read_bytes() == meta]
        cached.write_bytes(meta[: len(meta) // 3])  # a torn or damaged write
        del node

        def zarr_json_requests() -> int:
            srv.wait_idle()
            # (a cached document is revalidated at open: a HEAD, answered 304, no body)
            return sum(r.path.endswith("/zarr.json") and r.method == "GET" for r in srv.requests)

        for expected_requests in (1, 0):
            srv.reset_stats()
            (pool,) = ChunkPool.from_zarr_node(url, disk_cache=cache)
            try:
                np.testing.assert_array_equal(pool.get_chunk(0, (1, 0)).wait(), data[32:, :32])
            finally:
                pool.destroy()
            assert zarr_json_requests() == expected_requests


# --- crash leftovers, a corrupt index, an unusable directory --------------------------


def test_leftover_temp_files_are_removed_and_counted(tmp_path, caplog):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    objects = make_remote(remote, n=2)
    store = open_cache(remote, cache)
    get(store, "c/0/0")
    (entry,) = entry_files(cache)
    store.close()
    for _ in range(3):  # a writer killed mid-write leaves its temp file behind
        fd, _tmp = tempfile.mkstemp(dir=entry.parent, prefix=".tmp")
        os.write(fd, b"half an entr")
        os.close(fd)
    assert len(entry_files(cache)) == 4

    caplog.set_level(logging.INFO, logger="chunkpool")
    store = open_cache(remote, cache)
    try:
        assert entry_files(cache) == {entry}
        assert store.stats.temp_files_removed == 3
        logged = [r for r in caplog.records if "temporary" in r.getMessage()]
        assert len(logged) == 1 and "3" in logged[0].getMessage()
        assert get(store, "c/0/0") == objects["c/0/0"]
        assert remote_reads(store, "c/0/0") == 0  # the real entry survived the cleanup
    finally:
        store.close()
    caplog.clear()
    store = open_cache(remote, cache)
    assert store.stats.temp_files_removed == 0
    assert not [r for r in caplog.records if "temporary" in r.getMessage()]
    store.close()


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_index_is_rebuilt_and_never_fails_a_read(tmp_path, caplog, damage):
    remote, cache = tmp_path / "remote", tmp_path / "cache"
    objects = make_remote(remote, n=40)
    store = open_cache(remote, cache)
    for key in objects:
        get(store, key)
    store.close()
    index = cache / INDEX_NAME
    raw = index.read_bytes()
    assert len(raw) > 3 * 4096
    if damage == "garbage":
        index.write_bytes(b"this is not an sqlite database " * 200)
    else:  # a valid header, but most pages lost
        index.write_bytes(raw[: 2 * 4096])

    caplog.set_level(logging.WARNING, logger="chunkpool")
    store = open_cache(remote, cache)
    try:
        for key, data in objects.items():
            assert get(store, key) == data
            assert get(store, key) == data
        assert all(remote_reads(store, key) == 1 for key in objects)  # once, then cached
        assert bytes_on_disk(cache) == store.stats.bytes == 40 * ENTRY  # nothing orphaned
    finally:
        store.close()
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "index" in warnings[0].getMessage()


def test_an_unusable_cache_directory_costs_only_the_cache(tmp_path, caplog):
    remote = tmp_path / "remote"
    objects = make_remote(remote, n=1)
    blocker = tmp_path / "not-a-dir"
    blocker.write_bytes(b"a file where the cache directory should be")
    caplog.set_level(logging.WARNING, logger="chunkpool")
    store = open_cache(remote, blocker)
    try:
        assert get(store, "c/0/0") == objects["c/0/0"]
        assert get(store, "c/0/0") == objects["c/0/0"]
        assert remote_reads(store, "c/0/0") == 2  # no cache, but no failure either
    finally:
        store.close()
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1


# --- identities -----------------------------------------------------------------------


def test_two_identities_for_one_url_do_not_share_entries(tmp_path):
    data = ramp((64, 64))
    make_array(tmp_path / "srv" / "img.zarr", data, (32, 32))
    cache = tmp_path / "cache"
    with ZarrHTTPServer(tmp_path / "srv") as srv:

        def chunk_requests_as(user: str, password: str) -> int:
            srv.reset_stats()
            url = srv.url.replace("http://", f"http://{user}:{password}@") + "/img.zarr"
            (pool,) = ChunkPool.from_zarr_node(url, disk_cache=cache)
            try:
                array = pool.multiscale_info.levels[0].array
                assert "pw-" not in repr(array) + repr(array.store) + str(array.store)
                np.testing.assert_array_equal(pool.get_chunk(0, (1, 1)).wait(), data[32:, 32:])
            finally:
                pool.destroy()
            srv.wait_idle()
            return sum("/c/" in r.path for r in srv.requests)

        assert chunk_requests_as("alice", "pw-alice-1") == 1
        assert chunk_requests_as("bob", "pw-bob-2") == 1  # not alice's cached chunk
        assert chunk_requests_as("alice", "pw-alice-1") == 0  # alice's own cache
        assert chunk_requests_as("alice", "pw-alice-other") == 1  # another password
    for path in cache.rglob("*"):
        assert "pw-" not in path.name and "alice" not in path.name
        if path.is_file():
            assert b"pw-" not in path.read_bytes() and b"alice" not in path.read_bytes()


def test_s3_identities_from_the_environment_do_not_share_entries(tmp_path, monkeypatch):
    """No storage options: the access key id botocore resolves tells the identities apart
    (and neither it nor the secret is written anywhere in the cache)."""
    data = ramp((32, 32), "int16")
    make_array(tmp_path / "img.zarr", data, (16, 16))
    cache = tmp_path / "cache"
    with S3Server() as s3:
        s3.create_bucket("cache-ids")
        s3.upload_dir(tmp_path / "img.zarr", "cache-ids", "img.zarr")
        for name, value in s3.env().items():
            monkeypatch.setenv(name, value)

        def datasets_after_reading_as(key_id: str) -> set[str]:
            """Read as a new viewer process would: s3fs's cached clients (keyed on the
            arguments, not on the environment) would carry the last identity's keys."""
            s3fs.S3FileSystem.clear_instance_cache()
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", f"secret-of-{key_id}")
            node, _ = open_node("s3://cache-ids/img.zarr", disk_cache=cache)
            assert isinstance(node, zarr.Array)
            np.testing.assert_array_equal(node[16:, :16], data[16:, :16])
            return {p.name for p in cache.iterdir() if p.is_dir()}

        try:
            first = datasets_after_reading_as("AKIDFIRSTEXAMPLE")
            assert datasets_after_reading_as("AKIDFIRSTEXAMPLE") == first
            second = datasets_after_reading_as("AKIDSECONDEXAMPLE")
            assert len(first) == 1 and len(second) == 2 and first < second
        finally:
            s3fs.S3FileSystem.clear_instance_cache()  # no client of this server outlives it
    for path in cache.rglob("*"):
        assert "AKID" not in path.name and "secret-of" not in path.name
        if path.is_file():
            assert b"AKID" not in path.read_bytes() and b"secret-of" not in path.read_bytes()
