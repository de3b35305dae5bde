"""Queued handler delivery: the polled mode (an application that draws frames runs the
queue itself) and the bound on the queue in both queued modes (issue 12: nothing drains
while a window is hidden or a loop is paused; the queue must not grow with time).

The coalescing rules under test (chunkpool/dispatch.py): a load call whose registration
is gone by delivery is not delivered, the drop call is; a ref dropping a chunk again while
its earlier drop call is queued adds nothing; a chunk that dies before any call about it
was delivered gets none.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import weakref
from collections.abc import Callable, Iterator

import pytest
import zarr
from conftest import make_array, ramp

from chunkpool import ChunkPool

DEADLINE = 30.0
CYCLES = 100_000


class Recorder:
    """Handlers that record ``(kind, ref, chunk index)`` in the order they run."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, tuple[int, ...]]] = []

    def handlers(self, ref: str) -> dict[str, Callable]:
        return {
            f"{kind}_handler": (lambda loc, kind=kind: self.seen.append((kind, ref, loc.index)))
            for kind in ("load", "drop", "destroy")
        }

    def take(self) -> list[tuple[str, str, tuple[int, ...]]]:
        seen, self.seen = self.seen, []
        return seen


class Wakes:
    """A ``wake`` callable that counts its calls and can be waited on."""

    def __init__(self) -> None:
        self.count = 0
        self.threads: set[int] = set()
        self._cond = threading.Condition()

    def __call__(self) -> None:
        with self._cond:
            self.count += 1
            self.threads.add(threading.get_ident())
            self._cond.notify_all()

    def wait_for(self, n: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.count >= n, DEADLINE), self.count


@pytest.fixture
def array() -> zarr.Array:
    return make_array(zarr.storage.MemoryStore(), ramp((32, 32)), (8, 8))


# -- polled mode ------------------------------------------------------------------------


def test_polled_handlers_run_in_the_calling_thread_in_order(pools, array):
    pool = pools(array)
    wakes = Wakes()
    pool.enable_polled_load_handlers(wakes)
    rec = Recorder()
    locs = [pool.get_chunk(0, (0, i), "a", **rec.handlers("a")) for i in range(4)]
    for loc in locs:
        loc.wait()  # the data is there; the load handlers wait for the application
    wakes.wait_for(1)
    assert rec.seen == [] and pool.pending_handler_calls == 4
    assert pool.run_pending_handlers(max_calls=3) == 3
    assert pool.run_pending_handlers() == 1
    # in the order the loads completed (the pool's threads race)
    assert sorted(rec.take()) == [("load", "a", (0, i)) for i in range(4)]
    assert pool.run_pending_handlers() == 0
    pool.drop_chunks([(0, (0, i)) for i in range(2)], "a")
    assert pool.run_pending_handlers() == 4
    assert rec.take() == [
        ("drop", "a", (0, 0)),
        ("destroy", "a", (0, 0)),
        ("drop", "a", (0, 1)),
        ("destroy", "a", (0, 1)),
    ]


def test_wake_is_called_once_until_the_queue_is_drained(pools, array):
    pool = pools(array)
    wakes = Wakes()
    pool.enable_polled_load_handlers(wakes)
    rec = Recorder()
    for i in range(4):  # loads completing in the pool's threads: wake comes from there
        pool.get_chunk(0, (i, 0), "a", **rec.handlers("a")).wait()
    pool.get_chunk(0, (0, 1), "b", **rec.handlers("b"))
    pool.drop_chunk(0, (0, 1), "b")
    wakes.wait_for(1)
    assert wakes.count == 1
    assert pool.run_pending_handlers(max_calls=1) == 1  # not drained yet: no new wake
    pool.drop_chunk(0, (1, 0), "a")
    assert wakes.count == 1
    assert pool.run_pending_handlers() > 0 and pool.pending_handler_calls == 0
    pool.drop_chunk(0, (2, 0), "a")  # drained: the next call wakes again
    wakes.wait_for(2)
    assert wakes.count == 2
    assert pool.run_pending_handlers() == 2


def test_a_raising_wake_is_logged_and_retried(pools, array):
    pool = pools(array)

    def wake() -> None:
        raise RuntimeError("canvas closed")

    class Logged(logging.Handler):  # the log line comes once the wake is re-armed
        def __init__(self) -> None:
            super().__init__()
            self.wakes = Wakes()

        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and "canvas closed" in str(record.exc_info[1]):
                self.wakes()

    logged = Logged()
    logging.getLogger("chunkpool").addHandler(logged)
    try:
        pool.enable_polled_load_handlers(wake)
        rec = Recorder()
        pool.get_chunk(0, (0, 0), "a", **rec.handlers("a")).wait()
        logged.wakes.wait_for(1)
        pool.get_chunk(0, (0, 1), "a", **rec.handlers("a")).wait()
        logged.wakes.wait_for(2)  # the next call queued found the wake re-armed
    finally:
        logging.getLogger("chunkpool").removeHandler(logged)
    assert pool.run_pending_handlers() == 2


def test_a_load_whose_ref_dropped_before_delivery_is_not_delivered(pools, array):
    pool = pools(array, cache_size=8)
    pool.enable_polled_load_handlers(Wakes())
    rec = Recorder()
    pool.get_chunk(0, (0, 0), "keep", **rec.handlers("keep")).wait()
    pool.get_chunk(0, (0, 0), "gone", **rec.handlers("gone"))
    pool.get_chunk(0, (0, 0), "silent", load_handler=rec.handlers("silent")["load_handler"])
    pool.drop_chunk(0, (0, 0), "gone")
    pool.drop_chunk(0, (0, 0), "silent")  # no drop handler: its load just vanishes
    pool.run_pending_handlers()
    assert rec.take() == [("load", "keep", (0, 0)), ("drop", "gone", (0, 0))]


def test_modes_switch_without_losing_calls(pools, array):
    pool = pools(array)
    rec = Recorder()
    # sync mode: the load handler waits for wait(), which is not called
    pool.get_chunk(0, (0, 0), "a", **rec.handlers("a")).future.result(DEADLINE)
    pool.get_chunk(0, (1, 0), "a", **rec.handlers("a")).future.result(DEADLINE)
    pool.enable_polled_load_handlers(Wakes())  # takes both waiting loads over
    pool.get_chunk(0, (0, 1), "a", **rec.handlers("a")).wait()
    pool.enable_async_load_handlers("none")  # queued calls stay for run_pending_handlers
    pool.drop_chunk(0, (0, 0), "a")  # sync again: runs here
    assert rec.take() == [("drop", "a", (0, 0)), ("destroy", "a", (0, 0))]
    assert pool.pending_handler_calls == 3
    assert pool.run_pending_handlers() == 2  # the load of (0, 0) is no longer due
    assert rec.take() == [("load", "a", (1, 0)), ("load", "a", (0, 1))]
    wakes = Wakes()
    pool.enable_polled_load_handlers(wakes)
    pool.drop_chunk(0, (0, 1), "a")  # the chunk was seen in sync mode: its calls come
    wakes.wait_for(1)
    assert pool.run_pending_handlers() == 2
    assert rec.take() == [("drop", "a", (0, 1)), ("destroy", "a", (0, 1))]


# -- the bound: nothing drains ----------------------------------------------------------


def _cycle(pool: ChunkPool, rec: Recorder, check: Callable[[], None]) -> None:
    """Before the pause, ``a`` has seen (0, 0) load. During it (no cache): ``a`` holds
    (0, 1) (its load call waits); ``b`` gets and drops (1, 1), which ``holder`` keeps
    alive, CYCLES times (each cycle queues a load call and a drop call); ``c`` gets and
    drops a new chunk each cycle (a new location, cancelled or loaded, then destroyed);
    then ``a`` drops (0, 0). ``check()`` runs every 1,000 cycles; memory must not grow."""
    pool.get_chunk(0, (0, 1), "a", **rec.handlers("a")).wait()
    pool.get_chunk(0, (1, 1), "holder").wait()
    b_handlers = rec.handlers("b")
    c_handlers = rec.handlers("c")
    dead: list[weakref.ref] = []
    baseline = 0
    for n in range(CYCLES):
        pool.get_chunk(0, (1, 1), "b", **b_handlers)
        pool.drop_chunk(0, (1, 1), "b")
        key = (2 + n % 2, n // 2 % 4)
        loc = pool.get_chunk(0, key, "c", **c_handlers)
        pool.drop_chunk(0, key, "c")
        if n % 1000 == 999:
            dead.append(weakref.ref(loc))
            check()
            if n == 1999:
                baseline = _objects()
        del loc
    grown = _objects() - baseline
    # each queued call is at least one object: 98,000 cycles of growth would be 10^5
    assert grown < 1000, f"{grown} more objects after {CYCLES - 2000} more cycles"
    assert [r() for r in dead] == [None] * len(dead)  # the queue keeps no dead chunk
    pool.drop_chunk(0, (0, 0), "a")


def _objects() -> int:
    """The objects the garbage collector tracks (queued calls, locations, their dicts
    and tuples are): flat memory means a flat count."""
    gc.collect()
    return len(gc.get_objects())


# what the application must hear after the pause, in order
EXPECTED_AFTER_PAUSE = [
    ("load", "a", (0, 1)),
    ("drop", "b", (1, 1)),  # once for b's hundred thousand cycles
    # c's chunks died before anything about them was delivered: nothing
    ("drop", "a", (0, 0)),  # (0, 0) was seen loaded: its end is told
    ("destroy", "a", (0, 0)),
]
# and once the pool is destroyed: (0, 1) was held by a, (1, 1) by holder
EXPECTED_AFTER_DESTROY = [
    ("drop", "a", (0, 1)),
    ("destroy", "a", (0, 1)),
    ("destroy", "b", (1, 1)),
]
REFS = 4  # a, b, c, holder


def _bound(pool: ChunkPool) -> int:
    """The bound chunkpool/dispatch.py states, for this test's refs: two calls per
    (ref, chunk) pair among the chunks held or cached (none that the application has
    heard of dies during the pause), twice over for the slack between compactions."""
    stats = pool.stats
    return 2 * (2 * REFS * (stats.chunks_held + stats.chunks_cached)) + 64


@pytest.mark.timeout(120)
def test_polled_queue_stays_bounded_while_nothing_drains(pools, array):
    pool = pools(array)
    wakes = Wakes()
    pool.enable_polled_load_handlers(wakes)
    rec = Recorder()
    pool.get_chunk(0, (0, 0), "a", **rec.handlers("a")).wait()
    assert pool.run_pending_handlers() == 1
    assert rec.take() == [("load", "a", (0, 0))]

    def check() -> None:
        assert pool.pending_handler_calls <= _bound(pool)

    _cycle(pool, rec, check)
    assert rec.seen == [] and wakes.count == 2  # once before the pause, once in it
    assert pool.run_pending_handlers() == len(EXPECTED_AFTER_PAUSE)
    assert rec.take() == EXPECTED_AFTER_PAUSE
    assert pool.pending_handler_calls == 0
    pool.destroy()
    pool.run_pending_handlers()
    assert rec.take() == EXPECTED_AFTER_DESTROY


class PausedLoop:
    """An asyncio loop in its own thread, which can be held inside a callback (paused:
    running, but draining nothing) and let go."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="app-loop")
        self.thread.start()
        self._resume = threading.Event()

    def pause(self) -> None:
        paused = threading.Event()

        def hold() -> None:
            paused.set()
            assert self._resume.wait(DEADLINE * 4)

        self._resume.clear()
        self.loop.call_soon_threadsafe(hold)
        assert paused.wait(DEADLINE)

    def resume_and_flush(self) -> None:
        self._resume.set()
        for _ in range(2):  # a drain, then whatever the drain queued
            done = threading.Event()
            self.loop.call_soon_threadsafe(done.set)
            assert done.wait(DEADLINE)

    def close(self) -> None:
        self._resume.set()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE)
        self.loop.close()


@pytest.fixture
def paused_loop() -> Iterator[PausedLoop]:
    app = PausedLoop()
    yield app
    app.close()


@pytest.mark.timeout(120)
def test_async_queue_stays_bounded_while_the_loop_is_paused(pools, array, paused_loop):
    pool = pools(array)
    pool.enable_async_load_handlers(paused_loop.loop.call_soon_threadsafe)
    rec = Recorder()
    pool.get_chunk(0, (0, 0), "a", **rec.handlers("a")).wait()
    paused_loop.resume_and_flush()
    assert rec.take() == [("load", "a", (0, 0))]
    paused_loop.pause()

    def check() -> None:
        assert pool.pending_handler_calls <= _bound(pool)

    _cycle(pool, rec, check)
    assert rec.seen == []
    paused_loop.resume_and_flush()
    assert rec.take() == EXPECTED_AFTER_PAUSE
    assert pool.pending_handler_calls == 0
    pool.destroy()
    paused_loop.resume_and_flush()
    assert rec.take() == EXPECTED_AFTER_DESTROY
