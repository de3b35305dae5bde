"""Following a store while it is written: :meth:`ChunkPool.refresh` and ``watch``.

A refresh re-reads the image's metadata through the code that opened it
(:func:`~chunkpool.metadata.read_multiscales` on freshly opened zarr nodes of the same
store and path: zarr keeps metadata in its array objects, so they are opened again),
compares it with what the pool serves, and revalidates some of the chunks it holds:

- **Grown levels** (every axis at least as long, one longer: a new time point, a taller
  mosaic) and **added levels** (after the existing ones) are taken: the pool's
  ``multiscale_info`` becomes the new one, the chunk grid grows, existing
  ``ChunkLocation``\\ s stay valid, and the new indices can be requested. A chunk at the
  old edge whose cropped shape grows is reloaded (held) or dropped (cached).
- Anything else (a shrink, a level removed or inserted before another, another dtype,
  chunk or shard shape, codecs, fill value, axes, scale or translation of a level) is
  ``reopened``: the pool keeps serving its old image, unchanged, and says so at every
  refresh while it lasts. The application should open the source again
  (:meth:`ChunkPool.from_zarr_node`), move its users to the new pool and destroy this one.
- **Invalidation** (local files, also under store wrappers): each load stamps the stored
  object, ``(size, mtime_ns)`` of the chunk file or of its shard's file, *before* reading
  it (so a write during the read is seen later, never missed). A refresh stats the stored
  objects of at most ``revalidate`` loaded chunks, held or cached, those checked longest
  ago first (one stat per file: the inner chunks of a shard share theirs), never the
  whole store. A changed held chunk is read again while its old data stays in
  ``loc.data``; when the new data arrives it replaces it and each holder's load handler
  runs **again** with the same location ("on_load again = new data"), in the pool's
  handler mode. A changed cached chunk is dropped (its destroy handlers run). A chunk that
  was missing (the fill value) and has since been written counts as changed too. A
  reload that fails keeps the old data (the failure is logged) and is retried at the
  next refresh. Shard indexes carry the stamp of the shard they were read from, and one
  from another version of the shard is read again before use.
- **Remote stores** (HTTP(S), S3, obstore; see :mod:`chunkpool.stores`): a chunk is
  stamped with the validator its read's own response carried (ETag, else Last-Modified;
  an inner chunk with its shard index's), so loading costs no extra request. A refresh
  revalidates the same ``revalidate`` oldest-checked chunks, one request per stored
  object, all at once on zarr's loop (at most ``remote_io_concurrency`` in flight) with
  the store's retries and timeouts: over HTTP a HEAD with ``If-None-Match`` (or
  ``If-Modified-Since``), answered ``304`` when unchanged; over S3 a HEAD. No chunk body
  is read unless the object changed. A changed one reloads as a local one does (a
  changed shard's cached index is dropped first); a check that fails leaves its chunk
  unchecked (first in line next time). An inner chunk read from a shard whose version
  differs from its cached index's reads the index again (once). A remote refresh costs
  one round trip, not three: the checks are sent as it starts, beside the metadata
  reads, and those are sent at once (the documents the previous refresh read, see
  :class:`_ReadAhead`; zarr alone reads a group's document, then its levels').
- **The disk cache** (:mod:`chunkpool.diskcache`): metadata documents are revalidated
  whenever read (at open, at each refresh); cached chunks carry the version they were
  cached with and are revalidated as above (a changed object's entries are dropped, its
  reload reads the remote). When the remote does not answer, the cache is served as is,
  with one WARNING ("offline: serving N cached entries of ..."); each refresh probes the
  remote once, and one INFO line says when it answers again.

A refresh whose metadata cannot be read (the store deleted, JSON half written) raises a
:class:`~chunkpool.errors.SourceError` and changes nothing. ``refresh(on_metadata)``
tells grown or added levels as soon as they are taken, before the revalidation's
answers are waited for. ``watch`` refreshes on a timer (a fixed rate, see
:func:`next_wait`) in one thread of the pool, and for a local store also as soon as a
file under the image changes (``watchfiles``: inotify on Linux, debounced; see
:class:`Watcher`); it logs failures as one WARNING per distinct error until a refresh
succeeds again (told to ``on_error`` with the message, then None when it works again),
and calls ``on_change`` (in that thread) when something changed: a growth as soon as
the metadata is taken, and what the revalidation then finds in a second call.

Not covered yet: channel or name metadata changes; remote stores whose responses carry
neither ETag nor Last-Modified, or stores other than HTTP(S), S3 (s3fs) and obstore
(their chunks carry no stamp and are never revalidated); a remote object with only a
Last-Modified rewritten within the same second; disk-cache entries written by older
versions (no version kept); and under a memory budget a reload is not admitted through
the budget (its old data's memory stays counted, the new replaces it when it lands).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import heapq
import logging
import operator
import os
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import zarr
from zarr.buffer import default_buffer_prototype
from zarr.storage import StorePath, WrapperStore

from .diskcache import DiskCacheStore
from .errors import PoolDestroyedError, SourceError
from .info import MultiscaleInfo, ScaleInfo
from .location import ChunkKey, ChunkLocation, ChunkState
from .metadata import read_multiscales
from .retry import RetryPolicy
from .scheduler import LoadJob
from .source import ChunkSource, local_root
from .stores import describe_error
from .zarr_compat import wrapped_store, zarr_loop

try:  # optional: without it, a watch polls only
    import watchfiles
except ImportError:
    watchfiles = None

if TYPE_CHECKING:
    from .dispatch import HandlerCall
    from .pool import ChunkPool

__all__ = ["Changes", "Watcher", "next_wait", "refresh_pool"]

logger = logging.getLogger("chunkpool")

_LOADED = ChunkState.LOADED
_by_check = operator.attrgetter("_checked")
# A burst of file changes wakes a watch _STEP ms after its last change, at most
# _DEBOUNCE ms after its first (a writer that never pauses still gets refreshes).
_STEP = 20
_DEBOUNCE = 200
# A failed refresh is reported when it failed _CONFIRM times in a row, the watch trying
# again after _RETRY s (a writer between two levels' metadata is caught once, not for
# a quarter of a second).
_CONFIRM = 2
_RETRY = 0.25
# The file-system watch yields at least every _ARMED ms: its first yield says it is set
# up, the others check that the directory is still the one watched.
_ARMED = 100


@dataclass(frozen=True)
class Changes:
    """What one :meth:`ChunkPool.refresh` found.

    ``grown``: level -> (old shape, new shape) of the levels that grew (taken).
    ``added_levels``: the new levels' numbers (taken). ``rewritten``: the ``(level,
    index)`` keys of the chunks reloaded (held) or dropped (cached) because their stored
    object changed, or their cropped edge shape grew. ``reopened``: the image changed in
    a way the pool cannot follow (see :mod:`chunkpool.refresh`): nothing else was taken,
    the pool still serves its old image; open the source again.
    """

    grown: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    added_levels: tuple[int, ...] = ()
    rewritten: tuple[ChunkKey, ...] = ()
    reopened: bool = False

    @property
    def changed(self) -> bool:
        """Whether anything at all changed."""
        return bool(self.grown or self.added_levels or self.rewritten or self.reopened)


def reread(info: MultiscaleInfo, through: WrapperStore[Any] | None = None) -> MultiscaleInfo:
    """The image ``info`` describes, read again from its store (read ``through`` a
    wrapper of that store if given: the image's arrays are then put back on the store
    itself). Raises SourceError."""
    first = info.levels[0]
    home = first.array.store
    store = home if through is None else through
    zarr_format = first.array.metadata.zarr_format  # known: zarr need not probe for it
    try:
        if info.ome_version is None and len(info.levels) == 1:  # a lone array
            node: Any = zarr.open_array(
                store=store, path=first.array.path, mode="r", zarr_format=zarr_format
            )
        else:
            node = zarr.open_group(store=store, path=info.path, mode="r", zarr_format=zarr_format)
        images = read_multiscales(node, info.source)
    except SourceError:
        raise
    except Exception as err:
        failure = describe_error(err)
    else:
        for image in images:
            if image.levels[0].path == first.path and image.name == info.name:
                return image if through is None else _on_store(image, home)
        if len(images) == 1:
            return images[0] if through is None else _on_store(images[0], home)
        failure = f"no image with first level {first.path!r} any more"
    where = f"{info.source}/{info.path}" if info.path else info.source
    # raised outside the handler: the library's exception is neither cause nor context
    raise SourceError(f"{where}: refresh: {failure}")


def _on_store(image: MultiscaleInfo, store: Any) -> MultiscaleInfo:
    """``image`` with each level's array on ``store`` (the same metadata and path)."""
    levels = []
    for scale in image.levels:
        array = scale.array.async_array
        where = StorePath(store, array.store_path.path)
        moved = zarr.AsyncArray(metadata=array.metadata, store_path=where, config=array.config)
        levels.append(replace(scale, array=zarr.Array(moved)))
    return replace(image, levels=tuple(levels))


class _ReadAhead(WrapperStore[Any]):
    """``store`` for one reread of a remote image: the documents at ``keys`` (those the
    previous reread read) are requested at once, on zarr's loop, when it is made, and
    a whole read of one of those keys takes that answer (once: a second read of the key
    reads the store). zarr reads a group's document, and only then its levels' (at
    once): without this a refresh took two round trips for its metadata, with it one.
    ``read`` lists the keys read whole, in order: the next reread's ``keys``."""

    def __init__(self, store: Any, keys: tuple[str, ...] = ()):
        super().__init__(store)
        self.read: list[str] = []
        self._ahead: dict[str, concurrent.futures.Future[Any]] = {}
        prototype = default_buffer_prototype()
        loop = zarr_loop()
        for key in keys:
            self._ahead[key] = asyncio.run_coroutine_threadsafe(
                _outcome(store.get(key, prototype)), loop
            )

    def _with_store(self, store: Any) -> _ReadAhead:
        return type(self)(store)

    async def get(self, key: str, prototype: Any, byte_range: Any = None) -> Any:
        if byte_range is not None:
            return await self._store.get(key, prototype, byte_range)
        if key not in self.read:
            self.read.append(key)
        ahead = self._ahead.pop(key, None)
        if ahead is None:
            return await self._store.get(key, prototype)
        value, error = await asyncio.wrap_future(ahead)
        if error is not None:
            raise error
        return value

    def close(self) -> None:
        """Cancel the reads ahead not taken (the reread failed before them, or their
        keys are no longer read)."""
        for ahead in self._ahead.values():
            ahead.cancel()
        self._ahead.clear()


async def _outcome(read: Awaitable[Any]) -> tuple[Any, BaseException | None]:
    """``(value, None)`` or ``(None, the exception)``: a read ahead that fails and is
    never taken leaves no unretrieved exception behind."""
    try:
        return await read, None
    except Exception as err:
        return None, err


def _read_ahead(pool: ChunkPool) -> _ReadAhead | None:
    """For a remote image, the documents the last refresh read, asked for now (see
    :class:`_ReadAhead`); None for a local one (a file read costs no round trip, and the
    link checks of :mod:`chunkpool.metadata` want the ``LocalStore`` itself)."""
    store = pool._info.levels[0].array.store
    if local_root(store) is not None:
        return None
    return _ReadAhead(store, pool._metadata_keys)


def _reread(pool: ChunkPool, ahead: _ReadAhead | None) -> MultiscaleInfo:
    """:func:`reread` of the pool's image, ``through`` ``ahead`` if any (which keeps
    the keys it read for the next refresh)."""
    info = pool._info
    if ahead is None:
        return reread(info)
    try:
        image = reread(info, ahead)
    except BaseException:
        # what this one read, and the rest of what the last one did (a half-written
        # document ends the reading early)
        pool._metadata_keys = tuple(dict.fromkeys([*ahead.read, *pool._metadata_keys]))
        raise
    pool._metadata_keys = tuple(ahead.read)
    return image


def _probe_disk_caches(store: Any) -> None:
    """Let each disk cache under ``store`` that is offline try its remote again once."""
    while isinstance(store, WrapperStore):
        if isinstance(store, DiskCacheStore):
            store.probe()
        store = wrapped_store(store)


def _codecs(scale: ScaleInfo) -> str:
    """The array's metadata but its shape and attributes, comparably spelt."""
    meta = dict(scale.array.metadata.to_dict())
    meta.pop("shape", None)
    meta.pop("attributes", None)
    return repr(sorted(meta.items(), key=operator.itemgetter(0)))


def compare(
    old: MultiscaleInfo, new: MultiscaleInfo
) -> tuple[dict[int, tuple[tuple[int, ...], tuple[int, ...]]], tuple[int, ...]] | None:
    """``(grown, added levels)`` from ``old`` to ``new``, or None if the pool cannot
    follow (see the module's docstring)."""
    if len(new.levels) < len(old.levels):
        return None
    grown = {}
    for o, n in zip(old.levels, new.levels, strict=False):
        if (
            o.path != n.path
            or o.dtype != n.dtype
            or o.chunk_shape != n.chunk_shape
            or o.shard_shape != n.shard_shape
            or o.axes != n.axes
            or o.scale != n.scale
            or o.translation != n.translation
            or len(o.shape) != len(n.shape)
            or any(map(operator.lt, n.shape, o.shape))
            or _codecs(o) != _codecs(n)
        ):
            return None
        if n.shape != o.shape:
            grown[o.level] = (o.shape, n.shape)
    return grown, tuple(range(len(old.levels), len(new.levels)))


def refresh_pool(pool: ChunkPool, on_metadata: Callable[[Changes], None] | None = None) -> Changes:
    """:meth:`ChunkPool.refresh` (one at a time per pool)."""
    with pool._refresh_lock:
        if pool._destroyed:
            raise PoolDestroyedError("the pool was destroyed")
        old = pool._info
        _probe_disk_caches(old.levels[0].array.store)
        # the metadata asked for first, then the remote checks: both under way at once
        ahead = _read_ahead(pool)
        checks: _Checks | None = None
        try:
            checks = _Checks(pool)
            new = _reread(pool, ahead)
            verdict = compare(old, new)
            if verdict is None:
                return Changes(reopened=True)
            grown, added = verdict
            rewritten: list[ChunkKey] = []
            if grown or added:
                sources = {
                    level: ChunkSource(
                        new.levels[level],
                        pool._buffers,
                        name=new.source,
                        retry=pool._retry,
                        shard_indexes=pool._index_cache,
                        processes=pool._processes,
                    )
                    for level in (*grown, *added)
                }
                _apply(pool, new, sources, grown, rewritten)
                if on_metadata is not None:
                    on_metadata(
                        Changes(grown=grown, added_levels=added, rewritten=tuple(rewritten))
                    )
            rewritten += _revalidate(pool, checks)
            return Changes(grown=grown, added_levels=added, rewritten=tuple(rewritten))
        finally:  # what is still under way is not wanted (a failure, a reopen)
            if checks is not None:
                checks.cancel()
            if ahead is not None:
                ahead.close()


def _apply(
    pool: ChunkPool,
    new: MultiscaleInfo,
    sources: dict[int, ChunkSource],
    grown: dict[int, Any],
    rewritten: list[ChunkKey],
) -> None:
    """Serve ``new`` (grown or added levels): new sources, a grown chunk grid, the
    locations of grown levels moved to the new level info; old-edge chunks whose
    cropped shape grew are reloaded or dropped."""
    calls: list[HandlerCall] = []
    jobs: list[LoadJob] = []
    cancelled: list[LoadJob] = []
    with pool._lock:
        if pool._destroyed:
            return
        n_old = len(pool._sources)
        for level, source in sorted(sources.items()):
            if level < n_old:
                pool._sources[level] = source
                pool._levels[level] = None
            else:
                pool._sources.append(source)
                pool._levels.append(None)
        pool._info = new
        locs = [(loc, False) for loc in pool._chunks.values()]
        locs += [(loc, True) for loc in pool._cache]
        for loc, cached in locs:
            level = loc._scale_info.level
            if level not in grown:
                continue
            scale = new.levels[level]
            before = loc._scale_info.chunk_data_shape(loc._index)
            loc._scale_info = scale
            if scale.chunk_data_shape(loc._index) == before:
                continue
            nbytes = scale.chunk_nbytes(loc._index)
            if cached:
                pool._cache.take(loc.key)
                pool._destroy_loc(loc, calls)
            elif loc._state is _LOADED or loc._job is not None:
                job = loc._job
                if job is not None and not loc._waiting:
                    cancelled.append(job)
                pool._pending_bytes += nbytes - (loc._nbytes if job is not None else 0)
                loc._nbytes = nbytes
                if job is None:
                    pool._loading += 1
                loc._job = LoadJob(sources[level], loc._index, loc.priority, pool._on_job_done)
                if not loc._waiting:
                    jobs.append(loc._job)
            else:  # failed: retried when requested again after it is let go
                loc._nbytes = nbytes
                continue
            rewritten.append(loc.key)
        if cancelled:
            pool._scheduler.cancel_many(cancelled)
        if jobs:
            pool._scheduler.submit_many(jobs)
        done = _after_lock(pool, calls)
    done()


def _revalidate(pool: ChunkPool, checks: _Checks) -> list[ChunkKey]:
    """Reload or drop the chunks ``checks`` found changed. Their keys."""
    stamps = checks.stamps()
    rewritten: list[ChunkKey] = []
    calls: list[HandlerCall] = []
    jobs: list[LoadJob] = []
    with pool._lock:
        if pool._destroyed:
            return rewritten
        clock = pool._check_clock
        for loc, stamp in zip(checks.picked, stamps, strict=True):
            if loc._stamp is None or stamp is _UNKNOWN:
                continue  # (unknown: not counted as checked, so it comes first next time)
            loc._checked = next(clock)
            if stamp == loc._stamp:
                continue
            source = checks.sources[loc._scale_info.level]
            if source._sharding is not None:  # its index is of the old shard
                shard = tuple(map(operator.floordiv, loc._index, source._chunks_per_shard))
                pool._index_cache.discard((loc._scale_info.level, shard), loc._stamp)
            key = loc.key
            if pool._chunks.get(key) is loc:
                if loc._state is not _LOADED or loc._job is not None:
                    continue
                _reload(pool, loc, jobs)
            elif pool._cache.take(key) is loc:
                pool._destroy_loc(loc, calls)
            else:
                continue
            rewritten.append(key)
        if jobs:
            pool._scheduler.submit_many(jobs)
        done = _after_lock(pool, calls)
    done()
    return rewritten


#: A stored object's version that could not be learnt now (the remote unreachable).
_UNKNOWN: Any = object()


class _Checks:
    """The revalidation of one refresh: at most ``pool._revalidate`` loaded chunks (held
    or cached), oldest check first, picked when made. One request per stored object:
    for remote stores conditional requests (or HEADs) against the version read, sent
    at once when made, on zarr's loop (at most ``remote_io_concurrency`` in flight),
    each with the store's retries, so that their round trip is the metadata reads'
    (made before those); for local files a ``stat``, in :meth:`stamps`."""

    def __init__(self, pool: ChunkPool):
        with pool._lock:
            candidates = [
                loc
                for loc in pool._chunks.values()
                if loc._state is _LOADED and loc._job is None and loc._stamp is not None
            ]
            candidates += [loc for loc in pool._cache if loc._stamp is not None]
            self.picked: list[ChunkLocation] = heapq.nsmallest(
                pool._revalidate, candidates, key=_by_check
            )
            self.sources: list[ChunkSource] = list(pool._sources)
        self._local: dict[str, tuple[ChunkSource, tuple[int, ...]]] = {}
        remote: dict[tuple[int, str], tuple[ChunkSource, tuple[int, ...], Any]] = {}
        self._wanted: list[tuple[bool, Any]] = []
        for loc in self.picked:
            source = self.sources[loc._scale_info.level]
            key = source.stored_key(loc._index)
            if source.stat_root is not None or source.is_sync:
                self._local.setdefault(key, (source, loc._index))
                self._wanted.append((False, key))
            else:
                remote.setdefault((id(source), key), (source, loc._index, loc._stamp))
                self._wanted.append((True, (id(source), key)))
        self._remote = list(remote)
        self._future: concurrent.futures.Future[list[Any]] | None = None
        if remote:
            self._future, wait = _check_remote(pool, list(remote.values()))
            self._deadline = time.monotonic() + wait

    def cancel(self) -> None:
        """Stop the checks still under way (none once :meth:`stamps` returned)."""
        if self._future is not None:
            self._future.cancel()

    def stamps(self) -> list[Any]:
        """The version now of each picked chunk's stored object (local files are
        stat-ed now, remote checks waited for, as long as the retry policy lets them
        take); ``_UNKNOWN`` where a check failed."""
        local = {key: source.stamp(index) for key, (source, index) in self._local.items()}
        found: dict[tuple[int, str], Any] = {}
        if self._future is not None:
            try:
                results = self._future.result(max(self._deadline - time.monotonic(), 0.0))
            except concurrent.futures.TimeoutError:
                self._future.cancel()
            else:
                found = dict(zip(self._remote, results, strict=True))
        return [found.get(k, _UNKNOWN) if is_remote else local[k] for is_remote, k in self._wanted]


def _check_remote(
    pool: ChunkPool, objects: list[tuple[ChunkSource, tuple[int, ...], Any]]
) -> tuple[concurrent.futures.Future[list[Any]], float]:
    """Ask for the versions of remote ``objects`` concurrently (``_UNKNOWN`` for a check
    that failed); the future of the answers, and how long they may take (what the
    retry policy lets the checks take)."""
    limit = asyncio.Semaphore(pool._scheduler._remote_io_concurrency)

    async def one(source: ChunkSource, index: tuple[int, ...], stamp: Any) -> Any:
        async with limit:
            try:
                now = await source.remote_stamp(index, stamp)
            except Exception as err:
                logger.debug(
                    "chunkpool: revalidating %s failed: %s", source.name, describe_error(err)
                )
                return _UNKNOWN
            return _UNKNOWN if now is None else now

    async def all_of() -> list[Any]:
        return await asyncio.gather(*(one(*o) for o in objects))

    retry = pool._retry or RetryPolicy()
    per_check = retry.attempts * (retry.timeout + 1.5 * retry.max_delay)
    waves = -(-len(objects) // pool._scheduler._remote_io_concurrency)
    future = asyncio.run_coroutine_threadsafe(all_of(), zarr_loop())
    return future, per_check * waves + 5.0


def _reload(pool: ChunkPool, loc: ChunkLocation, jobs: list[LoadJob]) -> None:
    """Read a held loaded chunk again; its data stays until the new one arrives.
    Holds the pool's lock."""
    loc._job = LoadJob(pool._sources[loc.level], loc._index, loc.priority, pool._on_job_done)
    pool._pending_bytes += loc._nbytes
    pool._loading += 1
    jobs.append(loc._job)


def _after_lock(pool: ChunkPool, calls: list[HandlerCall]) -> Callable[[], None]:
    """Under the pool's lock, after chunks were dropped (their destroy-handler
    ``calls``): what to run once it is released (handlers run without it)."""
    if pool._budget is not None:
        pool._budget.generation += 1  # room
        return pool._settle(calls).finish
    rest = pool._deliver(calls)
    return lambda: pool._finish(rest)


class Watcher:
    """Refreshes a pool every ``interval`` seconds in one thread (see ``ChunkPool.watch``),
    and sooner when a file of a local store changes.

    For a local store (a ``LocalStore``, also under wrappers) with ``watchfiles``
    installed, a second thread watches the image's directory through the operating
    system (inotify on Linux): a burst of changes wakes the refresh once, ``_STEP`` after
    its last change (at most ``_DEBOUNCE`` after its first), so a new time point is seen
    as soon as its metadata lands (and once when the watch is set up, for what changed
    before). The timer stays as a fallback (a network file system
    whose writers are elsewhere sends no events). Setting the watch up lists the store's
    directories once (no stat per chunk); if it cannot be set up (the kernel's watch
    limit, the directory gone) the watch polls only, and a store deleted or replaced is
    watched again once it is back.
    """

    def __init__(
        self,
        pool: ChunkPool,
        interval: float,
        on_change: Callable[[Changes], None] | None = None,
        on_error: Callable[[str | None], None] | None = None,
    ):
        self._pool = pool
        self.interval = interval
        self._on_change = on_change
        self._on_error = on_error
        self._stop = threading.Event()
        self._wake = threading.Event()  # a file changed, or stop
        self._last_error: str | None = None
        self._failures = 0  # failed refreshes in a row (the first ones tried again soon)
        name = f"chunkpool-watch {pool._info.source}"
        self._threads = [threading.Thread(target=self._run, name=name, daemon=True)]
        directory = _watched_directory(pool._info)
        if directory is not None and watchfiles is not None:
            self._threads.append(
                threading.Thread(
                    target=self._watch_files,
                    args=(directory,),
                    name=f"chunkpool-files {pool._info.source}",
                    daemon=True,
                )
            )

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        started = ended = time.monotonic()
        while True:
            soon = 0 < self._failures < _CONFIRM  # not reported yet: try again soon
            period = min(_RETRY, self.interval) if soon else self.interval
            due = ended + next_wait(started, ended, period)
            self._wake.wait(max(due - time.monotonic(), 0.0))
            if self._stop.is_set():
                return
            self._wake.clear()
            started = time.monotonic()
            if not self.tick(early=True):
                return
            ended = time.monotonic()

    def _watch_files(self, directory: str) -> None:
        """Wake the refresh when a file under ``directory`` changes (see the class),
        and once when the watch is set up (for what changed before)."""
        while not self._stop.is_set():
            armed = _identity(directory)
            first = True
            if armed is None:  # not there (yet, or any more): the timer polls meanwhile
                self._stop.wait(self.interval)
                continue
            try:
                for changes in watchfiles.watch(
                    directory,
                    watch_filter=None,
                    debounce=_DEBOUNCE,
                    step=_STEP,
                    stop_event=self._stop,
                    rust_timeout=_ARMED,
                    yield_on_timeout=True,
                    force_polling=False,  # never its polling: it stats every file
                    ignore_permission_denied=True,
                ):
                    if changes or first:  # first: set up, look at what changed before
                        first = False
                        self._wake.set()
                    if _identity(directory) != armed:  # deleted or replaced: arm again
                        self._wake.set()
                        break
            except FileNotFoundError:
                continue
            except Exception as err:
                logger.info(
                    "chunkpool: %s: no file-system watch (%s), polling every %g s",
                    self._pool._info.source,
                    describe_error(err),
                    self.interval,
                )
                return

    def tick(self, *, early: bool = False) -> bool:
        """One refresh: a failure twice in a row is logged (once per distinct error
        until a refresh succeeds again; a first one may be a writer caught between the
        metadata documents of two levels: ``watch`` tries again after ``_RETRY``), a
        change told to ``on_change``. With ``early`` (the watch's own thread), grown
        or added levels are told as soon as the metadata is taken (so that their new
        chunks can be asked for while the revalidation's answers come), and the chunks
        the revalidation then finds rewritten in a second call. False once the pool is
        gone."""
        pool = self._pool
        told: list[Changes] = []

        def tell_now(changes: Changes) -> None:
            told.append(changes)
            self._tell_change(changes)

        try:
            changes = pool.refresh(on_metadata=tell_now) if early else pool.refresh()
        except PoolDestroyedError:
            return False
        except Exception as err:
            message = str(err) if isinstance(err, SourceError) else describe_error(err)
            self._failures += 1
            if self._failures < _CONFIRM:
                return True
            if message != self._last_error:
                self._last_error = message
                logger.warning(
                    "chunkpool: refresh failed, still showing what was read before: %s",
                    message,
                )
                self._tell_error(message)
            return True
        self._failures = 0
        if self._last_error is not None:
            self._last_error = None
            logger.info("chunkpool: %s: refresh works again", pool._info.source)
            self._tell_error(None)
        if told:
            rest = changes.rewritten[len(told[0].rewritten) :]
            if rest:
                self._tell_change(Changes(rewritten=rest))
        elif changes.changed:
            self._tell_change(changes)
        return True

    def _tell_change(self, changes: Changes) -> None:
        if self._on_change is not None:
            try:
                self._on_change(changes)
            except Exception:
                logger.exception("chunkpool: a watch on_change handler raised")

    def _tell_error(self, message: str | None) -> None:
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:
                logger.exception("chunkpool: a watch on_error handler raised")

    def stop(self, timeout: float) -> None:
        """Stop the thread; waits at most ``timeout`` seconds for it (not from itself)."""
        self._stop.set()
        self._wake.set()
        end = time.monotonic() + timeout
        for thread in self._threads:
            if thread.is_alive() and thread is not threading.current_thread():
                thread.join(max(end - time.monotonic(), 0.0))


def next_wait(started: float, ended: float, period: float) -> float:
    """Seconds from the end of a refresh (which ran from ``started`` to ``ended``) to
    the start of the next: refreshes start every ``period`` seconds (a fixed rate: the
    time a refresh takes, a round trip or two for a remote store, does not stretch the
    period, and so the time new data waits for its refresh); one that took longer than
    the period (a slow store, many checks) is followed at once, and the next ones are
    due a period apart from that one (late refreshes never pile up: one at a time)."""
    return max(started + period - ended, 0.0)


def _watched_directory(info: MultiscaleInfo) -> str | None:
    """The local directory of the image ``info`` describes, or None (not local)."""
    root = local_root(info.levels[0].array.store)
    if root is None:
        return None
    directory = os.path.join(root, info.path) if info.path else root
    return directory if os.path.isdir(directory) else root


def _identity(directory: str) -> tuple[int, int] | None:
    """``(device, inode)`` of ``directory``, None if it is not there."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)
