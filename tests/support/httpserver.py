"""A static-file HTTP/1.1 server for tests of remote Zarr reading, with fault injection.

:class:`ZarrHTTPServer` serves one directory read-only on 127.0.0.1 and an ephemeral port. It
behaves like a plain object-store front end (keep-alive, single byte ranges, 404 for anything
that is not a file) and lets a test make it slow (:attr:`~ZarrHTTPServer.latency`), thin
(:attr:`~ZarrHTTPServer.bandwidth`: one link shared by all responses) or broken
(:meth:`~ZarrHTTPServer.add_fault`) at runtime,
while it records every request so a test can count what a client actually asked for, how many
bytes crossed the wire and whether responses were still being written after the client gave up.

Like an object store, every file's answer carries validators: a strong ``ETag`` (a digest of the
file's bytes, so a rewrite within one tick of the file system's clock still changes it) and
``Last-Modified``; a GET or HEAD with ``If-None-Match`` (or, without it, ``If-Modified-Since``)
that still matches is answered ``304 Not Modified`` without a body (RFC 9110 13.1).
"""

from __future__ import annotations

import contextlib
import email.utils
import fnmatch
import hashlib
import os
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Literal, Self, get_args
from urllib.parse import unquote, urlsplit

FaultKind = Literal["403", "500", "503", "reset", "stall", "truncated"]
"""What a matching request gets instead of its normal answer:

* ``"403"`` / ``"500"`` / ``"503"`` - that status with a short text body (the connection
  stays open);
* ``"reset"`` - the connection is closed with SO_LINGER 0, so the client sees a TCP reset;
* ``"stall"`` - no answer until :attr:`ZarrHTTPServer.stall_release` is set (then the request
  is served normally) or the server stops (then the connection is closed unanswered);
* ``"truncated"`` - the normal status and headers, ``Content-Length`` included, then half the
  body and the connection closed (a server or proxy dying mid-response).
"""

_FAULT_KINDS: frozenset[str] = frozenset(get_args(FaultKind))
_STOP_JOIN_TIMEOUT = 1.0  # seconds stop() waits for each group of threads
_POLL_INTERVAL = 0.05  # seconds between checks of the stop flag in serve_forever and stalls
# A paced body crosses the link in pieces of about 1/_PIECES_PER_SECOND s of its bandwidth
# (so concurrent responses interleave finely), within these sizes (bytes).
_PIECES_PER_SECOND = 200
_MIN_PIECE = 256
_MAX_PIECE = 64 * 1024


@dataclass(eq=False)
class Fault:
    """A fault rule: requests whose URL path matches get :attr:`kind` instead of the file.

    Create rules with :meth:`ZarrHTTPServer.add_fault`; the server mutates :attr:`remaining`
    and :attr:`hits` under its lock, so read them (they are plain ints) but do not write them.
    """

    match: Callable[[str], bool]
    """Predicate on the request's URL path (percent-decoded, without query string)."""
    kind: FaultKind
    remaining: int | None
    """How many more requests this rule will hit; ``None`` for no limit."""
    hits: int = 0
    """How many requests this rule has hit so far."""


@dataclass(frozen=True)
class RequestRecord:
    """What happened to one GET or HEAD request.

    Times are :func:`time.monotonic` seconds. ``bytes_sent`` counts response *body* bytes that
    were handed to the socket (headers excluded). ``status`` is ``None`` when no status line
    was sent: a ``"reset"`` fault, or a stall or latency wait cut short by :meth:`stop`.
    ``client_disconnected`` is true when the client had closed its end before the response
    was fully written; the server then stops writing, as a real server would once it notices.
    """

    method: str
    path: str
    range: str | None
    status: int | None
    bytes_sent: int
    start: float
    end: float
    client_disconnected: bool
    fault: FaultKind | None
    conditional: bool = False
    """Whether the request carried ``If-None-Match`` or ``If-Modified-Since``."""


@dataclass
class _Outcome:
    """Mutable accumulator for the record of the request being handled."""

    status: int | None = None
    bytes_sent: int = 0
    client_disconnected: bool = False
    fault: FaultKind | None = None


class _Handler(BaseHTTPRequestHandler):
    """Serves GET/HEAD for :class:`ZarrHTTPServer`; everything else is the stdlib's 501."""

    protocol_version = "HTTP/1.1"  # keep-alive; http.server reads this from the handler
    # TCP_NODELAY, as real servers set: headers and body go out in two writes, and with
    # Nagle's algorithm the body waited for the client's delayed ACK, ~40 ms a response
    # on a reused connection (every client alike)
    disable_nagle_algorithm = True
    server: ZarrHTTPServer

    def do_GET(self) -> None:
        self._serve(send_body=True)

    def do_HEAD(self) -> None:
        self._serve(send_body=False)

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: :attr:`ZarrHTTPServer.requests` is the log."""

    def _serve(self, *, send_body: bool) -> None:
        start = time.monotonic()
        path = unquote(urlsplit(self.path).path)
        range_header = self.headers.get("Range")
        conditional = bool(
            self.headers.get("If-None-Match") or self.headers.get("If-Modified-Since")
        )
        out = _Outcome()
        srv = self.server
        srv._request_started()
        try:
            latency, bandwidth, out.fault = srv._plan(path)
            if not srv._hold(latency, out.fault):
                self.close_connection = True  # stopped meanwhile: drop it unanswered
            elif out.fault == "reset":
                self._reset_connection()
            elif out.fault in ("403", "500", "503"):
                self._respond_text(int(out.fault), f"injected {out.fault}\n", send_body, out)
            else:
                self._respond_file(path, range_header, send_body, bandwidth, out)
                if out.fault == "truncated":
                    self.close_connection = True  # the rest of the body never comes
        finally:
            srv._request_finished(
                RequestRecord(
                    method=self.command,
                    path=path,
                    range=range_header,
                    status=out.status,
                    bytes_sent=out.bytes_sent,
                    start=start,
                    end=time.monotonic(),
                    client_disconnected=out.client_disconnected,
                    fault=out.fault,
                    conditional=conditional,
                )
            )

    def _reset_connection(self) -> None:
        """Close the socket so the peer gets RST instead of FIN."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # The descriptor really closes when finish() closes rfile; socketserver's later
        # shutdown(SHUT_WR), which would send a FIN, then fails harmlessly on the closed socket.
        self.connection.close()
        self.close_connection = True

    def _respond_file(
        self,
        path: str,
        range_header: str | None,
        send_body: bool,
        bandwidth: float | None,
        out: _Outcome,
    ) -> None:
        file = self.server._resolve(path)
        if file is None:
            self._respond_text(HTTPStatus.NOT_FOUND, "not found\n", send_body, out)
            return
        content = file.read_bytes()
        size = len(content)
        validators = {
            "ETag": f'"{hashlib.blake2b(content, digest_size=12).hexdigest()}"',
            "Last-Modified": email.utils.formatdate(file.stat().st_mtime, usegmt=True),
        }
        if self._not_modified(validators, file.stat().st_mtime):
            self._send_not_modified(validators, out)
            return
        span = _parse_range(range_header, size)
        if span == "unsatisfiable":
            self._respond_text(
                HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE,
                "range not satisfiable\n",
                send_body,
                out,
                extra_headers={"Content-Range": f"bytes */{size}"},
            )
            return
        first, last = span if span is not None else (0, size - 1)
        length = last - first + 1
        headers = {"Content-Type": _content_type(file), "Accept-Ranges": "bytes", **validators}
        status = HTTPStatus.OK
        if span is not None:
            status = HTTPStatus.PARTIAL_CONTENT
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        body = content[first : last + 1] if send_body and length > 0 else b""
        self._send(status, headers, length, body, bandwidth, out)

    def _not_modified(self, validators: dict[str, str], mtime: float) -> bool:
        """Whether the request's preconditions say the client's copy is current:
        ``If-None-Match`` lists the ETag (or ``*``); without it, ``If-Modified-Since`` is
        not before the file's modification (at the header's one-second resolution)."""
        if_none_match = self.headers.get("If-None-Match")
        if if_none_match is not None:
            tags = {tag.strip().removeprefix("W/") for tag in if_none_match.split(",")}
            return "*" in tags or validators["ETag"] in tags
        since = self.headers.get("If-Modified-Since")
        if since is None:
            return False
        try:
            when = email.utils.parsedate_to_datetime(since).timestamp()
        except (TypeError, ValueError):
            return False  # an invalid date is ignored (RFC 9110 13.1.3)
        return int(mtime) <= when

    def _send_not_modified(self, validators: dict[str, str], out: _Outcome) -> None:
        """``304 Not Modified``: the validators, no body and no Content-Length."""
        if self._client_gone():
            out.client_disconnected = True
            self.close_connection = True
            return
        try:
            self.send_response(HTTPStatus.NOT_MODIFIED)
            for name, value in validators.items():
                self.send_header(name, value)
            self.end_headers()
            out.status = int(HTTPStatus.NOT_MODIFIED)
        except ConnectionError:
            out.client_disconnected = True
            self.close_connection = True

    def _respond_text(
        self,
        status: int,
        text: str,
        send_body: bool,
        out: _Outcome,
        extra_headers: dict[str, str] | None = None,
    ) -> None:
        body = text.encode()
        headers = {"Content-Type": "text/plain; charset=utf-8", **(extra_headers or {})}
        self._send(status, headers, len(body), body if send_body else b"", None, out)

    def _send(
        self,
        status: int,
        headers: dict[str, str],
        content_length: int,
        body: bytes,
        bandwidth: float | None,
        out: _Outcome,
    ) -> None:
        """Write status, headers and body, pacing the body and noticing a departed client.
        A ``"truncated"`` fault writes only the first half of the body."""
        if out.fault == "truncated":
            body = body[: len(body) // 2]
        if self._client_gone():
            out.client_disconnected = True
            self.close_connection = True
            return
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(content_length))
            self.end_headers()
            out.status = int(status)
            self._write_body(body, bandwidth, out)
        except ConnectionError:
            out.client_disconnected = True
            self.close_connection = True

    def _write_body(self, body: bytes, bandwidth: float | None, out: _Outcome) -> None:
        """Write the body; with a bandwidth, in pieces paced by the server's one link."""
        view = memoryview(body)
        if bandwidth is None:
            self.wfile.write(view)
            self.server._count_bytes(len(view), out)
            return
        piece = max(_MIN_PIECE, min(_MAX_PIECE, int(bandwidth / _PIECES_PER_SECOND)))
        for offset in range(0, len(view), piece):
            if offset and self._client_gone():
                out.client_disconnected = True
                self.close_connection = True
                return
            chunk = view[offset : offset + piece]
            # the piece is on the client's side once the link has carried it
            delay = self.server._link_reserve(len(chunk), bandwidth) - time.monotonic()
            if delay > 0 and self.server._stopping.wait(delay):
                self.close_connection = True
                return
            self.wfile.write(chunk)
            self.server._count_bytes(len(chunk), out)

    def _client_gone(self) -> bool:
        """True if the peer has closed or reset its end (EOF or error pending on the socket)."""
        try:
            return self.connection.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False  # nothing pending: still connected
        except OSError:
            return True


def _parse_range(
    header: str | None, size: int
) -> tuple[int, int] | Literal["unsatisfiable"] | None:
    """Inclusive ``(first, last)`` for a single byte range, or ``None`` to serve the whole file.

    Supports ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n``. Multi-range and malformed headers
    are ignored (``None``), which RFC 9110 allows; ranges starting past the end, empty
    suffixes and any range on an empty file are ``"unsatisfiable"``.
    """
    if header is None:
        return None
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    start_text, dash, end_text = spec.strip().partition("-")
    if not dash or not (start_text + end_text).isdigit():
        return None
    if not start_text:
        suffix = int(end_text)
        if suffix == 0 or size == 0:
            return "unsatisfiable"
        return max(0, size - suffix), size - 1
    first = int(start_text)
    if end_text and int(end_text) < first:
        return None
    if first >= size:
        return "unsatisfiable"
    last = min(int(end_text), size - 1) if end_text else size - 1
    return first, last


def _content_type(file: Path) -> str:
    return "application/json" if file.suffix == ".json" else "application/octet-stream"


class ZarrHTTPServer(ThreadingHTTPServer):
    """Threaded HTTP/1.1 server exposing ``root`` read-only at :attr:`url`.

    Usage::

        with ZarrHTTPServer(tmp_path) as srv:
            srv.latency = 0.05
            srv.add_fault("*/c/0/*", "503", times=1)
            ...  # read from srv.url
            srv.wait_idle()
            assert srv.requests[0].status == 503

    All knobs (:attr:`latency`, :attr:`bandwidth`, faults, :attr:`stall_release`) may be changed
    from any thread while requests are in flight; each request samples latency, bandwidth and
    its fault once, when its request line and headers have been read.
    """

    daemon_threads = True
    request_queue_size = 128
    # stop() closes and joins handler threads itself, with a timeout, because the stdlib's
    # server_close() would wait forever for idle keep-alive connections.
    block_on_close = False

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        latency: float = 0.0,
        bandwidth: float | None = None,
    ) -> None:
        """Bind 127.0.0.1 on an ephemeral port (so :attr:`url` is valid at once); serve on start().

        Args:
            root: directory to serve; URL path ``/a/b`` maps to ``root/a/b``.
            latency: initial :attr:`latency`.
            bandwidth: initial :attr:`bandwidth`.
        """
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._latency = 0.0
        self._bandwidth: float | None = None
        self._link_free_at = 0.0  # when the link has carried every piece handed to it
        self.latency = latency  # validate before binding, so a bad argument leaks no socket
        self.bandwidth = bandwidth
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root = Path(root).resolve()
        self.stall_release = threading.Event()
        """Set to let every stalled (and future stalling) request proceed; clear to re-arm."""
        self._faults: list[Fault] = []
        self._records: list[RequestRecord] = []
        self._bytes_sent = 0
        self._in_flight = 0
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._serve_thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (no trailing slash)."""
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> None:
        """Accept connections in a background daemon thread (the socket listens since init)."""
        if self._serve_thread is not None:
            raise RuntimeError("server already started")
        self._serve_thread = threading.Thread(
            target=self.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL},
            name=f"ZarrHTTPServer:{self.server_address[1]}",
            daemon=True,
        )
        self._serve_thread.start()

    def stop(self) -> None:
        """Stop serving and close every connection; returns within about two seconds.

        Stalled requests and latency/bandwidth sleeps are cut short and their connections
        closed unanswered (they are still recorded). Idempotent.
        """
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._serve_thread is not None:
            self.shutdown()
            self._serve_thread.join(_STOP_JOIN_TIMEOUT)
        with self._lock:
            connections = dict(self._connections)
        for sock in connections.values():
            with contextlib.suppress(OSError):  # already closed by its handler
                sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
        deadline = time.monotonic() + _STOP_JOIN_TIMEOUT
        for thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- behaviour knobs -------------------------------------------------------------------

    @property
    def latency(self) -> float:
        """Seconds slept before answering each request (0 for none)."""
        with self._lock:
            return self._latency

    @latency.setter
    def latency(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"latency must be >= 0, got {seconds}")
        with self._lock:
            self._latency = float(seconds)

    @property
    def bandwidth(self) -> float | None:
        """The link's rate in body bytes/s (``None`` for unlimited), shared by every
        response in flight, as one network link is: N concurrent responses get about
        1/N of it each (their pieces take turns), and together never more than it."""
        with self._lock:
            return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, bytes_per_second: float | None) -> None:
        if bytes_per_second is not None and bytes_per_second <= 0:
            raise ValueError(f"bandwidth must be > 0 or None, got {bytes_per_second}")
        with self._lock:
            self._bandwidth = None if bytes_per_second is None else float(bytes_per_second)

    def add_fault(
        self,
        match: str | Callable[[str], bool],
        kind: FaultKind,
        times: int | None = None,
    ) -> Fault:
        """Make matching requests fail with ``kind`` (see :data:`FaultKind`).

        Args:
            match: a predicate on the percent-decoded URL path (e.g. ``"/img.zarr/0/c/1/2"``),
                or a glob matched against it with :func:`fnmatch.fnmatchcase`, where ``*``
                also matches ``/``.
            kind: ``"403"``, ``"500"``, ``"503"``, ``"reset"``, ``"stall"`` or ``"truncated"``.
            times: fault only the first ``times`` matching requests; ``None`` for all.

        The predicate runs in handler threads under the server's lock: keep it quick and do
        not call back into the server from it.

        Returns:
            The rule, whose :attr:`Fault.hits` counts the requests it caught. Rules are tried
            in the order added; the first one matching with budget left applies.
        """
        if kind not in _FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(_FAULT_KINDS)}")
        if times is not None and times < 1:
            raise ValueError(f"times must be >= 1 or None, got {times}")
        if isinstance(match, str):
            pattern = match

            def predicate(path: str) -> bool:
                return fnmatch.fnmatchcase(path, pattern)

        else:
            predicate = match
        rule = Fault(match=predicate, kind=kind, remaining=times)
        with self._lock:
            self._faults.append(rule)
        return rule

    def clear_faults(self) -> None:
        """Remove every fault rule (requests already stalled stay stalled)."""
        with self._lock:
            self._faults.clear()

    # -- accounting ------------------------------------------------------------------------

    @property
    def requests(self) -> list[RequestRecord]:
        """Snapshot of the finished GET/HEAD requests since :meth:`reset_stats`, by start time.

        A request is recorded just *after* its last byte is written, so a client can see its
        response before the record exists: call :meth:`wait_idle` before inspecting this.
        """
        with self._lock:
            return sorted(self._records, key=lambda record: record.start)

    @property
    def bytes_sent(self) -> int:
        """Body bytes written since the last :meth:`reset_stats`, including in-flight ones."""
        with self._lock:
            return self._bytes_sent

    @property
    def in_flight(self) -> int:
        """Number of GET/HEAD requests being handled right now."""
        with self._lock:
            return self._in_flight

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is in flight, e.g. after a client cancelled some reads.

        Returns:
            Whether the server became idle within ``timeout`` seconds.
        """
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def reset_stats(self) -> None:
        """Forget recorded requests and zero :attr:`bytes_sent` (fault rules are kept)."""
        with self._lock:
            self._records.clear()
            self._bytes_sent = 0

    # -- used by the handler and socketserver ----------------------------------------------

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:
        """Handle the connection in a daemon thread tracked for :meth:`stop`."""
        thread = threading.Thread(
            target=self.process_request_thread,
            args=(request, client_address),
            daemon=self.daemon_threads,
        )
        with self._lock:
            if self._stopping.is_set():
                self.shutdown_request(request)
                return
            self._connections[thread] = request
        thread.start()

    def process_request_thread(
        self, request: socket.socket, client_address: tuple[str, int]
    ) -> None:
        """Run the stdlib's per-connection handling, then stop tracking the connection."""
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def handle_error(self, request: object, client_address: object) -> None:
        """Ignore clients that vanish between requests; report anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)

    def _resolve(self, url_path: str) -> Path | None:
        """The regular file under :attr:`root` for ``url_path``, or ``None`` (-> 404)."""
        candidate = (self.root / url_path.lstrip("/")).resolve()
        if candidate.is_relative_to(self.root) and candidate.is_file():
            return candidate
        return None

    def _plan(self, path: str) -> tuple[float, float | None, FaultKind | None]:
        """Sample latency and bandwidth and consume the first applicable fault rule."""
        with self._lock:
            fault: FaultKind | None = None
            for rule in self._faults:
                if (rule.remaining is None or rule.remaining > 0) and rule.match(path):
                    rule.hits += 1
                    if rule.remaining is not None:
                        rule.remaining -= 1
                    fault = rule.kind
                    break
            return self._latency, self._bandwidth, fault

    def _hold(self, latency: float, fault: FaultKind | None) -> bool:
        """Sleep ``latency``, then wait out a stall; False if the server stopped meanwhile."""
        if latency and self._stopping.wait(latency):
            return False
        if fault != "stall":
            return True
        while not self._stopping.is_set():
            if self.stall_release.wait(_POLL_INTERVAL):
                return True
        return False

    def _link_reserve(self, nbytes: int, bandwidth: float) -> float:
        """Queue ``nbytes`` on the shared link; the monotonic time they have crossed it.

        Pieces cross one after another in the order they are queued (a response queues
        its next piece only once its last one has crossed, so concurrent responses take
        turns); an idle link starts at once (no burst is saved up while idle). The wait
        this implies is at most one piece per response in flight.
        """
        with self._lock:
            start = max(time.monotonic(), self._link_free_at)
            self._link_free_at = start + nbytes / bandwidth
            return self._link_free_at

    def _count_bytes(self, n: int, out: _Outcome) -> None:
        out.bytes_sent += n
        with self._lock:
            self._bytes_sent += n

    def _request_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def _request_finished(self, record: RequestRecord) -> None:
        with self._idle:
            self._records.append(record)
            self._in_flight -= 1
            self._idle.notify_all()
