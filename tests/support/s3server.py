"""Moto's S3 emulation as a real HTTP endpoint on loopback, for s3fs and obstore tests.

moto's in-process ``mock_aws`` only patches botocore, so it cannot serve obstore (Rust HTTP
client) or anything else that opens its own sockets; :class:`S3Server` runs moto's standalone
server instead, so every client talks real HTTP to ``127.0.0.1``.

moto keeps its state in module-level backends: every :class:`S3Server` in one process sees the
same buckets. Use distinct bucket names per test, or :meth:`S3Server.reset`.

Like :class:`~support.httpserver.ZarrHTTPServer`, the server records every request it answers
(:attr:`S3Server.requests`: method, path, range, status, body bytes), so a test can count what
a client asked for and how many bytes it received. moto answers like S3: each object has an
``ETag`` (the MD5 of its bytes), and a GET or HEAD whose ``If-None-Match`` matches it gets 304.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3
from botocore.client import BaseClient
from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from moto.server import ThreadedMotoServer
from werkzeug.serving import make_server

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


@dataclass(frozen=True)
class S3Request:
    """One request the server answered: ``bytes_sent`` counts its response body."""

    method: str
    path: str
    range: str | None
    status: int
    bytes_sent: int
    conditional: bool


class _Recorder:
    """WSGI middleware around moto's app that records each request (and the size of the
    body it got) once its response has been written."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self.records: list[S3Request] = []

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterator[bytes]:
        status: list[int] = []

        def recording_start(code: str, headers: Any, *args: Any) -> Any:
            status.append(int(code.split()[0]))
            return start_response(code, headers, *args)

        sent = 0
        with self._lock:
            self._in_flight += 1
        try:
            for piece in self._app(environ, recording_start):
                sent += len(piece)
                yield piece
        finally:
            record = S3Request(
                method=environ["REQUEST_METHOD"],
                path=environ.get("PATH_INFO", ""),
                range=environ.get("HTTP_RANGE"),
                status=status[-1] if status else 0,
                bytes_sent=sent if environ["REQUEST_METHOD"] != "HEAD" else 0,
                conditional=bool(
                    environ.get("HTTP_IF_NONE_MATCH") or environ.get("HTTP_IF_MODIFIED_SINCE")
                ),
            )
            with self._idle:
                self.records.append(record)
                self._in_flight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._in_flight == 0, timeout)

    def snapshot(self) -> list[S3Request]:
        with self._lock:
            return list(self.records)

    def clear(self) -> None:
        with self._lock:
            self.records.clear()


class _RecordingMotoServer(ThreadedMotoServer):
    """moto's threaded server with :class:`_Recorder` around its WSGI app."""

    def __init__(self, recorder_holder: list[_Recorder], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._holder = recorder_holder

    def _server_entry(self) -> None:
        recorder = _Recorder(DomainDispatcherApplication(create_backend_app))
        self._holder.append(recorder)
        self._server = make_server(
            self._ip_address, self._port, recorder, True, request_handler=MotoRequestHandler
        )
        self._server_ready_event.set()
        self._server.serve_forever()


class S3Server:
    """moto's S3 server on 127.0.0.1 and a free port, plus helpers to fill and reach it.

    Nothing is written to ``os.environ``: pass :meth:`storage_options` to fsspec/s3fs, or apply
    :meth:`env` yourself (e.g. with ``monkeypatch.setenv``) for clients configured from the
    environment.

    Usage::

        with S3Server() as s3:
            s3.create_bucket("images")
            s3.upload_dir(tmp_path / "a.zarr", "images", "a.zarr")
            store = FsspecStore.from_url(
                "s3://images/a.zarr", storage_options=s3.storage_options(), read_only=True
            )
    """

    def __init__(self) -> None:
        """Prepare (but do not start) a server; the port is chosen by the OS on :meth:`start`."""
        self._recorders: list[_Recorder] = []
        self._server = _RecordingMotoServer(
            self._recorders, ip_address="127.0.0.1", port=0, verbose=False
        )
        self._endpoint_url: str | None = None
        self._client: BaseClient | None = None

    def start(self) -> None:
        """Start serving in a background thread; returns once the socket is listening."""
        if self._endpoint_url is not None:
            raise RuntimeError("server already started")
        self._server.start()
        host, port = self._server.get_host_and_port()
        self._endpoint_url = f"http://{host}:{port}"

    def stop(self) -> None:
        """Stop serving and release the port. Idempotent."""
        if self._endpoint_url is None:
            return
        self._server.stop()
        # ThreadedMotoServer.stop() shuts the loop down but leaves the listening socket open.
        if self._server._server is not None:
            self._server._server.server_close()
        self._endpoint_url = None
        self._client = None

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

    @property
    def endpoint_url(self) -> str:
        """E.g. ``http://127.0.0.1:40123``; only valid while started."""
        if self._endpoint_url is None:
            raise RuntimeError("server not started")
        return self._endpoint_url

    def env(self) -> dict[str, str]:
        """Environment variables that point botocore/s3fs and obstore at this server.

        botocore (hence s3fs) honours ``AWS_ENDPOINT_URL``; obstore's ``S3Store`` reads
        ``AWS_ENDPOINT_URL`` too but also needs ``AWS_ALLOW_HTTP`` for a plain-HTTP endpoint.
        """
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ALLOW_HTTP": "true",
        }

    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs ``storage_options`` for ``s3://`` URLs served by this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": ACCESS_KEY,
            "secret": SECRET_KEY,
            "client_kwargs": {"region_name": REGION},
        }

    @property
    def requests(self) -> list[S3Request]:
        """The requests answered since start (or :meth:`reset_stats`), in order of completion."""
        return self._recorders[0].snapshot() if self._recorders else []

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Wait until no request is being answered (a client may have read a response
        before its record exists); whether that happened within ``timeout`` seconds."""
        return self._recorders[0].wait_idle(timeout) if self._recorders else True

    def reset_stats(self) -> None:
        """Forget the recorded requests."""
        if self._recorders:
            self._recorders[0].clear()

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (S3 rules: 3-63 chars, lowercase, digits, ``-`` and ``.``)."""
        self._boto_client().create_bucket(Bucket=name)

    def upload_dir(self, local_dir: str | os.PathLike[str], bucket: str, prefix: str = "") -> int:
        """Upload every file under ``local_dir`` to ``s3://bucket/prefix/<relative path>``.

        Returns:
            The number of objects written.
        """
        root = Path(local_dir)
        prefix = prefix.strip("/")
        client = self._boto_client()
        count = 0
        for file in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = file.relative_to(root).as_posix()
            key = f"{prefix}/{relative}" if prefix else relative
            client.put_object(Bucket=bucket, Key=key, Body=file.read_bytes())
            count += 1
        return count

    def reset(self) -> None:
        """Delete all buckets and objects (moto state is shared by the whole process)."""
        request = urllib.request.Request(f"{self.endpoint_url}/moto-api/reset", method="POST")
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()

    def _boto_client(self) -> BaseClient:
        if self._client is None:
            self._client = boto3.client(
                "s3",
                endpoint_url=self.endpoint_url,
                aws_access_key_id=ACCESS_KEY,
                aws_secret_access_key=SECRET_KEY,
                region_name=REGION,
            )
        return self._client
