"""MemoryBudget: one hard bound on the memory of the chunks of one or more pools.

``ChunkPool(..., memory_budget=BYTES)`` (or a :class:`MemoryBudget` shared by several
pools: the images of one viewer) bounds what the pools count in ``memory_usage``:
loaded chunks (held or cached), their shard indexes, and the bytes reserved for every
load admitted (``nbytes + ENTRY_OVERHEAD``, from the moment it is queued for the IO
stage until it is loaded, failed or cancelled). At every moment the sum over the
pools is at most the budget.

A new load is a *request*: it waits (PENDING, ``loc.over_budget``, counted in
``stats.over_budget``) until it is admitted. Requests are admitted one at a time,
the most urgent first (lower priority number; ties: the earlier request), and only
in that order: a request that cannot get room blocks the less urgent ones behind it.
To make room for the request at the head, in this order and only if all of it
together would make enough room (nothing is given up in vain):

1. cached (unreferenced) chunks of any pool of the budget, least recently cached
   first, then cached shard indexes, least recently used first;
2. *victims*: chunks of any pool of the budget held at a priority strictly less
   urgent than the request's, least urgent first (ties: the later request first).
   A victim whose load is still queued goes back to waiting (its holders see
   nothing); a loaded (or failed) victim is released: each ref's drop handler and
   the destroy handlers run, as if every holder had dropped it
   (``stats.budget_releases``). A load already being read or decoded is not a
   victim (its memory is in use); it becomes one once loaded.

So the most urgent chunks are never given up, and a request waits only while what is
held at its priority or more urgently fills the budget. Admission is retried whenever
room or ranks may have changed: a drop, a load's end, an eviction, a re-rank. A chunk
whose reservation exceeds the whole budget fails at once with
:class:`~chunkpool.errors.MemoryBudgetError`.

Pools that share a budget share one lock (the budget's), so that one state change
sees and changes all of them; their schedulers and handler loops stay their own.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from typing import TYPE_CHECKING

from .scheduler import JobState

if TYPE_CHECKING:
    from .dispatch import HandlerCall
    from .location import ChunkLocation
    from .pool import ChunkPool
    from .scheduler import LoadJob

_QUEUED = JobState.QUEUED

__all__ = ["ENTRY_OVERHEAD", "MemoryBudget"]

#: Bytes one chunk entry costs beyond its data: its location, ref and handler
#: bookkeeping, its array object, its cache entry. Counted for every loaded chunk (an
#: absent chunk's data is one shared fill-value view), so that a byte bound also bounds
#: the memory of many small or empty chunks. Measured with tracemalloc
#: (tests/test_memory_budget.py checks it stays within 1.5x of what it costs).
ENTRY_OVERHEAD = 1024


class _Effects:
    """What one budgeted state change does to the pools of its budget, applied once
    the decisions are made: jobs to submit or cancel, handler calls to run per pool."""

    __slots__ = ("calls", "cancelled", "futures", "jobs")

    def __init__(self) -> None:
        self.calls: dict[ChunkPool, list[HandlerCall]] = {}
        self.jobs: dict[ChunkPool, list[LoadJob]] = {}
        self.cancelled: dict[ChunkPool, list[LoadJob]] = {}
        self.futures: list[tuple[object, BaseException]] = []  # (future, error) to fail

    def calls_for(self, pool: ChunkPool) -> list[HandlerCall]:
        calls = self.calls.get(pool)
        if calls is None:
            calls = self.calls[pool] = []
        return calls

    def apply(self) -> None:
        """Submit and cancel the jobs, queue the handler calls (under the lock)."""
        for pool, jobs in self.jobs.items():
            pool._scheduler.submit_many(jobs)
        for pool, jobs in self.cancelled.items():
            pool._scheduler.cancel_many(jobs)
        for pool, calls in self.calls.items():
            self.calls[pool] = pool._deliver(calls)

    def finish(self) -> None:
        """Run what must run without the lock: sync handler calls, loop wake-ups,
        failed futures."""
        for pool, calls in self.calls.items():
            pool._finish(calls)
        for future, error in self.futures:
            future.set_exception(error)  # type: ignore[attr-defined]


class MemoryBudget:
    """A hard bound in bytes on what one or more pools count in ``memory_usage``.

    Pass it as ``memory_budget=`` to every :class:`~chunkpool.ChunkPool` that should
    share it (an int makes a budget of the pool's own). See :mod:`chunkpool.budget`
    for what waits and what is released when holders ask for more than fits.
    """

    def __init__(self, nbytes: int):
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ValueError(f"memory_budget must be an int >= 0, not {nbytes!r}")
        self._limit = nbytes
        #: The lock of every pool sharing this budget.
        self._lock = threading.RLock()
        self._pools: list[ChunkPool] = []
        # requests waiting for room: (priority, request order, location); an entry is
        # live while its location waits at that priority (a re-rank pushes a new one)
        self._waiting: list[tuple[float, int, ChunkLocation]] = []
        self._n_waiting = 0
        self._seq = itertools.count()  # request order, across the pools
        self.clock = itertools.count()  # cache order, across the pools (global LRU)
        #: Bumped whenever room may have appeared or a held chunk may have become a
        #: victim; a head request that failed to get room is not retried before.
        self.generation = 0
        self._blocked: tuple[object, float, int] | None = None

    def __repr__(self) -> str:
        return f"<MemoryBudget {self.used} of {self._limit} bytes, {self._n_waiting} waiting>"

    @property
    def limit(self) -> int:
        """The bound, in bytes."""
        return self._limit

    @property
    def used(self) -> int:
        """Bytes counted by the pools sharing this budget (their ``memory_usage``)."""
        with self._lock:
            return self._used()

    @property
    def over_budget(self) -> int:
        """Requests of all the pools waiting for room."""
        return self._n_waiting

    # -- the pools' side (all under ``_lock``) ---------------------------------------

    def _used(self) -> int:
        return sum(pool._memory for pool in self._pools)

    def join(self, pool: ChunkPool) -> None:
        with self._lock:
            self._pools.append(pool)

    def leave(self, pool: ChunkPool) -> None:
        """``pool`` is destroyed: its requests no longer wait (they were cancelled)."""
        self._pools.remove(pool)
        self.generation += 1

    def next_request(self) -> int:
        return next(self._seq)

    def wait(self, loc: ChunkLocation) -> None:
        """``loc`` (its job made, not submitted) waits for room."""
        loc._waiting = True
        self._n_waiting += 1
        self._push(loc)

    def unwait(self, loc: ChunkLocation) -> None:
        """``loc`` no longer waits (admitted, refused or cancelled)."""
        loc._waiting = False
        self._n_waiting -= 1

    def rerank(self, loc: ChunkLocation, priority: float) -> None:
        """A waiting request's priority changed."""
        assert loc._job is not None
        loc._job.priority = priority
        self._push(loc)

    def _push(self, loc: ChunkLocation) -> None:
        assert loc._job is not None
        heap = self._waiting
        heapq.heappush(heap, (loc._job.priority, loc._seq, loc))
        if len(heap) > 64 + 4 * self._n_waiting:  # many stale entries: rebuild
            self._waiting = [e for e in heap if self._live(e)]
            heapq.heapify(self._waiting)

    @staticmethod
    def _live(entry: tuple[float, int, ChunkLocation]) -> bool:
        loc = entry[2]
        return loc._waiting and loc._job is not None and loc._job.priority == entry[0]

    def _head(self) -> ChunkLocation | None:
        heap = self._waiting
        while heap:
            if self._live(heap[0]):
                return heap[0][2]
            heapq.heappop(heap)
        return None

    def index_fits(self, nbytes: int, effects: _Effects) -> bool:
        """Whether a shard index of ``nbytes`` may be cached: only while no request
        waits (room goes to requests first), in free room or room made by evicting
        cached chunks and indexes."""
        if self._n_waiting:
            return False
        short = nbytes - (self._limit - self._used())
        return short <= 0 or self._evict_cached(short, effects, only_if_enough=True)

    def settle(self, effects: _Effects) -> None:
        """Admit waiting requests, most urgent first, while they can be given room."""
        while True:
            loc = self._head()
            if loc is None:
                return
            need = loc._nbytes + ENTRY_OVERHEAD
            pool = loc._pool
            if need > self._limit:
                heapq.heappop(self._waiting)
                pool._refuse(loc, self._limit, effects)
                continue
            short = need - (self._limit - self._used())
            if short > 0:
                priority = loc._job.priority  # type: ignore[union-attr]
                if self._blocked == (loc, priority, self.generation):
                    return  # nothing changed since it last failed
                if not self._make_room(short, priority, effects):
                    self._blocked = (loc, priority, self.generation)
                    return
            heapq.heappop(self._waiting)
            pool._admit(loc, effects)

    def _evict_cached(self, short: int, effects: _Effects, *, only_if_enough: bool) -> bool:
        """Evict cached chunks (global LRU), then cached shard indexes, until ``short``
        bytes are free; with ``only_if_enough``, evict nothing unless that suffices.
        Returns whether it did."""
        pools = self._pools
        if only_if_enough:
            cached = sum(p._cache.nbytes + p._index_cache.nbytes for p in pools)
            if cached < short:
                return False
        while short > 0:
            oldest = None
            for p in pools:
                loc = p._cache.oldest()
                if loc is not None and (oldest is None or loc._cached_at < oldest._cached_at):
                    oldest = loc
            if oldest is None:
                break
            short -= oldest._pool._evict_cached(oldest, effects)
        for p in pools:
            if short <= 0:
                break
            short -= p._evict_indexes(short)
        return short <= 0

    def _victims(self, priority: float) -> list[ChunkLocation]:
        """Held chunks that may give way to a request at ``priority``: less urgent,
        counted, and not being read or decoded; least urgent first, then the later
        request first."""
        found = []
        for p in self._pools:
            for loc in p._chunks.values():
                if loc._held_bytes and not loc._waiting and loc.priority > priority:
                    job = loc._job
                    if job is None or job.state is _QUEUED:
                        found.append(loc)
        found.sort(key=lambda loc: (-loc.priority, -loc._seq))
        return found

    def _make_room(self, short: int, priority: float, effects: _Effects) -> bool:
        """Free ``short`` bytes for a request at ``priority`` (see the module's
        docstring), or change nothing and return False."""
        cached = sum(p._cache.nbytes + p._index_cache.nbytes for p in self._pools)
        if cached >= short:
            return self._evict_cached(short, effects, only_if_enough=False)
        victims = self._victims(priority)
        remaining = sum(v._held_bytes for v in victims)
        if cached + remaining < short:
            return False
        short -= cached
        self._evict_cached(cached, effects, only_if_enough=False)
        for victim in victims:
            if short <= 0:
                break
            charge = victim._held_bytes
            if remaining < short:  # a queued victim started meanwhile: stop, in vain
                return False
            remaining -= charge
            if victim._job is not None:
                if victim._pool._preempt(victim):
                    short -= charge
            else:
                victim._pool._release_for_budget(victim, effects)
                short -= charge
        return short <= 0
