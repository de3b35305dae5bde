"""Damaging local Zarr stores on purpose: rewrite one chunk's (or inner chunk's) bytes.

The integrity and fuzz tests need stores whose metadata is right but whose chunk bytes
are not: a valid compressed frame of the wrong size, a truncated or empty file, flipped
bits. These helpers write such bytes where zarr would look for a chunk, and rebuild a
shard around a replaced inner chunk (fresh index and checksum), so that only the chunk
under test is wrong.
"""

from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import numcodecs
import numpy as np
import zarr
from zarr.codecs import BloscCodec, GzipCodec, ShardingCodec, ZstdCodec
from zarr.codecs.sharding import ShardingCodecIndexLocation, _ShardIndex
from zarr.core.codec_pipeline import codecs_from_list
from zarr.core.sync import sync

__all__ = [
    "chunk_file",
    "numcodecs_compressor",
    "replace_inner_chunk",
    "write_shard",
    "zstd_frame_without_size",
]


def chunk_file(arr: zarr.Array, index: tuple[int, ...]) -> pathlib.Path:
    """Where a local array keeps the file of chunk (or shard) ``index``."""
    root = pathlib.Path(str(arr.store_path.store.root))
    prefix = arr.store_path.path
    key = arr.metadata.encode_chunk_key(index)
    return root / prefix / key if prefix else root / key


def numcodecs_compressor(arr: zarr.Array) -> Any:
    """The numcodecs codec that writes the bytes of ``arr``'s (inner) chunks.

    Zarr v2: the array's compressor. Zarr v3: the single bytes-to-bytes codec (inside
    the sharding codec if there is one; None if there is not exactly one), mapped to
    the numcodecs codec of the same format, so that a test can encode frames of any
    size the array would read.
    """
    if arr.metadata.zarr_format == 2:
        return arr.metadata.compressor
    codecs = list(arr.async_array.codec_pipeline)
    if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
        codecs = list(codecs[0].codecs)
    _, _, bytes_codecs = codecs_from_list(codecs)
    if len(bytes_codecs) != 1:
        return None
    (codec,) = bytes_codecs
    if isinstance(codec, ZstdCodec):
        return numcodecs.Zstd(level=codec.level)
    if isinstance(codec, BloscCodec):
        return codec._blosc_codec
    if isinstance(codec, GzipCodec):
        return numcodecs.GZip(codec.level)
    return getattr(codec, "_codec", None)


def zstd_frame_without_size(payload: bytes) -> bytes:
    """A valid zstd frame of raw blocks that does not declare its content size (the
    header of a streamed frame), so only decoding tells how long it is."""
    frame = bytearray(b"\x28\xb5\x2f\xfd")  # magic
    frame += bytes([0x00, 0x50])  # no content size, no dictionary; window 1 MiB
    blocks = [payload[i : i + (1 << 17)] for i in range(0, len(payload), 1 << 17)] or [b""]
    for n, block in enumerate(blocks):
        last = n == len(blocks) - 1
        frame += (int(last) | (len(block) << 3)).to_bytes(3, "little")  # raw block
        frame += block
    return bytes(frame)


def _chunks_per_shard(arr: zarr.Array, codec: ShardingCodec) -> tuple[int, ...]:
    return tuple(
        s // c for s, c in zip(arr.metadata.chunk_grid.chunk_shape, codec.chunk_shape, strict=True)
    )


def _sharding(arr: zarr.Array) -> ShardingCodec:
    (codec,) = list(arr.async_array.codec_pipeline)
    assert isinstance(codec, ShardingCodec)
    return codec


def write_shard(
    arr: zarr.Array, shard: tuple[int, ...], chunks: Mapping[tuple[int, ...], bytes]
) -> None:
    """Write shard ``shard`` of ``arr`` from the encoded bytes of its inner chunks (by
    coordinates inside the shard; the others absent), with a correct index."""
    codec = _sharding(arr)
    chunks_per_shard = _chunks_per_shard(arr, codec)
    index_size = codec._shard_index_size(chunks_per_shard)
    at_start = codec.index_location == ShardingCodecIndexLocation.start
    index = _ShardIndex.create_empty(chunks_per_shard)
    offset = index_size if at_start else 0
    for coords, blob in chunks.items():
        index.set_chunk_slice(coords, slice(offset, offset + len(blob)))
        offset += len(blob)
    encoded = sync(codec._encode_shard_index(index)).to_bytes()
    body = b"".join(chunks.values())
    path = chunk_file(arr, shard)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encoded + body if at_start else body + encoded)


def replace_inner_chunk(
    arr: zarr.Array, shard: tuple[int, ...], inner: tuple[int, ...], data: bytes | None
) -> None:
    """Rewrite shard ``shard`` of ``arr`` so that inner chunk ``inner`` holds ``data``
    (None: absent), keeping the other inner chunks."""
    codec = _sharding(arr)
    chunks_per_shard = _chunks_per_shard(arr, codec)
    blob = chunk_file(arr, shard).read_bytes()
    index_size = codec._shard_index_size(chunks_per_shard)
    at_start = codec.index_location == ShardingCodecIndexLocation.start
    raw_index = blob[:index_size] if at_start else blob[-index_size:]
    prototype = zarr.core.buffer.default_buffer_prototype()
    index = sync(
        codec._decode_shard_index(prototype.buffer.from_bytes(raw_index), chunks_per_shard)
    )
    chunks: dict[tuple[int, ...], bytes] = {}
    for coords in np.ndindex(*chunks_per_shard):
        span = index.get_chunk_slice(coords)
        if coords == tuple(inner):
            if data is not None:
                chunks[coords] = data
        elif span is not None:
            chunks[coords] = blob[span[0] : span[1]]
    write_shard(arr, shard, chunks)
