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

A refresh whose metadata cannot be read (the store deleted, JSON half written) raises a
:class:`~chunkpool.errors.SourceError` and changes nothing. ``watch`` refreshes on a
timer in one thread of the pool, logs such failures as one WARNING per distinct error
until a refresh succeeds again, and calls ``on_change`` (in that thread) when something
changed.

Not covered yet: remote stores (no ETag / Last-Modified revalidation: their chunks carry
no stamp and are never revalidated), the disk cache, channel or name metadata changes,
and under a memory budget a reload is not admitted through the budget (its old data's
memory stays counted, the new replaces it when it lands).
"""

from __future__ import annotations

import heapq
import logging
import operator
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import zarr

from .errors import PoolDestroyedError, SourceError
from .info import MultiscaleInfo, ScaleInfo
from .location import ChunkKey, ChunkLocation, ChunkState
from .metadata import read_multiscales
from .scheduler import LoadJob
from .source import ChunkSource, Stamp
from .stores import describe_error

if TYPE_CHECKING:
    from .dispatch import HandlerCall
    from .pool import ChunkPool

__all__ = ["Changes", "Watcher", "refresh_pool"]

logger = logging.getLogger("chunkpool")

_LOADED = ChunkState.LOADED
_by_check = operator.attrgetter("_checked")


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


def reread(info: MultiscaleInfo) -> MultiscaleInfo:
    """The image ``info`` describes, read again from its store. Raises SourceError."""
    first = info.levels[0]
    store = first.array.store
    try:
        if info.ome_version is None and len(info.levels) == 1:  # a lone array
            node: Any = zarr.open_array(store=store, path=first.array.path, mode="r")
        else:
            node = zarr.open_group(store=store, path=info.path, mode="r")
        images = read_multiscales(node, info.source)
    except SourceError:
        raise
    except Exception as err:
        failure = describe_error(err)
    else:
        for image in images:
            if image.levels[0].path == first.path and image.name == info.name:
                return image
        if len(images) == 1:
            return images[0]
        failure = f"no image with first level {first.path!r} any more"
    where = f"{info.source}/{info.path}" if info.path else info.source
    # raised outside the handler: the library's exception is neither cause nor context
    raise SourceError(f"{where}: refresh: {failure}")


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


def refresh_pool(pool: ChunkPool) -> Changes:
    """:meth:`ChunkPool.refresh` (one at a time per pool)."""
    with pool._refresh_lock:
        if pool._destroyed:
            raise PoolDestroyedError("the pool was destroyed")
        old = pool._info
        new = reread(old)
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
        rewritten += _revalidate(pool)
        return Changes(grown=grown, added_levels=added, rewritten=tuple(rewritten))


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


def _revalidate(pool: ChunkPool) -> list[ChunkKey]:
    """Check the stored objects of at most ``pool._revalidate`` loaded chunks (held or
    cached), oldest check first; reload or drop those that changed. Their keys."""
    with pool._lock:
        candidates = [
            loc
            for loc in pool._chunks.values()
            if loc._state is _LOADED and loc._job is None and loc._stamp is not None
        ]
        candidates += [loc for loc in pool._cache if loc._stamp is not None]
        picked = heapq.nsmallest(pool._revalidate, candidates, key=_by_check)
        sources = list(pool._sources)
    seen: dict[str, Stamp | None] = {}  # one stat per file
    stamps = []
    for loc in picked:
        source = sources[loc._scale_info.level]
        key = source.stored_key(loc._index)
        if key not in seen:
            seen[key] = source.stamp(loc._index)
        stamps.append(seen[key])
    rewritten: list[ChunkKey] = []
    calls: list[HandlerCall] = []
    jobs: list[LoadJob] = []
    with pool._lock:
        if pool._destroyed:
            return rewritten
        clock = pool._check_clock
        for loc, stamp in zip(picked, stamps, strict=True):
            if loc._stamp is None:
                continue
            loc._checked = next(clock)
            if stamp == loc._stamp:
                continue
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
    """Refreshes a pool every ``interval`` seconds in one thread (see ``ChunkPool.watch``)."""

    def __init__(
        self,
        pool: ChunkPool,
        interval: float,
        on_change: Callable[[Changes], None] | None = None,
    ):
        self._pool = pool
        self.interval = interval
        self._on_change = on_change
        self._stop = threading.Event()
        self._last_error: str | None = None
        self._thread = threading.Thread(
            target=self._run, name=f"chunkpool-watch {pool._info.source}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.tick():
                return

    def tick(self) -> bool:
        """One refresh: a failure is logged (once per distinct error until a refresh
        succeeds again), a change told to ``on_change``. False once the pool is gone."""
        pool = self._pool
        try:
            changes = pool.refresh()
        except PoolDestroyedError:
            return False
        except Exception as err:
            message = str(err) if isinstance(err, SourceError) else describe_error(err)
            if message != self._last_error:
                self._last_error = message
                logger.warning(
                    "chunkpool: refresh failed, still showing what was read before: %s",
                    message,
                )
            return True
        if self._last_error is not None:
            self._last_error = None
            logger.info("chunkpool: %s: refresh works again", pool._info.source)
        if changes.changed and self._on_change is not None:
            try:
                self._on_change(changes)
            except Exception:
                logger.exception("chunkpool: a watch on_change handler raised")
        return True

    def stop(self, timeout: float) -> None:
        """Stop the thread; waits at most ``timeout`` seconds for it (not from itself)."""
        self._stop.set()
        thread = self._thread
        if thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout)
