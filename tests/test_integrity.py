"""No wrong pixel without an error: decoded sizes are checked, kept data owns its memory.

Issue 7, items 1a-1c. Every test here builds a store that zarr-python refuses to read (or
reads correctly) and checks that the pool either fails the chunk with a typed error that
says what is wrong, or returns exactly zarr-python's data, never another chunk's bytes
left over in a recycled buffer.
"""

from __future__ import annotations

import gc
import json
import warnings
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr
import zarr.codecs.numcodecs as zcn
from conftest import make_array, ramp
from support.corrupt import (
    chunk_file,
    numcodecs_compressor,
    replace_inner_chunk,
    write_shard,
    zstd_frame_without_size,
)
from zarr.codecs import BloscCodec, BytesCodec, GzipCodec, TransposeCodec, ZstdCodec

from chunkpool import ChunkDecodeError, ChunkLoadError, ChunkState, native
from chunkpool.buffers import BufferPool

#: zarr warns that numcodecs' codecs are not in the Zarr v3 spec; these tests use them.
pytestmark = pytest.mark.filterwarnings("ignore:Numcodecs codecs are not in the Zarr")


@pytest.fixture(autouse=True, params=["native", "python"])
def read_path(request, monkeypatch):
    """Every test here runs with local chunks read by chunkpool.native (where it is
    built and applies: raw and zstd chunks) and by the Python path alone."""
    if request.param == "native" and not native.AVAILABLE:
        pytest.skip("chunkpool._native is not built here")
    monkeypatch.setattr(native, "AVAILABLE", request.param == "native")
    return request.param


SHAPE = (32, 16)  # two chunks of 16 x 16 uint16: 512 bytes each
CHUNKS = (16, 16)
CHUNK_BYTES = 512

#: (name, zarr.create_array keyword arguments): one per decode path and codec.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr")
    LAYOUTS: dict[str, dict[str, Any]] = {
        "v3-zstd": {"compressors": [ZstdCodec()]},
        "v3-blosc": {"compressors": [BloscCodec()]},
        "v3-gzip": {"compressors": [GzipCodec()]},
        "v3-lz4": {"compressors": [zcn.LZ4()]},
        "v3-zlib": {"compressors": [zcn.Zlib()]},
        "v3-raw": {"compressors": None},
        "v2-zstd": {"zarr_format": 2, "compressors": numcodecs.Zstd()},
        "v2-blosc": {"zarr_format": 2, "compressors": numcodecs.Blosc()},
        "v2-lz4": {"zarr_format": 2, "compressors": numcodecs.LZ4()},
        "v2-zlib": {"zarr_format": 2, "compressors": numcodecs.Zlib()},
        "v2-gzip": {"zarr_format": 2, "compressors": numcodecs.GZip()},
        "v2-raw": {"zarr_format": 2, "compressors": None},
        # the zarr-codec paths: a synchronous chain, the async pipeline, a v2 filter chain
        "v3-transpose-zstd": {
            "filters": [TransposeCodec(order=(1, 0))],
            "compressors": [ZstdCodec()],
        },
        "v3-bz2-async": {"compressors": [zcn.BZ2()]},
        "v2-delta-zstd": {
            "zarr_format": 2,
            "filters": [numcodecs.Delta("<u2")],
            "compressors": numcodecs.Zstd(),
        },
        "v3-sharded-zstd": {"shards": SHAPE, "compressors": [ZstdCodec()]},
    }


def _write(tmp_path: Any, layout: str) -> tuple[zarr.Array, np.ndarray]:
    data = ramp(SHAPE)
    return make_array(tmp_path / f"{layout}.zarr", data, CHUNKS, **LAYOUTS[layout]), data


def _encode(arr: zarr.Array, payload: bytes) -> bytes:
    """``payload`` encoded as ``arr`` encodes its chunks' bytes."""
    compressor = numcodecs_compressor(arr)
    return payload if compressor is None else bytes(compressor.encode(payload))


def _set_chunk(arr: zarr.Array, index: tuple[int, ...], blob: bytes) -> None:
    if arr.metadata.zarr_format == 3 and arr.shards is not None:
        shard = tuple(i * c // s for i, c, s in zip(index, arr.chunks, arr.shards, strict=True))
        inner = tuple(i % (s // c) for i, c, s in zip(index, arr.chunks, arr.shards, strict=True))
        replace_inner_chunk(arr, shard, inner, blob)
    else:
        chunk_file(arr, index).write_bytes(blob)


def _load_after_a_neighbour(pools: Any, arr: zarr.Array) -> Any:
    """Load chunk (0, 0), let its buffer go back for reuse, then load chunk (1, 0)."""
    pool = pools(zarr.open_array(arr.store_path.store, path=arr.store_path.path), cpu_workers=1)
    first = pool.get_chunk(0, (0, 0), ref="a")
    pool.wait_for_chunks_to_load()
    assert first.state is ChunkState.LOADED
    pool.drop_chunk(0, (0, 0), ref="a")
    del first
    gc.collect()
    loc = pool.get_chunk(0, (1, 0), ref="b")
    try:
        pool.wait_for_chunks_to_load()
    except ChunkLoadError as err:
        return err
    return loc


def _zarr_raises(arr: zarr.Array) -> None:
    with pytest.raises(Exception):  # noqa: B017  (zarr-python's error types vary by codec)
        zarr.open_array(arr.store_path.store, path=arr.store_path.path)[16:32]


@pytest.mark.parametrize("size", [CHUNK_BYTES // 2, CHUNK_BYTES * 2], ids=["short", "long"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_frame_of_wrong_size_fails_the_chunk(pools, tmp_path, layout, size):
    """1a: a valid frame that decodes to too few (or too many) bytes is an error naming
    the sizes, on every decode path, never a chunk whose tail is a recycled buffer's."""
    arr, _ = _write(tmp_path, layout)
    payload = ramp((size // 2,))[::-1].tobytes()
    _set_chunk(arr, (1, 0), _encode(arr, payload))
    _zarr_raises(arr)
    result = _load_after_a_neighbour(pools, arr)
    assert isinstance(result, ChunkLoadError), f"loaded without error: {result.data!r}"
    error = result.failures[(0, (1, 0))]
    assert isinstance(error, ChunkDecodeError), repr(error)
    assert f"expected {CHUNK_BYTES}" in str(error), str(error)
    if layout.endswith(("gzip", "zlib")) and size > CHUNK_BYTES:
        assert "more than" in str(error), str(error)  # inflating stops one byte past
    else:
        assert f"{size} bytes" in str(error), str(error)


@pytest.mark.parametrize("layout", ["v3-gzip", "v2-gzip", "v3-zstd", "v2-lz4", "v3-blosc"])
def test_empty_chunk_file_fails_the_chunk(pools, tmp_path, layout):
    """1a: a zero-length chunk file (gzip reads it as an empty stream) is an error."""
    arr, _ = _write(tmp_path, layout)
    _set_chunk(arr, (1, 0), b"")
    _zarr_raises(arr)
    result = _load_after_a_neighbour(pools, arr)
    assert isinstance(result, ChunkLoadError), f"loaded without error: {result.data!r}"
    assert isinstance(result.failures[(0, (1, 0))], ChunkDecodeError)


def test_zstd_frames_are_checked_with_or_without_a_declared_size(pools, tmp_path):
    """1a: a zstd frame that does not declare its size is checked by decoding; one of the
    right total size split over two frames is read as zarr-python reads it."""
    arr, data = _write(tmp_path, "v3-zstd")
    chunk = data[16:].tobytes()
    zstd = numcodecs.Zstd()
    for blob, ok in [
        (zstd_frame_without_size(chunk[:256]), False),
        (zstd_frame_without_size(chunk + b"xx"), False),
        (zstd_frame_without_size(chunk), True),
        (bytes(zstd.encode(chunk[:200])) + bytes(zstd.encode(chunk[200:])), True),
        (bytes(zstd.encode(chunk[:200])) + bytes(zstd.encode(chunk[200:300])), False),
    ]:
        _set_chunk(arr, (1, 0), blob)
        result = _load_after_a_neighbour(pools, arr)
        if ok:
            np.testing.assert_array_equal(result.data, data[16:])
            np.testing.assert_array_equal(zarr.open_array(arr.store_path.store)[16:], data[16:])
        else:
            assert isinstance(result, ChunkLoadError), f"loaded: {result.data!r}"
            assert isinstance(result.failures[(0, (1, 0))], ChunkDecodeError)
            _zarr_raises(arr)


def test_truncated_blosc_is_refused_before_decoding(pools, tmp_path):
    """1a: blosc's decoder trusts the sizes in its header (it is never told how many
    bytes there are): a frame cut short must be refused, not read past its end."""
    arr, _ = _write(tmp_path, "v2-blosc")
    blob = chunk_file(arr, (1, 0)).read_bytes()
    for cut in (1, len(blob) // 2, len(blob) - 10, len(blob) - 15):
        chunk_file(arr, (1, 0)).write_bytes(blob[: len(blob) - cut])
        result = _load_after_a_neighbour(pools, arr)
        assert isinstance(result, ChunkLoadError), f"cut {cut}: loaded {result.data!r}"
        assert isinstance(result.failures[(0, (1, 0))], ChunkDecodeError)


def test_big_shard_index_owns_its_memory(pools, tmp_path):
    """1b: a shard index of >= 64 KiB (4096 inner chunks) is read into a recycled
    buffer; the cached index must not be a view of it, or the next shard's index read
    rewrites it and later chunks of the first shard come back wrong."""
    rng = np.random.default_rng(7)
    data = np.zeros((1024, 512), np.uint8)
    data[:512] = 3  # shard 0: constant chunks, small frames
    data[512:] = rng.integers(0, 255, (512, 512), dtype=np.uint8)  # shard 1: big frames
    arr = zarr.create_array(
        tmp_path / "big.zarr",
        shape=data.shape,
        chunks=(8, 8),
        shards=(512, 512),
        dtype=data.dtype,
        compressors=[ZstdCodec()],
    )
    zstd = numcodecs.Zstd()
    for shard in (0, 1):  # 4096 inner chunks each (zarr's own writer takes seconds)
        block = data[shard * 512 : (shard + 1) * 512]
        inner = {
            (i, j): bytes(zstd.encode(block[i * 8 : i * 8 + 8, j * 8 : j * 8 + 8].tobytes()))
            for i in range(64)
            for j in range(64)
        }
        write_shard(arr, (shard, 0), inner)
    np.testing.assert_array_equal(zarr.open_array(arr.store_path.store)[...], data)
    pool = pools(zarr.open_array(arr.store_path.store), io_concurrency=1, cpu_workers=1)
    scale = pool.multiscale_info.levels[0]
    order = [(0, 0), (64, 0), (1, 1), (65, 1), (63, 63), (127, 63)]
    for index in order:  # one at a time: shard 0, shard 1, shard 0, ...
        loc = pool.get_chunk(0, index)
        pool.wait_for_chunks_to_load()
        np.testing.assert_array_equal(loc.data, data[scale.chunk_slices(index)], str(index))


def test_decoded_chunk_does_not_view_its_read_buffer(pools, tmp_path):
    """1b: a codec chain whose decode returns a view of its input (transpose over raw
    bytes) must not hand out a chunk that views the recycled read buffer."""
    data = ramp((512, 256))
    arr = make_array(
        tmp_path / "t.zarr",
        data,
        (256, 256),  # 128 KiB per chunk: read into recycled buffers
        serializer=BytesCodec(),
        filters=[TransposeCodec(order=(1, 0))],
        compressors=None,
    )
    pool = pools(zarr.open_array(arr.store_path.store), io_concurrency=1, cpu_workers=1)
    first = pool.get_chunk(0, (0, 0))
    pool.wait_for_chunks_to_load()
    second = pool.get_chunk(0, (1, 0))
    pool.wait_for_chunks_to_load()
    np.testing.assert_array_equal(first.data, data[:256])
    np.testing.assert_array_equal(second.data, data[256:])


def _declare_chunks(arr: zarr.Array, chunks: tuple[int, ...]) -> zarr.Array:
    """Rewrite ``arr``'s metadata to declare ``chunks`` (the stored chunk stays)."""
    root = chunk_file(arr, (0, 0)).parent
    while not (root / "zarr.json").exists():
        root = root.parent
    meta_file = root / "zarr.json"
    meta = json.loads(meta_file.read_text())
    meta["chunk_grid"]["configuration"]["chunk_shape"] = list(chunks)
    meta_file.write_text(json.dumps(meta))
    return zarr.open_array(root)


@pytest.mark.parametrize(
    "chunks",
    [(1024, 1024), (1 << 20, 1 << 20), (1 << 40, 1 << 40), (1 << 63, 16)],
    ids=["1024", "2^20", "2^40", "2^63"],
)
def test_chunk_declared_larger_than_stored_fails(pools, tmp_path, monkeypatch, chunks):
    """1c: a 16 x 16 array whose metadata declares bigger chunks than the stored one:
    an error, never a full-size chunk of buffer garbage, and no absurd allocation."""
    data = ramp((16, 16))
    arr = _declare_chunks(
        make_array(tmp_path / "c.zarr", data, (16, 16), compressors=[ZstdCodec()]), chunks
    )
    with pytest.raises(Exception):  # noqa: B017
        arr[...]
    sizes: list[int] = []
    real_take = BufferPool.take
    monkeypatch.setattr(
        BufferPool, "take", lambda self, n: (sizes.append(n), real_take(self, n))[1]
    )
    pool = pools(arr)
    loc = pool.get_chunk(0, (0, 0))
    with pytest.raises(ChunkLoadError) as info:
        pool.wait_for_chunks_to_load()
    error = info.value.failures[(0, (0, 0))]
    assert isinstance(error, ChunkDecodeError), repr(error)
    assert loc.state is ChunkState.FAILED
    assert max(sizes, default=0) <= 1 << 24, f"tried to allocate {max(sizes)} bytes"


def test_empty_buffer_carves_no_spares():
    """1c: a zero-byte buffer (a chunk with a 0 dimension) must not carve an arena into
    4 Mi empty spares (seconds and hundreds of MiB of bookkeeping)."""
    buffers = BufferPool()
    assert buffers.take(0).nbytes == 0
    assert len(buffers._free.get(0, [])) <= 1
