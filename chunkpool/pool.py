"""ChunkPool: the ref-counted, cached, prioritised pool of one multiscale image's chunks.

The pool owns the state (which chunks exist, who holds them, the cache); the
scheduler (:mod:`chunkpool.scheduler`) owns the loading; the dispatcher
(:mod:`chunkpool.dispatch`) delivers handler calls. All state changes happen under
one lock; handlers are always called without it, so a handler may call back into the
pool.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import zarr

from .batch import iter_chunk_data
from .buffers import BufferPool
from .cache import ChunkCache
from .dispatch import HandlerCall, HandlerDispatcher, call_handlers, resolve_call_soon
from .errors import (
    ChunkCancelledError,
    ChunkIndexError,
    ChunkLoadError,
    PoolDestroyedError,
)
from .info import MultiscaleInfo
from .location import ChunkKey, ChunkLocation, ChunkState, Handler, _RefEntry
from .metadata import read_multiscales
from .retry import RetryPolicy
from .scheduler import LoadJob, LoadScheduler
from .source import ChunkSource
from .stats import PoolStats, StatsRecorder
from .stores import open_node

__all__ = ["ChunkPool"]

logger = logging.getLogger("chunkpool")

#: Seconds :meth:`ChunkPool.destroy` waits for its threads before abandoning them.
DESTROY_TIMEOUT = 5.0


def _held_bytes(data: np.ndarray) -> int:
    """Memory a chunk's array really holds (a broadcast fill-value chunk holds one item)."""
    return data.itemsize if 0 in data.strides and data.size > 1 else data.nbytes


class ChunkPool:
    """Get, share and drop the chunks of one multiscale image, loaded in the background.

    Parameters
    ----------
    multiscale_info:
        The image (see :meth:`from_zarr_node` to open one from a path or URL).
    cache_size:
        How many unreferenced loaded chunks to keep (0: none unless ``cache_bytes``).
    cache_bytes:
        Bound in bytes on the unreferenced loaded chunks kept (None: no byte bound).
    io_concurrency:
        Fetches in flight per local (synchronous) store.
    remote_io_concurrency:
        Fetches in flight per remote (asynchronous) store.
    cpu_workers:
        Decoding threads (default: the number of CPUs).
    recycle_bytes:
        Bound on the memory kept for reuse by reads and decodes (see
        :mod:`chunkpool.buffers`).
    retry:
        Timeout and retries of remote reads (see :class:`~chunkpool.retry.RetryPolicy`),
        for stores that have none yet: a store opened by :func:`~chunkpool.open_node`
        (as :meth:`from_zarr_node` does, with this same policy) keeps its own.
    """

    def __init__(
        self,
        multiscale_info: MultiscaleInfo,
        cache_size: int = 0,
        *,
        cache_bytes: int | None = None,
        io_concurrency: int = 8,
        remote_io_concurrency: int = 64,
        cpu_workers: int | None = None,
        recycle_bytes: int = 64 << 20,
        retry: RetryPolicy | None = None,
    ):
        self._info = multiscale_info
        self._buffers = BufferPool(recycle_bytes)
        self._sources = [
            ChunkSource(scale, self._buffers, name=multiscale_info.source, retry=retry)
            for scale in multiscale_info.levels
        ]
        self._cache = ChunkCache(cache_size, cache_bytes)
        self._scheduler = LoadScheduler(
            io_concurrency=io_concurrency,
            remote_io_concurrency=remote_io_concurrency,
            cpu_workers=cpu_workers or os.cpu_count() or 2,
        )
        self._lock = threading.RLock()
        self._chunks: dict[ChunkKey, ChunkLocation] = {}  # chunks with at least one ref
        self._dispatcher: HandlerDispatcher | None = None
        self._stats = StatsRecorder()
        self._memory = 0
        self._pending_bytes = 0
        self._destroyed = False

    @classmethod
    def from_zarr_node(
        cls,
        zarr_node: zarr.Group | zarr.Array | str | os.PathLike,
        cache_size: int = 0,
        *,
        storage_options: dict[str, Any] | None = None,
        disk_cache: str | os.PathLike | None = None,
        disk_cache_bytes: int = 2 << 30,
        retry: RetryPolicy | None = None,
        **kwargs: Any,
    ) -> list[ChunkPool]:
        """A pool for every multiscale image in a zarr Group/Array, path or URL.

        ``zarr_node`` may be a local path, a ``file://``, ``http(s)://`` or ``s3://``
        URL; ``storage_options`` go to fsspec. With ``disk_cache`` (a directory), what
        is read from a remote store is kept there too, up to ``disk_cache_bytes``.
        ``retry`` governs every remote read, opening's metadata reads as much as the
        pools' chunk reads. Raises SourceError if the source cannot be opened or holds
        no valid image.
        """
        node, name = open_node(
            zarr_node,
            storage_options=storage_options,
            disk_cache=disk_cache,
            disk_cache_bytes=disk_cache_bytes,
            retry=retry,
        )
        return [
            cls(info, cache_size, retry=retry, **kwargs) for info in read_multiscales(node, name)
        ]

    def __repr__(self) -> str:
        return f"<ChunkPool {self._info!r} held={len(self._chunks)} cached={len(self._cache)}>"

    # -- properties -----------------------------------------------------------------

    @property
    def multiscale_info(self) -> MultiscaleInfo:
        """The image this pool serves."""
        return self._info

    @property
    def memory_usage(self) -> int:
        """Bytes of chunk data the pool holds (held and cached chunks, not pending)."""
        return self._memory

    @property
    def pending_bytes(self) -> int:
        """Bytes of the chunks still being loaded, once they are."""
        return self._pending_bytes

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def stats(self) -> PoolStats:
        """A snapshot of the pool's counters."""
        waiting, fetching, decoding = self._scheduler.counts()
        with self._lock:
            s = self._stats
            p50, p90, p99 = s.latency_percentiles()
            pending = sum(1 for loc in self._chunks.values() if loc._job is not None)
            return PoolStats(
                hits=s.hits,
                misses=s.misses,
                loads=s.loads,
                failures=s.failures,
                cancellations=s.cancellations,
                bytes_fetched=s.bytes_fetched,
                bytes_loaded=s.bytes_loaded,
                latency_p50=p50,
                latency_p90=p90,
                latency_p99=p99,
                chunks_held=len(self._chunks),
                chunks_cached=len(self._cache),
                chunks_pending=pending,
                chunks_waiting=waiting,
                chunks_fetching=fetching,
                chunks_decoding=decoding,
                memory_usage=self._memory,
                cache_bytes=self._cache.nbytes,
                pending_bytes=self._pending_bytes,
                recycled_bytes=self._buffers.free_bytes,
            )

    # -- handlers -------------------------------------------------------------------

    def enable_async_load_handlers(
        self, call_soon_threadsafe: Callable[..., Any] | Literal["asyncio", "none"]
    ) -> None:
        """Run handlers on an event loop, as soon as their event happens.

        Pass the loop's ``call_soon_threadsafe`` (any framework), "asyncio" for the
        asyncio loop running in this thread (EventLoopError if none is running), or
        "none" to go back to the default, where load handlers run inside ``wait()`` /
        ``wait_for_chunks_to_load()`` and drop and destroy handlers in the thread that
        drops or destroys. Calls never wait for a loop that cannot run them: if an
        asyncio loop stops or closes (or any loop's ``call_soon`` raises), they are
        dropped with one WARNING and no handler is called until this is called again
        (see :mod:`chunkpool.dispatch`).
        """
        call_soon = resolve_call_soon(call_soon_threadsafe)
        with self._lock:
            if call_soon is None:
                self._dispatcher = None
                return
            self._dispatcher = HandlerDispatcher(call_soon, self._info.source)
            for loc in self._chunks.values():  # loads that were waiting for wait()
                self._dispatcher.post([(h, loc) for h in loc._unfired_loads.values()])
                loc._unfired_loads.clear()
        self._dispatcher.kick()

    def _deliver(self, calls: list[HandlerCall]) -> list[HandlerCall]:
        """Post calls to the loop if async; else return them for the caller to run.
        Holds ``_lock``."""
        if self._dispatcher is None or not calls:
            return calls
        self._dispatcher.post(calls)
        return []

    def _finish(self, sync_calls: list[HandlerCall]) -> None:
        """After releasing the lock: run sync calls, wake the loop for async ones."""
        call_handlers(sync_calls)
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.kick()

    def _queue_loads(self, loc: ChunkLocation, handlers: dict[str, Handler]) -> None:
        """Load handlers of ``loc`` to run: on the loop if async, else in ``wait()``.
        Holds ``_lock``."""
        if self._dispatcher is not None:
            self._dispatcher.post([(h, loc) for h in handlers.values()])
        else:
            loc._unfired_loads.update(handlers)

    def _fire_unfired_loads(self, loc: ChunkLocation) -> None:
        with self._lock:
            calls = [(h, loc) for h in loc._unfired_loads.values()]
            loc._unfired_loads.clear()
        call_handlers(calls)

    # -- get / drop -----------------------------------------------------------------

    def _validate(self, level: int, index: Iterable[int]) -> tuple[int, tuple[int, ...]]:
        levels = self._info.levels
        if not 0 <= level < len(levels):
            raise ChunkIndexError(f"level {level} out of range (image has {len(levels)} levels)")
        index = tuple(int(i) for i in index)
        scale = levels[level]
        if not scale.check_index(index):
            raise ChunkIndexError(
                f"chunk index {index} out of range for level {level} "
                f"(chunk grid {scale.chunk_grid_shape})"
            )
        return level, index

    def get_chunk(
        self,
        level: int,
        index: tuple[int, ...],
        ref: str = "pool",
        *,
        priority: float | None = None,
        load_handler: Handler | None = None,
        drop_handler: Handler | None = None,
        destroy_handler: Handler | None = None,
    ) -> ChunkLocation:
        """Hold a chunk for ``ref`` and return its location; its data loads if needed.

        A ref holds a chunk once: asking again registers nothing new, but updates its
        ``priority`` (lower loads sooner; default 0, ties in request order). A chunk
        loads at the most urgent priority among its refs. ``load_handler`` is told when
        the data is there (or the load failed: see ``location.error``), ``drop_handler``
        when this ref drops it, ``destroy_handler`` when the pool lets the chunk go.
        """
        level, index = self._validate(level, index)
        key = (level, index)
        with self._lock:
            if self._destroyed:
                raise PoolDestroyedError("the pool was destroyed")
            loc = self._chunks.get(key)
            new_load = False
            if loc is None:
                loc = self._cache.take(key)
                if loc is None:
                    loc = ChunkLocation(self, self._info.levels[level], index)
                    self._stats.misses += 1
                    new_load = True
                else:
                    self._stats.hits += 1
                self._chunks[key] = loc
            entry = loc._refs.get(ref)
            if entry is None:
                if not new_load and loc._refs:
                    self._stats.hits += 1
                loc._refs[ref] = _RefEntry(priority or 0.0, load_handler, drop_handler)
                if destroy_handler is not None:
                    loc._destroy_handlers[ref] = destroy_handler
                if load_handler is not None and loc._state in (
                    ChunkState.LOADED,
                    ChunkState.FAILED,
                ):
                    self._queue_loads(loc, {ref: load_handler})
            elif priority is not None:
                entry.priority = priority
            if new_load:
                self._pending_bytes += loc.nbytes
                loc._job = LoadJob(self._sources[level], index, loc.priority, self._on_job_done)
                self._scheduler.submit(loc._job)
            elif loc._job is not None:
                self._scheduler.reprioritize(loc._job, loc.priority)
        self._finish([])
        return loc

    def drop_chunk(self, level: int, index: tuple[int, ...], ref: str = "pool") -> None:
        """Release ``ref``'s hold on a chunk (nothing happens if it holds none).

        The ref's drop handler is called. A chunk left without refs goes to the cache
        if it is loaded and the cache is enabled; otherwise it is destroyed (a pending
        load is cancelled: it never starts, or its in-flight read is aborted).
        """
        self.drop_chunks([(level, index)], ref)

    def drop_chunks(self, keys: Iterable[tuple[int, tuple[int, ...]]], ref: str = "pool") -> None:
        """:meth:`drop_chunk` for many ``(level, index)`` keys at once.

        Their loads are cancelled together, so that a slot freed by one cancelled
        request is not handed to another chunk of the same batch.
        """
        keys = [self._validate(level, index) for level, index in keys]
        calls: list[HandlerCall] = []
        with self._lock:
            cancelled: list[LoadJob] = []
            for key in keys:
                loc = self._chunks.get(key)
                entry = None if loc is None else loc._refs.pop(ref, None)
                if loc is None or entry is None:
                    continue
                loc._unfired_loads.pop(ref, None)
                if entry.drop_handler is not None:
                    calls.append((entry.drop_handler, loc))
                if not loc._refs:
                    del self._chunks[key]
                    calls += self._release(loc, cancelled, keep=True)
                elif loc._job is not None:
                    self._scheduler.reprioritize(loc._job, loc.priority)
            self._scheduler.cancel_many(cancelled)
            calls = self._deliver(calls)
        self._finish(calls)

    def _release(
        self, loc: ChunkLocation, cancelled: list[LoadJob], *, keep: bool
    ) -> list[HandlerCall]:
        """``loc`` lost its last ref: cache it (if ``keep`` allows) or let it go; a
        pending load joins ``cancelled``. Returns the destroy-handler calls due. Holds
        ``_lock``."""
        if loc._state is ChunkState.LOADED and keep and self._cache.enabled:
            calls: list[HandlerCall] = []
            for old in self._cache.add(loc):
                calls += self._destroy_loc(old)
            return calls
        if loc._job is not None:
            cancelled.append(loc._job)
            loc._job = None
            loc._state = ChunkState.CANCELLED
            self._pending_bytes -= loc.nbytes
            self._stats.cancellations += 1
            loc._future.cancel()
        return self._destroy_loc(loc)

    def _destroy_loc(self, loc: ChunkLocation) -> list[HandlerCall]:
        """The pool lets ``loc`` go for good. Holds ``_lock``."""
        if loc._state in (ChunkState.LOADED, ChunkState.FAILED):
            loc._state = ChunkState.DESTROYED
        self._memory -= loc._held_bytes
        loc._held_bytes = 0
        calls = [(h, loc) for h in loc._destroy_handlers.values()]
        loc._destroy_handlers.clear()
        return calls

    def _on_job_done(self, job: LoadJob, data: np.ndarray | None, error: BaseException | None):
        """A load finished (in a worker thread): publish the data or the failure."""
        key = (job.source.scale.level, job.index)
        with self._lock:
            loc = self._chunks.get(key)
            if loc is None or loc._job is not job:
                return  # cancelled meanwhile
            loc._job = None
            self._pending_bytes -= loc.nbytes
            s = self._stats
            s.latencies.append(time.perf_counter() - job.submitted_at)
            s.bytes_fetched += job.nbytes_fetched
            if error is not None or data is None:
                loc._state = ChunkState.FAILED
                loc._error = error
                s.failures += 1
            else:
                loc._state = ChunkState.LOADED
                loc._data = data
                loc._held_bytes = _held_bytes(data)
                self._memory += loc._held_bytes
                s.loads += 1
                s.bytes_loaded += data.nbytes
            self._queue_loads(
                loc, {r: e.load_handler for r, e in loc._refs.items() if e.load_handler}
            )
        if error is not None:
            logger.warning(
                "chunkpool: %s level %d chunk %s failed: %r",
                self._info.source,
                key[0],
                key[1],
                error,
            )
            loc._future.set_exception(error)
        else:
            loc._future.set_result(data)
        self._finish([])

    # -- bulk -----------------------------------------------------------------------

    def iter_chunks(self) -> Iterator[ChunkLocation]:
        """Every chunk whose data the pool holds: held and cached ones (a snapshot)."""
        with self._lock:
            locs = [loc for loc in self._chunks.values() if loc._state is ChunkState.LOADED]
            locs += list(self._cache)
        return iter(locs)

    def iter_held(self, ref: str) -> Iterator[ChunkLocation]:
        """The chunks ``ref`` holds (a snapshot)."""
        with self._lock:
            return iter([loc for loc in self._chunks.values() if ref in loc._refs])

    def wait_for_chunks_to_load(self, timeout: float | None = None) -> None:
        """Wait until every held chunk has loaded or failed, running load handlers
        (when not async). Then raise one ChunkLoadError naming every failed chunk."""
        deadline = None if timeout is None else time.monotonic() + timeout
        failures: dict[ChunkKey, BaseException] = {}
        seen: set[int] = set()
        while True:
            with self._lock:
                todo = [loc for loc in self._chunks.values() if id(loc) not in seen]
            if not todo:
                break
            for loc in todo:
                seen.add(id(loc))
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                try:
                    loc.wait(remaining)
                except ChunkCancelledError:
                    continue
                except ChunkLoadError:
                    assert loc.error is not None
                    failures[loc.key] = loc.error
        if failures:
            raise ChunkLoadError(failures)

    def iter_data(
        self,
        keys: Iterable[tuple[int, tuple[int, ...]]],
        *,
        max_ahead: int = 8,
        priority: float = 0.0,
    ) -> Iterator[np.ndarray]:
        """Yield the data of ``(level, index)`` keys in order, loading ahead.

        At most ``max_ahead`` chunks are requested but not yet consumed (backpressure).
        Closing or dropping the iterator cancels what it had requested; a failed load
        raises ChunkLoadError in the caller.
        """
        return iter_chunk_data(self, keys, max_ahead=max_ahead, priority=priority)

    def destroy(self, timeout: float = DESTROY_TIMEOUT) -> None:
        """Drop and destroy all chunks, cancel all loads, and stop the worker threads.

        Drop and destroy handlers run for everything still held or cached. Waits at
        most ``timeout`` seconds for the worker threads to end: a synchronous read that
        does not return by then (a FIFO, a stuck network filesystem) is abandoned with
        its thread, named in one WARNING of the "chunkpool" logger. Its chunk is already
        cancelled; if the read ever returns, its result is discarded, its buffer is not
        recycled, and the thread ends by itself. Calling it again does nothing.
        """
        if not (math.isfinite(timeout) and timeout >= 0):
            raise ValueError(f"destroy() timeout must be a finite number >= 0, not {timeout!r}")
        with self._lock:
            if self._destroyed:
                return
            self._destroyed = True
            calls: list[HandlerCall] = []
            cancelled: list[LoadJob] = []  # the scheduler's shutdown cancels them all
            for loc in self._chunks.values():
                calls += [(e.drop_handler, loc) for e in loc._refs.values() if e.drop_handler]
                loc._refs.clear()
                loc._unfired_loads.clear()
                calls += self._release(loc, cancelled, keep=False)
            self._chunks.clear()
            for loc in self._cache.clear():
                calls += self._destroy_loc(loc)
            calls = self._deliver(calls)
        # from now on nothing is recycled: not the buffer of a read that returns late,
        # nor those of chunk arrays the application still holds when it lets them go
        self._buffers.max_free_bytes = 0
        self._buffers.clear()
        abandoned = self._scheduler.shutdown(timeout)
        if abandoned.threads:
            shown = ", ".join(f"level {lvl} chunk {idx}" for lvl, idx in abandoned.chunks[:8])
            more = len(abandoned.chunks) - 8
            logger.warning(
                "chunkpool: %s: destroy() abandoned %d %s still busy after %g s (%s%s); "
                "their chunks are cancelled and late results will be discarded",
                self._info.source,
                abandoned.threads,
                "thread" if abandoned.threads == 1 else "threads",
                timeout,
                shown or "no chunk",
                f" and {more} more" if more > 0 else "",
            )
        self._finish(calls)
