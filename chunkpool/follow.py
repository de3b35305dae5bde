"""Following a store while it is written, for scripts and asyncio apps.

:func:`follow` is the plain-iterator form (as the blissdata seed's
``walk_on_new_events``): ``for pool, changes in follow(path, interval=0.5): ...``;
:func:`changes` the asynchronous one: ``async for changes in changes(pool, 0.5)``.
Both refresh the pool every ``interval`` seconds in the caller's own flow (no thread:
:meth:`ChunkPool.watch` is the threaded form; refreshes start at a fixed rate, see
:func:`~chunkpool.refresh.next_wait`, and the time the caller spends on what was
yielded counts towards the wait) and yield only when something changed. A
refresh that fails (the store deleted, metadata half-written) is one WARNING until one
succeeds again, as for ``watch``; the iteration ends when the pool is destroyed.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

from .pool import ChunkPool
from .refresh import Changes, Watcher, next_wait

__all__ = ["changes", "follow"]


def follow(
    source: Any, interval: float = 0.5, **options: Any
) -> Iterator[tuple[ChunkPool, Changes]]:
    """Yield ``(pool, changes)`` each time ``source`` (a :class:`ChunkPool`, or anything
    :meth:`ChunkPool.from_zarr_node` opens, with ``options``: its first image) changes
    from what it was when ``follow`` was called (it opens the source at once, so that
    errors show there and nothing written after the call is missed). A pool opened here
    is destroyed when the iterator is closed (``close()``, ``contextlib.closing``, or
    when a ``for`` loop over ``follow(...)`` itself is left)."""
    if isinstance(source, ChunkPool):
        return _follow(source, interval, owned=False)
    pools = ChunkPool.from_zarr_node(source, **options)
    for extra in pools[1:]:
        extra.destroy()
    return _follow(pools[0], interval, owned=True)


def _follow(
    pool: ChunkPool, interval: float, *, owned: bool
) -> Iterator[tuple[ChunkPool, Changes]]:
    seen: deque[Changes] = deque()
    watcher = Watcher(pool, interval, seen.append)
    try:
        while True:
            started = time.monotonic()
            if not watcher.tick():
                break
            ended = time.monotonic()
            due = ended + next_wait(started, ended, interval)
            while seen:
                yield pool, seen.popleft()
            time.sleep(max(due - time.monotonic(), 0.0))
    finally:
        if owned:
            pool.destroy()


async def changes(pool: ChunkPool, interval: float = 0.5) -> AsyncIterator[Changes]:
    """Yield ``pool``'s changes, looking every ``interval`` seconds; the refresh (file
    reads) runs in a worker thread, so the loop stays responsive."""
    seen: deque[Changes] = deque()
    watcher = Watcher(pool, interval, seen.append)
    while True:
        started = time.monotonic()
        if not await asyncio.to_thread(watcher.tick):
            break
        ended = time.monotonic()
        due = ended + next_wait(started, ended, interval)
        while seen:
            yield seen.popleft()
        await asyncio.sleep(max(due - time.monotonic(), 0.0))
