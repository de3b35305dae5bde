"""The KPI log's file side: records formatted as JSON lines, written to a rotated file,
by a small process of the log's own.

Why a process: formatting a record is a few microseconds of Python, all of it holding
the GIL, which the pool's loading threads need for their own per-chunk work (a pool
reading page-cached 128² chunks is bound by the GIL, not by its cores): in a thread,
the log cost that pool 3-5% of its throughput. Here the log's thread only pickles
each batch as columns of plain values (under a microsecond a record) and writes it to a pipe;
the process, started with ``python -P`` on this file (the standard library and orjson
only: it starts in tens of milliseconds), formats and writes on a core the loading
threads leave idle. Where no core is idle (two loading threads on two cores), what the
process takes is taken from them: so it formats load records in C
(:mod:`chunkpool._kpilines`, an optional extension built with the package and loaded
from its file, about 0.3 µs a record against 3 µs in Python), and in Python (orjson,
the same bytes) where the extension is absent or a value is of a type it leaves alone.

**Protocol.** The parent writes frames to the child's stdin: an 8-byte little-endian
length, then a pickle of a list of items, each a run of load records as a list of 12
columns (one tuple per field of :class:`chunkpool.kpi.LoadRecord`: pickled in about half
the time of a tuple per record) or an event as a dict. The child writes one byte
to its stdout when a frame's lines are in the file, and exits at the end of its stdin
(the parent closed it, or died). It ignores SIGINT: a Ctrl-C is the application's,
which closes the log and so lets the child write what is left.

**Failures.** If the process cannot start, dies, or does not answer in time, the log
says so once (a warning on the ``"chunkpool"`` logger), stops it, and writes in its
own thread from then on (:class:`LineWriter`, the same lines); the lines of the batch
in flight at that moment may be lost.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.machinery
import importlib.util
import logging
import logging.handlers
import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["LINES_PER_WRITE", "NATIVE_LINES", "LineWriter", "WriterProcess"]


def _load_kpilines() -> Any:
    """``chunkpool._kpilines`` (the C formatter, optional: None without it), loaded from
    its file beside this one, so that the child needs no import of the package."""
    folder = os.path.dirname(os.path.abspath(__file__))
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(folder, "_kpilines" + suffix)
        if os.path.exists(path):
            spec = importlib.util.spec_from_file_location("chunkpool._kpilines", path)
            if spec is None or spec.loader is None:
                return None
            module = importlib.util.module_from_spec(spec)
            try:
                spec.loader.exec_module(module)
            except ImportError:
                return None
            return module
    return None


_kpilines = None if os.environ.get("CHUNKPOOL_NATIVE", "1") == "0" else _load_kpilines()
#: Whether load records are formatted in C (:mod:`chunkpool._kpilines`; ``CHUNKPOOL_NATIVE=0``
#: turns it off, as it does the native reads).
NATIVE_LINES = _kpilines is not None

#: Lines written by one call to the file (its rollover check and flush once each).
LINES_PER_WRITE = 256
#: orjson writes numpy scalars and arrays itself.
_NUMPY = orjson.OPT_SERIALIZE_NUMPY
_FRAME = struct.Struct("<Q")
#: The pipe to the process holds this much (where the system allows), so that a batch's
#: frame (about 70 kB for 1024 records) goes in one write: every system call hands the
#: GIL to the loading threads and takes it back.
PIPE_BYTES = 1 << 20
#: The process's answers are read once this many frames wait for one (not after every
#: send: a system call, as above); its pipe holds thousands.
ACKS_READ_EVERY = 64


def _jsonable(value: Any) -> Any:
    if type(value).__module__ == "numpy":  # a numpy scalar (the child may lack numpy)
        return value.item()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


class LineWriter:
    """Formats load records and events as JSON lines and writes them to ``path``,
    rotated at ``max_bytes`` with ``backups`` old files (the standard library's
    ``RotatingFileHandler``). Times of load records are ``perf_counter`` seconds,
    written as integer microseconds since the epoch (``epoch_us``: the epoch's
    microseconds at ``perf_counter()`` 0)."""

    def __init__(self, path: str, max_bytes: int, backups: int, epoch_us: int):
        self._epoch_us = epoch_us
        self._file = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
        )
        self._file.setFormatter(logging.Formatter("%(message)s"))

    def write(self, items: list[Any]) -> None:
        """Write ``items`` (events as dicts, runs of load records as lists of their 12
        columns), in order, :data:`LINES_PER_WRITE` lines to a call of the file."""
        blocks: list[bytes] = []  # each one line or more, newline-joined
        lines = 0
        for item in items:
            for block, count in self._blocks(item):
                blocks.append(block)
                lines += count
                if lines >= LINES_PER_WRITE:
                    self._emit(blocks)
                    blocks, lines = [], 0
        if blocks:
            self._emit(blocks)

    def _blocks(self, item: Any) -> Iterable[tuple[bytes, int]]:
        """An item's lines, newline-joined, at most LINES_PER_WRITE to a block, and the
        count of lines in each."""
        if type(item) is dict:
            yield orjson.dumps(item, default=_jsonable, option=_NUMPY), 1
            return
        for start in range(0, len(item[0]), LINES_PER_WRITE):
            run = [column[start : start + LINES_PER_WRITE] for column in item]
            yield self._load_lines(run), len(run[0])

    def _emit(self, blocks: list[bytes]) -> None:
        # one emit per batch: the rollover check and flush once each
        self._file.emit(logging.makeLogRecord({"msg": b"\n".join(blocks).decode()}))

    def _load_lines(self, columns: list[Any]) -> bytes:
        """A run of load records (its columns) as newline-joined lines: in C where it
        formats every value of the run, else in Python (the same bytes)."""
        if _kpilines is not None:
            try:
                return _kpilines.load_lines(self._epoch_us, columns)
            except (TypeError, ValueError):  # a value it leaves to orjson
                pass
        return b"\n".join(map(self._load_line, zip(*columns, strict=True)))

    def close(self) -> None:
        self._file.close()

    def _load_line(self, r: Iterable[Any]) -> bytes:
        source, level, index, state, fetched_bytes, decoded_bytes, requested, f, g, d, v, err = r
        e = self._epoch_us
        return orjson.dumps(
            {
                "event": "load",
                "source": source,
                "level": level,
                "index": index,
                "state": state,
                "bytes_fetched": fetched_bytes,
                "bytes_decoded": decoded_bytes,
                "requested": e + int(requested * 1e6),
                "fetch_started": None if f is None else e + int(f * 1e6),
                "fetched": None if g is None else e + int(g * 1e6),
                "decoded": None if d is None else e + int(d * 1e6),
                "delivered": None if v is None else e + int(v * 1e6),
                "error": err,
            },
            default=_jsonable,
            option=_NUMPY,
        )


class WriterProcess:
    """The parent's side of the writer process (see the module docstring). Not
    thread-safe: its owner calls it from one thread at a time. Every method raises
    :class:`OSError` when the process is gone or does not answer; the owner then
    :meth:`kill` s it and writes itself."""

    def __init__(self, path: str, max_bytes: int, backups: int, epoch_us: int):
        self._proc = subprocess.Popen(
            [sys.executable, "-P", __file__, path, str(max_bytes), str(backups), str(epoch_us)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._stdin = self._proc.stdin
        os.set_blocking(self._stdin.fileno(), False)  # (send's writes wait in select)
        with contextlib.suppress(OSError, AttributeError):  # (Linux; a larger pipe)
            fcntl.fcntl(self._stdin.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)
        self._acks = self._proc.stdout.fileno()
        os.set_blocking(self._acks, False)
        self._sent = self._acked = 0

    @property
    def pid(self) -> int:
        return self._proc.pid

    def send(self, items: list[Any], timeout: float) -> None:
        """Hand ``items`` to the process, waiting (without the GIL) while the pipe is
        full, for ``timeout`` seconds at most: a process that stopped reading raises
        OSError, never blocks its caller for good. Answers already there are
        collected on the way."""
        frame = pickle.dumps(items, pickle.HIGHEST_PROTOCOL)
        payload = memoryview(_FRAME.pack(len(frame)) + frame)
        fd = self._stdin.fileno()
        deadline = time.monotonic() + timeout
        try:
            while True:  # (a write first: the pipe has room for a frame, mostly)
                with contextlib.suppress(BlockingIOError):  # (room for less than a write)
                    payload = payload[os.write(fd, payload) :]
                if not payload:
                    break
                _, ready, _ = select.select([], [fd], [], max(0.0, deadline - time.monotonic()))
                if not ready:
                    raise OSError(f"the KPI writer process took nothing for {timeout} s")
        except BrokenPipeError:
            raise self._ended() from None
        self._sent += 1
        if self._sent - self._acked >= ACKS_READ_EVERY:
            self._collect(0.0)

    def wait(self, timeout: float) -> None:
        """Return once every frame sent is written; raise OSError after ``timeout``."""
        self._collect(timeout)
        if self._acked < self._sent:
            raise OSError(f"the KPI writer process did not answer within {timeout} s")

    def _collect(self, timeout: float) -> None:
        while self._acked < self._sent:
            ready, _, _ = select.select([self._acks], [], [], timeout)
            if not ready:
                return
            got = os.read(self._acks, 65536)
            if not got:
                raise self._ended()
            self._acked += len(got)

    def close(self, timeout: float) -> None:
        """End the process once it has written everything (at most ``timeout``)."""
        with contextlib.suppress(OSError):
            self._stdin.close()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise OSError(f"the KPI writer process did not end within {timeout} s") from None
        finally:
            self._proc.stdout.close()  # type: ignore[union-attr]

    def kill(self) -> None:
        """Stop the process now (its pipes closed, its exit collected)."""
        self._proc.kill()
        for pipe in (self._stdin, self._proc.stdout):
            with contextlib.suppress(OSError):
                pipe.close()  # type: ignore[union-attr]
        # (a process SIGKILL does not end at once is the kernel's to reap: not waited on)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(5.0)

    def _ended(self) -> OSError:
        """The error for a process whose pipe closed: it is gone, or going (its exit
        status, for the message, is waited for a second at most)."""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._proc.wait(1.0)
        return OSError(f"the KPI writer process ended ({self._exit_reason()})")

    def _exit_reason(self) -> str:
        code = self._proc.poll()
        if code is None:
            return "still running"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit code {code}"


def _read_exactly(stream: Any, n: int) -> bytes | None:
    data = stream.read(n)
    return data if len(data) == n else None


def main(argv: list[str]) -> int:
    """The child: frames from stdin, lines to the file, one byte back per frame."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    path, max_bytes, backups, epoch_us = argv[0], int(argv[1]), int(argv[2]), int(argv[3])
    writer = LineWriter(path, max_bytes, backups, epoch_us)
    source, acks = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            header = _read_exactly(source, _FRAME.size)
            if header is None:
                return 0
            payload = _read_exactly(source, _FRAME.unpack(header)[0])
            if payload is None:
                return 0
            writer.write(pickle.loads(payload))
            acks.write(b".")
            acks.flush()
    except BrokenPipeError:  # the parent is gone: nobody to answer
        return 0
    finally:
        writer.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
