"""Ordered batch reads with a bounded look-ahead (buzzard's ``iter_data`` idea).

The consumer gets the chunks' data in the order it asked for, while at most
``max_ahead`` of them are requested and not yet consumed: the loads run in parallel
ahead of the consumer, but never run away from it. Each position holds its own ref,
so a key listed twice is simply loaded (or served) twice. Closing the generator, or
letting it be garbage-collected, drops every ref it still holds, which cancels the
loads nobody else wants.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .location import ChunkLocation
    from .pool import ChunkPool

__all__ = ["iter_chunk_data"]

_batch_ids = itertools.count()


def iter_chunk_data(
    pool: ChunkPool,
    keys: Iterable[tuple[int, tuple[int, ...]]],
    *,
    max_ahead: int = 8,
    priority: float = 0.0,
    timeout: float | None = None,
) -> Iterator[np.ndarray]:
    """See :meth:`ChunkPool.iter_data`."""
    if max_ahead < 1:
        raise ValueError(f"max_ahead must be >= 1, not {max_ahead}")
    ref_prefix = f"iter_data-{next(_batch_ids)}"
    return _iterate(pool, iter(keys), max_ahead, priority, timeout, ref_prefix)


def _iterate(
    pool: ChunkPool,
    keys: Iterator[tuple[int, tuple[int, ...]]],
    max_ahead: int,
    priority: float,
    timeout: float | None,
    ref_prefix: str,
) -> Iterator[np.ndarray]:
    window: deque[tuple[str, ChunkLocation]] = deque()
    positions = itertools.count()

    def request_more() -> None:
        for level, index in itertools.islice(keys, max_ahead - len(window)):
            position = next(positions)
            ref = f"{ref_prefix}#{position}"
            loc = pool.get_chunk(level, index, ref, priority=priority)  # ties: request order
            window.append((ref, loc))

    try:
        request_more()
        while window:
            ref, loc = window[0]
            data = loc.wait(timeout)
            window.popleft()
            pool.drop_chunk(loc.level, loc.index, ref)
            request_more()
            yield data
    finally:
        for ref, loc in window:
            pool.drop_chunk(loc.level, loc.index, ref)
