"""Reading one chunk of one zarr array: fetch its bytes, then decode them.

The two steps are kept apart because they are bound by different things: fetching
waits on a disk or a network (many may be in flight), decoding burns a CPU core (about
one per core). The scheduler runs them in separate stages.

Fetching is written once, as a small *plan* (a generator that yields the byte
requests it needs and receives their results), and run by a sync driver for stores
that read synchronously (local files, memory) or an async driver for the others
(HTTP, S3), on zarr's own event loop where those stores live.

Decoding uses the array's own zarr codecs, called synchronously (``_decode_sync``)
in the caller's thread; the rare codec without a sync path goes through zarr's async
codec pipeline instead.

Sharded arrays (Zarr v3): the unit is the inner chunk. Its plan reads the shard's
index once (cached, and shared by concurrent requests for the same shard), then only
the byte range of that inner chunk.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np
from numcodecs.compat import ensure_ndarray_like
from zarr.abc.codec import SupportsSyncCodec
from zarr.abc.store import (
    ByteRequest,
    RangeByteRequest,
    SuffixByteRequest,
    SupportsGetSync,
)
from zarr.codecs.sharding import ShardingCodec, ShardingCodecIndexLocation, _ShardIndex
from zarr.core.array_spec import ArraySpec
from zarr.core.buffer import Buffer, BufferPrototype, NDBuffer, default_buffer_prototype
from zarr.core.codec_pipeline import BatchedCodecPipeline, codecs_from_list
from zarr.core.sync import _get_loop, sync

from .info import ScaleInfo

__all__ = ["ChunkSource", "RawChunk"]

#: Shard indexes kept per array; an index costs 16 bytes per inner chunk.
SHARD_INDEX_CACHE_SIZE = 4096


@dataclass(frozen=True)
class _Read:
    """A plan step: read ``key`` (optionally only ``byte_range``) from the store."""

    key: str
    byte_range: ByteRequest | None = None


@dataclass(frozen=True)
class _Await:
    """A plan step: wait until another request has produced ``future``'s result."""

    future: Future


_Plan = Generator[_Read | _Await, Any, "RawChunk"]


class _IndexReadAbandoned(Exception):
    """The request reading a shard index was cancelled; a waiter should read it."""


@dataclass(frozen=True)
class RawChunk:
    """The encoded bytes of one chunk (None when the chunk does not exist)."""

    data: Buffer | None
    nbytes_fetched: int


class _SyncDecoder:
    """Decodes one encoded chunk with a fixed codec chain and chunk spec."""

    def __init__(self, codecs: Any, spec: ArraySpec):
        aa, ab, bb = codecs_from_list(list(codecs))
        # Resolve the spec each codec sees, as zarr's BatchedCodecPipeline does.
        steps: list[tuple[Any, ArraySpec]] = []
        for codec in aa:
            steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        steps.append((ab, spec))
        spec = ab.resolve_metadata(spec)
        for codec in bb:
            steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        self._steps = steps[::-1]
        self._codecs = list(codecs)
        self._spec = steps[0][1]
        self._is_sync = all(isinstance(c, SupportsSyncCodec) for c, _ in steps)

    def __call__(self, data: Buffer) -> np.ndarray:
        if self._is_sync:
            out: Any = data
            for codec, spec in self._steps:
                out = codec._decode_sync(out, spec)
        else:
            pipeline = BatchedCodecPipeline.from_codecs(self._codecs)
            (out,) = sync(pipeline.decode([(data, self._spec)]))
        assert isinstance(out, NDBuffer)
        return out.as_numpy_array()


class _V2Decoder:
    """Decodes one Zarr v2 chunk: compressor, then filters in reverse, then reshape.

    zarr-python's V2Codec only offers an async path (one thread hop per codec); this is
    the same sequence of numcodecs calls, run in the caller's thread.
    """

    def __init__(self, codec: Any, shape: tuple[int, ...], dtype: np.dtype, order: str):
        self._compressor = codec.compressor
        self._filters = tuple(reversed(codec.filters or ()))
        self._shape = shape
        self._dtype = dtype
        self._order = order

    def __call__(self, data: Buffer) -> np.ndarray:
        chunk: Any = data.as_array_like()
        if self._compressor is not None:
            chunk = self._compressor.decode(chunk)
        for f in self._filters:
            chunk = f.decode(chunk)
        arr = ensure_ndarray_like(chunk).view(self._dtype).reshape(-1, order="A")
        return arr.reshape(self._shape, order=self._order)  # type: ignore[call-overload]


class _ShardIndexCache:
    """Shard indexes by shard coordinates, LRU-bounded, with in-flight deduplication."""

    def __init__(self, maxsize: int):
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[int, ...], Future] = OrderedDict()

    def claim(self, shard: tuple[int, ...]) -> tuple[Future, bool]:
        """The future of a shard's index, and whether the caller must produce it."""
        with self._lock:
            fut = self._entries.get(shard)
            if fut is not None:
                self._entries.move_to_end(shard)
                return fut, False
            fut = Future()
            self._entries[shard] = fut
            while len(self._entries) > self._maxsize:
                self._entries.popitem(last=False)
            return fut, True

    def forget(self, shard: tuple[int, ...], fut: Future) -> None:
        """Drop a failed entry so that a later request retries."""
        with self._lock:
            if self._entries.get(shard) is fut:
                del self._entries[shard]


class ChunkSource:
    """Fetches and decodes the chunks of one level (one zarr array)."""

    def __init__(self, scale: ScaleInfo):
        async_array = scale.array.async_array
        self.scale = scale
        self.store = async_array.store_path.store
        self._prefix = async_array.store_path.path
        self._metadata = async_array.metadata
        self._prototype: BufferPrototype = default_buffer_prototype()
        #: Whether the store reads synchronously (then an IO thread runs the plan).
        self.is_sync = isinstance(self.store, SupportsGetSync)
        codecs = list(async_array.codec_pipeline)
        config = async_array.config
        self._sharding: ShardingCodec | None = None
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            self._init_sharding(codecs[0], config)
        elif async_array.metadata.zarr_format == 2:
            self._decode = _V2Decoder(
                codecs[0], async_array.chunks, scale.dtype, async_array.metadata.order
            )
        else:
            spec = async_array.metadata.get_chunk_spec((0,) * scale.ndim, config, self._prototype)
            self._decode = _SyncDecoder(codecs, spec)

    def _init_sharding(self, codec: ShardingCodec, config: Any) -> None:
        shard_shape = self._metadata.chunk_grid.chunk_shape
        shard_spec = self._metadata.get_chunk_spec((0,) * len(shard_shape), config, self._prototype)
        self._sharding = codec
        self._chunks_per_shard = tuple(
            s // c for s, c in zip(shard_shape, codec.chunk_shape, strict=True)
        )
        index_size = codec._shard_index_size(self._chunks_per_shard)
        if codec.index_location == ShardingCodecIndexLocation.start:
            self._index_range: ByteRequest = RangeByteRequest(0, index_size)
        else:
            self._index_range = SuffixByteRequest(index_size)
        self._decode_index = _SyncDecoder(
            codec.index_codecs, codec._get_index_chunk_spec(self._chunks_per_shard)
        )
        self._decode = _SyncDecoder(codec.codecs, codec._get_chunk_spec(shard_spec))
        self._shard_indexes = _ShardIndexCache(SHARD_INDEX_CACHE_SIZE)

    @property
    def window_key(self) -> object:
        """Requests to the same store share one in-flight window."""
        return id(self.store)

    # -- fetching ---------------------------------------------------------------------

    def _key(self, coords: tuple[int, ...]) -> str:
        key = self._metadata.encode_chunk_key(coords)
        return f"{self._prefix}/{key}" if self._prefix else key

    def _plan(self, index: tuple[int, ...]) -> _Plan:
        if self._sharding is None:
            data = yield _Read(self._key(index))
            return RawChunk(data, 0 if data is None else len(data))
        shard = tuple(i // n for i, n in zip(index, self._chunks_per_shard, strict=True))
        inner = tuple(i % n for i, n in zip(index, self._chunks_per_shard, strict=True))
        shard_index, fetched = yield from self._shard_index_plan(shard)
        byte_slice = None if shard_index is None else shard_index.get_chunk_slice(inner)
        if byte_slice is None:  # the whole shard, or this inner chunk, is empty
            return RawChunk(None, fetched)
        data = yield _Read(self._key(shard), RangeByteRequest(*byte_slice))
        return RawChunk(data, fetched + (0 if data is None else len(data)))

    def _shard_index_plan(
        self, shard: tuple[int, ...]
    ) -> Generator[_Read | _Await, Any, tuple[_ShardIndex | None, int]]:
        """A shard's index (None if the shard is missing) and the bytes fetched for it.

        The first request for a shard reads the index; concurrent ones wait for it. If
        that first request is cancelled, a waiter takes over.
        """
        while True:
            fut, mine = self._shard_indexes.claim(shard)
            if not mine:
                try:
                    return (fut.result() if fut.done() else (yield _Await(fut))), 0
                except _IndexReadAbandoned:
                    continue
            try:
                raw = yield _Read(self._key(shard), self._index_range)
                shard_index = None if raw is None else _ShardIndex(self._decode_index(raw))
            except BaseException as err:
                self._shard_indexes.forget(shard, fut)
                cancelled = isinstance(err, asyncio.CancelledError | GeneratorExit)
                fut.set_exception(_IndexReadAbandoned() if cancelled else err)
                raise
            fut.set_result(shard_index)
            return shard_index, 0 if raw is None else len(raw)

    @staticmethod
    def _drive_sync(plan: _Plan, perform: Any) -> RawChunk:
        """Run a plan to completion, performing each step with ``perform(step)``."""
        try:
            step = next(plan)
            while True:
                try:
                    result = perform(step)
                except BaseException as err:
                    step = plan.throw(err)
                else:
                    step = plan.send(result)
        except StopIteration as stop:
            return stop.value

    def fetch_sync(self, index: tuple[int, ...]) -> RawChunk:
        """Fetch a chunk's bytes from a synchronous store, in the calling thread."""

        def perform(step: _Read | _Await) -> Any:
            if isinstance(step, _Await):
                return step.future.result()
            return self.store.get_sync(  # type: ignore[attr-defined]
                step.key, prototype=self._prototype, byte_range=step.byte_range
            )

        return self._drive_sync(self._plan(index), perform)

    async def fetch_async(self, index: tuple[int, ...]) -> RawChunk:
        """Fetch a chunk's bytes from an asynchronous store, on zarr's event loop."""
        plan = self._plan(index)
        try:
            step = next(plan)
            while True:
                try:
                    if isinstance(step, _Await):
                        # shield: cancelling this request must not cancel the shared read
                        result = await asyncio.shield(asyncio.wrap_future(step.future))
                    else:
                        result = await self.store.get(step.key, self._prototype, step.byte_range)
                except BaseException as err:
                    step = plan.throw(err)
                else:
                    step = plan.send(result)
        except StopIteration as stop:
            return stop.value

    @staticmethod
    def io_loop() -> asyncio.AbstractEventLoop:
        """The event loop that asynchronous stores run on (zarr's own)."""
        return _get_loop()

    # -- decoding ---------------------------------------------------------------------

    def decode(self, index: tuple[int, ...], raw: RawChunk) -> np.ndarray:
        """Decode a fetched chunk to a read-only array cropped to the array bounds.

        A missing chunk is the array's fill value, as a broadcast view that holds no
        memory of its own.
        """
        shape = self.scale.chunk_data_shape(index)
        if raw.data is None:
            return np.broadcast_to(np.asarray(self.scale.fill_value, self.scale.dtype), shape)
        arr = self._decode(raw.data)
        if arr.shape != shape:
            arr = np.ascontiguousarray(arr[tuple(slice(0, n) for n in shape)])
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr.flags.writeable = False
        return arr
