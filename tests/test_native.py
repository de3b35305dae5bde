"""chunkpool.native: batches of local chunks read and decoded without the GIL.

The extension must give exactly what the Python path gives (data, stamps, errors and
their messages), be used where it applies (counted), and leave everything else to
Python: links, edge chunks, absent inner chunks, damaged chunks, a FIFO.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp
from support.corrupt import chunk_file
from zarr.codecs import ZstdCodec

from chunkpool import ChunkLoadError, ChunkReadError, ChunkState, native, scheduler

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="chunkpool._native is not built")

#: 40 x 36 in 8 x 8 chunks: edge chunks on both far sides (Python's), and 30 full ones.
SHAPE, CHUNKS = (40, 36), (8, 8)

LAYOUTS = {
    "v3-zstd": {"compressors": [ZstdCodec()]},
    "v3-raw": {"compressors": None},
    "v2-zstd": {"zarr_format": 2, "compressors": {"id": "zstd", "level": 1}},
    "v2-raw": {"zarr_format": 2, "compressors": None},
    "v3-sharded-zstd": {"shards": (16, 16), "compressors": [ZstdCodec()]},
    "v3-sharded-raw": {"shards": (16, 16), "compressors": None},
}


@pytest.fixture
def counted(monkeypatch):
    """The chunks each call of the extension got (a list per call)."""
    calls: list[int] = []
    real = native.read_chunks

    def read_chunks(items, zstd):
        calls.append(len(items))
        return real(items, zstd)

    monkeypatch.setattr(native, "read_chunks", read_chunks)
    return calls


def _data() -> np.ndarray:
    data = ramp(SHAPE)
    data[16:24, 8:16] = 0  # a chunk of fill values: not stored (missing), read as fill
    return data


def _load_all(pools, arr: zarr.Array, counted: list[int] | None = None, **kwargs) -> dict:
    """Every chunk's data and stamp, as loaded the second time (the first read the
    shard indexes), ``counted`` only counting that second time."""
    pool = pools(zarr.open_array(arr.store_path.store, path=arr.store_path.path), **kwargs)
    keys = [(0, idx) for idx in pool.multiscale_info.levels[0].iter_chunk_indices()]
    pool.get_chunks(keys)
    pool.wait_for_chunks_to_load(timeout=60)
    pool.drop_chunks(keys)
    if counted is not None:
        counted.clear()
    locs = pool.get_chunks(keys)
    pool.wait_for_chunks_to_load(timeout=60)
    return {loc.index: (np.array(loc.data), loc._stamp) for loc in locs}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_native_reads_what_python_reads(pools, tmp_path, layout, counted, monkeypatch):
    arr = make_array(tmp_path / "a.zarr", _data(), CHUNKS, **LAYOUTS[layout])
    # one IO thread holding the one CPU slot, reading in batches however fast reads
    # are against decodes: every job is in a batch
    monkeypatch.setattr(scheduler, "BATCH_FETCH_RATIO", float("inf"))
    got = _load_all(pools, arr, counted, io_concurrency=1, cpu_workers=1)
    # every full chunk went through the extension (an absent inner chunk of a shard is
    # known from its index: nothing to read)
    assert sum(counted) == (19 if "sharded" in layout else 20), counted
    monkeypatch.setattr(native, "AVAILABLE", False)
    expected = _load_all(pools, arr)
    assert got.keys() == expected.keys()
    data = _data()
    for index, (chunk, stamp) in got.items():
        np.testing.assert_array_equal(chunk, expected[index][0])
        where = tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, CHUNKS, strict=True))
        np.testing.assert_array_equal(chunk, data[where])
        assert stamp == expected[index][1], index  # (size, mtime_ns) of the file read


def test_native_arrays_are_read_only_and_recycled(pools, tmp_path, counted):
    arr = make_array(tmp_path / "a.zarr", ramp((64, 64)), (8, 8), compressors=[ZstdCodec()])
    pool = pools(zarr.open_array(arr.store_path.store))
    keys = [(0, idx) for idx in np.ndindex(8, 8)]
    for _ in range(3):
        locs = pool.get_chunks(keys)
        pool.wait_for_chunks_to_load(timeout=60)
        assert not locs[0].data.flags.writeable
        del locs
        pool.drop_chunks(keys)
    assert counted and pool.memory_usage == 0
    assert pool.stats.recycled_bytes > 0  # the rounds after the first reused buffers


def _damage(arr: zarr.Array) -> None:
    """Chunks the extension leaves to Python, each a different way."""
    chunk_file(arr, (0, 1)).write_bytes(b"")  # empty
    chunk_file(arr, (0, 2)).write_bytes(b"not a zstd frame at all")
    good = chunk_file(arr, (0, 3)).read_bytes()
    chunk_file(arr, (0, 3)).write_bytes(good[: len(good) // 2])  # truncated
    chunk_file(arr, (1, 0)).write_bytes(chunk_file(arr, (1, 1)).read_bytes()[:-1])
    os.remove(chunk_file(arr, (1, 2)))
    os.mkdir(chunk_file(arr, (1, 2)))  # a directory in its place
    outside = arr.store_path.store.root.parent / "outside"
    outside.write_bytes(chunk_file(arr, (2, 0)).read_bytes())
    os.remove(chunk_file(arr, (2, 0)))
    os.symlink(outside, chunk_file(arr, (2, 0)))  # a link out of the store
    os.remove(chunk_file(arr, (2, 1)))
    os.symlink(chunk_file(arr, (2, 2)), chunk_file(arr, (2, 1)))  # a link inside it


def _outcomes(pools, arr: zarr.Array) -> dict:
    pool = pools(zarr.open_array(arr.store_path.store))
    keys = [(0, idx) for idx in np.ndindex(4, 4)]
    locs = pool.get_chunks(keys)
    with pytest.raises(ChunkLoadError):
        pool.wait_for_chunks_to_load(timeout=60)
    return {
        loc.index: str(loc.error) if loc.state is ChunkState.FAILED else np.array(loc.data)
        for loc in locs
    }


def test_damaged_chunks_fail_as_in_python(pools, tmp_path, counted, monkeypatch):
    """Every chunk the extension does not end exactly is read again by Python, which
    fails it with the same message (or, for a link inside the store, reads it)."""
    data = ramp((32, 32))
    arr = make_array(tmp_path / "a" / "a.zarr", data, (8, 8), compressors=[ZstdCodec()])
    _damage(arr)
    got = _outcomes(pools, arr)
    assert counted
    monkeypatch.setattr(native, "AVAILABLE", False)
    expected = _outcomes(pools, arr)
    failed = {k for k, v in got.items() if isinstance(v, str)}
    assert failed == {(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (2, 0)}, got
    assert "out of the store" in got[(2, 0)] or "link" in got[(2, 0)], got[(2, 0)]
    for index, outcome in got.items():
        if index in failed:
            assert outcome == expected[index], index
        else:
            np.testing.assert_array_equal(outcome, expected[index])
    np.testing.assert_array_equal(got[(2, 1)], data[16:24, 16:24])  # the linked chunk's


@pytest.mark.timeout(60)
def test_a_fifo_in_a_chunks_place_holds_up_no_other_chunk(pools, tmp_path, monkeypatch):
    """The extension does not block on a FIFO (not a regular file: Python's), so while
    Python's read of it waits for a writer, every other chunk of its batch loads."""
    monkeypatch.setattr(scheduler, "BATCH_FETCH_RATIO", float("inf"))
    data = ramp((64, 64))
    arr = make_array(tmp_path / "a.zarr", data, (8, 8), compressors=[ZstdCodec()])
    # (two CPU slots: the thread stuck on the FIFO holds one, as in Python)
    pool = pools(zarr.open_array(arr.store_path.store), io_concurrency=4, cpu_workers=2)
    keys = [(0, idx) for idx in np.ndindex(8, 8)]
    pool.get_chunks(keys)  # measured: batches of MAX_BATCH from now on
    pool.wait_for_chunks_to_load(timeout=60)
    pool.drop_chunks(keys)
    fifo = chunk_file(arr, (0, 3))  # in the middle of the first batch
    os.remove(fifo)
    os.mkfifo(fifo)
    locs = {loc.index: loc for loc in pool.get_chunks(keys)}
    others = [loc for index, loc in locs.items() if index != (0, 3)]
    deadline = time.monotonic() + 30
    while not all(loc.loaded for loc in others):
        assert time.monotonic() < deadline, [loc for loc in others if not loc.loaded]
        time.sleep(0.005)
    for loc in others:
        np.testing.assert_array_equal(loc.data, data[loc.slices])
    assert locs[(0, 3)].state is ChunkState.LOADING  # its read waits for a writer
    writer = threading.Thread(target=lambda: os.close(os.open(fifo, os.O_WRONLY)))
    writer.start()  # a writer that writes nothing: the read ends in an error
    writer.join(30)
    assert not writer.is_alive()
    with pytest.raises((ChunkLoadError, ChunkReadError)):
        pool.wait_for_chunks_to_load(timeout=30)
    assert locs[(0, 3)].state is ChunkState.FAILED


def test_the_extension_refuses_bad_items_with_python_errors(tmp_path):
    """Called wrongly, the extension raises (no crash, nothing written); paths it must
    not open (a NUL inside, a directory) are left to Python."""
    (tmp_path / "f").write_bytes(b"x" * 8)
    out = np.zeros(8, np.uint8)
    with pytest.raises(TypeError):
        native.read_chunks([("not bytes", -1, 0, out)], zstd=False)
    with pytest.raises(TypeError):
        native.read_chunks([(b"x", -1, 0)], zstd=False)
    with pytest.raises((BufferError, TypeError, ValueError)):
        native.read_chunks([(os.fsencode(tmp_path / "f"), -1, 0, bytes(8))], zstd=False)
    nul = os.fsencode(tmp_path / "f") + b"\0/etc/passwd"
    ((status, *_),) = native.read_chunks([(nul, -1, 0, out)], zstd=False)
    assert status == native.FALLBACK and not out.any()
    ((status, *_),) = native.read_chunks([(os.fsencode(tmp_path), -1, 0, out)], zstd=False)
    assert status == native.FALLBACK
    ((status, size, _, nread, *_),) = native.read_chunks(
        [(os.fsencode(tmp_path / "f"), -1, 0, out)], zstd=False
    )
    assert (status, size, nread) == (native.DONE, 8, 8) and out.tobytes() == b"x" * 8
    ((status, *_),) = native.read_chunks([(os.fsencode(tmp_path / "gone"), -1, 0, out)], False)
    assert status == native.MISSING
