"""The exceptions raised by chunkpool.

Every error chunkpool raises on purpose derives from :class:`ChunkPoolError`, so an
application can catch the whole family in one place.
"""

from __future__ import annotations

from collections.abc import Mapping


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


class ChunkLoadError(ChunkPoolError):
    """One or more chunks failed to load.

    ``failures`` maps ``(level, index)`` to the exception of each failed chunk.
    """

    def __init__(self, failures: Mapping[tuple[int, tuple[int, ...]], BaseException]):
        self.failures = dict(failures)
        lines = [
            f"level {level} chunk {index}: {type(err).__name__}: {err}"
            for (level, index), err in sorted(self.failures.items())
        ]
        noun = "chunk" if len(lines) == 1 else "chunks"
        super().__init__(f"{len(lines)} {noun} failed to load:\n  " + "\n  ".join(lines))
