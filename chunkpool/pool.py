"""ChunkPool: the ref-counted, cached, prioritised pool of one multiscale image's chunks.

The pool owns the state (which chunks exist, who holds them, the cache); the
scheduler (:mod:`chunkpool.scheduler`) owns the loading; the dispatcher
(:mod:`chunkpool.dispatch`) delivers handler calls. All state changes happen under
one lock; handlers are always called without it, so a handler may call back into the
pool.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import math
import operator
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from typing import Any, Literal

import numpy as np
import zarr

from .batch import iter_chunk_data
from .budget import ENTRY_OVERHEAD, MemoryBudget, _Effects
from .cache import ChunkCache
from .dispatch import (
    HandlerCall,
    HandlerDispatcher,
    HandlerQueue,
    call_handlers,
    resolve_call_soon,
)
from .errors import (
    ChunkIndexError,
    ChunkLoadError,
    MemoryBudgetError,
    PoolDestroyedError,
)
from .info import MultiscaleInfo
from .kpi import KpiLog, LoadRecord
from .location import (
    TRANSITIONS,
    ChunkKey,
    ChunkLocation,
    ChunkState,
    Handler,
    _load_handlers,
    _RefEntry,
)
from .metadata import read_multiscales
from .procdecode import decode_setup
from .redaction import describe_error
from .refresh import Changes, Watcher, refresh_pool
from .retry import RetryPolicy
from .scheduler import Completions, LoadJob, LoadScheduler
from .source import SHARD_INDEX_CACHE_BYTES, ChunkSource, ShardIndexCache
from .stats import LinkEstimate, PoolStats, StatsRecorder
from .stores import open_node

__all__ = ["ChunkPool"]

logger = logging.getLogger("chunkpool")
#: One record per failed chunk load (an application may quiet or summarise these alone).
chunk_logger = logging.getLogger("chunkpool.chunks")

#: Seconds :meth:`ChunkPool.destroy` waits for its threads before abandoning them.
DESTROY_TIMEOUT = 5.0


# Enum member lookups cost ~0.1 µs each on Python 3.11; the hot paths use these.
_PENDING = ChunkState.PENDING
_LOADED = ChunkState.LOADED
_FAILED = ChunkState.FAILED
_CANCELLED = ChunkState.CANCELLED
_DESTROYED = ChunkState.DESTROYED


class _Level:
    """What ``get_chunk`` needs of a level, precomputed: its chunk grid, and the
    size of its full (not edge) chunks."""

    __slots__ = ("full_grid", "full_nbytes", "grid", "scale")

    def __init__(self, scale: Any):
        self.scale = scale
        self.grid: tuple[int, ...] = scale.chunk_grid_shape
        self.full_grid = tuple(s // c for s, c in zip(scale.shape, scale.chunk_shape, strict=True))
        self.full_nbytes = math.prod(scale.chunk_shape) * scale.dtype.itemsize

    def nbytes(self, index: tuple[int, ...]) -> int:
        if any(map(operator.ge, index, self.full_grid)):  # an edge chunk
            return self.scale.chunk_nbytes(index)
        return self.full_nbytes


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
        Decodes at once (default: one per CPU; measured on 2 cores, page-cached zstd
        chunks, against one more: 1.14-1.18x the throughput at 128², 1.09-1.18x at
        256², the same at 512²: a third thread mostly waits for the GIL).
    recycle_bytes:
        Bound on the memory kept for reuse by reads and decodes (see
        :mod:`chunkpool.buffers`).
    retry:
        Timeout and retries of remote reads (see :class:`~chunkpool.retry.RetryPolicy`),
        for stores that have none yet: a store opened by :func:`~chunkpool.open_node`
        (as :meth:`from_zarr_node` does, with this same policy) keeps its own.
    memory_budget:
        A hard bound in bytes on ``memory_usage`` (held and cached chunks, shard
        indexes, and loads in progress, reserved when admitted), or a
        :class:`~chunkpool.MemoryBudget` shared with other pools (one bound for all).
        When holders ask for more, cached chunks are evicted first, then the least
        urgent requests wait (``loc.over_budget``, ``stats.over_budget``) or held
        chunks less urgent than a waiting request are released to their drop handlers;
        the most urgent are never given up. See :mod:`chunkpool.budget`. None: no
        bound (requests never wait). Use async handlers with a budget: the room it
        makes may call drop and destroy handlers from a pool thread.
    index_cache_bytes:
        Bound on the bytes of the shard indexes kept (all levels together).
    revalidate:
        How many held or cached chunks one :meth:`refresh` checks against their stored
        file (local stores), those checked longest ago first (see
        :mod:`chunkpool.refresh`).
    decode:
        ``"threads"`` (decode in the pool's threads) or ``"processes"``: decode in
        worker processes, into shared memory (see :mod:`chunkpool.procdecode`), so that
        codecs holding the GIL scale with cores and a crashing codec fails its chunk
        (:class:`~chunkpool.DecodeWorkerError`), not the application.
    decode_processes:
        With ``decode="processes"``: how many worker processes at most (default: one
        per CPU).
    kpi_log:
        Where each finished, failed or cancelled load's record goes (see
        :mod:`chunkpool.kpi`): a path (JSON lines, rotated; closed by :meth:`destroy`),
        a :class:`~chunkpool.kpi.KpiLog` shared with other pools (the caller closes
        it), or None (records kept in memory only, :attr:`kpis`).
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
        memory_budget: int | MemoryBudget | None = None,
        index_cache_bytes: int = SHARD_INDEX_CACHE_BYTES,
        revalidate: int = 256,
        decode: str = "threads",
        decode_processes: int | None = None,
        kpi_log: str | os.PathLike[str] | KpiLog | None = None,
    ):
        if revalidate < 0:
            raise ValueError(f"revalidate must be >= 0, not {revalidate}")
        budget = memory_budget
        if budget is not None and not isinstance(budget, MemoryBudget):
            budget = MemoryBudget(budget)
        self._budget: MemoryBudget | None = budget
        self._info = multiscale_info
        # a log given is the caller's (shared, closed by them); a path's is ours
        self._owns_kpis = not isinstance(kpi_log, KpiLog)
        self._kpis = kpi_log if isinstance(kpi_log, KpiLog) else KpiLog(kpi_log)
        self._retry = retry
        self._buffers, self._processes = decode_setup(decode, decode_processes, recycle_bytes)
        self._index_cache = ShardIndexCache(
            index_cache_bytes, self._reserve_index, self._release_index
        )
        self._sources = [
            ChunkSource(
                scale,
                self._buffers,
                name=multiscale_info.source,
                retry=retry,
                shard_indexes=self._index_cache,
                processes=self._processes,
            )
            for scale in multiscale_info.levels
        ]
        self._cache = ChunkCache(cache_size, cache_bytes, None if budget is None else budget.clock)
        self._scheduler = LoadScheduler(
            io_concurrency=io_concurrency,
            remote_io_concurrency=remote_io_concurrency,
            cpu_workers=cpu_workers or os.cpu_count() or 1,
            on_done_many=self._on_jobs_done,
        )
        # one bound method for every job's on_done (not one more object per chunk for
        # the garbage collector to count and track)
        self._job_done = self._on_job_done
        # pools sharing a memory budget share its lock: one state change sees them all
        self._lock = threading.RLock() if budget is None else budget._lock
        self._chunks: dict[ChunkKey, ChunkLocation] = {}  # chunks with at least one ref
        self._levels: list[_Level | None] = [None] * len(multiscale_info.levels)
        self._loading = 0  # held chunks whose load is pending
        self._over_budget = 0  # of them, those waiting for room in the memory budget
        # notified when no load is in progress (every pending one waits for room)
        self._all_loaded = threading.Condition(self._lock)
        self._dispatcher: HandlerQueue | None = None  # where handler calls are queued
        self._polled: HandlerQueue | None = None  # the queue of run_pending_handlers
        self._stats = StatsRecorder()
        self._memory = 0  # what memory_usage says
        self._reserved = 0  # of it, the reservations of admitted loads
        self._pending_bytes = 0
        self._destroyed = False
        self._revalidate = revalidate
        self._check_clock = itertools.count(1)  # stamps ChunkLocation._checked
        # one refresh at a time (re-entrant: on_metadata may refresh again, in its thread)
        self._refresh_lock = threading.RLock()
        # the metadata documents the last refresh read (a remote one reads them at once)
        self._metadata_keys: tuple[str, ...] = ()
        self._watcher: Watcher | None = None
        if budget is not None:
            budget.join(self)

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
        pools' chunk reads. An int ``memory_budget`` makes one
        :class:`~chunkpool.MemoryBudget` shared by all the pools returned. Raises
        SourceError if the source cannot be opened or holds no valid image.
        """
        node, name = open_node(
            zarr_node,
            storage_options=storage_options,
            disk_cache=disk_cache,
            disk_cache_bytes=disk_cache_bytes,
            retry=retry,
        )
        budget = kwargs.get("memory_budget")
        if budget is not None and not isinstance(budget, MemoryBudget):
            kwargs["memory_budget"] = MemoryBudget(budget)
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
        """Bytes the pool counts: its loaded chunks, held and cached (data plus
        ``ENTRY_OVERHEAD`` each), its shard indexes, and, under a memory budget, what
        is reserved for loads admitted (not for requests still waiting)."""
        return self._memory

    @property
    def memory_budget(self) -> MemoryBudget | None:
        """The budget bounding this pool's ``memory_usage`` (maybe shared), if any."""
        return self._budget

    @property
    def pending_bytes(self) -> int:
        """Bytes of the chunks still being loaded, once they are."""
        return self._pending_bytes

    @property
    def destroyed(self) -> bool:
        return self._destroyed

    @property
    def kpis(self) -> KpiLog:
        """The per-chunk load records (the most recent in memory; see ``kpi_log``)."""
        return self._kpis

    @property
    def stats(self) -> PoolStats:
        """A snapshot of the pool's counters."""
        waiting, fetching, decoding = self._scheduler.counts()
        with self._lock:
            s = self._stats
            p50, p90, p99 = self._kpis.latency_percentiles()
            pending = self._loading
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
                index_bytes=self._index_cache.nbytes,
                reserved_bytes=self._reserved,
                over_budget=self._over_budget,
                budget_releases=s.budget_releases,
                memory_budget=None if self._budget is None else self._budget.limit,
                link=s.link_estimate(),
            )

    @property
    def link_estimate(self) -> LinkEstimate | None:
        """What the link to the store achieves (``stats.link``), without the rest of
        the snapshot: cheap enough to read every frame."""
        with self._lock:
            return self._stats.link_estimate()

    def loaded_among(self, keys: Iterable[ChunkKey]) -> set[ChunkKey]:
        """Those of ``keys`` whose data the pool holds now (held or cached): what a
        request would get without a fetch. One hold of the lock."""
        with self._lock:
            chunks, cached = self._chunks, self._cache._entries
            out = set()
            for key in keys:
                loc = chunks.get(key)
                if (loc is not None and loc._state is _LOADED) or key in cached:
                    out.add(key)
            return out

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
        dropped with one WARNING and no handler is called until this is called again.
        Queued calls are coalesced, so that the queue stays bounded while the loop does
        not drain it (see :mod:`chunkpool.dispatch`).
        """
        call_soon = resolve_call_soon(call_soon_threadsafe)
        self._use_queue(
            None if call_soon is None else HandlerDispatcher(call_soon, self._info.source)
        )

    def enable_polled_load_handlers(self, wake: Callable[[], None]) -> None:
        """Queue every handler call for :meth:`run_pending_handlers` (an application that
        draws frames runs them at the start of each frame, on its own thread).

        ``wake()`` is called, from whatever thread queues a call, once when the queue
        goes from empty to non-empty and not again until a run has emptied it: it must
        be cheap and thread-safe (e.g. ``canvas.request_draw``); one that raises is
        logged and called again at the next call queued. Calls are queued in the order
        the pool's state changed, and coalesced so that the queue stays bounded however
        long nothing runs them (see :mod:`chunkpool.dispatch`). Calling this again only
        replaces ``wake``; ``enable_async_load_handlers`` switches to another mode (calls
        already queued here stay for :meth:`run_pending_handlers`).
        """
        if not callable(wake):
            raise TypeError(f"enable_polled_load_handlers() expects a callable, not {wake!r}")
        queue = self._polled
        if queue is None:
            queue = self._polled = HandlerQueue(wake, self._info.source)
        else:
            queue.rewake(wake)
        self._use_queue(queue)

    def run_pending_handlers(self, max_calls: int | None = None) -> int:
        """Run the handler calls queued in polled mode (at most ``max_calls``, oldest
        first) in this thread, and return how many ran (0 if polled mode was never
        enabled). Calls that handlers queue meanwhile wait for the next run (and wake
        the application again); while this returns ``max_calls``, more may wait."""
        queue = self._polled
        return 0 if queue is None else queue.run(max_calls)

    @property
    def pending_handler_calls(self) -> int:
        """Handler calls queued and not yet run, in the current mode's queue and the
        polled one (at most: a few of them may yet be coalesced away)."""
        current, polled = self._dispatcher, self._polled
        n = 0 if current is None else len(current)
        return n + (len(polled) if polled is not None and polled is not current else 0)

    def _use_queue(self, queue: HandlerQueue | None) -> None:
        """Queue handler calls in ``queue`` from now on (None: call them directly), with
        the load calls that were waiting for ``wait()``."""
        with self._lock:
            self._dispatcher = queue
            if queue is None:
                return
            # chunks that exist may have been heard of before (their calls are due)
            queue.tell(self._chunks.values())
            queue.tell(self._cache)
            for loc in self._chunks.values():  # loads that were waiting for wait()
                if loc._unfired_loads:
                    queue.post_loads(loc, loc._unfired_loads)
                    loc._unfired_loads = None
        queue.kick()

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
            self._dispatcher.post_loads(loc, handlers)
        elif loc._unfired_loads is None:
            loc._unfired_loads = dict(handlers)
        else:
            loc._unfired_loads.update(handlers)

    def _fire_unfired_loads(self, loc: ChunkLocation) -> None:
        with self._lock:
            unfired = loc._unfired_loads
            calls = [(h, loc, r) for r, h in unfired.items()] if unfired else []
            loc._unfired_loads = None
        call_handlers(calls)

    def _future_of(self, loc: ChunkLocation) -> concurrent.futures.Future:
        """``loc``'s future, made on first demand and resolved at once if the chunk
        already loaded, failed or was cancelled (see :attr:`ChunkLocation.future`)."""
        with self._lock:
            future = loc._future
            if future is None:
                future = loc._future = concurrent.futures.Future()
                if loc._data is not None:
                    future.set_result(loc._data)
                elif loc._error is not None:
                    future.set_exception(loc._error)
                elif loc._state is _CANCELLED:
                    future.cancel()
            return future

    # -- get / drop -----------------------------------------------------------------

    def _level(self, level: int) -> _Level:
        """The checked level's precomputed facts (made on first use)."""
        levels = self._levels
        if not 0 <= level < len(levels):
            raise ChunkIndexError(f"level {level} out of range (image has {len(levels)} levels)")
        fast = levels[level]
        if fast is None:
            fast = levels[level] = _Level(self._info.levels[level])
        return fast

    def _validate(self, level: int, index: Iterable[int]) -> tuple[int, tuple[int, ...]]:
        grid = self._level(level).grid
        if type(index) is not tuple or any(type(i) is not int for i in index):
            index = tuple(map(int, index))  # (a tuple of ints is kept: one object less)
        if (
            len(index) != len(grid)
            or (index and min(index) < 0)
            or any(map(operator.ge, index, grid))
        ):
            raise ChunkIndexError(
                f"chunk index {index} out of range for level {level} (chunk grid {grid})"
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
        jobs: list[LoadJob] = []
        with self._lock:
            loc, kick = self._hold(
                level, index, ref, priority, load_handler, drop_handler, destroy_handler, jobs
            )
            effects = self._start(jobs)
        self._after_hold(effects, kick)
        return loc

    def get_chunks(
        self,
        keys: Iterable[tuple[int, tuple[int, ...]]],
        ref: str = "pool",
        *,
        priority: float | Iterable[float] | None = None,
        load_handler: Handler | None = None,
        drop_handler: Handler | None = None,
        destroy_handler: Handler | None = None,
    ) -> list[ChunkLocation]:
        """:meth:`get_chunk` for many ``(level, index)`` keys at once (a viewer's tiles
        of one frame): one hold of the pool's lock and one of the scheduler's for all,
        and their new loads queued together. ``priority`` is one for all, or one per
        key. Every key is checked before any is held. Returns the locations in order.
        """
        keys = list(keys)
        if priority is None or isinstance(priority, int | float):
            priorities: list[float | None] = [priority] * len(keys)
        else:
            priorities = list(priority)
            if len(priorities) != len(keys):
                raise ValueError(f"{len(priorities)} priorities for {len(keys)} keys")
        jobs: list[LoadJob] = []
        locs: list[ChunkLocation] = []
        kick = False
        with self._lock:
            chunks = self._chunks
            for key in keys:  # check them all first
                try:
                    held = key in chunks
                except TypeError:  # an unhashable index (a list)
                    held = False
                if not held:
                    self._validate(*key)
            hold = self._hold
            for (level, index), p in zip(keys, priorities, strict=True):
                loc, kicked = hold(
                    level, index, ref, p, load_handler, drop_handler, destroy_handler, jobs
                )
                locs.append(loc)
                kick = kick or kicked
            effects = self._start(jobs)
        self._after_hold(effects, kick)
        return locs

    def _start(self, jobs: list[LoadJob]) -> _Effects | None:
        """Queue the loads a hold made (or, with none, let the budget admit what now
        fits); the effects to finish without the lock. Holds ``_lock``."""
        if jobs:
            self._scheduler.submit_many(jobs)
            return None
        return self._settle() if self._budget is not None else None

    def _after_hold(self, effects: _Effects | None, kick: bool) -> None:
        """After a hold, without the lock: finish the budget's effects, wake the
        handler loop if calls were queued."""
        if effects is not None:
            effects.finish()
        if kick:
            self._finish([])

    def _hold(
        self,
        level: int,
        index: tuple[int, ...],
        ref: str,
        priority: float | None,
        load_handler: Handler | None,
        drop_handler: Handler | None,
        destroy_handler: Handler | None,
        jobs: list[LoadJob],
    ) -> tuple[ChunkLocation, bool]:
        """:meth:`get_chunk` under the lock: the location, and whether handler calls
        were queued for the loop; a new load's job joins ``jobs`` (for the caller to
        submit). Holds ``_lock``."""
        chunks = self._chunks
        try:  # a held chunk's key is valid: no need to check it again
            loc = chunks.get((level, index))
        except TypeError:  # an unhashable index (a list): checked below
            loc = None
        if loc is None:
            key = self._validate(level, index)
            if self._destroyed:
                raise PoolDestroyedError("the pool was destroyed")
            loc = chunks.get(key)
            if loc is None:
                loc = self._cache.take(key) if self._cache else None
                if loc is None:  # a new load
                    fast = self._levels[level]
                    assert fast is not None  # made by _validate
                    index = key[1]
                    loc = ChunkLocation(self, fast.scale, index, fast.nbytes(index))
                    p = priority or 0.0
                    loc._refs[ref] = (
                        p
                        if load_handler is None and drop_handler is None
                        else _RefEntry(p, load_handler, drop_handler)
                    )
                    if destroy_handler is not None:
                        loc._destroy_handlers = {ref: destroy_handler}
                    chunks[key] = loc
                    self._stats.misses += 1
                    self._pending_bytes += loc._nbytes
                    self._loading += 1
                    job = LoadJob(self._sources[level], index, p, self._job_done)
                    loc._job = job
                    budget = self._budget
                    if budget is None:
                        jobs.append(job)
                    else:  # a request: admitted when the caller settles the budget
                        loc._seq = budget.next_request()
                        self._over_budget += 1
                        budget.wait(loc)
                    return loc, False
                self._stats.hits += 1
                chunks[key] = loc
                if self._budget is not None:
                    loc._seq = self._budget.next_request()
        kick = False
        budget = self._budget
        before = loc.priority if budget is not None else 0.0
        refs = loc._refs
        entry = refs.get(ref)
        if entry is None:
            if refs:  # (a chunk just taken from the cache has no refs: counted above)
                self._stats.hits += 1
            p = priority or 0.0
            refs[ref] = (
                p
                if load_handler is None and drop_handler is None
                else _RefEntry(p, load_handler, drop_handler)
            )
            if destroy_handler is not None:
                if loc._destroy_handlers is None:
                    loc._destroy_handlers = {}
                loc._destroy_handlers[ref] = destroy_handler
            if load_handler is not None and (loc._state is _LOADED or loc._state is _FAILED):
                self._queue_loads(loc, {ref: load_handler})
                kick = True
        elif priority is not None:
            if type(entry) is _RefEntry:
                entry.priority = priority
            else:
                refs[ref] = priority
        self._rerank(loc)
        if budget is not None and loc.priority > before and not loc._waiting:
            budget.generation += 1  # it may now give way to a waiting request
        return loc, kick

    def _rerank(self, loc: ChunkLocation) -> None:
        """A held chunk's refs or priorities changed: re-rank its pending load, if any.
        Holds ``_lock``."""
        job = loc._job
        if job is not None:
            p = loc.priority
            if job.priority != p:  # written only under this lock
                if loc._waiting:
                    self._budget.rerank(loc, p)  # type: ignore[union-attr]
                else:
                    self._scheduler.reprioritize(job, p)

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
        calls: list[HandlerCall] = []
        effects = None
        with self._lock:
            chunks = self._chunks
            found: list[ChunkLocation] = []  # every key checked before anything drops
            for key in keys:
                try:  # a held chunk's key is valid: no need to check it again
                    loc = chunks.get(key)
                except TypeError:  # an unhashable index (a list): checked below
                    loc = None
                if loc is None:
                    level, index = key
                    loc = chunks.get(self._validate(level, index))
                    if loc is None:
                        continue
                found.append(loc)
            cancelled: list[LoadJob] = []
            for loc in found:
                refs = loc._refs
                entry = refs.pop(ref, None)
                if entry is None:
                    continue
                if loc._unfired_loads:
                    loc._unfired_loads.pop(ref, None)
                if type(entry) is _RefEntry and entry.drop_handler is not None:
                    calls.append((entry.drop_handler, loc, ref))
                if not refs:
                    del chunks[(loc._scale_info.level, loc._index)]
                    self._release(loc, cancelled, calls, keep=True)
                else:
                    self._rerank(loc)
            if cancelled:
                self._scheduler.cancel_many(cancelled)
            if self._budget is not None and found:
                self._budget.generation += 1  # room, or a chunk less urgent than it was
                effects = self._settle(calls)
            else:
                calls = self._deliver(calls)
        if effects is not None:
            effects.finish()
        elif calls or self._dispatcher is not None:
            self._finish(calls)

    def _release(
        self,
        loc: ChunkLocation,
        cancelled: list[LoadJob],
        calls: list[HandlerCall],
        *,
        keep: bool,
    ) -> None:
        """``loc`` lost its last ref: cache it (if ``keep`` allows) or let it go; a
        pending load joins ``cancelled``, the destroy-handler calls due join ``calls``.
        Holds ``_lock``."""
        if loc._state is _LOADED and loc._job is not None:  # a reload: not needed now
            cancelled.append(loc._job)
            loc._job = None
            self._pending_bytes -= loc._nbytes
            self._loaded_one()
        if loc._state is _LOADED and keep and self._cache.enabled:
            for old in self._cache.add(loc):
                self._destroy_loc(old, calls)
            return
        job = loc._job
        if job is not None:
            if loc._waiting:  # never submitted: nothing to cancel
                self._budget.unwait(loc)  # type: ignore[union-attr]
                self._over_budget -= 1
            else:
                cancelled.append(job)
                self._reserved -= loc._held_bytes
            loc._job = None
            _move(loc, _CANCELLED)
            self._kpis.add(_load_record(job, "cancelled", None, None, None, self._info.source))
            self._pending_bytes -= loc._nbytes
            self._stats.cancellations += 1
            self._loaded_one()
            if loc._future is not None:
                loc._future.cancel()
        self._destroy_loc(loc, calls)

    def _destroy_loc(self, loc: ChunkLocation, calls: list[HandlerCall]) -> None:
        """The pool lets ``loc`` go for good; its destroy-handler calls join ``calls``.
        Holds ``_lock``."""
        state = loc._state
        if state is _LOADED or state is _FAILED:
            _move(loc, _DESTROYED)
        if loc._held_bytes:
            self._memory -= loc._held_bytes
            loc._held_bytes = 0
            if self._budget is not None:
                self._budget.generation += 1
        handlers = loc._destroy_handlers
        if handlers:
            calls += [(h, loc, r) for r, h in handlers.items()]
            handlers.clear()

    def _loaded_one(self) -> None:
        """A held chunk's load is over (done, failed or cancelled). Holds ``_lock``."""
        self._loading -= 1
        if self._loading <= self._over_budget:
            self._all_loaded.notify_all()

    # -- the memory budget (see chunkpool.budget; all under ``_lock``) ----------------

    def _settle(self, calls: list[HandlerCall] | None = None) -> _Effects:
        """Admit what the budget can now admit, after this pool's state change (whose
        handler ``calls`` go first); returns the effects to finish without the lock."""
        effects = _Effects()
        if calls is not None:
            effects.calls[self] = calls
        self._budget.settle(effects)  # type: ignore[union-attr]
        effects.apply()
        return effects

    def _admit(self, loc: ChunkLocation, effects: _Effects) -> None:
        """A waiting request got room: reserve its bytes and queue its load."""
        self._budget.unwait(loc)  # type: ignore[union-attr]
        self._over_budget -= 1
        charge = loc._held_bytes = loc._nbytes + ENTRY_OVERHEAD
        self._memory += charge
        self._reserved += charge
        jobs = effects.jobs.get(self)
        if jobs is None:
            jobs = effects.jobs[self] = []
        jobs.append(loc._job)  # type: ignore[arg-type]

    def _refuse(self, loc: ChunkLocation, limit: int, effects: _Effects) -> None:
        """A waiting request larger than the whole budget: it fails at once."""
        self._budget.unwait(loc)  # type: ignore[union-attr]
        self._over_budget -= 1
        loc._job = None
        self._pending_bytes -= loc._nbytes
        error = MemoryBudgetError(
            f"{self._info.source}: level {loc.level} chunk {loc._index} needs "
            f"{loc._nbytes + ENTRY_OVERHEAD} bytes, more than the whole memory budget "
            f"of {limit} bytes"
        )
        loc._error = error
        _move(loc, _FAILED)
        self._stats.failures += 1
        handlers = _load_handlers(loc._refs)
        if handlers:
            self._queue_loads(loc, handlers)
        effects.calls_for(self)  # (so that the handlers' loop is woken)
        self._loaded_one()
        if loc._future is not None:
            effects.futures.append((loc._future, error))

    def _preempt(self, loc: ChunkLocation) -> bool:
        """Send an admitted load that has not started back to waiting (its holders see
        nothing); False if it started meanwhile."""
        job = loc._job
        assert job is not None
        if loc._state is _LOADED:  # a reload (see refresh): its old data stays in use
            return False
        if not self._scheduler.withdraw(job):
            return False
        loc._job = LoadJob(job.source, job.index, loc.priority, self._job_done)
        charge, loc._held_bytes = loc._held_bytes, 0
        self._memory -= charge
        self._reserved -= charge
        self._over_budget += 1
        self._budget.wait(loc)  # type: ignore[union-attr]
        if self._loading <= self._over_budget:
            self._all_loaded.notify_all()
        return True

    def _release_for_budget(self, loc: ChunkLocation, effects: _Effects) -> None:
        """Release a loaded (or failed) held chunk to make room: every ref's drop
        handler runs, then its destroy handlers, as if each holder had dropped it."""
        calls = effects.calls_for(self)
        calls += _drop_calls(loc)
        loc._refs.clear()
        loc._unfired_loads = None
        del self._chunks[(loc._scale_info.level, loc._index)]
        self._release(loc, [], calls, keep=False)
        self._stats.budget_releases += 1

    def _evict_cached(self, loc: ChunkLocation, effects: _Effects) -> int:
        """Evict a cached chunk to make room; returns the bytes freed."""
        charge = loc._held_bytes
        self._cache.take(loc.key)
        self._destroy_loc(loc, effects.calls_for(self))
        return charge

    def _evict_indexes(self, nbytes: int) -> int:
        """Evict cached shard indexes until ``nbytes`` are freed; returns the bytes freed."""
        freed = self._index_cache.evict(nbytes)
        self._memory -= freed
        return freed

    def _reserve_index(self, nbytes: int) -> bool:
        """Whether the index cache may keep an index of ``nbytes`` (counted if so).
        Called by it without its lock, from the thread that read the index."""
        effects = _Effects()
        with self._lock:
            fits = not self._destroyed and (
                self._budget is None or self._budget.index_fits(nbytes, effects)
            )
            if fits:
                self._memory += nbytes
            effects.apply()
        effects.finish()
        return fits

    def _release_index(self, nbytes: int) -> None:
        """The index cache evicted ``nbytes`` of indexes (without its lock)."""
        with self._lock:
            self._memory -= nbytes
            if self._budget is None:
                return
            self._budget.generation += 1
            effects = self._settle()
        effects.finish()

    def _on_job_done(self, job: LoadJob, data: np.ndarray | None, error: BaseException | None):
        """A load finished (in a worker thread): publish the data or the failure."""
        self._on_jobs_done([(job, data, error)])

    def _on_jobs_done(self, reports: Completions) -> None:
        """Loads finished (in a worker thread, a batch at a time): publish their data
        or failures under one hold of the lock, then resolve futures, log failures and
        wake the handlers' loop once."""
        resolved: list[tuple[concurrent.futures.Future | None, Any, Any, ChunkKey]] = []
        posted = False
        kpis, source = self._kpis, self._info.source
        with self._lock:
            chunks = self._chunks
            s = self._stats
            dispatcher = self._dispatcher
            now = time.perf_counter()
            for job, data, error in reports:
                key = (job.source.scale.level, job.index)
                loc = chunks.get(key)
                if loc is None or loc._job is not job:
                    continue  # cancelled meanwhile
                loc._job = None
                self._pending_bytes -= loc._nbytes
                if loc._state is _LOADED:  # a reload: the stored chunk changed
                    kpis.add(_load_record(job, "reloaded", data, error, now, source))
                    s.fetched(job.submitted_at, now, job.nbytes_fetched, error is None)
                    self._loaded_one()
                    if error is not None or data is None:
                        # the old data stays; its stamp too, so the next refresh retries
                        resolved.append((None, None, error, key))
                        s.failures += 1
                        continue
                    held = _held_bytes(data) + ENTRY_OVERHEAD
                    self._memory += held - loc._held_bytes
                    loc._held_bytes = held
                    loc._data = data
                    loc._stamp = job.stamp
                    loc._checked = next(self._check_clock)
                    s.loads += 1
                    s.bytes_loaded += data.nbytes
                    reloaded = _load_handlers(loc._refs)
                    if reloaded:
                        self._queue_loads(loc, reloaded)
                        posted = posted or dispatcher is not None
                    continue
                reserved = loc._held_bytes  # under a memory budget (else 0)
                self._reserved -= reserved
                failed = error is not None or data is None
                kpis.add(
                    _load_record(job, "failed" if failed else "loaded", data, error, now, source)
                )
                s.fetched(job.submitted_at, now, job.nbytes_fetched, error is None)
                handlers = _load_handlers(loc._refs)
                if handlers and dispatcher is None:
                    # before the data: wait() reads the data, then these, without the lock
                    if loc._unfired_loads is None:
                        loc._unfired_loads = handlers
                    else:
                        loc._unfired_loads.update(handlers)
                if failed:
                    loc._error = error
                    _move(loc, _FAILED)
                    loc._held_bytes = 0
                    self._memory -= reserved
                    s.failures += 1
                else:
                    loc._data = data
                    _move(loc, _LOADED)
                    loc._stamp = job.stamp
                    loc._checked = next(self._check_clock)
                    loc._held_bytes = held = _held_bytes(data) + ENTRY_OVERHEAD
                    self._memory += held - reserved
                    s.loads += 1
                    s.bytes_loaded += data.nbytes
                if handlers and dispatcher is not None:
                    dispatcher.post_loads(loc, handlers)
                    posted = True
                self._loaded_one()
                if error is not None or loc._future is not None:
                    resolved.append((loc._future, data, error, key))
            effects = None
            if self._budget is not None:
                self._budget.generation += 1  # reservations became data, or were freed
                effects = self._settle()
        if effects is not None:
            effects.finish()
        for future, data, error, key in resolved:
            if error is not None:
                chunk_logger.warning(
                    "chunkpool: %s level %d chunk %s failed: %r",
                    self._info.source,
                    key[0],
                    key[1],
                    error,
                )
                if future is not None:
                    future.set_exception(error)
            elif future is not None:
                future.set_result(data)
        if posted:
            dispatcher.kick()  # type: ignore[union-attr]

    # -- following a store being written (see chunkpool.refresh) ----------------------

    def refresh(self, on_metadata: Callable[[Changes], None] | None = None) -> Changes:
        """Re-read the image's metadata and revalidate up to ``revalidate`` loaded chunks.

        Grown and added levels are taken (``multiscale_info`` is replaced, existing
        locations stay valid, new indices may be requested); held chunks whose stored
        file changed are read again, and their holders' load handlers run a second time
        with the same location once ``loc.data`` is the new data (the old data stays
        until then); cached ones are dropped. A change the pool cannot follow (a
        shrink, another dtype, chunk grid or axes...) leaves the pool as it was and
        says ``reopened``: open the source again. Raises SourceError if the metadata
        cannot be read now (nothing changes), PoolDestroyedError after destroy().

        ``on_metadata(changes)``, if given, runs in the calling thread as soon as grown
        or added levels are taken, before the revalidation's answers are waited for
        (over a remote store they take a round trip or more): the new chunks can be
        asked for meanwhile. Its ``changes`` has the levels and the old-edge chunks
        reloaded; the returned one all of them.
        """
        return refresh_pool(self, on_metadata)

    def changes(self, interval: float = 0.5) -> AsyncIterator[Changes]:
        """``async for changes in pool.changes(0.5)``: the pool's changes, refreshed
        every ``interval`` seconds (in a worker thread); ends when the pool is
        destroyed. See :mod:`chunkpool.follow`."""
        from .follow import changes

        return changes(self, interval)

    def watch(
        self,
        interval: float,
        on_change: Callable[[Changes], None] | None = None,
        on_error: Callable[[str | None], None] | None = None,
    ) -> None:
        """Refresh every ``interval`` seconds in a thread of the pool (replacing an
        earlier watch; refreshes start ``interval`` apart whatever each takes, one
        that took longer is followed at once), and a local store also as soon as its
        files change; ``watch(0)`` stops. ``on_change(changes)`` runs in that thread
        when something changed: grown or added levels as soon as the metadata is taken
        (see ``refresh(on_metadata)``), then the chunks the revalidation finds
        rewritten in a second call; a refresh that fails is one WARNING of the
        "chunkpool" logger per distinct error until one succeeds again, and one
        ``on_error(message)`` (then ``on_error(None)`` when it works again). Stopped by
        destroy().
        """
        if not (math.isfinite(interval) and interval >= 0):
            raise ValueError(f"watch() interval must be a finite number >= 0, not {interval!r}")
        with self._lock:
            if self._destroyed:
                raise PoolDestroyedError("the pool was destroyed")
            old, self._watcher = self._watcher, None
            if interval > 0:
                self._watcher = Watcher(self, interval, on_change, on_error)
                self._watcher.start()
        if old is not None:
            old.stop(DESTROY_TIMEOUT)

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
                # one wake-up when the last load in progress ends (requests waiting
                # for room in a memory budget wait for what the caller does next)
                while self._loading > self._over_budget:
                    remaining = None if deadline is None else deadline - time.monotonic()
                    if remaining is not None and remaining <= 0:
                        raise TimeoutError(
                            f"{self._loading - self._over_budget} chunks did not load "
                            f"within {timeout} s"
                        )
                    self._all_loaded.wait(remaining)
                todo = [loc for loc in self._chunks.values() if id(loc) not in seen]
            if not todo:
                break
            for loc in todo:  # handlers run here may request more chunks: loop
                seen.add(id(loc))
                if loc._unfired_loads:
                    self._fire_unfired_loads(loc)
                if loc._error is not None:
                    failures[loc.key] = loc._error
        if failures:
            raise ChunkLoadError(failures)

    def iter_data(
        self,
        keys: Iterable[tuple[int, tuple[int, ...]]],
        *,
        max_ahead: int = 8,
        priority: float = 0.0,
        timeout: float | None = None,
    ) -> Iterator[np.ndarray]:
        """Yield the data of ``(level, index)`` keys in order, loading ahead.

        At most ``max_ahead`` chunks are requested but not yet consumed (backpressure).
        Closing or dropping the iterator cancels what it had requested; a failed load
        raises ChunkLoadError in the caller, and a chunk that takes longer than
        ``timeout`` seconds (None: no bound) to arrive once it is next raises
        TimeoutError.
        """
        return iter_chunk_data(self, keys, max_ahead=max_ahead, priority=priority, timeout=timeout)

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
            watcher, self._watcher = self._watcher, None
            calls: list[HandlerCall] = []
            cancelled: list[LoadJob] = []  # the scheduler's shutdown cancels them all
            for loc in self._chunks.values():
                calls += _drop_calls(loc)
                loc._refs.clear()
                loc._unfired_loads = None
                self._release(loc, cancelled, calls, keep=False)
            self._chunks.clear()
            for loc in self._cache.clear():
                self._destroy_loc(loc, calls)
            self._memory -= self._index_cache.clear()
            effects = None
            if self._budget is not None:  # room for the other pools of the budget
                self._budget.leave(self)
                effects = self._settle(calls)
            else:
                calls = self._deliver(calls)
        # from now on nothing is recycled: not the buffer of a read that returns late,
        # nor those of chunk arrays the application still holds when it lets them go
        self._buffers.max_free_bytes = 0
        self._buffers.clear()
        if watcher is not None:  # (a refresh in progress ends at its next step)
            watcher.stop(timeout)
        if self._processes is not None:  # decode="processes": stop and unlink first
            self._processes.close(timeout)
        abandoned = self._scheduler.shutdown(timeout)
        if self._owns_kpis:
            self._kpis.close(timeout)
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
        if effects is not None:
            effects.finish()
        else:
            self._finish(calls)


def _load_record(
    job: LoadJob,
    state: str,
    data: np.ndarray | None,
    error: BaseException | None,
    delivered: float | None,
    source: str,
) -> LoadRecord:
    """The KPI record of a load that ended (``delivered``: when, or None if cancelled)."""
    return LoadRecord(
        source,
        job.source.scale.level,
        job.index,
        state,
        job.nbytes_fetched,
        0 if data is None else data.nbytes,
        job.submitted_at,
        job.fetch_started_at or None,
        job.fetched_at or None,
        job.decoded_at or None,
        delivered,
        None if error is None else describe_error(error),
    )


def _drop_calls(loc: ChunkLocation) -> list[HandlerCall]:
    """The drop-handler calls of every ref holding ``loc`` (released by the pool)."""
    return [
        (e.drop_handler, loc, r)
        for r, e in loc._refs.items()
        if type(e) is _RefEntry and e.drop_handler is not None
    ]


def _move(loc: ChunkLocation, state: ChunkState) -> None:
    """Set ``loc``'s state: the one place it changes after creation (the pool's lock
    held). The move is checked against :data:`~chunkpool.location.TRANSITIONS`."""
    assert state in TRANSITIONS[loc._state], f"{loc.key}: {loc._state.name} -> {state.name}"
    loc._state = state
