"""The loading engine: a priority queue feeding a bounded IO stage and a CPU stage.

Each load is a :class:`LoadJob`. Jobs wait in the scheduler's own priority queue (one
heap per store window), so re-prioritising or cancelling a waiting job is cheap and
never touches an executor. Only a few jobs are in flight at once:

- **IO stage** (fetch the encoded bytes): at most ``io_concurrency`` jobs per store
  window. Synchronous stores (local files, memory) are read in a small pool of IO
  threads; asynchronous stores (HTTP, S3) are read by tasks on zarr's event loop,
  which a cancel really aborts.
- **CPU stage** (decode): a pool of ``cpu_workers`` threads (the codecs release the
  GIL). While ``decode_backlog`` fetched jobs wait for a decoder, no new fetch starts:
  memory stays bounded and late re-prioritisations still count.

A job is started, in priority order, whenever a slot frees up (``_pump``). The
scheduler never calls back into its owner while holding its lock; ``on_done`` runs in
a worker thread (or on zarr's loop) once per job that was not cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .source import ChunkSource, RawChunk
from .workers import Workers

__all__ = ["Abandoned", "JobState", "LoadJob", "LoadScheduler"]


class JobState(enum.Enum):
    QUEUED = "queued"
    FETCHING = "fetching"
    DECODING = "decoding"
    DONE = "done"
    CANCELLED = "cancelled"


class Abandoned(NamedTuple):
    """What :meth:`LoadScheduler.shutdown` left running when its timeout ran out."""

    threads: int  # worker threads still busy
    chunks: list[tuple[int, tuple[int, ...]]]  # (level, index) of the loads they run


DoneCallback = Callable[["LoadJob", "np.ndarray | None", "BaseException | None"], None]


@dataclass(eq=False)
class LoadJob:
    """One chunk to load: where from, how urgent, and what to call when done."""

    source: ChunkSource
    index: tuple[int, ...]
    priority: float
    on_done: DoneCallback
    state: JobState = JobState.QUEUED
    submitted_at: float = field(default_factory=time.perf_counter)
    nbytes_fetched: int = 0
    _seq: int = 0
    _version: int = 0
    _io_future: concurrent.futures.Future | None = None


@dataclass(eq=False)
class _Window:
    """The waiting jobs and in-flight fetches of one store."""

    limit: int
    heap: list[tuple[float, int, int, LoadJob]] = field(default_factory=list)
    queued: int = 0
    in_flight: int = 0

    def peek(self) -> LoadJob | None:
        """The best live job, dropping stale heap entries on the way."""
        heap = self.heap
        while heap:
            _, _, version, job = heap[0]
            if job.state is JobState.QUEUED and version == job._version:
                return job
            heapq.heappop(heap)
        return None

    def push(self, job: LoadJob) -> None:
        heapq.heappush(self.heap, (job.priority, job._seq, job._version, job))
        if len(self.heap) > 64 + 4 * self.queued:  # many stale entries: rebuild
            self.heap = [
                e for e in self.heap if e[3].state is JobState.QUEUED and e[2] == e[3]._version
            ]
            heapq.heapify(self.heap)


class LoadScheduler:
    """Runs :class:`LoadJob` s through the IO and CPU stages, best priority first."""

    def __init__(
        self,
        *,
        io_concurrency: int = 8,
        remote_io_concurrency: int = 64,
        cpu_workers: int = 2,
        decode_backlog: int | None = None,
    ):
        self._io_concurrency = io_concurrency
        self._remote_io_concurrency = remote_io_concurrency
        self._decode_backlog = decode_backlog if decode_backlog is not None else 2 * cpu_workers
        self._lock = threading.Lock()
        self._windows: dict[object, _Window] = {}
        self._decoding = 0
        self._active: set[LoadJob] = set()  # fetching or decoding
        self._seq = itertools.count()
        self._closed = False
        self._io_workers = Workers("io", io_concurrency)
        self._cpu_workers = Workers("decode", cpu_workers)

    # -- the owner's side -------------------------------------------------------------

    def submit(self, job: LoadJob) -> None:
        """Queue a job; it starts when it is the best waiting one and a slot is free."""
        with self._lock:
            if self._closed:
                raise RuntimeError("scheduler is shut down")
            job._seq = next(self._seq)
            window = self._window_for(job.source)
            window.queued += 1
            window.push(job)
            self._pump()

    def reprioritize(self, job: LoadJob, priority: float) -> None:
        """Change a job's priority; only a waiting job is affected."""
        with self._lock:
            if job.priority == priority:
                return
            job.priority = priority
            if job.state is JobState.QUEUED:
                job._version += 1
                self._windows[job.source.window_key].push(job)

    def cancel_many(self, jobs: list[LoadJob]) -> None:
        """Cancel jobs: a waiting one never starts, an async fetch is aborted, and the
        result of a running one is discarded. ``on_done`` is not called afterwards.
        All are cancelled before any freed slot is reused."""
        with self._lock:
            for job in jobs:
                state = job.state
                if state in (JobState.DONE, JobState.CANCELLED):
                    continue
                job.state = JobState.CANCELLED
                if state is JobState.QUEUED:
                    self._windows[job.source.window_key].queued -= 1
                elif state is JobState.FETCHING and job._io_future is not None:
                    job._io_future.cancel()

    def counts(self) -> tuple[int, int, int]:
        """(waiting, fetching, decoding) job counts."""
        with self._lock:
            waiting = sum(w.queued for w in self._windows.values())
            fetching = sum(w.in_flight for w in self._windows.values())
            return waiting, fetching, self._decoding

    def shutdown(self, timeout: float) -> Abandoned:
        """Cancel everything and stop the worker threads.

        In-flight reads and decodes are cancelled: their results will be discarded. Wait
        ``timeout`` seconds at most (both stages together) for the threads to end, and
        report those still busy, with their chunks: a synchronous read may never return
        (a FIFO, a stuck network filesystem). Such a thread is abandoned; if its read
        ever returns, the result is discarded (the job is cancelled and the scheduler
        closed) and the thread ends by itself.
        """
        with self._lock:
            self._closed = True
            for window in self._windows.values():
                for _, _, _, job in window.heap:
                    job.state = JobState.CANCELLED
                window.heap.clear()
                window.queued = 0
            in_threads: set[LoadJob] = set()  # jobs a worker thread of ours is running
            for job in self._active:
                if job.source.is_sync or job.state is JobState.DECODING:
                    in_threads.add(job)
                job.state = JobState.CANCELLED
                if job._io_future is not None:
                    job._io_future.cancel()
        deadline = time.monotonic() + timeout
        busy = self._io_workers.shutdown(deadline) + self._cpu_workers.shutdown(deadline)
        if not busy:
            return Abandoned(0, [])
        with self._lock:  # what the busy threads are still running
            stuck = [job for job in self._active if job in in_threads]
        keys = sorted((job.source.scale.level, job.index) for job in stuck)
        return Abandoned(len(busy), keys)

    # -- internals --------------------------------------------------------------------

    def _window_for(self, source: ChunkSource) -> _Window:
        window = self._windows.get(source.window_key)
        if window is None:
            limit = self._io_concurrency if source.is_sync else self._remote_io_concurrency
            window = self._windows[source.window_key] = _Window(limit)
        return window

    def _pump(self) -> None:
        """Start the best waiting jobs while slots are free. Holds ``_lock``."""
        if self._closed:
            return
        while self._decoding < self._decode_backlog:
            best: tuple[_Window, LoadJob] | None = None
            for window in self._windows.values():
                if window.in_flight >= window.limit or not window.queued:
                    continue
                job = window.peek()
                if job is not None and (
                    best is None or (job.priority, job._seq) < (best[1].priority, best[1]._seq)
                ):
                    best = (window, job)
            if best is None:
                return
            window, job = best
            heapq.heappop(window.heap)
            window.queued -= 1
            window.in_flight += 1
            job.state = JobState.FETCHING
            self._active.add(job)
            self._start_fetch(job)

    def _start_fetch(self, job: LoadJob) -> None:
        if job.source.is_sync:
            self._io_workers.submit(self._fetch_sync, job)
        else:
            job._io_future = asyncio.run_coroutine_threadsafe(
                self._fetch_async(job), job.source.io_loop()
            )

    def _fetch_sync(self, job: LoadJob) -> None:
        """IO stage for a synchronous store, in an IO thread."""
        if job.state is not JobState.FETCHING:  # cancelled while waiting for a thread
            self._fetched(job, None, None)
            return
        try:
            raw = job.source.fetch_sync(job.index)
        except Exception as err:
            self._fetched(job, None, err)
        else:
            self._fetched(job, raw, None)

    async def _fetch_async(self, job: LoadJob) -> None:
        """IO stage for an asynchronous store, as a task on zarr's event loop."""
        try:
            raw = await job.source.fetch_async(job.index)
        except asyncio.CancelledError:
            self._fetched(job, None, None)
            raise
        except Exception as err:
            self._fetched(job, None, err)
        else:
            self._fetched(job, raw, None)

    def _fetched(self, job: LoadJob, raw: RawChunk | None, error: Exception | None) -> None:
        """IO stage done: hand the bytes over to a decoder, or report the error."""
        with self._lock:
            self._windows[job.source.window_key].in_flight -= 1
            job._io_future = None
            failed = False
            if job.state is not JobState.FETCHING or self._closed:
                job.state = JobState.CANCELLED
                self._active.discard(job)
                if raw is not None:
                    job.source.release(raw)
            elif error is not None:
                job.state = JobState.DONE
                self._active.discard(job)
                failed = True
            elif raw is not None:
                job.nbytes_fetched = raw.nbytes_fetched
                job.state = JobState.DECODING
                self._decoding += 1
                self._cpu_workers.submit(self._decode, job, raw)
            self._pump()
        if failed:
            job.on_done(job, None, error)

    def _decode(self, job: LoadJob, raw: RawChunk) -> None:
        """CPU stage, in a decoder thread."""
        data: np.ndarray | None = None
        error: BaseException | None = None
        if job.state is JobState.DECODING:
            try:
                data = job.source.decode(job.index, raw)
            except Exception as err:
                error = err
        else:
            job.source.release(raw)
        with self._lock:
            self._decoding -= 1
            self._active.discard(job)
            deliver = job.state is JobState.DECODING and not self._closed
            job.state = JobState.DONE if deliver else JobState.CANCELLED
            self._pump()
        if deliver:
            job.on_done(job, data, error)
