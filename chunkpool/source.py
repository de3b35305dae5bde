"""Reading one chunk of one zarr array: fetch its bytes, then decode them.

The two steps are kept apart because they are bound by different things: fetching
waits on a disk or a network (many may be in flight), decoding burns a CPU core (about
one per core). The scheduler runs them in separate stages.

Fetching is written once, as a small *plan* (a generator that yields the byte
requests it needs and receives their results), and run by a sync driver for stores
that read synchronously (local files, memory) or an async driver for the others
(HTTP, S3), on zarr's own event loop where those stores live. Local files are read
with ``preadv`` into recycled buffers (:mod:`chunkpool.buffers`).

Decoding uses the array's own codecs. The common layout (raw bytes behind at most one
numcodecs compressor: zstd, blosc, lz4, zlib, gzip) is decoded straight into a
recycled buffer, after the frame's own header said it holds exactly the chunk
(:mod:`chunkpool.frames`); any other chain runs zarr's codecs synchronously
(``_decode_sync``), and the rare codec without a sync path runs its async decode on
zarr's loop. Whatever the path, a chunk that does not decode to exactly its declared
shape fails with :class:`~chunkpool.errors.ChunkDecodeError`: never trust what a
recycled buffer held before. What the pool keeps (decoded chunks, shard indexes) owns
its memory, or views memory that nothing else reuses.

Sharded arrays (Zarr v3): the unit is the inner chunk. Its plan reads the shard's
index once (cached, and shared by concurrent requests for the same shard), then only
the byte range of that inner chunk.
"""

from __future__ import annotations

import asyncio
import errno
import math
import operator
import os
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import numcodecs
import numpy as np
from numcodecs.compat import ensure_ndarray_like
from zarr.abc.buffer import NDBuffer
from zarr.abc.codec import SupportsSyncCodec
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    SuffixByteRequest,
    SupportsGetSync,
)
from zarr.buffer import default_buffer_prototype
from zarr.codecs import BytesCodec, GzipCodec
from zarr.codecs.sharding import ShardingCodec, ShardingCodecIndexLocation
from zarr.storage import LocalStore, WrapperStore

from . import native
from .buffers import BufferPool, transient_size
from .errors import ChunkDecodeError, ChunkReadError, SourceError
from .frames import IntoDecode, decode_raw, decode_zstd, into_decoder, wrong_size
from .info import ScaleInfo
from .links import StoreRoot
from .retry import RetryPolicy
from .stores import MISSING_OBJECT, check_stamp, describe_error, with_retries
from .zarr_compat import (
    ArraySpec,
    DefaultChunkKeyEncoding,
    ShardIndex,
    V2ChunkKeyEncoding,
    codecs_from_list,
    decode_sync,
    inner_chunk_spec,
    numcodecs_compressor,
    shard_index_size,
    shard_index_spec,
    sync,
    zarr_loop,
)

if TYPE_CHECKING:
    from .procdecode import DecodeProcesses

__all__ = ["ChunkSource", "OpenFiles", "RawChunk", "ShardIndexCache", "close_files"]

#: Default bound on the bytes of the shard indexes a pool keeps (all its levels).
SHARD_INDEX_CACHE_BYTES = 64 << 20

#: Bytes a cached shard index costs beyond its 16 bytes per inner chunk (its entry,
#: key, index object and array header).
INDEX_ENTRY_OVERHEAD = 512

#: Local reads smaller than this are plain ``pread`` calls, not recycled buffers.
SMALL_READ = 1 << 16

#: Directories of a local store remembered as resolving inside its root (then forgotten).
MAX_CHECKED_DIRS = 1 << 16

#: The largest chunk the pool decodes, in bytes. A larger declared chunk (a corrupt or
#: hostile shape, e.g. 2**40 items) fails with ChunkDecodeError before any allocation.
MAX_CHUNK_BYTES = 1 << 31

#: The value of an absent (empty) inner chunk's offset and length in a shard index.
_NO_CHUNK = 2**64 - 1

#: What :meth:`ShardIndexCache.cached` returns for a shard that does not exist.
_MISSING = object()


@dataclass(frozen=True)
class _Read:
    """A plan step: read ``key`` (optionally only ``byte_range``) from the store."""

    key: str
    byte_range: ByteRequest | None = None


@dataclass(frozen=True)
class _Await:
    """A plan step: wait until another request has produced ``future``'s result."""

    future: Future


class _Bytes(NamedTuple):
    """What a read produced: the bytes as a uint8 array, and the recycled buffer that
    holds them from its start (to give back once used), if any."""

    data: np.ndarray
    owner: np.ndarray | None


_Plan = Generator[_Read | _Await, Any, "RawChunk"]


class _IndexReadAbandoned(Exception):
    """The request reading a shard index was cancelled; a waiter should read it."""


class RawChunk(NamedTuple):
    """The encoded bytes of one chunk (None when the chunk does not exist). A named
    tuple: one is made per chunk, and a frozen dataclass costs ~1 µs more to make.
    ``stamp``: the stored object's version: for local files (:func:`file_stamp`) seen
    before reading it, for remote stores the validator its response carried
    (:data:`~chunkpool.stores.RemoteStamp`); None where the store has no such thing."""

    data: np.ndarray | None
    nbytes_fetched: int
    owner: np.ndarray | None = None
    stamp: Stamp | None = None
    #: With decode="processes": the key of a local chunk file not read here (``data``
    #: is then :data:`UNREAD`): the decode process reads it itself.
    unread: str | None = None


#: The ``data`` of a chunk whose file a decode process reads (``RawChunk.unread``).
UNREAD = np.empty(0, np.uint8)
UNREAD.flags.writeable = False


#: A stored object's version: ``(size, mtime_ns)`` of a local file, ``(ETag,
#: Last-Modified)`` of a remote object (:data:`~chunkpool.stores.RemoteStamp`);
#: :data:`ABSENT` for no object.
Stamp = tuple[int, int] | tuple[str, str]
ABSENT: Stamp = MISSING_OBJECT


def file_stamp(path: str) -> Stamp:
    """``(size, mtime_ns)`` of the file at ``path``, :data:`ABSENT` if there is none.
    Taken *before* a read: a write after it changes the stamp, so a refresh sees it."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return ABSENT
    return (st.st_size, st.st_mtime_ns)


def local_root(store: Any) -> str | None:
    """The root directory of the LocalStore under ``store`` (through wrappers), if any."""
    while isinstance(store, WrapperStore):
        store = store._store
    return os.path.join(str(store.root), "") if isinstance(store, LocalStore) else None


class _IntoDecoder:
    """Decodes ``[one compressor] + raw bytes`` straight into a recycled buffer (or, for
    zlib and gzip, into the memory they inflate to), checking the decoded size."""

    def __init__(
        self,
        compressor: Any,
        decode_into: IntoDecode,
        dtype: np.dtype,
        shape: tuple[int, ...],
        order: str,
        buffers: BufferPool,
    ):
        self._compressor = compressor
        self._decode_into = decode_into
        self.dtype = self._dtype = dtype
        self.shape = tuple(shape)
        self._order = order
        self.nbytes = math.prod(shape) * dtype.itemsize
        self._buffers = buffers

    def __call__(self, data: np.ndarray) -> np.ndarray:
        out, recycled = self._decode_into(self._compressor, data, self.nbytes, self._buffers)
        if recycled:
            return self._buffers.hand_out(out, self._dtype, self.shape, self._order)
        return out.view(self._dtype).reshape(self.shape, order=self._order)  # type: ignore[call-overload]

    def native_kind(self) -> bool | None:
        """How :mod:`chunkpool.native` can decode this: True zstd, False raw bytes,
        None not at all."""
        if self._decode_into is decode_zstd and native.zstd_available():
            return True
        return False if self._decode_into is decode_raw else None

    def hand_out(self, out: np.ndarray) -> np.ndarray:
        """The chunk array over ``out``, a recycled buffer of :attr:`nbytes` it filled."""
        return self._buffers.hand_out(out, self._dtype, self.shape, self._order)


class _SyncDecoder:
    """Decodes one encoded chunk with a zarr codec chain and chunk spec."""

    def __init__(self, codecs: Any, spec: ArraySpec):
        aa, ab, bb = codecs_from_list(list(codecs))
        # Resolve the spec each codec sees, as zarr's BatchedCodecPipeline does.
        steps: list[tuple[Any, ArraySpec]] = []
        for codec in aa:
            steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        steps.append((ab, spec))
        #: Bytes the array-to-bytes step must receive, when that is fixed (raw bytes).
        self._serialized_nbytes = (
            math.prod(spec.shape) * spec.dtype.to_native_dtype().itemsize
            if isinstance(ab, BytesCodec)
            else None
        )
        spec = ab.resolve_metadata(spec)
        for codec in bb:
            steps.append((codec, spec))
            spec = codec.resolve_metadata(spec)
        self._steps = [(c, s, isinstance(c, SupportsSyncCodec)) for c, s in steps[::-1]]
        self._n_bytes_steps = len(bb)
        self.shape = tuple(steps[0][1].shape)
        self.nbytes = math.prod(self.shape) * steps[0][1].dtype.to_native_dtype().itemsize
        self._prototype = default_buffer_prototype()

    def __call__(self, data: np.ndarray) -> np.ndarray:
        out: Any = self._prototype.buffer.from_array_like(data)
        for step, (codec, spec, is_sync) in enumerate(self._steps):
            expected = self._serialized_nbytes
            if step == self._n_bytes_steps and expected is not None and len(out) != expected:
                raise wrong_size("chunk decodes to", len(out), expected)
            if is_sync:
                out = decode_sync(codec, out, spec)
            else:  # the rare codec without a sync path: its async decode on zarr's loop
                (out,) = sync(codec.decode([(out, spec)]))
                if out is None:
                    raise ChunkDecodeError(f"{codec} decoded nothing")
        if not isinstance(out, NDBuffer):
            raise ChunkDecodeError(f"the codecs decoded {type(out).__name__}, not an array")
        arr = out.as_numpy_array()
        if arr.shape != self.shape:
            raise ChunkDecodeError(f"chunk decodes to shape {arr.shape}, expected {self.shape}")
        return arr


class _V2Decoder:
    """Decodes one Zarr v2 chunk with filters: compressor, filters in reverse, reshape.

    zarr-python's V2Codec only offers an async path (one thread hop per codec); this is
    the same sequence of numcodecs calls, run in the caller's thread.
    """

    def __init__(self, codec: Any, shape: tuple[int, ...], dtype: np.dtype, order: str):
        self._compressor = codec.compressor
        self._filters = tuple(reversed(codec.filters or ()))
        self.shape = shape
        self.nbytes = math.prod(shape) * dtype.itemsize
        self._dtype = dtype
        self._order = order

    def __call__(self, data: np.ndarray) -> np.ndarray:
        chunk: Any = data
        if self._compressor is not None:
            chunk = self._compressor.decode(chunk)
        for f in self._filters:
            chunk = f.decode(chunk)
        flat = ensure_ndarray_like(chunk).reshape(-1, order="A")
        if flat.nbytes != self.nbytes:
            raise wrong_size("chunk decodes to", flat.nbytes, self.nbytes)
        arr = flat.view(self._dtype)
        return arr.reshape(self.shape, order=self._order)  # type: ignore[call-overload]


def _numcodecs_compressor(codec: Any) -> Any | None:
    """The numcodecs compressor behind a zarr v3 bytes-to-bytes codec, if it decodes
    into a given buffer with a checked size; else None."""
    if isinstance(codec, GzipCodec):
        compressor = numcodecs.GZip(codec.level)
    else:  # zstd, blosc, zarr.codecs.numcodecs wrappers
        compressor = numcodecs_compressor(codec)
    return compressor if compressor is not None and into_decoder(compressor) else None


def _make_decoder(codecs: list[Any], spec: ArraySpec, buffers: BufferPool) -> Any:
    """The fastest decoder for a Zarr v3 codec chain and chunk spec."""
    aa, ab, bb = codecs_from_list(codecs)
    if not aa and isinstance(ab, BytesCodec) and len(bb) <= 1:
        compressor = _numcodecs_compressor(bb[0]) if bb else None
        decode_into = into_decoder(compressor)
        if decode_into is not None and (compressor is not None or not bb):
            dtype = np.dtype(spec.dtype.to_native_dtype())
            if ab.endian is not None and dtype.itemsize > 1:
                dtype = dtype.newbyteorder("<" if ab.endian.value == "little" else ">")
            return _IntoDecoder(compressor, decode_into, dtype, spec.shape, spec.order, buffers)
    return _SyncDecoder(codecs, spec)


def _make_v2_decoder(codec: Any, metadata: Any, buffers: BufferPool) -> Any:
    """The fastest decoder for a Zarr v2 array's V2Codec."""
    dtype = np.dtype(metadata.dtype.to_native_dtype())
    decode_into = into_decoder(codec.compressor)
    if not codec.filters and decode_into is not None:
        return _IntoDecoder(
            codec.compressor, decode_into, dtype, metadata.chunks, metadata.order, buffers
        )
    return _V2Decoder(codec, metadata.chunks, dtype, metadata.order)


class _LocalReader:
    """Reads files of a LocalStore with ``preadv`` into recycled buffers, never through
    a symbolic link out of the store's root (:mod:`chunkpool.links`): each directory
    holding chunk files is resolved once, and files are opened with ``O_NOFOLLOW``."""

    def __init__(self, root: str, buffers: BufferPool):
        self.root = root  #: the store's directory
        self._root_slash = os.path.join(root, "")
        self._buffers = buffers
        self._store_root = StoreRoot(root)
        self._checked_dirs: set[str] = set()  # directories known to resolve inside

    def read(self, key: str, byte_range: ByteRequest | None) -> _Bytes | None:
        """The bytes of ``key`` (None if there is no such file). Raises
        :class:`LinkEscapeError` if reading it would follow a link out of the root."""
        fd = self._open(key)
        if fd is None:
            return None
        try:
            if type(byte_range) is RangeByteRequest:  # (pread stops at the file's end)
                return self.pread(fd, byte_range.start, byte_range.end - byte_range.start)
            start, stop = _byte_span(byte_range, os.fstat(fd).st_size)
            return self.pread(fd, start, stop - start)
        finally:
            os.close(fd)

    def read_stamped(self, key: str) -> tuple[_Bytes | None, Stamp]:
        """The whole file ``key`` (None if there is none) and its stamp, taken with
        ``fstat`` on the open file before reading it: the version read, never a later
        one, at the cost of no second path lookup (each system call here also hands
        the GIL over)."""
        fd, stamp = self.open_stamped(key, None)
        if fd is None:
            return None, stamp
        try:
            return self.pread(fd, 0, stamp[0]), stamp
        finally:
            os.close(fd)

    def open_stamped(self, key: str, files: OpenFiles | None) -> tuple[int | None, Stamp]:
        """A descriptor of ``key`` opened for reading (None if there is no such file,
        :data:`ABSENT` its stamp) and its stamp, taken with ``fstat`` before anything
        is read from it. Raises :class:`LinkEscapeError` for a link out of the root.

        With ``files`` (the caller's), the file stays open there, with that stamp, for
        the caller's next reads of it (the inner chunks of a shard: their stamp is the
        one taken at the first, which is never newer than what they read), and the
        caller closes it (:func:`close_files`)."""
        if files is not None:
            fd = files.get(key)
            if fd is not None:
                return fd, files.stamps[key]
        fd = self._open(key)
        if fd is None:
            return None, ABSENT
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        stamp = (st.st_size, st.st_mtime_ns)
        if files is not None:
            files[key] = fd
            files.stamps[key] = stamp
        return fd, stamp

    def pread(self, fd: int, start: int, length: int) -> _Bytes:
        """``length`` bytes of ``fd`` from ``start`` (fewer at the file's end): small
        reads as bytes of their own, larger ones into a recycled buffer."""
        length = max(0, length)
        if length < SMALL_READ:
            return _Bytes(np.frombuffer(os.pread(fd, length, start), np.uint8), None)
        owner = self._buffers.take(transient_size(length))
        n = os.preadv(fd, [memoryview(owner)[:length]], start)
        return _Bytes(owner[:n], owner)

    def status(self, key: str) -> os.stat_result | None:
        """``lstat`` of ``key`` (None if there is no such file), its directory checked
        as :meth:`checked_path` checks it; a link is not followed (its own status)."""
        try:
            return os.lstat(self.checked_path(key))
        except (FileNotFoundError, NotADirectoryError):
            return None

    def checked_path(self, key: str) -> str:
        """The path of ``key``, its directory known to resolve inside the root (the
        file itself is opened with ``O_NOFOLLOW``). Raises :class:`LinkEscapeError`."""
        directory = key.rpartition("/")[0]
        if directory not in self._checked_dirs:
            self._store_root.check(directory)
            if len(self._checked_dirs) >= MAX_CHECKED_DIRS:
                self._checked_dirs.clear()
            self._checked_dirs.add(directory)
        return self._root_slash + key

    def _open(self, key: str) -> int | None:
        """A descriptor of ``key`` opened for reading, never through a link out of the
        root (None if there is no such file)."""
        path = self.checked_path(key)
        try:
            return os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None
        except OSError as err:
            if err.errno != errno.ELOOP:
                raise
        self._store_root.check(key)  # the file is a link: follow it only inside
        try:
            return os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            return None


#: A chunk read by :meth:`ChunkSource.fetch_decode_native`: its array, the bytes read,
#: the stamp of the file read, and when it was fetched and decoded (``perf_counter``
#: seconds; 0.0 for a missing chunk).
NativeResult = tuple[np.ndarray, int, "Stamp", float, float]


class OpenFiles(dict[str, int]):
    """The files a batch of reads keeps open (key -> descriptor), and the stamp of each
    taken when it was opened (:meth:`_LocalReader.open_stamped`)."""

    __slots__ = ("stamps",)

    def __init__(self) -> None:
        super().__init__()
        self.stamps: dict[str, Stamp] = {}


def close_files(files: OpenFiles) -> None:
    """Close the descriptors that reads with ``files`` left open, and forget them."""
    for fd in files.values():
        os.close(fd)
    files.clear()
    files.stamps.clear()


def _byte_span(byte_range: ByteRequest | None, size: int) -> tuple[int, int]:
    """``[start, stop)`` of a byte request on a file of ``size`` bytes."""
    if byte_range is None:
        return 0, size
    if isinstance(byte_range, RangeByteRequest):
        return byte_range.start, min(byte_range.end, size)
    if isinstance(byte_range, OffsetByteRequest):
        return byte_range.offset, size
    if isinstance(byte_range, SuffixByteRequest):
        return max(0, size - byte_range.suffix), size
    raise TypeError(f"unexpected byte range {byte_range!r}")


class ShardIndexCache:
    """The shard indexes of a pool's arrays by ``(level, shard)``, LRU, bounded in bytes
    (an index costs 16 bytes per inner chunk, plus ``INDEX_ENTRY_OVERHEAD``), with
    in-flight deduplication: concurrent requests for one shard wait for the first.

    ``reserve(nbytes) -> bool`` and ``release(nbytes)`` (the pool's) are told of the
    bytes an index takes and gives back; an index ``reserve`` refuses is used for the
    reads waiting on it, and not kept. They are called without this cache's lock, so
    the pool may call :meth:`evict` and :meth:`clear` under its own.
    """

    def __init__(
        self,
        max_bytes: int = SHARD_INDEX_CACHE_BYTES,
        reserve: Callable[[int], bool] | None = None,
        release: Callable[[int], None] | None = None,
    ):
        if max_bytes < 0:
            raise ValueError(f"index_cache_bytes must be >= 0, not {max_bytes}")
        self.max_bytes = max_bytes
        self._reserve = reserve
        self._release = release
        self._lock = threading.Lock()
        # a Future while being read, then (index or None for a missing shard, bytes,
        # the shard file's stamp when it was read, or None)
        self._entries: OrderedDict[tuple[int, tuple[int, ...]], Any] = OrderedDict()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def claim(
        self, key: tuple[int, tuple[int, ...]], stamp: Stamp | None = None
    ) -> tuple[Any, Future | None, bool]:
        """``(entry, None, False)`` for a cached index (``entry[0]`` is the index, None
        for a missing shard); else ``(None, future, mine)``: whether the caller must
        read it (then :meth:`store` or :meth:`forget` it), or wait for ``future``.
        A cached index read from another version of the shard than ``stamp`` (the
        file's now, if known) is stale: it is forgotten and read again."""
        with self._lock:
            entry = self._entries.get(key)
            stale = 0
            if entry is not None and type(entry) is not Future and _stale(entry, stamp):
                del self._entries[key]
                stale = entry[1]
                self.nbytes -= stale
                entry = None
            if entry is None:
                fut: Future = Future()
                self._entries[key] = fut
                result: tuple[Any, Future | None, bool] = (None, fut, True)
            elif type(entry) is Future:
                result = (None, entry, False)
            else:
                self._entries.move_to_end(key)
                result = (entry, None, False)
        if stale and self._release is not None:
            self._release(stale)
        return result

    def cached(self, key: tuple[int, tuple[int, ...]], stamp: Stamp | None = None) -> Any:
        """A shard's index if it was read already (``_MISSING`` if the shard does not
        exist), else None (not read, being read, failed, or read from another version
        of the shard than ``stamp``)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or type(entry) is Future or _stale(entry, stamp):
                return None
            self._entries.move_to_end(key)
        return _MISSING if entry[0] is None else entry[0]

    def cached_entry(self, key: tuple[int, tuple[int, ...]]) -> tuple[Any, Stamp | None] | None:
        """``(index, stamp)`` of a shard whose index was read (the shard's version it was
        read from, or None), whichever version the file is now; None if not read (or
        missing: ``_MISSING`` shards are not returned)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or type(entry) is Future or entry[0] is None:
                return None
            self._entries.move_to_end(key)
        return entry[0], entry[2]

    def store(
        self,
        key: tuple[int, tuple[int, ...]],
        fut: Future,
        index: Any,
        stamp: Stamp | None = None,
    ) -> None:
        """Keep the index the caller read (``fut`` already resolved with it) from the
        shard version ``stamp``, if it fits: evicting the least recently used indexes
        to stay within the bound."""
        nbytes = INDEX_ENTRY_OVERHEAD + (0 if index is None else index.offsets_and_lengths.nbytes)
        if nbytes > self.max_bytes or (self._reserve is not None and not self._reserve(nbytes)):
            self.forget(key, fut)
            return
        with self._lock:
            if self._entries.get(key) is not fut:  # cleared meanwhile
                freed = nbytes
            else:
                self._entries[key] = (index, nbytes, stamp)
                self.nbytes += nbytes
                freed = self._evict(self.nbytes - self.max_bytes)
        if freed and self._release is not None:
            self._release(freed)

    def discard(self, key: tuple[int, tuple[int, ...]], stamp: Stamp | None) -> None:
        """Forget a kept index read from the shard version ``stamp`` (another version,
        or one being read, stays): the shard changed since."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None or type(entry) is Future or entry[2] != stamp:
                return
            del self._entries[key]
            self.nbytes -= entry[1]
        if self._release is not None:
            self._release(entry[1])

    def forget(self, key: tuple[int, tuple[int, ...]], fut: Future) -> None:
        """Drop an entry being read (a failed or refused read): a later request reads it."""
        with self._lock:
            if self._entries.get(key) is fut:
                del self._entries[key]

    def evict(self, nbytes: int) -> int:
        """Evict the least recently used indexes until ``nbytes`` are freed (or none is
        left); returns the bytes freed. :meth:`release` is not called."""
        with self._lock:
            return self._evict(nbytes)

    def clear(self) -> int:
        """Forget everything (reads in flight are then not kept); returns the bytes freed."""
        with self._lock:
            freed, self.nbytes = self.nbytes, 0
            self._entries.clear()
            return freed

    def _evict(self, nbytes: int) -> int:
        freed = 0
        if nbytes <= 0:
            return 0
        gone = []
        for key, entry in self._entries.items():  # oldest first; reads in flight stay
            if type(entry) is not Future:
                gone.append(key)
                freed += entry[1]
                if freed >= nbytes:
                    break
        for key in gone:
            del self._entries[key]
        self.nbytes -= freed
        return freed


def _stale(entry: tuple[Any, int, Stamp | None], stamp: Stamp | None) -> bool:
    """Whether a cached shard index was read from another version than ``stamp``."""
    return stamp is not None and entry[2] is not None and entry[2] != stamp


class ChunkSource:
    """Fetches and decodes the chunks of one level (one zarr array)."""

    def __init__(
        self,
        scale: ScaleInfo,
        buffers: BufferPool,
        *,
        name: str = "",
        retry: RetryPolicy | None = None,
        shard_indexes: ShardIndexCache | None = None,
        processes: DecodeProcesses | None = None,
    ):
        #: Where present chunks are decoded, with decode="processes" (None: here).
        self.processes = processes
        async_array = scale.array.async_array
        #: Where this level's shard indexes are kept (the pool's, shared by its levels).
        self._shard_indexes = shard_indexes if shard_indexes is not None else ShardIndexCache()
        self._fills: dict[tuple[int, ...], np.ndarray] = {}  # fill-value chunks by shape
        self.scale = scale
        self.name = name  # the store's display name, for messages (no credentials)
        self.store = async_array.store_path.store
        self._prefix = async_array.store_path.path
        self._metadata = async_array.metadata
        self._buffers = buffers
        self._prototype = default_buffer_prototype()
        self._full_grid: tuple[int, ...] | None = None  # chunks not cut by the array's edge
        #: Whether the store reads synchronously (then an IO thread runs the plan).
        self.is_sync = isinstance(self.store, SupportsGetSync)
        # Asynchronous (remote) reads are retried by one RemoteStore layer: the one
        # open_node put in, or, for a node opened elsewhere, one with ``retry``.
        self._remote = None if self.is_sync else with_retries(self.store, name, retry)
        #: The remote store's read that also says the object's version (stamps), if any.
        self._get_stamped = getattr(self._remote, "get_stamped", None)
        self._local = (
            _LocalReader(str(self.store.root), buffers)
            if isinstance(self.store, LocalStore)
            else None
        )
        #: The directory of the local files under the store (None: not local), whose
        #: versions are stamped at each read (:func:`file_stamp`) for refreshes.
        self.stat_root = local_root(self.store)
        self._sharding: ShardingCodec | None = None
        self._init_keys(self._metadata)
        try:
            self._init_decoders(async_array)
        except Exception as err:  # codecs zarr opened but that cannot decode this array
            where = f"{name}/{self._prefix}" if self._prefix else name
            detail = " ".join(str(err).split())
            raise SourceError(
                f"{where}: its codecs cannot decode chunks ({type(err).__name__}: {detail})"
            ) from err

    def _init_keys(self, metadata: Any) -> None:
        """How :meth:`_key` spells a chunk key: zarr's two standard encodings are
        spelt here (checked against zarr's own spelling once), any other by zarr."""
        self._key_separator: str | None = None
        self._key_c = False
        if metadata.zarr_format == 2:
            separator = metadata.dimension_separator
        elif type(metadata.chunk_key_encoding) is DefaultChunkKeyEncoding:
            separator, self._key_c = metadata.chunk_key_encoding.separator, True
        elif type(metadata.chunk_key_encoding) is V2ChunkKeyEncoding:
            separator = metadata.chunk_key_encoding.separator
        else:
            return
        probe = tuple(range(1, self.scale.ndim + 1))
        expected = metadata.encode_chunk_key(probe)
        self._key_separator = separator
        if self._key(probe) != (f"{self._prefix}/{expected}" if self._prefix else expected):
            self._key_separator = None

    def _init_decoders(self, async_array: Any) -> None:
        codecs = list(async_array.codec_pipeline)
        config = async_array.config
        if len(codecs) == 1 and isinstance(codecs[0], ShardingCodec):
            self._init_sharding(codecs[0], config)
        elif async_array.metadata.zarr_format == 2:
            self._decode = _make_v2_decoder(codecs[0], async_array.metadata, self._buffers)
        else:
            spec = async_array.metadata.get_chunk_spec(
                (0,) * self.scale.ndim, config, self._prototype
            )
            self._decode = _make_decoder(codecs, spec, self._buffers)
        #: Whether :meth:`decode` may skip its general checks for a full chunk: an
        #: _IntoDecoder returns exactly the chunk's shape (its size checked), in memory
        #: that is not the read buffer, and here in native byte order.
        decoder = self._decode
        self._plain_decode = (
            isinstance(decoder, _IntoDecoder)
            and decoder.nbytes <= MAX_CHUNK_BYTES
            and decoder.dtype.isnative
            and decoder.shape == tuple(self.scale.chunk_shape)
        )
        #: How :meth:`fetch_decode_native` decodes (True zstd, False raw), or None: it
        #: does not apply (not a local store, not decoded here, another codec).
        self.native = (
            self.native_kind() if self._local is not None and self.processes is None else None
        )

    def native_kind(self) -> bool | None:
        """How :mod:`chunkpool.native` decodes this level's full chunks, wherever they
        are read (True zstd, False raw bytes; None: it does not apply)."""
        if not (native.AVAILABLE and self._plain_decode):
            return None
        return self._decode.native_kind()

    def _init_sharding(self, codec: ShardingCodec, config: Any) -> None:
        shard_shape = self._metadata.chunk_grid.chunk_shape
        shard_spec = self._metadata.get_chunk_spec((0,) * len(shard_shape), config, self._prototype)
        self._sharding = codec
        self._chunks_per_shard = tuple(
            s // c for s, c in zip(shard_shape, codec.chunk_shape, strict=True)
        )
        index_size = shard_index_size(codec, self._chunks_per_shard)
        if codec.index_location == ShardingCodecIndexLocation.start:
            self._index_range: ByteRequest = RangeByteRequest(0, index_size)
        else:
            self._index_range = SuffixByteRequest(index_size)
        self._decode_index = _SyncDecoder(
            codec.index_codecs, shard_index_spec(codec, self._chunks_per_shard)
        )
        inner_spec = inner_chunk_spec(codec, shard_spec)
        self._decode = _make_decoder(list(codec.codecs), inner_spec, self._buffers)

    @property
    def window_key(self) -> object:
        """Requests to the same store share one in-flight window."""
        return id(self.store)

    # -- fetching ---------------------------------------------------------------------

    def _key(self, coords: tuple[int, ...]) -> str:
        sep = self._key_separator
        if sep is None:
            key = self._metadata.encode_chunk_key(coords)
        elif self._key_c:  # zarr's two standard encodings, without their call overhead
            key = sep.join(("c", *map(str, coords)))
        else:
            key = sep.join(map(str, coords)) or "0"
        return f"{self._prefix}/{key}" if self._prefix else key

    def stored_key(self, index: tuple[int, ...]) -> str:
        """The store key of the object holding chunk ``index``: its file, or its shard's."""
        if self._sharding is None:
            return self._key(index)
        return self._key(tuple(map(operator.floordiv, index, self._chunks_per_shard)))

    def stamp(self, index: tuple[int, ...]) -> Stamp | None:
        """The version of the object holding chunk ``index`` now (None: not local)."""
        root = self.stat_root
        return None if root is None else file_stamp(root + self.stored_key(index))

    async def remote_stamp(self, index: tuple[int, ...], stamp: Stamp) -> Stamp | None:
        """The version of the remote object holding chunk ``index`` now, asked with a
        conditional request against ``stamp`` (the version read) or a HEAD; None if the
        store cannot say. Raises ChunkReadError when the store cannot be reached."""
        return await check_stamp(self._remote, self.stored_key(index), stamp)

    def _plan(
        self,
        index: tuple[int, ...],
        stamp: Stamp | None = None,
        seen: list[Stamp | None] | None = None,
    ) -> _Plan:
        """``stamp``: the stored object's version known before reading (local files);
        ``seen``: where a remote driver appends the version each read's response carried
        (then a shard index read from another version than the inner chunk's bytes is
        stale: it is read again, once)."""
        if self._sharding is None:
            read = yield _Read(self._key(index))
            if read is None:
                return RawChunk(None, 0)
            return RawChunk(read.data, read.data.nbytes, read.owner)
        shard = tuple(i // n for i, n in zip(index, self._chunks_per_shard, strict=True))
        inner = tuple(i % n for i, n in zip(index, self._chunks_per_shard, strict=True))
        fetched = 0
        for attempt in range(2):
            shard_index, n, version = yield from self._shard_index_plan(shard, stamp, seen)
            fetched += n
            byte_slice = None if shard_index is None else shard_index.get_chunk_slice(inner)
            if byte_slice is None:  # the whole shard, or this inner chunk, is empty
                return RawChunk(None, fetched, stamp=version)
            try:
                read = yield _Read(self._key(shard), RangeByteRequest(*byte_slice))
            except ChunkReadError:
                # a range the shard does not have (416) from a cached index: the shard
                # may have changed since; read its index again, once
                if seen is None or attempt or n:
                    raise
                self._shard_indexes.discard((self.scale.level, shard), version)
                continue
            if not seen or version is None or seen[-1] == version or attempt:
                break
            # the shard changed since its index was read: read both again
            self._shard_indexes.discard((self.scale.level, shard), version)
            if read is not None:
                fetched += read.data.nbytes
        if read is None:
            return RawChunk(None, fetched, stamp=version)
        return RawChunk(read.data, fetched + read.data.nbytes, read.owner, version)

    def _shard_index_plan(
        self,
        shard: tuple[int, ...],
        stamp: Stamp | None = None,
        seen: list[Stamp | None] | None = None,
    ) -> Generator[_Read | _Await, Any, tuple[ShardIndex | None, int, Stamp | None]]:
        """A shard's index (None if the shard is missing), the bytes fetched for it and
        the shard's version it was read from (``stamp``, or the response's in ``seen``).

        The first request for a shard reads the index; concurrent ones wait for it. If
        that first request is cancelled, a waiter takes over.
        """
        key = (self.scale.level, shard)
        while True:
            entry, fut, mine = self._shard_indexes.claim(key, stamp)
            if fut is None:
                return entry[0], 0, entry[2]
            if not mine:
                try:
                    got = fut.result() if fut.done() else (yield _Await(fut))
                except _IndexReadAbandoned:
                    continue
                return got[0], 0, got[1]
            read = None
            try:
                read = yield _Read(self._key(shard), self._index_range)
                shard_index = None if read is None else self._read_index(shard, read.data)
            except BaseException as err:
                self._shard_indexes.forget(key, fut)
                cancelled = isinstance(err, asyncio.CancelledError | GeneratorExit)
                fut.set_exception(_IndexReadAbandoned() if cancelled else err)
                raise
            finally:
                if read is not None and read.owner is not None:
                    self._buffers.give(read.owner)
            version = stamp if stamp is not None or not seen else seen[-1]
            fut.set_result((shard_index, version))
            self._shard_indexes.store(key, fut, shard_index, version)
            return shard_index, 0 if read is None else read.data.nbytes, version

    def _read_index(self, shard: tuple[int, ...], data: np.ndarray) -> ShardIndex:
        """Decode a shard's index into memory of its own (``data`` may be a read buffer
        that is reused as soon as this returns), and check that every entry is absent
        or a byte range that can exist."""
        try:
            offsets_and_lengths = np.array(self._decode_index(data), np.uint64, order="C")
        except Exception as err:
            raise self._decode_error(f"{self._key(shard)} (shard index)", err) from err
        starts, lengths = offsets_and_lengths[..., 0], offsets_and_lengths[..., 1]
        present = (starts != _NO_CHUNK) | (lengths != _NO_CHUNK)
        if np.any(present & ((starts >= 1 << 62) | (lengths >= 1 << 62))):
            raise ChunkDecodeError(
                f"{self.name}/{self._key(shard)}: shard index holds impossible byte ranges"
            )
        return ShardIndex(offsets_and_lengths)

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

    def fetch_sync(self, index: tuple[int, ...], files: OpenFiles | None = None) -> RawChunk:
        """Fetch a chunk's bytes from a synchronous store, in the calling thread.

        ``files``: see :meth:`_LocalReader.open_stamped` (local stores; the caller
        closes them with :func:`close_files`). Local files are stamped before they are
        read (``raw.stamp``)."""
        if self._local is not None:
            raw = self._fetch_local(index, files)
            if raw is not None:
                return raw
        stamp = None if self.stat_root is None else self.stamp(index)

        def perform(step: _Read | _Await) -> Any:
            if isinstance(step, _Await):
                return step.future.result()
            if self._local is not None:
                return self._read_local(step.key, step.byte_range)
            try:
                buf = self.store.get_sync(  # type: ignore[attr-defined]
                    step.key, prototype=self._prototype, byte_range=step.byte_range
                )
            except Exception as err:
                reason = describe_error(err)
            else:
                return None if buf is None else _Bytes(buf.as_numpy_array(), None)
            # raised outside the handler: the store's exception is neither cause nor context
            raise ChunkReadError(f"{self.name}/{step.key}: {reason}", reason=reason)

        raw = self._drive_sync(self._plan(index, stamp), perform)
        return raw if stamp is None else raw._replace(stamp=stamp)

    def _read_local(self, key: str, byte_range: ByteRequest | None) -> _Bytes | None:
        """Read a local file's bytes; a failure is a ChunkReadError naming the key."""
        assert self._local is not None
        try:
            return self._local.read(key, byte_range)
        except Exception as err:
            reason = describe_error(err)
        # raised outside the handler: the OS error is neither cause nor context
        raise ChunkReadError(f"{self.name}/{key}: {reason}", reason=reason)

    def _fetch_local(self, index: tuple[int, ...], files: OpenFiles | None) -> RawChunk | None:
        """The plan's common cases for local files, without its generator machinery
        (a few µs per chunk), stamped with ``fstat`` of the file read: a whole chunk
        file, or an inner chunk of a shard whose index is already cached. None means:
        run the plan. A failure is a ChunkReadError naming the key.

        With decode="processes" a whole chunk file (a plain file, not a link) is not
        read here but by the decode process (``RawChunk.unread``), stamped with its
        ``lstat``, taken before that read: never a later version than the one read."""
        local = self._local
        assert local is not None
        if self._sharding is None:
            key = self._key(index)
            try:
                if self.processes is not None:  # a decode process reads a plain file
                    st = local.status(key)
                    if st is None:
                        return RawChunk(None, 0, None, ABSENT)
                    if stat.S_ISREG(st.st_mode):  # (a link: read here, as in thread mode)
                        stamp = (st.st_size, st.st_mtime_ns)
                        return RawChunk(UNREAD, st.st_size, None, stamp, key)
                read, stamp = local.read_stamped(key)
            except Exception as err:
                reason = describe_error(err)
            else:
                if read is None:
                    return RawChunk(None, 0, None, stamp)
                return RawChunk(read.data, read.data.nbytes, read.owner, stamp)
            # raised outside the handler: the OS error is neither cause nor context
            raise ChunkReadError(f"{self.name}/{key}: {reason}", reason=reason)
        per = self._chunks_per_shard
        shard = tuple(map(operator.floordiv, index, per))
        key = self._key(shard)
        fd = None
        try:
            fd, stamp = local.open_stamped(key, files)
            shard_index = self._shard_indexes.cached((self.scale.level, shard), stamp)
            if shard_index is None:
                return None
            if shard_index is _MISSING or fd is None:
                return RawChunk(None, 0, None, stamp)
            offset, length = shard_index.offsets_and_lengths[
                tuple(map(operator.mod, index, per))
            ].tolist()
            if offset == _NO_CHUNK and length == _NO_CHUNK:
                return RawChunk(None, 0, None, stamp)
            read = local.pread(fd, offset, length)
            return RawChunk(read.data, read.data.nbytes, read.owner, stamp)
        except Exception as err:
            reason = describe_error(err)
        finally:
            if files is None and fd is not None:
                os.close(fd)
        raise ChunkReadError(f"{self.name}/{key}: {reason}", reason=reason)

    def fetch_decode_native(self, indexes: list[tuple[int, ...]]) -> list[NativeResult | None]:
        """Read and decode full chunks of a local store in one call without the GIL
        (:mod:`chunkpool.native`; only where :attr:`native` is not None). Per chunk,
        its result, or None: read it with :meth:`fetch_sync` and :meth:`decode`
        instead (an edge chunk, a shard whose index is not cached, an absent inner
        chunk, or anything the extension leaves to Python: links, errors)."""
        local, decoder, buffers = self._local, self._decode, self._buffers
        assert local is not None and isinstance(decoder, _IntoDecoder)
        nbytes = decoder.nbytes
        full = self.scale.chunk_shape
        sharding = self._sharding is not None
        items: list[native.Item] = []
        where: list[int] = []  # the item of each chunk, or -1
        versions: list[Stamp | None] = []  # sharded: the version each index was read from
        # sharded: the shard of the chunk before, and what was found for it (its
        # index entry, its path: one bytes object per shard, which the extension
        # reads through one open file)
        last_shard: tuple[int, ...] | None = None
        entry: tuple[Any, Stamp | None] | None = None
        shard_path: bytes | None = None
        for index in indexes:
            where.append(-1)
            if self.chunk_data_shape(index) is not full:
                continue
            if sharding:
                per = self._chunks_per_shard
                shard = tuple(map(operator.floordiv, index, per))
                if shard != last_shard:
                    last_shard, shard_path = shard, None
                    entry = self._shard_indexes.cached_entry((self.scale.level, shard))
                    if entry is not None:
                        try:
                            shard_path = os.fsencode(local.checked_path(self._key(shard)))
                        except Exception:  # a link out of the root: Python says so
                            shard_path = None
                if entry is None or shard_path is None:
                    continue
                offset, length = (
                    entry[0].offsets_and_lengths[tuple(map(operator.mod, index, per))].tolist()
                )
                if offset == _NO_CHUNK and length == _NO_CHUNK:
                    continue
                path = shard_path
                versions.append(entry[1])
            else:
                offset, length = -1, 0
                try:
                    path = os.fsencode(local.checked_path(self._key(index)))
                except Exception:  # a link out of the root: the Python path says so
                    continue
            where[-1] = len(items)
            items.append((path, offset, length, buffers.take(nbytes)))
        results: list[NativeResult | None] = [None] * len(indexes)
        if not items:
            return results
        done = native.read_chunks(items, bool(self.native))
        clock = native.CLOCK_OFFSET
        for k, item_at in enumerate(where):
            if item_at < 0:
                continue
            out = items[item_at][3]
            status, size, mtime, nread, fetched, decoded = done[item_at]
            stamp: Stamp = (size, mtime)
            if status == native.DONE and (not sharding or versions[item_at] in (None, stamp)):
                arr = decoder.hand_out(out)
                arr.flags.writeable = False
                results[k] = (arr, nread, stamp, fetched * 1e-9 + clock, decoded * 1e-9 + clock)
                continue
            buffers.give(out)
            if status == native.MISSING and not sharding:
                results[k] = (self.decode(indexes[k], RawChunk(None, 0)), 0, ABSENT, 0.0, 0.0)
        return results

    async def fetch_async(self, index: tuple[int, ...]) -> RawChunk:
        """Fetch a chunk's bytes from an asynchronous store, on zarr's event loop.

        Where the store says so, the chunk is stamped with the version its object's
        response carried (its shard's index's, for an inner chunk): no extra request."""
        get_stamped = self._get_stamped
        seen: list[Stamp | None] | None = None if get_stamped is None else []
        plan = self._plan(index, None, seen)
        try:
            step = next(plan)
            while True:
                try:
                    if isinstance(step, _Await):
                        # shield: cancelling this request must not cancel the shared read
                        result = await asyncio.shield(asyncio.wrap_future(step.future))
                    elif seen is None:
                        buf = await self._remote.get(step.key, self._prototype, step.byte_range)
                        result = None if buf is None else _Bytes(buf.as_numpy_array(), None)
                    else:
                        buf, version = await get_stamped(  # type: ignore[misc]
                            step.key, self._prototype, step.byte_range
                        )
                        seen.append(version)
                        result = None if buf is None else _Bytes(buf.as_numpy_array(), None)
                except BaseException as err:
                    step = plan.throw(err)
                else:
                    step = plan.send(result)
        except StopIteration as stop:
            raw = stop.value
        if seen and raw.stamp is None:  # a whole chunk: its one read's
            return raw._replace(stamp=seen[0])
        return raw

    @staticmethod
    def io_loop() -> asyncio.AbstractEventLoop:
        """The event loop that asynchronous stores run on (zarr's own)."""
        return zarr_loop()

    # -- decoding ---------------------------------------------------------------------

    def decode(self, index: tuple[int, ...], raw: RawChunk) -> np.ndarray:
        """Decode a fetched chunk to a read-only array cropped to the array bounds.

        A missing chunk is the array's fill value, as a broadcast view that holds no
        memory of its own: one per chunk shape, shared by every missing chunk of it.
        """
        shape = self.chunk_data_shape(index)
        if raw.data is None:
            fill = self._fills.get(shape)
            if fill is None:
                value = np.asarray(self.scale.fill_value, self.scale.dtype)
                fill = self._fills[shape] = np.broadcast_to(value, shape)
            return fill
        if self.processes is not None:  # decode="processes": the same decode, in a worker
            return self.processes.decode(self, index, raw)
        if self._plain_decode and shape is self.scale.chunk_shape:
            # the common case, in short: a full chunk decoded into memory of its own
            # (a recycled buffer, or what zlib inflated to) in native byte order
            try:
                arr = self._decode(raw.data)
            except Exception as err:
                raise self._decode_error(self._chunk_key(index), err) from err
            finally:
                if raw.owner is not None:
                    self._buffers.give(raw.owner)
            arr.flags.writeable = False
            return arr
        try:
            if self._decode.nbytes > MAX_CHUNK_BYTES:
                raise ChunkDecodeError(
                    f"declared chunks of {self._decode.nbytes} bytes exceed the limit of "
                    f"{MAX_CHUNK_BYTES} bytes per chunk"
                )
            arr = self._decode(raw.data)
            if raw.owner is not None and np.may_share_memory(arr, raw.owner):
                arr = arr.copy()  # a codec returned a view of the read buffer, reused next
        except Exception as err:
            raise self._decode_error(self._chunk_key(index), err) from err
        finally:
            self.release(raw)
        if arr.shape != shape:
            arr = np.ascontiguousarray(arr[tuple(slice(0, n) for n in shape)])
        if not arr.dtype.isnative:
            arr = arr.astype(arr.dtype.newbyteorder("="))
        arr.flags.writeable = False
        return arr

    def _chunk_key(self, index: tuple[int, ...]) -> str:
        """The store key of chunk ``index`` (its shard's, and where in it), for messages."""
        if self._sharding is None:
            return self._key(index)
        shard = tuple(i // n for i, n in zip(index, self._chunks_per_shard, strict=True))
        inner = tuple(i % n for i, n in zip(index, self._chunks_per_shard, strict=True))
        return f"{self._key(shard)} (inner chunk {inner})"

    def _decode_error(self, key: str, err: Exception) -> ChunkDecodeError:
        """``err``, raised decoding ``key``, as a ChunkDecodeError naming the store."""
        what = str(err) if isinstance(err, ChunkDecodeError) else f"{type(err).__name__}: {err}"
        return ChunkDecodeError(f"{self.name}/{key}: {what}")

    def chunk_data_shape(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """:meth:`ScaleInfo.chunk_data_shape`, without its per-axis loop for the chunks
        away from the array's far edges (most of them)."""
        full = self._full_grid
        if full is None:
            scale = self.scale
            full = self._full_grid = tuple(
                s // c for s, c in zip(scale.shape, scale.chunk_shape, strict=True)
            )
        if any(map(operator.ge, index, full)):
            return self.scale.chunk_data_shape(index)
        return self.scale.chunk_shape

    def release(self, raw: RawChunk) -> None:
        """Give a fetched chunk's read buffer back (once its bytes are no longer needed)."""
        if raw.owner is not None:
            self._buffers.give(raw.owner)
