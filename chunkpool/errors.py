"""The exceptions raised by chunkpool.

Every error chunkpool raises on purpose derives from :class:`ChunkPoolError`, so an
application can catch the whole family in one place.
"""

from __future__ import annotations

from collections.abc import Mapping

#: How many failed chunks a ChunkLoadError's message names (``failures`` has them all).
_NAMED_FAILURES = 3


class ChunkPoolError(Exception):
    """Base class of every error raised by chunkpool."""


class SourceError(ChunkPoolError):
    """The source cannot be opened as a (multiscale) image.

    Raised for a missing path, something that is not Zarr, malformed or inconsistent
    multiscales metadata, or an unsupported dtype. The message names the store and what
    is wrong with it.
    """


class ChunkIndexError(ChunkPoolError, IndexError):
    """A level or chunk index outside the image."""


class PoolDestroyedError(ChunkPoolError):
    """The pool was destroyed; it accepts no new requests."""


class EventLoopError(ChunkPoolError, RuntimeError):
    """Handlers cannot be bound to the event loop asked for (none is running)."""


class ChunkCancelledError(ChunkPoolError):
    """The chunk's load was cancelled because its last ref was dropped."""


class ChunkReadError(ChunkPoolError):
    """Reading from a store failed (after any retries): a chunk, or metadata while
    opening (then it surfaces as the reason of a :class:`SourceError`).

    The message names the store (without credentials), the key and the cause;
    ``reason`` is the cause alone (e.g. ``"timed out after 4 attempts"``). The library
    exception behind it is not chained: its text may quote a signed URL.
    """

    def __init__(self, message: str, *, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or message


class ChunkDecodeError(ChunkPoolError):
    """A chunk's bytes do not decode to the chunk the array's metadata describes.

    Raised for corrupt or truncated data, a valid compressed frame of the wrong size
    (the message says the bytes expected and those found), a decoded array of the wrong
    shape, or a declared chunk too large to decode. The message names the store (without
    credentials) and the key.
    """


class DecodeWorkerError(ChunkDecodeError):
    """A decode process died (or had to be killed) while decoding a chunk
    (``ChunkPool(..., decode="processes")``): a codec crashed, exited or ran out of
    memory. The message names the store, the key, the worker's pid and ``exit_reason``
    (e.g. ``"killed by SIGSEGV"``, ``"exit code 3"``); the pool replaces the worker."""

    def __init__(self, message: str, *, exit_reason: str):
        super().__init__(message)
        self.exit_reason = exit_reason


class MemoryBudgetError(ChunkPoolError):
    """A chunk larger than the whole memory budget of its pool: it can never load under
    that bound, so it fails at once (as its load error) instead of waiting for ever."""


class ChunkLoadError(ChunkPoolError):
    """One or more chunks failed to load.

    ``failures`` maps ``(level, index)`` to the exception of each failed chunk; the
    message, one line, names the first few.
    """

    def __init__(self, failures: Mapping[tuple[int, tuple[int, ...]], BaseException]):
        self.failures = dict(failures)
        items = sorted(self.failures.items())
        named = "; ".join(
            f"level {level} chunk {index}: {type(err).__name__}: {' '.join(str(err).split())}"
            for (level, index), err in items[:_NAMED_FAILURES]
        )
        more = len(items) - _NAMED_FAILURES
        noun = "chunk" if len(items) == 1 else "chunks"
        # One line (the command line tool prints it as its one line of error).
        super().__init__(
            f"{len(items)} {noun} failed to load: {named}"
            + (f"; and {more} more" if more > 0 else "")
        )
