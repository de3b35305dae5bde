"""Delivering handler calls on the application's event loop, in order.

The pool produces events (chunk loaded, dropped, destroyed) in whatever thread does the
work. With async handlers enabled, they are queued here *while the pool's lock is
held* (so their order is the order in which the pool's state changed) and run in
batches by one callback on the application's loop, given as a ``call_soon_threadsafe``
function. That works with asyncio, Qt, trio, rendercanvas or any loop offering one.

A handler that raises is logged and does not stop the others.

Queued calls keep their chunks (and data) alive, so they must never wait for a loop
that will not run them:

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
again.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

from .errors import EventLoopError

__all__ = ["HandlerCall", "HandlerDispatcher", "call_handlers", "resolve_call_soon"]

logger = logging.getLogger("chunkpool")

CallSoon = Callable[..., Any]
HandlerCall = tuple[Callable[[Any], Any], Any]


def call_handlers(calls: list[HandlerCall]) -> None:
    """Call each ``handler(arg)``; log, but survive, a handler that raises."""
    for handler, arg in calls:
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


class HandlerDispatcher:
    """A FIFO of handler calls, drained on the application's loop.

    ``name`` (the image's display name) is used in log lines only.
    """

    def __init__(self, call_soon: CallSoon, name: str = ""):
        self.call_soon = call_soon
        self._name = name
        loop = getattr(call_soon, "__self__", None)
        #: The asyncio loop behind ``call_soon``, if it is one: then its state is known.
        self._loop = loop if isinstance(loop, asyncio.AbstractEventLoop) else None
        self._queue: deque[HandlerCall] = deque()
        self._lock = threading.Lock()
        self._scheduled = False
        self._ran = self._loop is not None and self._loop.is_running()
        self._detached = False
        #: Handler calls dropped because the loop stopped or closed.
        self.dropped = 0

    def post(self, calls: list[HandlerCall]) -> None:
        """Queue calls. The caller holds the pool's lock, which fixes their order."""
        with self._lock:
            if self._detached:
                self.dropped += len(calls)
            else:
                self._queue.extend(calls)

    def kick(self) -> None:
        """Make sure a drain is scheduled on the loop if calls are waiting (or, if the
        loop is gone, drop them)."""
        with self._lock:
            if self._detached or not self._queue:
                return
            why = self._loop_gone()
            if why is None:
                if self._scheduled:
                    return
                self._scheduled = True
        if why is None:
            try:
                self.call_soon(self._drain)
                return
            except Exception as err:  # a closed loop raises RuntimeError
                why = f"its call_soon raised {type(err).__name__}"
        self._detach(why)

    def _loop_gone(self) -> str | None:
        """Why the asyncio loop will not run queued calls, or None. Holds ``_lock``."""
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

    def _detach(self, why: str) -> None:
        with self._lock:
            if self._detached:
                return
            self._detached = True
            n = len(self._queue)
            self.dropped += n
            self._queue.clear()
            self._scheduled = False
        logger.warning(
            "chunkpool: %s: %s: %d handler calls dropped; handlers will not be called "
            "until enable_async_load_handlers() is called again",
            self._name,
            why,
            n,
        )

    def _drain(self) -> None:
        with self._lock:
            self._ran = True
            calls = list(self._queue)
            self._queue.clear()
            self._scheduled = False
        call_handlers(calls)
