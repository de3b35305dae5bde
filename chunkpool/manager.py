"""ChunkManager: one user of a pool, with its lifetime callbacks as methods.

Subclass it and override :meth:`on_load`, :meth:`on_drop` and :meth:`on_destroy`;
the code that decides *which* chunks to hold (calling :meth:`get_chunk` /
:meth:`drop_chunk`) then stays apart from the code that decides what happens to them.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from .location import ChunkKey, ChunkLocation
from .pool import ChunkPool

__all__ = ["ChunkManager"]

_manager_ids = itertools.count()


class ChunkManager:
    """A ref on a :class:`ChunkPool` whose handlers are this object's ``on_*`` methods."""

    def __init__(self, pool: ChunkPool, ref: str | None = None):
        self._pool = pool
        self._ref = ref if ref is not None else f"{type(self).__name__}-{next(_manager_ids)}"

    @property
    def pool(self) -> ChunkPool:
        return self._pool

    @property
    def ref(self) -> str:
        """The ref this manager holds its chunks under."""
        return self._ref

    def get_chunk(
        self, level: int, index: tuple[int, ...], *, priority: float | None = None
    ) -> ChunkLocation:
        """Hold a chunk (or update its priority); :meth:`on_load` follows once loaded."""
        return self._pool.get_chunk(
            level,
            index,
            self._ref,
            priority=priority,
            load_handler=self.on_load,
            drop_handler=self.on_drop,
            destroy_handler=self.on_destroy,
        )

    def get_chunks(
        self, keys: Iterable[ChunkKey], *, priority: float | Iterable[float] | None = None
    ) -> list[ChunkLocation]:
        """Hold many chunks at once (one priority for all, or one per key); see
        :meth:`ChunkPool.get_chunks`."""
        return self._pool.get_chunks(
            keys,
            self._ref,
            priority=priority,
            load_handler=self.on_load,
            drop_handler=self.on_drop,
            destroy_handler=self.on_destroy,
        )

    def drop_chunk(self, level: int, index: tuple[int, ...]) -> None:
        """Release a chunk; :meth:`on_drop` is called for it."""
        self._pool.drop_chunk(level, index, self._ref)

    def drop_chunks(self, keys: Iterable[ChunkKey]) -> None:
        """Release many chunks at once (their loads are cancelled together)."""
        self._pool.drop_chunks(keys, self._ref)

    def held_chunks(self) -> list[ChunkKey]:
        """The keys of the chunks this manager holds."""
        return [loc.key for loc in self._pool.iter_held(self._ref)]

    def drop_all(self) -> None:
        """Release every chunk this manager holds."""
        self.drop_chunks(self.held_chunks())

    def on_load(self, chunk_location: ChunkLocation) -> None:
        """Called when a chunk's data is there, or its load failed (``.error``)."""

    def on_drop(self, chunk_location: ChunkLocation) -> None:
        """Called when this manager drops a chunk."""

    def on_destroy(self, chunk_location: ChunkLocation) -> None:
        """Called when the pool lets go of a chunk this manager held."""
