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

Cost: :meth:`KpiLog.add` is a ring append and, with a path, a line formatted and
buffered; the buffer is written every :data:`FLUSH_EVERY` lines, by whichever thread
fills it, without the pool's lock. One line, with ``null`` for a step a load never
reached (a cancelled one has no ``decoded``)::

    {"event": "load", "source": "img.zarr", "level": 0, "index": [0, 3, 4],
     "state": "loaded", "bytes_fetched": 30466, "bytes_decoded": 131072,
     "requested": 1764643012118331, "fetch_started": 1764643012118502,
     "fetched": 1764643012119113, "decoded": 1764643012119706,
     "delivered": 1764643012119741, "error": null}

Times are integer microseconds since the epoch (``time.time()`` scale, measured with
``time.perf_counter()``; integers format in a third of the time floats take), so the
lines of several pools and of the viewer line up.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import threading
import time
from collections import deque
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np

__all__ = ["FLUSH_EVERY", "KpiLog", "LoadRecord", "read_kpi_lines"]

#: Lines buffered before they are written (also written at :meth:`KpiLog.flush`/close).
FLUSH_EVERY = 256
#: Records kept in memory by default.
RING = 8192


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
    files kept: ``PATH.1``, ``PATH.2``...). Thread-safe; one log may serve several
    pools and the viewer. :meth:`close` writes what is buffered and closes the file.
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
        self._lock = threading.Lock()  # the buffer; the handler has its own
        self._lines: list[str] = []
        self._sources: dict[str, str] = {}  # source -> its JSON string, made once
        # perf_counter -> epoch: measured once, so that every line shares one clock
        self._epoch = time.time() - time.perf_counter()
        self._epoch_us = int(self._epoch * 1e6)
        self._file: logging.handlers.RotatingFileHandler | None = None
        if self.path is not None:
            self._file = logging.handlers.RotatingFileHandler(
                self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8"
            )
            self._file.setFormatter(logging.Formatter("%(message)s"))

    def __repr__(self) -> str:
        return f"<KpiLog {len(self._ring)} records, {self.path or 'in memory'}>"

    def add(self, record: LoadRecord) -> None:
        """Keep ``record`` (and log it, with a path)."""
        self._ring.append(record)  # deque.append is atomic
        if self._file is not None:
            self._buffer(self._load_line(record))

    def event(self, event: str, when: float | None = None, **fields: Any) -> None:
        """Log an application event (e.g. ``"drawn"`` with ``source``, ``level`` and
        ``index``; ``"view"`` with the camera), at ``when`` (``perf_counter``
        seconds, default now). Nothing is kept in memory; without a path, a no-op."""
        if self._file is None:
            return
        stamp = time.perf_counter() if when is None else when
        line = {"event": event, "time": self._epoch_us + int(stamp * 1e6), **fields}
        self._buffer(json.dumps(line, default=_jsonable))

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

    def flush(self) -> None:
        """Write the buffered lines now."""
        with self._lock:
            lines, self._lines = self._lines, []
        self._write(lines)

    def close(self) -> None:
        """Write what is buffered and close the file (the ring stays readable)."""
        self.flush()
        if self._file is not None:
            self._file.close()

    def _buffer(self, line: str) -> None:
        with self._lock:
            self._lines.append(line)
            if len(self._lines) < FLUSH_EVERY:
                return
            lines, self._lines = self._lines, []
        self._write(lines)

    def _write(self, lines: list[str]) -> None:
        if lines and self._file is not None:
            # one emit per batch: the handler's lock, rollover check and flush once
            self._file.emit(logging.makeLogRecord({"msg": "\n".join(lines)}))

    def _load_line(self, r: LoadRecord) -> str:
        # formatted by hand, not json.dumps(dict): a third of the cost, per chunk
        source = self._sources.get(r.source)
        if source is None:
            source = self._sources[r.source] = json.dumps(r.source)
        e = self._epoch_us
        return (
            f'{{"event": "load", "source": {source}, "level": {r.level}, '
            f'"index": {list(r.index)}, "state": "{r.state}", '
            f'"bytes_fetched": {r.bytes_fetched}, "bytes_decoded": {r.bytes_decoded}, '
            f'"requested": {e + int(r.requested * 1e6)}, '
            f'"fetch_started": {_us(r.fetch_started, e)}, "fetched": {_us(r.fetched, e)}, '
            f'"decoded": {_us(r.decoded, e)}, "delivered": {_us(r.delivered, e)}, '
            f'"error": {"null" if r.error is None else json.dumps(r.error)}}}'
        )


def _us(when: float | None, epoch_us: int) -> str:
    return "null" if when is None else str(epoch_us + int(when * 1e6))


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple | set | frozenset):
        return list(value)
    raise TypeError(f"not JSON: {type(value).__name__}")


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
