"""A persistent on-disk cache in front of a remote store, bounded in bytes.

``DiskCacheStore`` wraps a zarr store: every successful read (metadata documents,
chunks, shard indexes and inner-chunk byte ranges alike) is kept in a directory, so a
revisited dataset opens and shows from disk. Each dataset gets its own subdirectory
(named by a hash of its location); within the byte budget, the least recently used
entries are deleted first. Misses that the store reports as absent (a 404) are kept too,
as empty markers, so that sparse arrays do not re-ask for their fill-value chunks.

Meant for immutable datasets: the cache never revalidates; delete its directory to
refresh. Files are written atomically (temporary file + rename), so concurrent viewers
sharing the cache never read half an entry.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.core.buffer import Buffer, BufferPrototype
from zarr.storage import WrapperStore

__all__ = ["DiskCacheStore", "default_cache_dir"]

_ABSENT = ".absent"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/zarrscope/chunks`` (``~/.cache/zarrscope/chunks`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zarrscope" / "chunks"


def _range_tag(byte_range: ByteRequest | None) -> str:
    if byte_range is None:
        return "all"
    if isinstance(byte_range, RangeByteRequest):
        return f"{byte_range.start}-{byte_range.end}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"{byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"-{byte_range.suffix}"
    raise TypeError(f"unexpected byte range {byte_range!r}")


class _Index:
    """Sizes of the cached files, least recently used first; thread-safe."""

    def __init__(self, directory: Path):
        self.lock = threading.Lock()
        self.entries: OrderedDict[str, int] = OrderedDict()
        self.nbytes = 0
        files = [p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".tmp")]
        for path in sorted(files, key=lambda p: p.stat().st_mtime):
            size = path.stat().st_size
            self.entries[str(path)] = size
            self.nbytes += size

    def touch(self, path: str) -> None:
        with self.lock:
            if path in self.entries:
                self.entries.move_to_end(path)

    def add(self, path: str, size: int, max_bytes: int) -> list[str]:
        """Record a new file; return the files to delete to stay within budget."""
        with self.lock:
            self.nbytes += size - self.entries.pop(path, 0)
            self.entries[path] = size
            evict = []
            while self.nbytes > max_bytes and len(self.entries) > 1:
                old, old_size = self.entries.popitem(last=False)
                self.nbytes -= old_size
                evict.append(old)
            return evict


class DiskCacheStore(WrapperStore):
    """A read-only store that keeps what it reads from ``store`` in ``directory``,
    within ``max_bytes``."""

    def __init__(
        self, store: Any, directory: str | os.PathLike[str], max_bytes: int, *, location: str = ""
    ):
        super().__init__(store)
        self.location = location or str(store)
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:24]
        self.directory = Path(directory) / digest
        self.directory.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self._index = _Index(self.directory)
        self.hits = 0
        self.misses = 0

    def _with_store(self, store: Any) -> DiskCacheStore:
        return type(self)(store, self.directory.parent, self.max_bytes, location=self.location)

    def __repr__(self) -> str:
        return f"DiskCacheStore({self._store!r}, {str(self.directory)!r})"

    def _path(self, key: str, byte_range: ByteRequest | None) -> Path:
        name = hashlib.sha256(f"{key}\0{_range_tag(byte_range)}".encode()).hexdigest()
        return self.directory / name[:2] / name[2:]

    async def get(
        self,
        key: str,
        prototype: BufferPrototype,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        path = self._path(key, byte_range)
        cached = await asyncio.to_thread(_read, path)
        if cached is not None:
            self.hits += 1
            self._index.touch(str(cached[0]))
            data = cached[1]
            return None if data is None else prototype.buffer.from_bytes(data)
        self.misses += 1
        result = await self._store.get(key, prototype, byte_range)
        data = None if result is None else result.to_bytes()
        await asyncio.to_thread(self._write, path, data)
        return result

    def _write(self, path: Path, data: bytes | None) -> None:
        target = path if data is not None else path.with_name(path.name + _ABSENT)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data or b"")
            os.replace(tmp, target)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            return  # a full or read-only disk only costs the cache, never the read
        for old in self._index.add(str(target), len(data or b""), self.max_bytes):
            Path(old).unlink(missing_ok=True)


def _read(path: Path) -> tuple[Path, bytes | None] | None:
    """(file, contents) of a cached entry, (marker, None) for a cached absence, or None.
    A hit refreshes the file's mtime, which orders the LRU when the cache is reopened."""
    for target in (path, path.with_name(path.name + _ABSENT)):
        try:
            data = target.read_bytes()
        except FileNotFoundError:
            continue
        os.utime(target)
        return target, (data if target is path else None)
    return None
