"""Reading and decoding batches of local chunks without the GIL (``chunkpool._native``).

Why: the pool is bound by the GIL on small chunks. Read in Python, each chunk is an
open, an fstat, a read, a close and a decode, each a call that hands the GIL over and
takes it back, with bytecode between them; two IO threads then run hardly faster
than one (tensorstore, in C++, read 128² chunks 1.7x faster than the pool did). The
extension reads and decodes a whole batch in one call without the GIL, so that the
threads of a batch-reading pool (:class:`~chunkpool.scheduler.LoadScheduler`) use every
core, and Python is left with the bookkeeping.

It applies only where it gives exactly the Python path's result (``ChunkSource.native``,
``ChunkSource.fetch_decode_native``): a local store, and chunks that are raw bytes or
a single zstd frame set (``bytes`` + ``zstd``, or v2 with a zstd compressor) decoded
straight into the chunk's buffer, by the pool's threads or by a decode process.
Anything else the extension meets on the way (a link, a file that is not a regular
file, a read cut short, a frame of the wrong size, a libzstd error) it does not judge:
that chunk is read again by the Python path, which says what is wrong, so errors and
their messages are the same either way.
A missing file is a missing chunk, as in Python.

The extension is built when the package is installed (``pyproject.toml``; optional:
without a C compiler chunkpool reads in Python, and :data:`AVAILABLE` is False).
``CHUNKPOOL_NATIVE=0`` in the environment turns it off (for comparison).
"""

from __future__ import annotations

import os
import time
from typing import Any

from . import frames

try:
    from . import _native
except ImportError:  # not built here (no compiler when installed): read in Python
    _native = None

__all__ = [
    "AVAILABLE",
    "CLOCK_OFFSET",
    "DONE",
    "FALLBACK",
    "MISSING",
    "read_chunks",
    "zstd_available",
]

#: A result's status: the chunk is in its buffer; there is no such file; read it the
#: Python way.
DONE, MISSING, FALLBACK = 0, 1, 2

#: Whether batches of local chunks are read by the extension.
AVAILABLE = _native is not None and os.environ.get("CHUNKPOOL_NATIVE", "1") != "0"

#: libzstd's decompress and is-error functions (addresses), if libzstd is loaded.
_ZSTD: tuple[int, int] | None = None
if frames._LIBZSTD is not None:
    _ffi, _lib = frames._LIBZSTD
    _ZSTD = (
        int(_ffi.cast("uintptr_t", _lib.ZSTD_decompressDCtx)),
        int(_ffi.cast("uintptr_t", _lib.ZSTD_isError)),
    )

#: ``perf_counter()`` seconds = CLOCK_MONOTONIC ns * 1e-9 + this (0 where they agree).
CLOCK_OFFSET = 0.0 if _native is None else time.perf_counter() - _native.monotonic_ns() * 1e-9

#: One item: ``(path bytes, offset or -1 for the whole file, length, uint8 buffer)``.
Item = tuple[bytes, int, int, Any]


def zstd_available() -> bool:
    """Whether the extension can decode zstd (libzstd was loaded through cffi)."""
    return _ZSTD is not None


def read_chunks(items: list[Item], zstd: bool) -> list[tuple[int, int, int, int, int, int]]:
    """Read (and, with ``zstd``, decode) each item into its buffer, in the calling
    thread, without the GIL. Per item: ``(status, size, mtime_ns, bytes read, fetched
    ns, decoded ns)``; ``ns * 1e-9 + CLOCK_OFFSET`` is ``perf_counter`` seconds (0:
    not reached)."""
    assert _native is not None
    if zstd:
        assert _ZSTD is not None
        ffi = frames._LIBZSTD[0]  # type: ignore[index]
        decompress, is_error = _ZSTD
        dctx = int(ffi.cast("uintptr_t", frames.thread_dctx()))
    else:
        dctx = decompress = is_error = 0
    return _native.read_chunks(items, dctx, decompress, is_error)
