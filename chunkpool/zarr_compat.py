"""Every zarr-python name chunkpool uses that is not zarr's public API, in one place.

zarr-python may rename or drop these in any release; ``tests/test_zarr_compat.py``
checks that the installed zarr is one of :data:`CHECKED_ZARR_VERSIONS` (or shares
their major.minor) and that each name below still exists. When a new zarr is
supported, check each one, then add its version.

Private modules (``zarr.core``):

- ``zarr.core.array_spec.ArraySpec``: the spec (shape, dtype, fill value, prototype) a
  codec decodes against; the fast decoders hand it to each codec as zarr does.
- ``zarr.core.codec_pipeline.codecs_from_list``: splits an array's codecs into
  array-to-array, array-to-bytes and bytes-to-bytes, to run them one by one.
- ``zarr.core.chunk_key_encodings.DefaultChunkKeyEncoding`` / ``V2ChunkKeyEncoding``:
  recognising zarr's two standard encodings, to build chunk keys without a call each.
- ``zarr.core.sync.sync`` / ``_get_loop``: running a codec without a synchronous path on
  zarr's own event loop, and that loop (where asynchronous stores' reads run).
- ``zarr.core.array.get_array_metadata`` and ``zarr.storage._common.make_store_path``:
  the array probe ``zarr.open`` makes, on the store path it makes, run here at the same
  time as the group probe (:func:`open_node`: one round trip, not two).

Private names of zarr objects:

- ``zarr.codecs.sharding._ShardIndex``: a shard index read once and cached.
- ``ShardingCodec._shard_index_size``, ``._get_index_chunk_spec``, ``._get_chunk_spec``:
  where a shard's index is, and the specs its index and inner chunks decode with.
- ``<codec>._decode_sync`` (of codecs that are ``SupportsSyncCodec``): a codec's decode
  without a task on zarr's loop.
- ``ZstdCodec._zstd_codec``, ``BloscCodec._blosc_codec``, the ``_codec`` of the
  ``zarr.codecs.numcodecs`` wrappers: the numcodecs compressor behind a codec, which
  decodes into a recycled buffer after checking the frame's size.
- ``WrapperStore._store``: the store a wrapper wraps (finding a ``RemoteStore`` under
  wrappers, naming a store; setting it in ``DiskCacheStore._with_store``).
- ``Group._async_group``: a group's asynchronous twin, to read the metadata of several
  of its members concurrently (:func:`members`: one round trip for all the levels of
  a remote image, not one each).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import zarr
from zarr.codecs.sharding import _ShardIndex as ShardIndex
from zarr.core.array import get_array_metadata
from zarr.core.array_spec import ArraySpec
from zarr.core.chunk_key_encodings import DefaultChunkKeyEncoding, V2ChunkKeyEncoding
from zarr.core.codec_pipeline import codecs_from_list
from zarr.core.sync import _get_loop, sync
from zarr.errors import NodeTypeValidationError
from zarr.storage._common import make_store_path

__all__ = [
    "CHECKED_ZARR_VERSIONS",
    "PRIVATE_ATTRIBUTES",
    "ArraySpec",
    "DefaultChunkKeyEncoding",
    "ShardIndex",
    "V2ChunkKeyEncoding",
    "codecs_from_list",
    "decode_sync",
    "inner_chunk_spec",
    "members",
    "numcodecs_compressor",
    "open_node",
    "set_wrapped_store",
    "shard_index_size",
    "shard_index_spec",
    "sync",
    "wrapped_store",
    "zarr_loop",
]

#: zarr-python releases these names were checked against.
CHECKED_ZARR_VERSIONS = ("3.1.6",)

#: ``(owner, attribute)`` for each private attribute used below: the owner is a class,
#: or for instance attributes the dotted name of a class the test makes an instance of.
PRIVATE_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("zarr.codecs.ShardingCodec", "_shard_index_size"),
    ("zarr.codecs.ShardingCodec", "_get_index_chunk_spec"),
    ("zarr.codecs.ShardingCodec", "_get_chunk_spec"),
    ("zarr.codecs.ZstdCodec", "_decode_sync"),
    ("zarr.codecs.ZstdCodec", "_zstd_codec"),
    ("zarr.codecs.BloscCodec", "_blosc_codec"),
    ("zarr.codecs.numcodecs.LZ4", "_codec"),
    ("zarr.storage.WrapperStore", "_store"),
    ("zarr.Group", "_async_group"),
)


def zarr_loop() -> asyncio.AbstractEventLoop:
    """zarr's own event loop (started on first use), where asynchronous stores live."""
    return _get_loop()


def decode_sync(codec: Any, data: Any, spec: ArraySpec) -> Any:
    """``codec``'s decode of ``data`` in this thread (a ``SupportsSyncCodec`` codec)."""
    return codec._decode_sync(data, spec)


def numcodecs_compressor(codec: Any) -> Any | None:
    """The numcodecs compressor inside a zarr zstd, blosc or numcodecs-wrapper codec,
    or None for any other codec."""
    from zarr.codecs import BloscCodec, ZstdCodec

    if isinstance(codec, ZstdCodec):
        return codec._zstd_codec
    if isinstance(codec, BloscCodec):
        return codec._blosc_codec
    return getattr(codec, "_codec", None)  # zarr.codecs.numcodecs wrappers


def shard_index_size(codec: Any, chunks_per_shard: tuple[int, ...]) -> int:
    """The byte size of a shard's index, for a ``ShardingCodec``."""
    return codec._shard_index_size(chunks_per_shard)


def shard_index_spec(codec: Any, chunks_per_shard: tuple[int, ...]) -> ArraySpec:
    """The spec a shard's index decodes with, for a ``ShardingCodec``."""
    return codec._get_index_chunk_spec(chunks_per_shard)


def inner_chunk_spec(codec: Any, shard_spec: ArraySpec) -> ArraySpec:
    """The spec of a shard's inner chunks, for a ``ShardingCodec``."""
    return codec._get_chunk_spec(shard_spec)


def wrapped_store(store: Any) -> Any:
    """The store a ``WrapperStore`` wraps."""
    return store._store


def set_wrapped_store(wrapper: Any, store: Any) -> None:
    """Make a (copied) ``WrapperStore`` wrap ``store``."""
    wrapper._store = store


def members(group: zarr.Group, paths: Sequence[str]) -> list[zarr.Array | zarr.Group | Exception]:
    """``group[path]`` for each of ``paths``, their metadata read concurrently on zarr's
    loop; for each, the node or the exception reading it raised (KeyError: none)."""
    parent = group._async_group

    async def one(path: str) -> Any:
        try:
            return await parent.getitem(path)
        except Exception as err:  # returned, for the caller to describe per path
            return err

    async def every() -> list[Any]:
        return await asyncio.gather(*(one(path) for path in paths))

    nodes = sync(every())
    return [
        node
        if isinstance(node, Exception)
        else zarr.Array(node)
        if isinstance(node, zarr.AsyncArray)
        else zarr.Group(node)
        for node in nodes
    ]


class _SharedReads(zarr.storage.WrapperStore[Any]):
    """``store``, with the whole-object reads of one key (under way or done) shared:
    the array probe and the group probe both read ``zarr.json`` and ``.zattrs``, and
    each key is read once (a cached document, or a remote one, is fetched once)."""

    def __init__(self, store: Any):
        super().__init__(store)
        self._reads: dict[str, asyncio.Future[Any]] = {}

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        read = self._reads.get(key)
        if read is None:
            read = self._reads[key] = asyncio.ensure_future(self._store.get(key, prototype))
        return await asyncio.shield(read)


async def _open_node(store: Any) -> zarr.AsyncArray | zarr.AsyncGroup:
    from zarr.api.asynchronous import open_group

    store_path = await make_store_path(store, mode="r")
    probed = zarr.storage.StorePath(_SharedReads(store_path.store), store_path.path)
    metadata, group = await asyncio.gather(
        get_array_metadata(probed, zarr_format=None),
        open_group(store=probed, mode="r"),
        return_exceptions=True,
    )
    if not isinstance(metadata, BaseException):
        zarr_format = metadata["zarr_format"]
        if zarr_format == 2 or metadata.get("node_type") == "array":
            return zarr.AsyncArray(store_path=store_path, metadata=metadata)
    elif not isinstance(metadata, AssertionError | FileNotFoundError | NodeTypeValidationError):
        raise metadata  # as zarr.open: only "no array here" falls through to the group
    if isinstance(group, BaseException):
        raise group
    return zarr.AsyncGroup(metadata=group.metadata, store_path=store_path)  # on the store


def open_node(store: Any) -> zarr.Array | zarr.Group:
    """What ``zarr.open(store, mode="r")`` opens (an array if there is one, else a
    group), in one round trip: ``zarr.open`` probes for an array, and only then, in a
    second round of reads, for a group; here both probes are sent at once (and share
    the reads of the keys both read)."""
    node = sync(_open_node(store))
    return zarr.Array(node) if isinstance(node, zarr.AsyncArray) else zarr.Group(node)
