"""The cache of loaded chunks that nobody holds any more.

A chunk whose last ref is dropped is kept here (if the cache is enabled) so that a
later request is served without a load. The cache is bounded by a number of chunks
and/or a number of bytes (what each chunk counts: its data plus ``ENTRY_OVERHEAD``,
so that many empty chunks are bounded too); the least recently released chunk is
evicted first. A chunk requested again leaves the cache. Under a memory budget the
budget may evict any cached chunk of its pools, oldest first across them.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterator

from .location import ChunkKey, ChunkLocation

__all__ = ["ChunkCache"]


class ChunkCache:
    """Zero-ref loaded chunks, LRU, bounded by count and bytes.

    ``max_count`` <= 0 and ``max_bytes`` None mean no bound of that kind; with neither
    bound set the cache is disabled (keeps nothing).
    """

    def __init__(
        self,
        max_count: int = 0,
        max_bytes: int | None = None,
        clock: Iterator[int] | None = None,
    ):
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"cache_bytes must be >= 0, not {max_bytes}")
        self.max_count = max(0, max_count)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[ChunkKey, ChunkLocation] = OrderedDict()
        self.nbytes = 0
        #: Stamps each chunk added (``loc._cached_at``): shared by the caches of pools
        #: under one memory budget, which evicts the oldest of them all first.
        self._clock = clock if clock is not None else itertools.count()

    @property
    def enabled(self) -> bool:
        return self.max_count > 0 or bool(self.max_bytes)

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[ChunkLocation]:
        return iter(self._entries.values())

    def add(self, loc: ChunkLocation) -> list[ChunkLocation]:
        """Keep ``loc``; return the chunks evicted to stay in budget (maybe ``loc``)."""
        self._entries[loc.key] = loc
        loc._cached_at = next(self._clock)
        self.nbytes += loc._held_bytes
        evicted = []
        while self._entries and self._over_budget():
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old._held_bytes
            evicted.append(old)
        return evicted

    def take(self, key: ChunkKey) -> ChunkLocation | None:
        """Remove and return the chunk with this key, if cached."""
        loc = self._entries.pop(key, None)
        if loc is not None:
            self.nbytes -= loc._held_bytes
        return loc

    def oldest(self) -> ChunkLocation | None:
        """The least recently cached chunk, if any."""
        for loc in self._entries.values():
            return loc
        return None

    def clear(self) -> list[ChunkLocation]:
        """Empty the cache; return what it held."""
        locs = list(self._entries.values())
        self._entries.clear()
        self.nbytes = 0
        return locs

    def _over_budget(self) -> bool:
        if self.max_count and len(self._entries) > self.max_count:
            return True
        return self.max_bytes is not None and self.nbytes > self.max_bytes
