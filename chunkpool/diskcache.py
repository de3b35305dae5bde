"""A persistent on-disk cache in front of a remote store, bounded in bytes, that any number
of processes and threads may share.

``DiskCacheStore`` wraps a zarr store: every successful read (metadata documents, chunks,
shard indexes and inner-chunk byte ranges alike) is kept under a directory, so a revisited
dataset opens and shows from disk. Reads the store reports as absent (a 404) are kept too,
so that sparse arrays do not re-ask for their fill-value chunks.

**Revalidation** (over a :class:`~chunkpool.stores.RemoteStore`, whose reads carry the
objects' versions: ETag / Last-Modified). Each entry keeps the version its bytes came
with, and its store key. The rule:

- *Metadata documents* (``zarr.json``, ``.zarray``, ``.zattrs``, ``.zgroup``,
  ``.zmetadata``) are revalidated whenever they are read, that is at open and at each
  :meth:`ChunkPool.refresh`: a conditional request against the cached version (a HEAD
  with ``If-None-Match``: "not modified" costs no body), and a fresh read only if the
  document changed.
- *Chunks and shard ranges* are served from disk without a request, with the version
  they were cached with, so the pool revalidates them like any remote chunk: at each
  refresh, at most ``revalidate`` of the chunks it holds or caches, oldest check first
  (:meth:`DiskCacheStore.check_stamp`). An object found changed has every entry of its
  key dropped (all byte ranges), so its reload reads the remote store.
- *Offline*: when a request for that revalidation fails (the remote unreachable, or
  answering errors), what the cache has is served as is, and one WARNING says so
  ("offline: serving N cached entries of <location>"); no request is tried again until
  the next refresh probes the remote (:meth:`DiskCacheStore.probe`, one try), and the
  first one that succeeds says once (INFO) that it is online again. The state is shared by
  the stores of one dataset in one process. Entries written by older versions (no
  version kept) of chunks are not revalidated; their metadata is read again.

**Layout.** ``DIR/index.sqlite3`` (SQLite in WAL mode) indexes everything under ``DIR``:
one row per entry with its size, CRC-32, last use and a random write token, and the total
of the sizes. An entry's bytes are the file ``DIR/<dataset>/<aa>/<name>`` (``name`` a hash
of the key and byte range); a cached absence is a row without a file. The index is the
truth: a file it does not know is never served.

**Many processes and threads.** Every change to the files (writing an entry, evicting,
healing, sweeping) happens inside an SQLite write transaction, so no one sees another's
half-done work, and the byte budget is shared: whoever inserts first evicts the least
recently used entries of *any* dataset in ``DIR`` until the new entry fits in its own
``max_bytes`` (an entry larger than that is not kept). A writer waits at most
``_BUSY_TIMEOUT`` seconds for the other threads of its process (they queue on a lock), and
as long for other processes (SQLite's busy timeout), then skips keeping that read. Reads
take no lock: a file that vanishes or changes under a reader is a miss. A hit records its
time only when the recorded one is over ``_TOUCH_INTERVAL`` seconds old.

**Healing.** A hit is checked against the size and checksum in the index (CRC-32: 51 µs
per 128 KiB here, against 241 µs for an 8-byte BLAKE2b): a short, long, garbage,
zero-length, missing or unreadable entry, or a directory where it should be, is dropped
(row, then file) and read again from the store. Opening a dataset sweeps its directory:
temporary files left by a crashed writer (no writer is mid-write while the sweep holds the
write lock) and files the index does not know (e.g. ``.absent`` markers of older versions)
are removed, counted in :attr:`DiskCacheStore.stats` and logged once. An index SQLite
reports corrupt (``PRAGMA quick_check`` at open, or any later query) is rebuilt empty, with
one warning; if that fails, or the directory is unusable, the cache is disabled with one
warning. The cache never fails a read that the store would have served: each of its own
failures is a miss or a skipped write.

**Identity.** Entries are keyed on the data *and* on who reads it. The dataset directory
is a digest of ``location`` (the source without credentials) and of ``identity``:
everything credential-bearing the caller knows, e.g. the URL as given with its user info
and secret query parameters, the storage options, and for s3 the access key id that
botocore resolves from the environment (see ``chunkpool.stores``; credentials that other
libraries find by themselves, e.g. for ``gs://``, are not seen). So two identities never
share entries, even for one URL, and one identity shares them across sessions. The
identity is stretched with PBKDF2 before it enters the digest, and is kept nowhere: no
secret is written to the disk, to a file name, a log line or a repr.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import tempfile
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import ByteRequest, OffsetByteRequest, RangeByteRequest, SuffixByteRequest
from zarr.storage import WrapperStore

from .errors import ChunkPoolError
from .redaction import describe_error, redact_text
from .zarr_compat import set_wrapped_store

__all__ = ["INDEX_NAME", "DiskCacheStats", "DiskCacheStore", "default_cache_dir"]

log = logging.getLogger(__name__)

#: The index's file name in the cache directory (SQLite adds ``-wal`` and ``-shm``).
INDEX_NAME = "index.sqlite3"

_BUSY_TIMEOUT = 10.0  # s: how long a writer waits for other threads, then other processes
_TOUCH_INTERVAL = 1.0  # s: a hit records its time only if the recorded one is older
_TEMP_PREFIX = ".tmp"
_IDENTITY_ROUNDS = 100_000  # PBKDF2 rounds: 40 ms here, once per open with an identity
_DATASET = re.compile(r"[0-9a-f]{24}")
_ENTRY = re.compile(r"[0-9a-f]{24}/[0-9a-f]{2}/[0-9a-f]{62}")
_SUBDIR = re.compile(r"[0-9a-f]{2}")
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS entries (
        path TEXT PRIMARY KEY,      -- <dataset>/<aa>/<name>, relative to the cache directory
        size INTEGER NOT NULL,      -- bytes of the file; -1: a cached absence, no file
        checksum INTEGER NOT NULL,  -- zlib.crc32 of the file
        last_use REAL NOT NULL,     -- time.time() of the write or of a (recent enough) hit
        token INTEGER NOT NULL,     -- random per write: a stale reader never drops a newer one
        key TEXT,                   -- the store key (no credentials); NULL: older versions
        stamp TEXT                  -- JSON of the object's version when read; NULL: none
    )""",
    "CREATE INDEX IF NOT EXISTS entries_by_use ON entries (last_use)",
    """CREATE TABLE IF NOT EXISTS total (
        id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL
    )""",
    "INSERT OR IGNORE INTO total VALUES (0, 0)",
    """CREATE TRIGGER IF NOT EXISTS entries_added AFTER INSERT ON entries
        BEGIN UPDATE total SET bytes = bytes + max(NEW.size, 0); END""",
    """CREATE TRIGGER IF NOT EXISTS entries_removed AFTER DELETE ON entries
        BEGIN UPDATE total SET bytes = bytes - max(OLD.size, 0); END""",
    """CREATE TRIGGER IF NOT EXISTS entries_resized AFTER UPDATE OF size ON entries
        BEGIN UPDATE total SET bytes = bytes - max(OLD.size, 0) + max(NEW.size, 0); END""",
)

_T = TypeVar("_T")

# One writer per process and cache directory at a time: threads queue on a lock instead of
# SQLite's busy handler, which polls with sleeps of up to 100 ms.
_WRITERS: dict[str, threading.Lock] = {}
_WRITERS_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/zarrscope/chunks`` (``~/.cache/zarrscope/chunks`` by default)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "zarrscope" / "chunks"


@dataclass(frozen=True)
class DiskCacheStats:
    """What one :class:`DiskCacheStore` did since it was opened (``bytes``: the whole
    cache directory's entries now, as the shared index counts them)."""

    hits: int
    misses: int
    healed: int  # entries found damaged or missing, dropped and (if read) refetched
    evicted: int  # entries this store evicted to make room (of any dataset)
    write_skips: int  # reads not kept: index busy or failing, disk full, too large
    temp_files_removed: int  # left by crashed writers, removed at open
    strays_removed: int  # files the index did not know, removed at open
    bytes: int
    enabled: bool  # False: the directory or its index is unusable, every read is a miss


class _CorruptIndex(Exception):
    """SQLite's own check found the index damaged."""


def _is_corrupt(err: BaseException) -> bool:
    code = getattr(err, "sqlite_errorcode", None)
    return isinstance(err, _CorruptIndex) or (code is not None and code & 0xFF in _CORRUPT_CODES)


class _Connection(sqlite3.Connection):
    """A connection that can be weakly referenced (one of a thread that ended closes)."""


class _Index:
    """The SQLite index of one cache directory: one connection per thread (reconnected
    after :meth:`close`), and every change to the directory's files made inside a write
    transaction."""

    def __init__(self, root: Path):
        self.root = root
        self.path = root / INDEX_NAME
        self._local = threading.local()
        self._lock = threading.Lock()
        self._generation = 0
        self._connections: weakref.WeakSet[_Connection] = weakref.WeakSet()
        self._file_id: tuple[int, int] | None = None
        with _WRITERS_LOCK:
            self._writer = _WRITERS.setdefault(os.path.abspath(root), threading.Lock())

    def db(self) -> sqlite3.Connection:
        local = self._local
        if getattr(local, "generation", None) != self._generation:
            db = sqlite3.connect(
                self.path,
                timeout=_BUSY_TIMEOUT,
                isolation_level=None,
                check_same_thread=False,
                factory=_Connection,
            )
            db.execute("PRAGMA synchronous = NORMAL")  # WAL: durable enough for a cache
            with self._lock:
                self._connections.add(db)
                local.db, local.generation = db, self._generation
        return local.db

    def close(self) -> None:
        with self._lock:
            self._generation += 1
            connections, self._connections = list(self._connections), weakref.WeakSet()
        for db in connections:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: the cache's files change only inside one."""
        if not self._writer.acquire(timeout=_BUSY_TIMEOUT):
            raise TimeoutError("another thread kept the index busy")
        try:
            db = self.db()
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                raise
        finally:
            self._writer.release()

    def setup(self) -> None:
        """Create the schema if needed (adding the columns older versions lacked) and
        check the file; raises if it is corrupt."""
        db = self.db()
        db.execute("PRAGMA journal_mode = WAL")  # stays in rollback mode where WAL cannot
        with self.write() as db:
            for statement in _SCHEMA:
                db.execute(statement)
            columns = {row[1] for row in db.execute("PRAGMA table_info(entries)")}
            for column in ("key", "stamp"):
                if column not in columns:
                    db.execute(f"ALTER TABLE entries ADD COLUMN {column} TEXT")
            db.execute("CREATE INDEX IF NOT EXISTS entries_by_key ON entries (key)")
        problems = db.execute("PRAGMA quick_check").fetchall()
        if problems != [("ok",)]:
            raise _CorruptIndex(str(problems[0][0]) if problems else "no answer")
        info = os.stat(self.path)
        self._file_id = (info.st_dev, info.st_ino)

    def rebuild(self) -> None:
        """Replace a corrupt index by an empty one, deleting the entries it indexed."""
        self.close()
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            info = None
        if info and self._file_id and (info.st_dev, info.st_ino) != self._file_id:
            self.setup()  # another process rebuilt it already
            return
        for suffix in ("-wal", "-shm", "-journal", ""):
            (self.root / (INDEX_NAME + suffix)).unlink(missing_ok=True)
        for item in _scandir(self.root):
            if _DATASET.fullmatch(item.name) and item.is_dir(follow_symlinks=False):
                shutil.rmtree(item.path, ignore_errors=True)
        self.setup()

    def lookup(self, path: str) -> tuple[int, int, float, int, str | None] | None:
        """``(size, checksum, last_use, token, stamp)`` of an entry, or None."""
        return (
            self.db()
            .execute(
                "SELECT size, checksum, last_use, token, stamp FROM entries WHERE path = ?",
                (path,),
            )
            .fetchone()
        )

    def drop_key(self, dataset: str, key: str) -> int:
        """Drop every entry (all byte ranges) of ``key`` in ``dataset``; how many."""
        with self.write() as db:
            paths = [
                path
                for (path,) in db.execute(
                    "SELECT path FROM entries WHERE key = ? AND path >= ? AND path < ?",
                    (key, f"{dataset}/", f"{dataset}0"),
                )
            ]
            db.executemany("DELETE FROM entries WHERE path = ?", [(p,) for p in paths])
            for path in paths:
                self._remove(path)
        return len(paths)

    def count(self, dataset: str) -> int:
        """The entries of ``dataset`` that hold bytes (not cached absences)."""
        return (
            self.db()
            .execute(
                "SELECT count(*) FROM entries WHERE size >= 0 AND path >= ? AND path < ?",
                (f"{dataset}/", f"{dataset}0"),
            )
            .fetchone()[0]
        )

    def touch(self, path: str, token: int) -> None:
        with self.write() as db:
            db.execute(
                "UPDATE entries SET last_use = ? WHERE path = ? AND token = ?",
                (time.time(), path, token),
            )

    def total(self) -> int:
        return self.db().execute("SELECT bytes FROM total").fetchone()[0]

    def drop(self, path: str, token: int) -> bool:
        """Drop a damaged entry (row, then file), unless it was rewritten meanwhile."""
        with self.write() as db:
            dropped = db.execute(
                "DELETE FROM entries WHERE path = ? AND token = ?", (path, token)
            ).rowcount
            if dropped:
                self._remove(path)
        return bool(dropped)

    def put(
        self,
        path: str,
        data: bytes | None,
        max_bytes: int,
        key: str | None = None,
        stamp: str | None = None,
    ) -> tuple[int, bool]:
        """Keep ``data`` (None: an absence) as entry ``path`` (of store key ``key``, read
        at version ``stamp``), first evicting least recently used entries until the cache
        fits in ``max_bytes`` with it. Returns (entries evicted, whether it was kept)."""
        size = -1 if data is None else len(data)
        checksum = 0 if data is None else zlib.crc32(data)
        with self.write() as db:
            row = db.execute(
                "SELECT size, checksum, stamp FROM entries WHERE path = ?", (path,)
            ).fetchone()
            if row == (size, checksum, stamp):  # another reader kept it meanwhile
                return 0, True
            old = max(row[0], 0) if row else 0
            evicted = self._make_room(db, path, max(size, 0) - old, max_bytes)
            try:
                if data is None:
                    self._remove(path)
                else:
                    _write_file(self.root / path, data)
            except OSError:  # a full or read-only disk only costs the cache
                db.execute("DELETE FROM entries WHERE path = ?", (path,))
                self._remove(path)
                return evicted, False
            db.execute(
                """INSERT INTO entries (path, size, checksum, last_use, token, key, stamp)
                VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (path) DO UPDATE SET
                size = excluded.size, checksum = excluded.checksum,
                last_use = excluded.last_use, token = excluded.token, key = excluded.key,
                stamp = excluded.stamp""",
                (
                    path,
                    size,
                    checksum,
                    time.time(),
                    int.from_bytes(os.urandom(7), "big"),
                    key,
                    stamp,
                ),
            )
        return evicted, True

    def _make_room(self, db: sqlite3.Connection, path: str, growth: int, max_bytes: int) -> int:
        (total,) = db.execute("SELECT bytes FROM total").fetchone()
        excess = total + growth - max_bytes
        evicted = 0
        while excess > 0:
            victims = db.execute(
                "SELECT path, size FROM entries WHERE path != ? ORDER BY last_use LIMIT 64",
                (path,),
            ).fetchall()
            if not victims:
                break
            for victim, size in victims:
                db.execute("DELETE FROM entries WHERE path = ?", (victim,))
                self._remove(victim)
                evicted += 1
                excess -= max(size, 0)
                if excess <= 0:
                    break
        return evicted

    def sweep(self, dataset: str) -> tuple[int, int, int]:
        """Remove what crashes and older versions left in ``dataset``'s directory: temp
        files, files (or anything else) the index does not know; drop the rows whose file
        is gone. Returns (temp files, strays, rows dropped)."""
        temps = strays = 0
        with self.write() as db:
            known = dict(
                db.execute(
                    "SELECT path, size FROM entries WHERE path >= ? AND path < ?",
                    (f"{dataset}/", f"{dataset}0"),  # "0" follows "/"
                )
            )
            present = set()
            for top in _scandir(self.root / dataset):
                if not (_SUBDIR.fullmatch(top.name) and top.is_dir(follow_symlinks=False)):
                    _remove(Path(top.path))
                    strays += 1
                    continue
                for item in _scandir(top.path):
                    rel = f"{dataset}/{top.name}/{item.name}"
                    if item.name.startswith(_TEMP_PREFIX):
                        temps += 1
                    elif known.get(rel, -1) >= 0 and item.is_file(follow_symlinks=False):
                        present.add(rel)
                        continue
                    else:
                        strays += 1
                    _remove(Path(item.path))
            lost = [(path,) for path, size in known.items() if size >= 0 and path not in present]
            db.executemany("DELETE FROM entries WHERE path = ?", lost)
        return temps, strays, len(lost)

    def _remove(self, path: str) -> None:
        if _ENTRY.fullmatch(path):  # a tampered index never deletes outside the cache
            _remove(self.root / path)


def _scandir(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _remove(path: Path) -> None:
    """Delete a file, link or a directory standing where a file should be; tolerant of it
    being gone already."""
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)


def _write_file(target: Path, data: bytes) -> None:
    """Write ``target`` atomically: a temporary file beside it, then a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        shutil.rmtree(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_TEMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)


def _read_entry(file: Path, size: int, checksum: int) -> bytes | None:
    """The entry's bytes if the file is whole (the size and checksum indexed), else None.
    Opens without blocking and reads only regular files (a FIFO there never hangs us)."""
    try:
        with open(os.open(file, _READ_FLAGS), "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                return None
            data = f.read(size + 1)
    except OSError:  # vanished, a directory, unreadable
        return None
    return data if len(data) == size and zlib.crc32(data) == checksum else None


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


def _dataset_name(location: str, identity: str) -> str:
    """The dataset directory's name: a digest of the location and of the stretched
    identity (without one, that of the location alone, as older versions named it)."""
    material = location.encode()
    if identity:
        salt = b"zarrscope disk cache\0" + material
        material += b"\0" + hashlib.pbkdf2_hmac("sha256", identity.encode(), salt, _IDENTITY_ROUNDS)
    return hashlib.sha256(material).hexdigest()[:24]


class _Counts:
    """The counters behind :class:`DiskCacheStats`, updated from many threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.hits = self.misses = self.healed = self.evicted = self.write_skips = 0
        self.temp_files_removed = self.strays_removed = 0

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


#: The documents zarr reads metadata from: revalidated whenever read.
_METADATA_NAMES = frozenset({"zarr.json", ".zarray", ".zattrs", ".zgroup", ".zmetadata"})


def _is_metadata(key: str) -> bool:
    return key.rpartition("/")[2] in _METADATA_NAMES


def _encode_stamp(stamp: Any) -> str | None:
    return None if stamp is None else json.dumps(list(stamp))


def _decode_stamp(text: str | None) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return tuple(value) if isinstance(value, list) else None


class _Link:
    """Whether one dataset's remote store answers, shared by its stores in a process."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.offline = False
        self.probe = False  # offline: whether the next request may try the remote


_LINKS: weakref.WeakValueDictionary[str, _Link] = weakref.WeakValueDictionary()
_LINKS_LOCK = threading.Lock()


def _link(directory: Path) -> _Link:
    with _LINKS_LOCK:
        link = _LINKS.get(str(directory))
        if link is None:
            link = _LINKS[str(directory)] = _Link()
        return link


async def _get_stamped(
    store: Any, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
) -> tuple[Buffer | None, Any]:
    """``store.get_stamped`` where the store knows versions, else a plain get."""
    getter = getattr(store, "get_stamped", None)
    if getter is None:
        return await store.get(key, prototype, byte_range), None
    return await getter(key, prototype, byte_range)


class DiskCacheStore(WrapperStore):
    """A read-only store that keeps what it reads from ``store`` under ``directory``,
    within ``max_bytes`` for the whole directory (see the module's notes).

    ``location`` names the data without credentials: it is what ``str()``, ``repr()`` and
    log lines show. ``identity`` is whatever tells apart who reads it (credentials
    included); only a stretched digest of it is kept.
    """

    def __init__(
        self,
        store: Any,
        directory: str | os.PathLike[str],
        max_bytes: int,
        *,
        location: str,
        identity: str = "",
    ):
        super().__init__(store)
        self.location = location
        self.max_bytes = max_bytes
        self.dataset = _dataset_name(location, identity)
        self.directory = Path(directory) / self.dataset
        self._counts = _Counts()
        self._recover_lock = threading.Lock()
        self._rebuilt = False
        self._index = self._open_index(Path(directory))
        self._link = _link(self.directory)
        #: Whether the store under tells versions (then metadata is revalidated).
        self._versioned = hasattr(store, "get_stamped")

    def _open_index(self, root: Path) -> _Index | None:
        """The directory's index (rebuilt if corrupt) after sweeping this dataset's
        directory; None, with one warning, if the cache cannot be used."""
        try:
            root.mkdir(parents=True, exist_ok=True)
            index = _Index(root)
            try:
                index.setup()
            except (sqlite3.Error, _CorruptIndex) as err:
                if not _is_corrupt(err):
                    raise
                log.warning("disk cache %s: its index is corrupt (%s), rebuilt empty", root, err)
                self._rebuilt = True
                index.rebuild()
            temps, strays, lost = index.sweep(self.dataset)
        except (OSError, sqlite3.Error, _CorruptIndex) as err:
            log.warning("disk cache %s is disabled, reading without it: %s", root, err)
            return None
        self._counts.add(temp_files_removed=temps, strays_removed=strays, healed=lost)
        if temps or strays:
            log.info(
                "disk cache %s: removed %d leftover temporary file(s) and %d stray file(s)",
                self.directory,
                temps,
                strays,
            )
        return index

    def _with_store(self, store: Any) -> DiskCacheStore:
        clone = copy.copy(self)  # shares the index and the counters
        set_wrapped_store(clone, store)
        return clone

    def __repr__(self) -> str:
        return f"DiskCacheStore({self.location!r}, {str(self.directory)!r})"

    def __str__(self) -> str:
        return self.location

    @property
    def stats(self) -> DiskCacheStats:
        """What this store did since it was opened, and the directory's bytes now."""
        c = self._counts
        total = self._cached(_Index.total)
        with c.lock:
            return DiskCacheStats(
                hits=c.hits,
                misses=c.misses,
                healed=c.healed,
                evicted=c.evicted,
                write_skips=c.write_skips,
                temp_files_removed=c.temp_files_removed,
                strays_removed=c.strays_removed,
                bytes=total or 0,
                enabled=self._index is not None,
            )

    def close(self) -> None:
        """Close the index's connections (they reopen if the store is used again), then
        the wrapped store."""
        if self._index is not None:
            self._index.close()
        super().close()

    def _entry(self, key: str, byte_range: ByteRequest | None) -> str:
        name = hashlib.sha256(f"{key}\0{_range_tag(byte_range)}".encode()).hexdigest()
        return f"{self.dataset}/{name[:2]}/{name[2:]}"

    async def get(
        self,
        key: str,
        prototype: BufferPrototype,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        return (await self.get_stamped(key, prototype, byte_range))[0]

    async def get_stamped(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> tuple[Buffer | None, Any]:
        """:meth:`get`, and the version of the object the bytes are of (see
        :meth:`chunkpool.stores.RemoteStore.get_stamped`): a hit's is the one it was
        cached with. A metadata document is revalidated first (the module's notes)."""
        if self._index is None:
            return await _get_stamped(self._store, key, prototype, byte_range)
        entry = self._entry(key, byte_range)
        hit = await asyncio.to_thread(self._read, entry)
        if hit is not None and (not _is_metadata(key) or await self._current(key, hit[1])):
            self._counts.add(hits=1)
            data, stamp = hit
            return (None if data is None else prototype.buffer.from_bytes(data)), stamp
        self._counts.add(misses=1)
        result, stamp = await _get_stamped(self._store, key, prototype, byte_range)
        data = None if result is None else result.to_bytes()
        await asyncio.to_thread(self._keep, entry, data, key, stamp)
        return result, stamp

    async def check_stamp(self, key: str, stamp: Any) -> Any:
        """The version of ``key`` now, asked of the store under (conditionally); a changed
        object's entries are dropped. None, without a request, while offline (until the
        next :meth:`probe`); a failure makes it offline (one warning)."""
        if not self._may_ask():
            return None
        check = getattr(self._store, "check_stamp", None)
        if check is None:
            return None
        try:
            now = await check(key, stamp)
        except Exception as err:
            self._went_offline(err)
            return None
        self._online()
        if now is not None and now != stamp and self._index is not None:
            await asyncio.to_thread(self._cached, _Index.drop_key, self.dataset, key)
        return now

    def probe(self) -> None:
        """While offline, let the next request try the remote once (each refresh does)."""
        link = self._link
        with link.lock:
            if link.offline:
                link.probe = True

    async def _current(self, key: str, stamp: Any) -> bool:
        """Whether a cached metadata document may be served: it is still the remote's
        (a conditional request), or the remote cannot be asked now (offline), or no
        version can be known for it."""
        if stamp is None:
            return not self._versioned  # kept without a version: read it again
        return await self.check_stamp(key, stamp) in (None, stamp)

    def _may_ask(self) -> bool:
        link = self._link
        with link.lock:
            if not link.offline:
                return True
            probe, link.probe = link.probe, False
            return probe

    def _went_offline(self, err: BaseException) -> None:
        link = self._link
        with link.lock:
            if link.offline:
                return
            link.offline, link.probe = True, False
        reason = str(err) if isinstance(err, ChunkPoolError) else describe_error(err)
        n = self._cached(_Index.count, self.dataset) or 0
        log.warning(
            "offline: serving the %d cached entries of %s (the remote did not answer: %s)",
            n,
            self.location,
            redact_text(reason),
        )

    def _online(self) -> None:
        link = self._link
        with link.lock:
            if not link.offline:
                return
            link.offline = link.probe = False
        log.info("online again: %s answers, the disk cache is revalidated", self.location)

    def _read(self, entry: str) -> tuple[bytes | None, Any] | None:
        """``(bytes, stamp)`` or ``(None, stamp)`` (a cached absence) on a hit, None on a
        miss."""
        index = self._index
        row = self._cached(_Index.lookup, entry)
        if index is None or row is None:
            return None
        size, checksum, last_use, token, stamp = row
        data = None
        if size >= 0:
            data = _read_entry(index.root / entry, size, checksum)
            if data is None:
                if self._cached(_Index.drop, entry, token):
                    self._counts.add(healed=1)
                return None
        if time.time() - last_use > _TOUCH_INTERVAL:
            self._cached(_Index.touch, entry, token)
        return data, _decode_stamp(stamp)

    def _keep(self, entry: str, data: bytes | None, key: str, stamp: Any) -> None:
        if data is not None and len(data) > self.max_bytes:
            self._counts.add(write_skips=1)
            return
        done = self._cached(_Index.put, entry, data, self.max_bytes, key, _encode_stamp(stamp))
        evicted, kept = done if done is not None else (0, False)
        self._counts.add(evicted=evicted, write_skips=0 if kept else 1)

    def _cached(self, op: Callable[..., _T], *args: Any) -> _T | None:
        """``op(index, *args)``; None if the cache is disabled or fails (then a corrupt
        index is rebuilt once, or the cache disabled, each with one warning)."""
        index = self._index
        if index is None:
            return None
        try:
            return op(index, *args)
        except (OSError, sqlite3.Error, _CorruptIndex) as err:
            if _is_corrupt(err):
                self._recover(index, err)
            else:
                log.debug("disk cache %s: %s", index.root, err)
            return None

    def _recover(self, index: _Index, err: BaseException) -> None:
        with self._recover_lock:
            if self._index is not index:
                return  # another thread dealt with it
            if not self._rebuilt:
                self._rebuilt = True
                log.warning(
                    "disk cache %s: its index is corrupt (%s), rebuilt empty", index.root, err
                )
                with contextlib.suppress(OSError, sqlite3.Error, _CorruptIndex):
                    index.rebuild()
                    return
            log.warning("disk cache %s is disabled, reading without it: %s", index.root, err)
            self._index = None
            index.close()
