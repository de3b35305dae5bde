"""The loading engine: a priority queue feeding a bounded IO stage and a CPU stage.

Each load is a :class:`LoadJob`. Jobs wait in the scheduler's own priority queue (one
heap per store window), so re-prioritising or cancelling a waiting job is cheap and
never touches an executor. Only a few jobs are in flight at once:

- **IO stage** (fetch the encoded bytes): at most ``io_concurrency`` jobs per store
  window. Synchronous stores (local files, memory) are read by IO threads
  ("loopers") that take the best waiting job themselves whenever they are free, so a
  busy thread goes on to the next job without a hand-off, and a sleeping one is woken
  only for work that no running thread will take. How many run follows from what a
  fetch and a decode typically take (``_update_wanted``). Asynchronous stores (HTTP,
  S3) are read by tasks on zarr's event loop, which a cancel really aborts.
- **CPU stage** (decode): at most ``cpu_workers`` decodes at once (the codecs release
  the GIL). A looper decodes the chunk it read itself when a CPU slot is free (no
  thread hop); otherwise, and for asynchronous stores, the chunk waits in a FIFO
  backlog, served by whoever next holds a slot (decoder threads serve the
  asynchronous stores). While ``decode_backlog`` fetched jobs wait for or run a
  decode, no new fetch starts: memory stays bounded and late re-prioritisations still
  count.

While reads are fast (the page cache), a looper takes a *batch* of the best waiting
jobs of one window (``_take_batch``): it holds one CPU slot, one window place and one
backlog unit for all of them, reads and decodes them in turn, and its results are
published together (``on_done_many``); an idle looper may take a batch's waiting jobs
(``_steal``), so a read that never returns delays no other job.

A job starts, in priority order, when a slot frees up: a looper takes it
(``_take_sync``, ``_take_batch``), or ``_pump`` starts an async fetch. The scheduler
never calls back into its owner while holding its lock; ``on_done`` (or
``on_done_many``, for a batch) runs in a worker thread (or on zarr's loop) once per
job that was not cancelled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from .source import ChunkSource, OpenFiles, RawChunk, close_files
from .workers import Workers

__all__ = ["Abandoned", "Completions", "JobState", "LoadJob", "LoadScheduler"]

logger = logging.getLogger("chunkpool")


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


# Enum member lookups cost ~0.1 µs each on Python 3.11; the hot paths use these.
_QUEUED = JobState.QUEUED
_FETCHING = JobState.FETCHING
_DECODING = JobState.DECODING
_DONE = JobState.DONE
_CANCELLED = JobState.CANCELLED

#: :meth:`LoadScheduler._fetched`'s answer when the fetch failed.
_FAILED = object()

#: Most jobs an IO thread takes at once from a fast local store (a *batch*, read and
#: decoded in turn by that thread, its results published together), and about how
#: many seconds a batch should take: small, so that priorities stay fresh. With local
#: chunks read natively, paired on 2 cores: 8 reached 1.06-1.09x tensorstore's
#: throughput at 128² and 1.04-1.06x at 256², 16 reached 1.17-1.22x and 1.09-1.13x,
#: 24 no more than 16.
MAX_BATCH = 16
BATCH_SECONDS = 0.002
#: The same with decode="processes", where a batch's chunks go to one worker process,
#: which sleeps between batches: a batch costs ~300 µs of CPU there in all (wake-ups of
#: the worker and of the thread, publishing), ~30 µs per chunk at 5 chunks a batch.
PROCESS_MAX_BATCH = 32
PROCESS_BATCH_SECONDS = 0.008
#: Batches are taken while a typical read takes at most this many typical decodes.
BATCH_FETCH_RATIO = 2.0
#: A batch's read that has lasted this long (seconds) is blocked: another IO thread may
#: start for the other jobs. Shorter ones are not counted as reads: on 2 cores at 128²
#: and 256² page-cached chunks, threads added while every batch was "reading" (waiting
#: for the GIL after a read's system call, mostly) cost 15-20% of the throughput.
STALLED_READ = 0.05

#: A decode done: the job, its data or error, and how many seconds it took.
_Decoded = tuple["LoadJob", "np.ndarray | None", "BaseException | None", float]

DoneCallback = Callable[["LoadJob", "np.ndarray | None", "BaseException | None"], None]

#: Completions published together: ``[(job, data, error), ...]``.
Completions = list[tuple["LoadJob", "np.ndarray | None", "BaseException | None"]]


class LoadJob:
    """One chunk to load: where from, how urgent, and what to call when done."""

    __slots__ = (
        "_io_future",
        "_seq",
        "_version",
        "decoded_at",
        "fetch_started_at",
        "fetched_at",
        "index",
        "nbytes_fetched",
        "on_done",
        "priority",
        "source",
        "stamp",
        "state",
        "submitted_at",
    )

    def __init__(
        self,
        source: ChunkSource,
        index: tuple[int, ...],
        priority: float,
        on_done: DoneCallback,
    ):
        self.source = source
        self.index = index
        self.priority = priority
        self.on_done = on_done
        self.state = _QUEUED
        self.submitted_at = time.perf_counter()
        # when it started fetching, was fetched, was decoded (perf_counter; 0.0: not
        # yet): the pool's per-chunk KPI records (chunkpool.kpi)
        self.fetch_started_at = self.fetched_at = self.decoded_at = 0.0
        self.nbytes_fetched = 0
        self.stamp: tuple[int, int] | None = None  # the stored object's, when read
        self._seq = 0
        self._version = 0
        self._io_future: concurrent.futures.Future | None = None

    def __repr__(self) -> str:
        return f"<LoadJob {self.index} priority={self.priority} {self.state.value}>"


class _Window:
    """The waiting jobs and in-flight fetches of one store."""

    __slots__ = ("heap", "in_flight", "limit", "queued", "sync")

    def __init__(self, limit: int, sync: bool):
        self.limit = limit
        self.sync = sync
        self.heap: list[tuple[float, int, int, LoadJob]] = []
        self.queued = 0
        self.in_flight = 0

    def peek(self) -> LoadJob | None:
        """The best live job, dropping stale heap entries on the way."""
        heap = self.heap
        while heap:
            _, _, version, job = heap[0]
            if job.state is _QUEUED and version == job._version:
                return job
            heapq.heappop(heap)
        return None

    def push(self, job: LoadJob) -> None:
        heapq.heappush(self.heap, (job.priority, job._seq, job._version, job))
        if len(self.heap) > 64 + 4 * self.queued:  # many stale entries: rebuild
            self.heap = [e for e in self.heap if e[3].state is _QUEUED and e[2] == e[3]._version]
            heapq.heapify(self.heap)


class _Batch:
    """Jobs one IO thread took together from one window. It holds one CPU slot, one
    unit of the window's in-flight bound and one of the decode backlog for all of
    them: it reads and decodes them in turn (one read buffer alive at a time; the
    consecutive jobs of a level :mod:`chunkpool.native` reads, in one call), then
    publishes what it got in one go. Another IO thread with nothing else to do may
    take its waiting jobs (``pending``: popped at either end, which is atomic), so a
    read that never returns holds up no other job for long (jobs the native call left
    to Python go back to ``pending``, after what it read is published). Written by
    its thread without the lock: ``pending``, ``taken``, ``reading``."""

    __slots__ = (
        "decode_s",
        "fetch_s",
        "pending",
        "publish",
        "published",
        "reading",
        "results",
        "taken",
        "window",
    )

    def __init__(self, window: _Window, jobs: list[LoadJob], publish: Callable[[_Batch], None]):
        self.window = window
        #: Publishes the results so far before the batch ends (``published`` counts
        #: them): done before reads that may not return.
        self.publish = publish
        self.published = 0
        self.pending = deque(jobs)
        self.taken: list[LoadJob] = []  # by this batch's thread, in order
        self.reading = True  # whether the job it is at is being read (else decoded)
        self.results: Completions = []
        self.fetch_s = 0.0  # seconds of this batch's fetches and decodes, in total
        self.decode_s = 0.0

    def run(self) -> None:
        """Read and decode every job not cancelled meanwhile (without the lock)."""
        files = OpenFiles()  # shards stay open for the batch's other inner chunks
        try:
            self._run(self.results, self.taken, self.pending, files)
        finally:
            close_files(files)

    def _run(
        self,
        results: Completions,
        taken: list[LoadJob],
        pending: deque[LoadJob],
        files: OpenFiles,
    ) -> None:
        perf_counter = time.perf_counter
        fetch_s = decode_s = 0.0
        # decode="processes": a worker decodes each job while the next is read (their read
        # buffers stay taken until finish: at most a batch of them)
        pipeline = None
        carried: LoadJob | None = None  # taken, of another level than the group before it
        in_python: set[LoadJob] = set()  # left to Python by the native path
        while True:
            if carried is not None:
                job, carried = carried, None
            else:
                try:
                    job = pending.popleft()
                except IndexError:
                    break
                taken.append(job)
                if job.state is not _FETCHING:  # cancelled since the batch was taken
                    continue
            source = job.source
            if source.native is not None and job not in in_python:
                # the jobs of this level that follow: read and decoded in one call
                group = [job]
                while True:
                    try:
                        job = pending.popleft()
                    except IndexError:
                        break
                    taken.append(job)
                    if job.state is not _FETCHING:
                        continue
                    if job.source is not source or job in in_python:
                        carried = job
                        break
                    group.append(job)
                left = self._run_native(source, group, results)
                # back where another thread may take them, to be read the Python way;
                # one of them may be a read that does not return (a FIFO), so what is
                # read already is published now, not after it
                in_python.update(left)
                if left:
                    self.publish(self)
                if carried is not None:
                    left.append(carried)
                    carried = None
                for job in reversed(left):
                    taken.remove(job)
                    pending.appendleft(job)
                continue
            processes = source.processes
            if processes is None:
                f, d = self._run_one(job, results, files)
                fetch_s, decode_s = fetch_s + f, decode_s + d
                continue
            t0 = perf_counter()
            raw = self._fetch(job, results, files)
            fetch_s += job.fetched_at - t0
            if raw is None:
                continue
            if raw.data is None:  # missing: the fill, here
                decode_s += self._decode(job, raw, results)
                continue
            if pipeline is None:
                pipeline = processes.pipeline()
            pipeline.submit(job, source, job.index, raw)
        if pipeline is not None:
            for job, data, error, seconds in pipeline.finish():  # (seconds in the worker)
                job.decoded_at = perf_counter()
                decode_s += seconds
                results.append((job, data, error))
        self.fetch_s += fetch_s
        self.decode_s += decode_s

    def _fetch(self, job: LoadJob, results: Completions, files: OpenFiles) -> RawChunk | None:
        """Read one job in Python: its bytes, or None (failed: its result is in
        ``results``; or cancelled meanwhile)."""
        self.reading = True
        job.fetch_started_at = time.perf_counter()
        try:
            raw = job.source.fetch_sync(job.index, files)
        except Exception as err:
            job.fetched_at = time.perf_counter()
            results.append((job, None, err))
            return None
        job.fetched_at = time.perf_counter()
        job.nbytes_fetched = raw.nbytes_fetched
        job.stamp = raw.stamp
        if job.state is not _FETCHING:
            job.source.release(raw)
            return None
        self.reading = False
        return raw

    @staticmethod
    def _decode(job: LoadJob, raw: RawChunk, results: Completions) -> float:
        """Decode one fetched job in Python into ``results``; returns the seconds taken."""
        data: np.ndarray | None = None
        error: BaseException | None = None
        try:
            data = job.source.decode(job.index, raw)
        except Exception as err:
            error = err
        job.decoded_at = time.perf_counter()
        results.append((job, data, error))
        return job.decoded_at - job.fetched_at

    def _run_one(self, job: LoadJob, results: Completions, files: OpenFiles) -> tuple[float, float]:
        """Read and decode one job in Python; returns the seconds each took."""
        raw = self._fetch(job, results, files)
        fetch_s = job.fetched_at - job.fetch_started_at
        return fetch_s, 0.0 if raw is None else self._decode(job, raw, results)

    def _run_native(
        self, source: ChunkSource, group: list[LoadJob], results: Completions
    ) -> list[LoadJob]:
        """Read and decode ``group`` (jobs of ``source``) in one call without the GIL
        (:meth:`ChunkSource.fetch_decode_native`); returns the jobs it left for
        :meth:`_run_one` (which then says what is wrong, if anything)."""
        self.reading = True
        t0 = time.perf_counter()
        for job in group:
            job.fetch_started_at = t0
        left = []
        started = t0
        fetch_s = decode_s = 0.0
        for job, result in zip(
            group, source.fetch_decode_native([j.index for j in group]), strict=True
        ):
            if result is None:
                left.append(job)
                continue
            data, job.nbytes_fetched, job.stamp, fetched, decoded = result
            if not fetched:  # a missing chunk: nothing read
                fetched = decoded = started
            job.fetch_started_at, job.fetched_at, job.decoded_at = started, fetched, decoded
            fetch_s += fetched - started
            decode_s += decoded - fetched
            started = decoded
            results.append((job, data, None))
        self.fetch_s += fetch_s
        self.decode_s += decode_s
        return left


def _typical(estimate: float, sample: float) -> float:
    """A decaying minimum of durations: what a step takes when nothing else gets in
    its way. Waits for the GIL or for a core only add to a sample, so the minimum
    sees through them, and rising by 5% per sample it follows a real slow-down
    (a cold disk) within a few dozen samples."""
    if estimate <= 0.0:
        return sample
    return min(sample, estimate * 1.05)


class LoadScheduler:
    """Runs :class:`LoadJob` s through the IO and CPU stages, best priority first."""

    def __init__(
        self,
        *,
        io_concurrency: int = 8,
        remote_io_concurrency: int = 64,
        cpu_workers: int = 2,
        decode_backlog: int | None = None,
        on_done_many: Callable[[Completions], None] | None = None,
    ):
        #: Called with completions published together (a batch's), if given; else
        #: each job's ``on_done`` is called in turn.
        self._on_done_many = on_done_many
        self._io_concurrency = io_concurrency
        self._remote_io_concurrency = remote_io_concurrency
        self._decode_backlog = decode_backlog if decode_backlog is not None else 2 * cpu_workers
        self._lock = threading.Lock()
        self._windows: dict[object, _Window] = {}
        self._sync_windows: list[_Window] = []
        self._async_windows: list[_Window] = []
        self._decoding = 0  # fetched jobs waiting for or running a decode
        self._cpu_limit = cpu_workers
        self._cpu_busy = 0  # CPU slots taken (a decode running or about to)
        self._backlog: deque[tuple[LoadJob, RawChunk]] = deque()  # fetched, waiting for a slot
        # IO threads reading synchronous stores ("loopers"), and how many are wanted
        self._loopers = 0
        self._in_fetch = 0  # loopers fetching, or started and about to
        self._starting = 0  # loopers started that have not taken a job yet
        # Until fetch and decode times are measured: as many IO threads as may read at
        # once, and those holding a CPU slot read in batches (of one job while nothing
        # is measured), so that some of what is measured is not blurred by threads
        # waiting for the GIL, which would make page-cache reads look slow and keep
        # them out of batches for good.
        self._batching = True  # whether reads are fast enough for batches
        self._wanted = io_concurrency
        self._fetch_s = 0.0  # typical seconds of one sync fetch and one decode (_typical)
        self._decode_s = 0.0
        self._active: set[LoadJob] = set()  # fetching or decoding, one at a time
        self._batches: set[_Batch] = set()  # taken by IO threads, not yet published
        # the loop async fetches run on, and their tasks there (touched on that loop only)
        self._async_loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._seq = itertools.count()
        self._closed = False
        self._io_workers = Workers("io", io_concurrency)
        self._cpu_workers = Workers("decode", cpu_workers)

    # -- the owner's side -------------------------------------------------------------

    def submit_many(self, jobs: list[LoadJob]) -> None:
        """Queue jobs, in order, under one hold of the lock; each starts when it is the
        best waiting one and a slot is free."""
        with self._lock:
            if self._closed:
                raise RuntimeError("scheduler is shut down")
            seq, windows = self._seq, self._windows
            for job in jobs:
                job._seq = next(seq)
                window = windows.get(job.source.window_key) or self._window_for(job.source)
                window.queued += 1
                window.push(job)
            self._pump()

    def reprioritize(self, job: LoadJob, priority: float) -> None:
        """Change a job's priority; only a waiting job is affected."""
        with self._lock:
            if job.priority == priority:
                return
            job.priority = priority
            if job.state is _QUEUED:
                job._version += 1
                self._windows[job.source.window_key].push(job)

    def cancel_many(self, jobs: list[LoadJob]) -> None:
        """Cancel jobs: a waiting one never starts, an async fetch is aborted, and the
        result of a running one is discarded. ``on_done`` is not called afterwards.
        All are cancelled before any freed slot is reused."""
        with self._lock:
            for job in jobs:
                state = job.state
                if state is _DONE or state is _CANCELLED:
                    continue
                job.state = _CANCELLED
                if state is _QUEUED:
                    self._windows[job.source.window_key].queued -= 1
                elif state is _FETCHING and job._io_future is not None:
                    job._io_future.cancel()

    def withdraw(self, job: LoadJob) -> bool:
        """Cancel a job only if it is still waiting (it then never starts); False if
        it has started, finished or was cancelled already."""
        with self._lock:
            if job.state is not _QUEUED:
                return False
            job.state = _CANCELLED
            self._windows[job.source.window_key].queued -= 1
            return True

    def counts(self) -> tuple[int, int, int]:
        """(waiting, fetching, decoding) job counts."""
        with self._lock:
            waiting = sum(w.queued for w in self._windows.values())
            fetching = sum(w.in_flight for w in self._windows.values())
            decoding = self._decoding
            for batch in self._batches:  # each holds one fetch and one decode unit
                waiting += len(batch.pending)
                if batch.reading:
                    decoding -= 1
                else:
                    fetching -= 1
            return waiting, fetching, decoding

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
            for batch in self._batches:
                for job in [*batch.taken, *batch.pending]:
                    job.state = JobState.CANCELLED
        deadline = time.monotonic() + timeout
        self._end_tasks(deadline)
        busy = self._io_workers.shutdown(deadline) + self._cpu_workers.shutdown(deadline)
        if not busy:
            return Abandoned(0, [])
        with self._lock:  # what the busy threads are still running
            stuck = [job for job in self._active if job in in_threads]
            stuck += [b.taken[-1] for b in self._batches if b.taken]
        keys = sorted((job.source.scale.level, job.index) for job in stuck)
        return Abandoned(len(busy), keys)

    def _end_tasks(self, deadline: float) -> None:
        """Wait, until ``deadline`` at most, for the async fetch tasks (cancelled) to end
        on their loop, so that none is left pending there when the process exits (it
        would be reported as "Task was destroyed but it is pending")."""
        loop = self._async_loop
        if loop is None or loop.is_closed():
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            return  # called from a loop (maybe that one): it must not block
        # queued after every fetch scheduled so far: each has started (or ended) by then
        ended = asyncio.run_coroutine_threadsafe(self._cancel_tasks(deadline), loop)
        try:
            ended.result(max(0.0, deadline - time.monotonic()))
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            ended.cancel()

    async def _cancel_tasks(self, deadline: float) -> None:
        """On the fetches' loop: cancel this scheduler's tasks and await them."""
        tasks = [task for task in self._tasks if not task.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))

    # -- internals --------------------------------------------------------------------

    def _window_for(self, source: ChunkSource) -> _Window:
        window = self._windows.get(source.window_key)
        if window is None:
            limit = self._io_concurrency if source.is_sync else self._remote_io_concurrency
            window = self._windows[source.window_key] = _Window(limit, source.is_sync)
            (self._sync_windows if source.is_sync else self._async_windows).append(window)
        return window

    @staticmethod
    def _best(windows: list[_Window]) -> _Window | None:
        """The window holding the best waiting job that may start. Holds ``_lock``."""
        best: _Window | None = None
        best_job: LoadJob | None = None
        for window in windows:
            if window.in_flight >= window.limit or not window.queued:
                continue
            job = window.peek()
            if job is not None and (
                best_job is None or (job.priority, job._seq) < (best_job.priority, best_job._seq)
            ):
                best, best_job = window, job
        return best

    def _start(self, window: _Window) -> LoadJob:
        """Move the best job of ``window`` (just peeked) to the IO stage. Holds ``_lock``."""
        job = heapq.heappop(window.heap)[3]
        window.queued -= 1
        window.in_flight += 1
        job.state = _FETCHING
        self._active.add(job)
        return job

    def _pump(self) -> None:
        """Start the best waiting async fetches while slots are free, and make sure
        enough IO threads run for the synchronous ones. Holds ``_lock``."""
        if self._closed:
            return
        if self._async_windows:
            while self._decoding < self._decode_backlog:
                window = self._best(self._async_windows)
                if window is None:
                    break
                job = self._start(window)
                self._async_loop = loop = job.source.io_loop()
                job._io_future = asyncio.run_coroutine_threadsafe(self._fetch_async(job), loop)
        # Start a thread only for work no started thread will take, up to the number of
        # threads wanted, or beyond while every running one waits on its read.
        loopers = self._loopers
        if (
            not self._sync_windows
            or loopers >= self._io_concurrency
            or (loopers >= self._wanted and self._reading() != loopers)
        ):
            return
        startable = self._decode_backlog - self._decoding
        if startable <= self._starting:
            return
        waiting = sum(min(w.queued, w.limit - w.in_flight) for w in self._sync_windows)
        startable = min(startable, waiting)
        while (
            startable > self._starting
            and self._loopers < self._io_concurrency
            and (self._loopers < self._wanted or self._reading() == self._loopers)
        ):
            self._loopers += 1
            self._starting += 1
            self._in_fetch += 1
            self._io_workers.submit(self._io_loop)

    def _reading(self) -> int:
        """IO threads waiting on a read (or about to start): fetching a single job, or
        at a read in their batch that has lasted over :data:`STALLED_READ`. (A batch's
        reads are page-cache copies of microseconds: one at a read longer than that
        is blocked, where one at a shorter read mostly waits for the GIL, which another
        thread would only contend for.) Holds ``_lock``."""
        reading = self._in_fetch
        if self._batches:
            stalled = time.perf_counter() - STALLED_READ
            for batch in self._batches:
                if batch.reading and batch.taken:
                    started = batch.taken[-1].fetch_started_at
                    reading += 0.0 < started < stalled
        return reading

    def _take_sync(self) -> LoadJob | None:
        """Start the best waiting sync job, if one may start. Holds ``_lock``."""
        if self._decoding >= self._decode_backlog:
            return None
        window = self._sync_window()
        return None if window is None else self._start(window)

    def _sync_window(self) -> _Window | None:
        """The synchronous store window whose best waiting job may start now, if any
        (one window, the common case, without comparing priorities). Holds ``_lock``."""
        windows = self._sync_windows
        if len(windows) != 1:
            return self._best(windows)
        window = windows[0]
        if window.in_flight >= window.limit or not window.queued or window.peek() is None:
            return None
        return window

    def _take_batch(self) -> _Batch | None:
        """Take a batch of the best waiting sync jobs of one window, if reads are fast
        (one thread per CPU slot keeps the slots busy: ``_wanted`` says so) and a CPU
        slot is free. It holds that slot and one unit of the decode backlog, and is as
        large as ``BATCH_SECONDS`` of typical work allows, at most ``MAX_BATCH`` (with
        decode="processes": ``PROCESS_BATCH_SECONDS``, ``PROCESS_MAX_BATCH``), and
        leaves work for the other slots. Holds ``_lock``."""
        if (
            not self._batching
            or self._cpu_busy >= self._cpu_limit
            or self._decoding >= self._decode_backlog
            or self._backlog
        ):
            return None
        window = self._sync_window()
        if window is None:
            return None
        budget, most = BATCH_SECONDS, MAX_BATCH
        first = window.peek()
        if first is not None and first.source.processes is not None:
            budget, most = PROCESS_BATCH_SECONDS, PROCESS_MAX_BATCH
        per_job = self._fetch_s + self._decode_s
        size = 1 if per_job <= 0.0 else int(budget / per_job)  # (1: unmeasured)
        size = max(1, min(size, most, -(-window.queued // self._cpu_limit)))
        heap = window.heap
        heappop = heapq.heappop
        jobs = []
        while len(jobs) < size and heap:
            _, _, version, job = heappop(heap)
            if job.state is _QUEUED and version == job._version:
                job.state = _FETCHING
                jobs.append(job)
        window.queued -= len(jobs)
        window.in_flight += 1
        self._cpu_busy += 1
        self._decoding += 1
        batch = _Batch(window, jobs, self._publish_early)
        self._batches.add(batch)
        return batch

    def _steal(self) -> LoadJob | None:
        """A waiting job of another thread's batch, started as a single job (for a
        thread with nothing else to do: the tail of a burst, or a batch stuck behind a
        read that does not return). Holds ``_lock``."""
        if self._decoding >= self._decode_backlog:
            return None
        for batch in self._batches:
            window = batch.window
            if window.in_flight >= window.limit:
                continue
            try:
                job = batch.pending.pop()
            except IndexError:
                continue
            if job.state is not _FETCHING:  # cancelled: the batch's thread skips none
                batch.taken.append(job)  # (its _batch_done marks it)
                continue
            window.in_flight += 1
            self._active.add(job)
            return job
        return None

    def _publish_early(self, batch: _Batch) -> None:
        """Publish a running batch's results so far (its thread calls this, without
        the lock), as :meth:`_batch_done` would; the batch keeps its slot."""
        with self._lock:
            reports = self._take_results(batch)
            batch.published += len(reports)
        if reports:
            self._deliver_many(reports)

    def _take_results(self, batch: _Batch) -> Completions:
        """End the jobs of a batch's results so far and return those to publish (not
        those of jobs cancelled meanwhile, nor any once the scheduler is shut down).
        Holds ``_lock``."""
        closed = self._closed
        reports = []
        for report in batch.results:
            job = report[0]
            if job.state is _FETCHING and not closed:
                job.state = _DONE
                reports.append(report)
        batch.results.clear()
        return reports

    def _batch_done(self, batch: _Batch) -> Completions:
        """A batch has run: give its CPU slot back, end its jobs, and return the
        completions to publish (not those of jobs cancelled meanwhile). Holds
        ``_lock``."""
        self._cpu_busy -= 1
        self._decoding -= 1
        batch.window.in_flight -= 1
        self._batches.discard(batch)
        reports = self._take_results(batch)
        for job in batch.taken:
            if job.state is not _DONE:
                job.state = _CANCELLED
        if reports or batch.published:
            n = len(reports) + batch.published
            self._fetch_s = _typical(self._fetch_s, batch.fetch_s / n)
            self._decode_s = _typical(self._decode_s, batch.decode_s / n)
            self._update_wanted()
        self._pump()
        return reports

    def _io_loop(self) -> None:
        """An IO thread ("looper"): take the best startable synchronous job, read it,
        decode it here if a CPU slot is free, and go on while there is work (a backlog
        decode first, when a slot is free) and this thread is wanted. A decode's
        bookkeeping and the choice of the next job share one hold of ``_lock``."""
        lock = self._lock
        finished: _Decoded | None = None
        ran: _Batch | None = None
        with lock:
            self._starting -= 1
            self._in_fetch -= 1
        while True:
            item: tuple[LoadJob, RawChunk] | None = None
            job: LoadJob | None = None
            batch: _Batch | None = None
            with lock:
                report = None if finished is None else self._decoded(finished)
                reports = None if ran is None else self._batch_done(ran)
                if self._closed:
                    pass
                elif self._backlog and self._cpu_busy < self._cpu_limit:
                    self._cpu_busy += 1
                    item = self._backlog.popleft()
                elif self._loopers <= self._wanted or self._reading() == self._loopers - 1:
                    # (a surplus thread stops, unless all the others wait on reads)
                    batch = self._take_batch()
                    if batch is None:
                        job = self._take_sync() or self._steal()
                        if job is not None:
                            self._in_fetch += 1
                if item is None and job is None and batch is None:
                    self._loopers -= 1
            if report is not None:
                self._deliver(*report)
            if reports:
                self._deliver_many(reports)
            finished = ran = None
            if batch is not None:
                batch.run()
                ran = batch
                continue
            if job is not None:
                item = self._fetch_one(job)
            elif item is None:
                return
            finished = None if item is None else self._run_decode(*item)

    def _fetch_one(self, job: LoadJob) -> tuple[LoadJob, RawChunk] | None:
        """Read a started sync job (without ``_lock``), then do its bookkeeping; returns
        what this thread must decode now (a CPU slot taken for it), if anything."""
        raw: RawChunk | None = None
        error: Exception | None = None
        job.fetch_started_at = t0 = time.perf_counter()
        if job.state is _FETCHING:  # else cancelled since it started
            try:
                raw = job.source.fetch_sync(job.index)
            except Exception as err:
                error = err
        job.fetched_at = t1 = time.perf_counter()
        elapsed = t1 - t0
        with self._lock:
            self._in_fetch -= 1
            if raw is not None:
                self._fetch_s = _typical(self._fetch_s, elapsed)
            item = self._fetched(job, raw, error)
            failed = item is _FAILED
            if item is not None and not failed:
                return item  # type: ignore[return-value]
        if failed:
            self._deliver(job, None, error)
        return None

    async def _fetch_async(self, job: LoadJob) -> None:
        """IO stage for an asynchronous store, as a task on zarr's event loop."""
        raw: RawChunk | None = None
        error: Exception | None = None
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        job.fetch_started_at = time.perf_counter()
        try:
            raw = await job.source.fetch_async(job.index)
            job.fetched_at = time.perf_counter()
        except asyncio.CancelledError:
            with self._lock:
                self._fetched(job, None, None)
            raise
        except Exception as err:
            job.fetched_at = time.perf_counter()
            error = err
        finally:
            self._tasks.discard(task)
        with self._lock:
            item = self._fetched(job, raw, error)
            if item is not None and item is not _FAILED:
                self._cpu_workers.submit(self._decode_loop, *item)  # type: ignore[misc]
        if item is _FAILED:
            self._deliver(job, None, error)

    def _fetched(
        self, job: LoadJob, raw: RawChunk | None, error: Exception | None
    ) -> tuple[LoadJob, RawChunk] | object | None:
        """IO stage done: queue the decode, or end the job. Returns ``_FAILED`` if the
        caller must report ``error``; or, if a CPU slot was free (and taken), the job to
        decode now (the oldest of the backlog, if any); else None. Holds ``_lock``."""
        self._windows[job.source.window_key].in_flight -= 1
        job._io_future = None
        outcome: tuple[LoadJob, RawChunk] | object | None = None
        if job.state is not _FETCHING or self._closed or (raw is None and error is None):
            job.state = _CANCELLED
            self._active.discard(job)
            if raw is not None:
                job.source.release(raw)
        elif error is not None:
            job.state = _DONE
            self._active.discard(job)
            outcome = _FAILED
        else:
            assert raw is not None
            job.nbytes_fetched = raw.nbytes_fetched
            job.stamp = raw.stamp
            job.state = _DECODING
            self._decoding += 1
            if self._cpu_busy < self._cpu_limit:
                self._cpu_busy += 1
                if self._backlog:
                    self._backlog.append((job, raw))
                    outcome = self._backlog.popleft()
                else:
                    outcome = (job, raw)
            else:
                self._backlog.append((job, raw))
        self._pump()
        return outcome

    @staticmethod
    def _run_decode(job: LoadJob, raw: RawChunk) -> _Decoded:
        """Decode a job's bytes (a CPU slot held, ``_lock`` not), or give them back if
        the job was cancelled meanwhile."""
        data: np.ndarray | None = None
        error: BaseException | None = None
        t0 = time.perf_counter()
        if job.state is _DECODING:
            try:
                data = job.source.decode(job.index, raw)
            except Exception as err:
                error = err
        else:
            job.source.release(raw)
        job.decoded_at = t1 = time.perf_counter()
        return job, data, error, t1 - t0

    def _decoded(
        self, finished: _Decoded
    ) -> tuple[LoadJob, np.ndarray | None, BaseException | None] | None:
        """A decode is over: end the job and give its CPU slot back. Returns the
        completion to report (without ``_lock``), unless the job was cancelled. Holds
        ``_lock``."""
        job, data, error, seconds = finished
        self._decoding -= 1
        self._cpu_busy -= 1
        self._active.discard(job)
        deliver = job.state is _DECODING and not self._closed
        job.state = _DONE if deliver else _CANCELLED
        if deliver:
            self._decode_s = _typical(self._decode_s, seconds)
            self._update_wanted()
        self._pump()
        return (job, data, error) if deliver else None

    def _decode_loop(self, job: LoadJob, raw: RawChunk) -> None:
        """A decoder thread (asynchronous stores), holding a CPU slot: decode ``job``,
        then whatever waits in the backlog, then give the slot back."""
        item: tuple[LoadJob, RawChunk] | None = (job, raw)
        while item is not None:
            finished = self._run_decode(*item)
            with self._lock:
                item = None
                if self._backlog and not self._closed:
                    item = self._backlog.popleft()
                    self._cpu_busy += 1  # the slot goes on to it
                report = self._decoded(finished)
            if report is not None:
                self._deliver(*report)

    def _update_wanted(self) -> None:
        """IO threads wanted to keep the CPU slots busy (Little's law): each thread
        spends a fetch and a decode per chunk, so ``cpu_workers * (fetch + decode) /
        decode`` of them; at least ``cpu_workers``, at most ``io_concurrency``. Fast
        local reads want ``cpu_workers`` threads (each reads, then decodes, like plain
        threads would); slow reads want more, to keep more of them in flight.

        Reads that take no longer than ``BATCH_FETCH_RATIO`` decodes (the page cache:
        a read is a copy, CPU work too) are taken in batches (``_take_batch``), one
        thread per CPU slot: a thread waiting on such a read leaves little of its
        core idle, and fewer threads contend less for the GIL. Holds ``_lock``."""
        fetch, decode = self._fetch_s, self._decode_s
        if fetch <= 0.0 or decode <= 0.0:
            return
        least = min(self._cpu_limit, self._io_concurrency)
        self._batching = fetch <= BATCH_FETCH_RATIO * decode
        if self._batching:
            self._wanted = least
            return
        wanted = int(self._cpu_limit * (fetch + decode) / decode)
        self._wanted = max(least, min(wanted, self._io_concurrency))

    def _deliver_many(self, reports: Completions) -> None:
        """Publish completions together (``on_done_many``), or one by one."""
        if self._on_done_many is None:
            for report in reports:
                self._deliver(*report)
            return
        try:
            self._on_done_many(reports)
        except Exception:  # never lose a worker (and its CPU slot) to an owner's bug
            logger.exception("chunkpool: completing %d loads failed", len(reports))

    @staticmethod
    def _deliver(job: LoadJob, data: np.ndarray | None, error: BaseException | None) -> None:
        try:
            job.on_done(job, data, error)
        except Exception:  # never lose a worker (and its CPU slot) to an owner's bug
            logger.exception("chunkpool: completing %r failed", job)
