"""Delivering handler calls on the application's event loop, in order.

The pool produces events (chunk loaded, dropped, destroyed) in whatever thread does the
work. With async handlers enabled, they are queued here *while the pool's lock is
held* (so their order is the order in which the pool's state changed) and run in
batches by one callback on the application's loop, given as a ``call_soon_threadsafe``
function. That works with asyncio, Qt, trio, rendercanvas or any loop offering one.

A handler that raises is logged and does not stop the others.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, Literal

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
    """Turn the argument of ``enable_async_load_handlers`` into a callable (or None)."""
    if spec is None or spec == "none":
        return None
    if spec == "asyncio":
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        return loop.call_soon_threadsafe
    if callable(spec):
        return spec
    raise ValueError(
        f"enable_async_load_handlers() expects a call_soon_threadsafe callable, "
        f"'asyncio' or 'none', not {spec!r}"
    )


class HandlerDispatcher:
    """A FIFO of handler calls, drained on the application's loop."""

    def __init__(self, call_soon: CallSoon):
        self.call_soon = call_soon
        self._queue: deque[HandlerCall] = deque()
        self._lock = threading.Lock()
        self._scheduled = False

    def post(self, calls: list[HandlerCall]) -> None:
        """Queue calls. The caller holds the pool's lock, which fixes their order."""
        with self._lock:
            self._queue.extend(calls)

    def kick(self) -> None:
        """Make sure a drain is scheduled on the loop if calls are waiting."""
        with self._lock:
            if self._scheduled or not self._queue:
                return
            self._scheduled = True
        try:
            self.call_soon(self._drain)
        except RuntimeError:  # the loop is closed: nobody is left to notify
            logger.debug("chunkpool: event loop closed, %d handler calls dropped", len(self._queue))
            with self._lock:
                self._queue.clear()
                self._scheduled = False

    def _drain(self) -> None:
        with self._lock:
            calls = list(self._queue)
            self._queue.clear()
            self._scheduled = False
        call_handlers(calls)
