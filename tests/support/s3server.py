"""Moto's S3 emulation as a real HTTP endpoint on loopback, for s3fs and obstore tests.

moto's in-process ``mock_aws`` only patches botocore, so it cannot serve obstore (Rust HTTP
client) or anything else that opens its own sockets; :class:`S3Server` runs moto's standalone
server instead, so every client talks real HTTP to ``127.0.0.1``.

moto keeps its state in module-level backends: every :class:`S3Server` in one process sees the
same buckets. Use distinct bucket names per test, or :meth:`S3Server.reset`.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import boto3
from botocore.client import BaseClient
from moto.server import ThreadedMotoServer

ACCESS_KEY = "testing"
SECRET_KEY = "testing"
REGION = "us-east-1"


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
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
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
