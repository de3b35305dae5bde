"""Recycled memory for reads and decoded chunks (oasislmf's preallocated-buffer idea).

Fresh memory is expensive here: the kernel must fault in and zero every page, which on
this class of machine costs about as much as decoding a chunk (measured: zstd decode
of a 512 KiB chunk 660 µs into new memory, 400 µs into reused memory; reading a
370 KiB file 350 µs with ``read()``, 105 µs with ``readinto`` a reused buffer). So the
pool reads and decodes into buffers it recycles:

- *Transient* buffers (the encoded bytes of a local read) are taken and given back by
  the pool itself.
- A *decoded* chunk's buffer is handed out inside a numpy array. It comes back to the
  free list when the last array or view of it dies: the buffer's owner is an instance
  of a private ndarray subclass, which stops numpy from collapsing view bases past the
  *handle* array, so every view of the data keeps the handle alive; the handle is an
  instance of another private subclass whose ``__del__`` returns the buffer (a
  ``weakref.finalize`` per chunk did the same at three times the cost: thousands of
  chunks a second pass through here).

New buffers are carved from arenas of at least 4 MiB, which numpy backs with huge pages
where the kernel allows. The free list is bounded in bytes; buffers beyond it are let go.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import numpy as np

__all__ = ["BufferPool"]

#: Arenas at least this large get transparent huge pages from numpy (>= 4 MiB).
ARENA_BYTES = 4 << 20


class _Owner(np.ndarray):
    """The memory owner of recycled buffers (see the module docstring for why a
    subclass)."""


class _Handle(np.ndarray):
    """A handed-out buffer's handle: the one array whose views the data are. Its
    death means no array views the buffer any more, so it returns the buffer."""

    __slots__ = ()  # (no instance dict: a third of the cost of making one)
    _pool: BufferPool  # set on the subclass each BufferPool makes

    def __del__(self) -> None:
        buffer = self.base
        # Only the handle itself: an array derived from it (``data.base[...]``) is a
        # _Handle too, but its base is the handle, not the recycled buffer.
        if type(buffer) is _Owner:
            self._pool.give(buffer)


def transient_size(nbytes: int) -> int:
    """Size class of a transient buffer: the next power of two, at least 64 KiB."""
    return max(1 << 16, 1 << (max(nbytes, 1) - 1).bit_length())


class BufferPool:
    """Free lists of byte buffers by exact size, bounded by ``max_free_bytes``."""

    def __init__(self, max_free_bytes: int = 64 << 20):
        self.max_free_bytes = max_free_bytes
        # re-entrant: a handle collected by the garbage collector (which may run at
        # any allocation, also under this lock) gives its buffer back at once
        self._lock = threading.RLock()
        self._free: defaultdict[int, list[np.ndarray]] = defaultdict(list)
        self.free_bytes = 0
        self.reused = 0
        self.allocated = 0
        self._handle = type("_Handle", (_Handle,), {"_pool": self, "__slots__": ()})

    def take(self, nbytes: int) -> np.ndarray:
        """A uint8 buffer of exactly ``nbytes`` bytes (contents undefined)."""
        with self._lock:
            free = self._free.get(nbytes)
            if free:
                self.free_bytes -= nbytes
                self.reused += 1
                return free.pop()
            count = max(1, ARENA_BYTES // nbytes) if nbytes else 1  # (not 4 Mi empty ones)
            self.allocated += 1
        arena = self._new_arena(count * nbytes)
        slices = [arena[i * nbytes : (i + 1) * nbytes] for i in range(count)]
        for spare in slices[1:]:
            self.give(spare)
        return slices[0]

    def _new_arena(self, nbytes: int) -> np.ndarray:
        """Fresh memory for ``nbytes`` of buffers, as an ``_Owner`` (the hook of
        :class:`chunkpool.procdecode.SharedBuffers`, which maps shared memory instead)."""
        return np.ndarray.__new__(_Owner, (nbytes,), np.uint8)

    def give(self, buffer: np.ndarray) -> None:
        """Return a buffer taken from :meth:`take` (kept if the free list has room)."""
        nbytes = buffer.nbytes
        with self._lock:
            if self.free_bytes + nbytes <= self.max_free_bytes:
                self._free[nbytes].append(buffer)
                self.free_bytes += nbytes

    def hand_out(
        self, buffer: np.ndarray, dtype: np.dtype, shape: tuple[int, ...], order: str = "C"
    ) -> np.ndarray:
        """An array of ``dtype`` and ``shape`` over ``buffer``, which returns to the free
        list once that array and every view of it are gone."""
        # a plain array over the handle (only the handle gives back), made in one step
        return np.ndarray(shape, dtype, buffer.view(self._handle), order=order)

    def clear(self) -> None:
        """Let go of every free buffer."""
        with self._lock:
            self._free.clear()
            self.free_bytes = 0
