"""Per-chunk KPIs: one record per finished, failed or cancelled load, kept and logged.

Every load the pool finishes leaves a :class:`LoadRecord`: which chunk, how it ended,
the bytes fetched (encoded) and decoded, and when it was requested, started fetching,
was fetched, was decoded and was delivered (the data published to its holders). A
:class:`KpiLog` keeps the most recent records in a ring (``pool.kpis``; ``pool.stats``
takes its latency percentiles from it) and, given a path, also writes them as JSON
lines, rotated by size (the standard library's ``RotatingFileHandler``), so the file
stays bounded however long an application runs. Applications add their own events to
the same log: the viewer writes ``drawn`` (a chunk's data first on screen) and
``view`` (the camera moved) lines, from which a report draws where the time of one
jump went.

Cost: :meth:`KpiLog.add` is two deque appends (the ring and, with a path, the lines
to write), cheap enough under the pool's lock; every :data:`FLUSH_EVERY` records or
:data:`FLUSH_SECONDS`, whichever comes first, the log's thread hands what waits to its
writer process (:mod:`chunkpool.kpiwriter`: formatting in a thread took the GIL from
the loading threads), and :meth:`KpiLog.close` writes the rest and stops both. One line, with
``null`` for a step a load never reached (a cancelled one has no ``decoded``), written
by orjson (shown here on several lines)::

    {"event":"load","source":"img.zarr","level":0,"index":[0,3,4],"state":"loaded",
     "bytes_fetched":30466,"bytes_decoded":131072,"requested":1764643012118331,
     "fetch_started":1764643012118502,"fetched":1764643012119113,
     "decoded":1764643012119706,"delivered":1764643012119741,"error":null}

Times are integer microseconds since the epoch (``time.time()`` scale, measured with
``time.perf_counter()``; integers format in a third of the time floats take), so the
lines of several pools and of the viewer line up.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

from .kpiwriter import LINES_PER_WRITE, LineWriter, WriterProcess

__all__ = [
    "FLUSH_EVERY",
    "FLUSH_SECONDS",
    "LINES_PER_WRITE",
    "KpiLog",
    "LoadRecord",
    "read_kpi_lines",
]

logger = logging.getLogger("chunkpool")

#: Records that wake the log's thread; it also hands them over every FLUSH_SECONDS.
#: About 25 wake-ups a second at the pool's fastest (each takes the GIL from the
#: loading threads for a moment), frames of about 70 kB (one write into the writer's
#: pipe), so that the writer formats while the pool loads, and a batch waits in
#: memory at most a second.
FLUSH_EVERY = 1024
FLUSH_SECONDS = 1.0
#: How long :meth:`KpiLog.close` waits for the writer thread, and then for the writer
#: process; and :meth:`KpiLog.flush` for the process to have written.
CLOSE_TIMEOUT = 5.0
#: Records kept in memory by default (the percentiles of ``pool.stats`` are over these;
#: about 0.4 kB each).
RING = 2048


class LoadRecord(NamedTuple):
    """How one load went. Times are ``time.perf_counter()`` seconds (None: not reached).

    ``state`` is ``"loaded"``, ``"failed"`` or ``"cancelled"``; ``"reloaded"`` is a
    held chunk read again after its stored object changed (``ChunkPool.refresh``)."""

    source: str
    level: int
    index: tuple[int, ...]
    state: str
    bytes_fetched: int
    bytes_decoded: int
    requested: float
    fetch_started: float | None
    fetched: float | None
    decoded: float | None
    delivered: float | None
    error: str | None = None

    @property
    def latency(self) -> float | None:
        """Seconds from request to delivery (None if never delivered)."""
        return None if self.delivered is None else self.delivered - self.requested


class KpiLog:
    """The most recent :class:`LoadRecord` s (a ring of ``capacity``) and, with ``path``,
    every record as a JSON line in a file rotated at ``max_bytes`` (``backups`` old
    files kept: ``PATH.1``, ``PATH.2``...), handed by a thread of the log's own to a
    writer process (:mod:`chunkpool.kpiwriter`). Thread-safe; one log may serve
    several pools and the viewer. :meth:`close` writes what is left and stops the
    thread and the process (the ring stays readable).
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        capacity: int = RING,
        max_bytes: int = 32 << 20,
        backups: int = 2,
    ):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        self.path = None if path is None else os.fspath(path)
        self._ring: deque[LoadRecord] = deque(maxlen=capacity)
        self._todo: deque[LoadRecord | dict[str, Any]] | None = None  # for the file
        # perf_counter -> epoch: measured once, so that every line shares one clock
        self._epoch_us = int((time.time() - time.perf_counter()) * 1e6)
        self._max_bytes, self._backups = max_bytes, backups
        self._process: WriterProcess | None = None  # the file's writer, or else:
        self._lines: LineWriter | None = None  # (writing in this process)
        self._wake = threading.Event()
        self._closed = False
        self._writer: threading.Thread | None = None
        self._write_lock = threading.Lock()  # one writer of the file at a time
        if self.path is not None:
            try:
                self._process = WriterProcess(self.path, max_bytes, backups, self._epoch_us)
            except OSError as err:
                self._write_here(f"could not start: {err}")
            self._todo = deque()
            self._writer = threading.Thread(target=self._run, name="chunkpool-kpi", daemon=True)
            self._writer.start()

    def __repr__(self) -> str:
        return f"<KpiLog {len(self._ring)} records, {self.path or 'in memory'}>"

    def add(self, record: LoadRecord) -> None:
        """Keep ``record`` (and log it, with a path). Cheap: two appends."""
        self._ring.append(record)  # deque.append is atomic
        todo = self._todo
        if todo is not None:
            todo.append(record)
            if len(todo) >= FLUSH_EVERY and not self._wake.is_set():
                self._wake.set()  # (once: set() takes a lock, the adds go on meanwhile)

    def event(self, event: str, when: float | None = None, **fields: Any) -> None:
        """Log an application event (e.g. ``"drawn"`` with ``source``, ``level`` and
        ``index``; ``"view"`` with the camera), at ``when`` (``perf_counter``
        seconds, default now). Nothing is kept in memory; without a path, a no-op."""
        if self._todo is not None:
            stamp = time.perf_counter() if when is None else when
            self._todo.append({"event": event, "time": self._epoch_us + int(stamp * 1e6), **fields})

    def records(self) -> list[LoadRecord]:
        """The records in the ring, oldest first (a snapshot)."""
        return list(self._ring)

    def latency_percentiles(self, q: Iterable[float] = (50, 90, 99)) -> tuple[float, ...]:
        """Percentiles of request-to-delivery seconds over the ring's delivered loads
        (NaN each while there is none)."""
        q = tuple(q)
        latencies = [r.delivered - r.requested for r in list(self._ring) if r.delivered]
        if not latencies:
            return (float("nan"),) * len(q)
        return tuple(float(v) for v in np.percentile(latencies, q))

    def flush(self, wait: bool = True) -> None:
        """Hand what waits now to the writer process, in this thread; with ``wait``,
        return once it is in the file (or :data:`CLOSE_TIMEOUT` has passed)."""
        todo = self._todo
        if todo is None:
            return
        with self._write_lock:
            popleft = todo.popleft  # (only this lock's holder takes from todo)
            items = _as_columns([popleft() for _ in range(len(todo))])
            process = self._process
            if process is not None:
                try:
                    if items:
                        process.send(items, CLOSE_TIMEOUT)
                    if wait:
                        process.wait(CLOSE_TIMEOUT)
                    return
                except OSError as err:
                    self._write_here(str(err))
            if self._lines is not None and items:
                self._lines.write(items)

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Stop the log's thread (bounded by ``timeout``), write what is left, and end
        the writer process (bounded by ``timeout`` too). Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._writer is not None:
            self._wake.set()
            self._writer.join(timeout)
        self.flush(wait=False)
        with self._write_lock:
            if self._process is not None:
                try:
                    self._process.close(timeout)
                except OSError as err:
                    logger.warning("chunkpool: KPI log %s: %s", self.path, err)
                self._process = None
            if self._lines is not None:
                self._lines.close()
                self._lines = None

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait(FLUSH_SECONDS)
            self._wake.clear()
            self.flush(wait=False)

    def _write_here(self, reason: str) -> None:
        """The writer process failed (``reason``): stop it, say so once, and write in
        this process from now on. Holds ``_write_lock`` (or runs in ``__init__``)."""
        logger.warning(
            "chunkpool: KPI log %s: %s; writing it in this process from now on",
            self.path,
            reason,
        )
        if self._process is not None:
            self._process.kill()
            self._process = None
        assert self.path is not None
        self._lines = LineWriter(self.path, self._max_bytes, self._backups, self._epoch_us)


def _as_columns(items: list[LoadRecord | dict[str, Any]]) -> list[Any]:
    """``items`` as the writer takes them: each run of load records as one list of
    columns (a tuple per field: pickled in about half the time of a tuple per record),
    each event as its dict."""
    if set(map(type, items)) == {LoadRecord}:  # (a pool's log: records only)
        return [list(zip(*items, strict=True))]
    out: list[Any] = []
    run: list[LoadRecord] = []
    for item in items:
        if type(item) is LoadRecord:
            run.append(item)
            continue
        if run:
            out.append(list(zip(*run, strict=True)))
            run = []
        out.append(item)
    if run:
        out.append(list(zip(*run, strict=True)))
    return out


def read_kpi_lines(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The lines of a KPI log and of its rotated files, oldest first, as dicts. A line
    cut short (the writer was killed mid-write) is skipped."""
    base = os.fspath(path)
    files = []
    k = 1
    while os.path.exists(f"{base}.{k}"):
        files.append(f"{base}.{k}")
        k += 1
    files = [*reversed(files), base]
    lines: list[dict[str, Any]] = []
    for name in files:
        if not os.path.exists(name):
            continue
        with open(name, encoding="utf-8") as f:
            for text in f:
                if text.strip():
                    try:
                        lines.append(json.loads(text))
                    except json.JSONDecodeError:
                        continue
    return lines
