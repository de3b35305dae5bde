"""Delivering handler calls, in order, on the application's thread, from a bounded queue.

The pool produces events (chunk loaded, dropped, destroyed) in whatever thread does the
work. In the two *queued* modes they are queued here *while the pool's lock is held*
(so their order is the order in which the pool's state changed) and run later, without
the pool's lock, by the application:

- **async** (:class:`LoopDispatcher`, ``enable_async_load_handlers``): in batches by one
  callback on the application's loop, given as a ``call_soon_threadsafe`` function. That
  works with asyncio, Qt, trio, rendercanvas or any loop offering one.
- **polled** (:class:`HandlerQueue`, ``enable_polled_load_handlers``): by
  ``run_pending_handlers()``, which an application that draws frames calls at the start
  of each frame; ``wake()`` (e.g. ``canvas.request_draw``) is called, from whatever
  thread, once when the queue goes from empty to non-empty, and not again until a run
  has emptied it.

A handler that raises is logged and does not stop the others.

**The queue holds what the application still has to hear, not the history**, so that it
stays bounded however long nothing drains (a hidden window, a paused loop):

1. a load call whose registration is gone when it would be delivered (its ref dropped
   the chunk) is not delivered; the drop call (if the ref has a drop handler) is;
2. a ref that drops a chunk while its earlier drop call for that chunk is still queued
   (it held the chunk again and dropped it, and heard nothing of that) adds nothing;
3. a chunk that is destroyed or cancelled before any call about it was delivered gets
   none at all (its queued calls are removed): the application never heard of it. A
   chunk that existed when the mode was enabled counts as heard of.

Bound: after a compaction the queue holds at most, per (ref, chunk) pair, one load call
(the registration is held), one drop call (the chunk is held or cached), and for a chunk
the application heard of that died since, its drop and destroy calls; that is at most
two calls per (ref, chunk) pair among the chunks held or cached now or at the last
delivery. Between compactions (run when the queue has doubled since the last one, so
each call costs O(1) on average) it is at most twice that, plus 64. Queued calls keep
their chunks alive; the chunks the rules remove are freed.

Queued calls must never wait for a loop that will not run them:

- ``"asyncio"`` binds to the loop running in the calling thread; with none running it
  raises :class:`~chunkpool.errors.EventLoopError` (a loop that may never run would
  queue calls forever).
- When the loop is an asyncio loop (``"asyncio"``, or a loop's own
  ``call_soon_threadsafe``), the dispatcher *detaches* as soon as calls wait for a loop
  that is closed, or that ran and is no longer running (stopped): the waiting calls
  are dropped with one WARNING, and so is every later one. A loop given before it
  starts is waited for until it first runs (or is closed).
- For any other loop, a ``call_soon`` that raises (the loop is closed) detaches the
  same way; the application must otherwise stop handlers (``"none"``, or
  ``destroy()``) before it stops its loop.

After detaching, no handler is called until ``enable_async_load_handlers`` is called
again. (A polled queue never detaches: it waits for the application, and is bounded.)
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Literal

from .errors import EventLoopError
from .location import ChunkState

if TYPE_CHECKING:
    from .location import ChunkLocation, Handler, _RefEntry

__all__ = ["HandlerCall", "HandlerDispatcher", "HandlerQueue", "call_handlers", "resolve_call_soon"]

logger = logging.getLogger("chunkpool")

CallSoon = Callable[..., Any]
#: ``(handler, location, ref)``: ``handler(location)`` is due for ``ref``.
HandlerCall = tuple[Callable[[Any], Any], Any, str]

_DEAD = (ChunkState.CANCELLED, ChunkState.DESTROYED)
#: Queue length below which no compaction runs (see the module's bound).
COMPACT_SLACK = 64


def call_handlers(calls: list[HandlerCall]) -> None:
    """Call each ``handler(location)``; log, but survive, a handler that raises."""
    for handler, arg, _ref in calls:
        try:
            handler(arg)
        except Exception:
            logger.exception("chunkpool: handler %r raised for %r", handler, arg)


def resolve_call_soon(spec: CallSoon | Literal["asyncio", "none"] | None) -> CallSoon | None:
    """Turn the argument of ``enable_async_load_handlers`` into a callable (or None).

    Raises EventLoopError for "asyncio" when no asyncio loop runs in this thread.
    """
    if spec is None or spec == "none":
        return None
    if spec == "asyncio":
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise EventLoopError(
                "enable_async_load_handlers('asyncio'): no asyncio event loop is running in "
                "this thread; call it from a coroutine on the loop, or pass that loop's "
                "call_soon_threadsafe"
            ) from None
        return loop.call_soon_threadsafe
    if callable(spec):
        return spec
    raise ValueError(
        f"enable_async_load_handlers() expects a call_soon_threadsafe callable, "
        f"'asyncio' or 'none', not {spec!r}"
    )


class _Call:
    """One queued handler call. ``entry`` is set for a load call only: the ref's
    registration when it was queued, which must still be the ref's on delivery."""

    __slots__ = ("entry", "handler", "loc", "ref")

    def __init__(self, handler: Handler, loc: ChunkLocation, ref: str, entry: _RefEntry | None):
        self.handler = handler
        self.loc = loc
        self.ref = ref
        self.entry = entry


class HandlerQueue:
    """The coalescing FIFO of handler calls (see the module's rules and bound), drained
    by :meth:`run` on the application's thread; ``wake()`` is called once each time it
    goes from empty to non-empty. The async :class:`HandlerDispatcher` is the same queue
    drained by a callback on a loop.

    ``post`` and ``post_loads`` are called with the pool's lock held (they read the
    chunks' state); the others without it. ``name`` (the image's display name) is used
    in log lines only.
    """

    def __init__(self, wake: Callable[[], None] | None, name: str = ""):
        self.wake = wake
        self._name = name
        self._queue: deque[_Call] = deque()
        #: The queued drop call of each (ref, live chunk) pair that has one (rule 2).
        self._drops: dict[tuple[str, ChunkLocation], _Call] = {}
        #: Chunks the application has heard of: a call about them was delivered, or
        #: they existed when the mode was enabled (rule 3 spares their calls).
        self._told: weakref.WeakSet[ChunkLocation] = weakref.WeakSet()
        self._compact_at = COMPACT_SLACK
        self._lock = threading.Lock()
        self._woken = False
        self._detached = False
        #: Handler calls dropped because the loop stopped or closed.
        self.dropped = 0

    def __len__(self) -> int:
        """Calls queued (a few of them may yet be coalesced away)."""
        return len(self._queue)

    def rewake(self, wake: Callable[[], None]) -> None:
        """Call ``wake`` from now on; it is told of calls already waiting at the next
        :meth:`kick`."""
        with self._lock:
            self.wake = wake
            self._woken = False

    def tell(self, locs: Iterable[ChunkLocation]) -> None:
        """Count these chunks as heard of (they may have been, before this queue)."""
        with self._lock:
            self._told.update(locs)

    # -- queueing (the pool's lock held) ----------------------------------------------

    def post(self, calls: Iterable[HandlerCall]) -> None:
        """Queue drop and destroy calls (a chunk's destroy calls are queued once it is
        dead, with the drop call of its last ref)."""
        with self._lock:
            if self._detached:
                self.dropped += sum(1 for _ in calls)
                return
            queue, drops = self._queue, self._drops
            for handler, loc, ref in calls:
                if loc._state in _DEAD:
                    if loc in self._told:
                        queue.append(_Call(handler, loc, ref, None))
                    # else rule 3: its queued calls go at delivery or compaction
                    continue
                key = (ref, loc)
                if key not in drops:  # else rule 2
                    queue.append(call := _Call(handler, loc, ref, None))
                    drops[key] = call
            self._compact_if_grown()

    def post_loads(self, loc: ChunkLocation, handlers: dict[str, Handler]) -> None:
        """Queue the load calls of ``loc`` for these refs (a ref to handler dict)."""
        with self._lock:
            if self._detached:
                self.dropped += len(handlers)
                return
            refs = loc._refs
            for ref, handler in handlers.items():
                entry = refs.get(ref)
                if entry is not None:
                    self._queue.append(_Call(handler, loc, ref, entry))
            self._compact_if_grown()

    def _due(self, call: _Call) -> bool:
        """Whether the application must still hear of ``call``. Holds ``_lock``."""
        loc = call.loc
        if call.entry is not None:  # rule 1: the registration is still held
            return loc._refs.get(call.ref) is call.entry
        return loc._state not in _DEAD or loc in self._told  # rule 3

    def _forget(self, call: _Call) -> None:
        """``call`` leaves the queue. Holds ``_lock``."""
        if call.entry is None:
            key = (call.ref, call.loc)
            if self._drops.get(key) is call:
                del self._drops[key]

    def _compact_if_grown(self) -> None:
        """Drop the calls no longer due once the queue has doubled since the last time
        (O(1) per call on average). Holds ``_lock``."""
        if len(self._queue) <= self._compact_at:
            return
        kept: deque[_Call] = deque()
        for call in self._queue:
            if self._due(call):
                kept.append(call)
            else:
                self._forget(call)
        self._queue = kept
        self._compact_at = 2 * len(kept) + COMPACT_SLACK

    # -- delivering (without the pool's lock) -----------------------------------------

    def take(self, max_calls: int | None = None) -> list[HandlerCall]:
        """Take the calls due, oldest first (at most ``max_calls``); the chunks they are
        about count as heard of from now on. Emptying the queue re-arms ``wake``."""
        calls: list[HandlerCall] = []
        with self._lock:
            queue, tell = self._queue, self._told.add
            while queue and (max_calls is None or len(calls) < max_calls):
                call = queue.popleft()
                self._forget(call)
                if self._due(call):
                    tell(call.loc)
                    calls.append((call.handler, call.loc, call.ref))
            if not queue:
                self._woken = False
                self._compact_at = COMPACT_SLACK
        return calls

    def run(self, max_calls: int | None = None) -> int:
        """Run the calls due (at most ``max_calls``) here; how many ran."""
        if max_calls is not None and max_calls < 0:
            raise ValueError(f"max_calls must be None or >= 0, not {max_calls!r}")
        calls = self.take(max_calls)
        call_handlers(calls)
        return len(calls)

    def kick(self) -> None:
        """Wake the application if calls wait and it has not been woken since the queue
        was last emptied (or, if its loop is gone, drop them)."""
        with self._lock:
            if self._detached or not self._queue:
                return
            why = self._gone()
            if why is None:
                if self._woken:
                    return
                self._woken = True
        if why is None:
            why = self._wake()
            if why is None:
                return
        self._detach(why)

    def _gone(self) -> str | None:
        """Why nothing will ever run the queued calls, or None. Holds ``_lock``."""
        return None

    def _wake(self) -> str | None:
        """Tell the application that calls wait; why it cannot be told, or None."""
        wake = self.wake
        try:
            if wake is not None:
                wake()
        except Exception:
            with self._lock:
                self._woken = False
            logger.exception(
                "chunkpool: %s: wake() raised; it is called again at the next handler call",
                self._name,
            )
        return None

    def _detach(self, why: str) -> None:
        with self._lock:
            if self._detached:
                return
            self._detached = True
            n = len(self._queue)
            self.dropped += n
            self._queue.clear()
            self._drops.clear()
            self._woken = False
        logger.warning(
            "chunkpool: %s: %s: %d handler calls dropped; handlers will not be called "
            "until enable_async_load_handlers() is called again",
            self._name,
            why,
            n,
        )


class HandlerDispatcher(HandlerQueue):
    """The queue, drained in one batch by a callback that ``call_soon`` schedules on the
    application's loop each time calls start waiting."""

    def __init__(self, call_soon: CallSoon, name: str = ""):
        super().__init__(None, name)
        self.call_soon = call_soon
        loop = getattr(call_soon, "__self__", None)
        #: The asyncio loop behind ``call_soon``, if it is one: then its state is known.
        self._loop = loop if isinstance(loop, asyncio.AbstractEventLoop) else None
        self._ran = self._loop is not None and self._loop.is_running()

    def _gone(self) -> str | None:
        loop = self._loop
        if loop is None:
            return None
        if loop.is_closed():
            return "the event loop is closed"
        if loop.is_running():
            self._ran = True
        elif self._ran:
            return "the event loop is not running any more"
        return None

    def _wake(self) -> str | None:
        try:
            self.call_soon(self._drain)
        except Exception as err:  # a closed loop raises RuntimeError
            return f"its call_soon raised {type(err).__name__}"
        return None

    def _drain(self) -> None:
        with self._lock:
            self._ran = True
        call_handlers(self.take())
