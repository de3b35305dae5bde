"""Opening a source (local path, URL or zarr node) read-only as a zarr Group or Array.

Every failure becomes a :class:`~chunkpool.errors.SourceError` whose one-line message
names the source and what is wrong, so an application can show it as is. Sources are
always named through :func:`redact`, and no error chains the library exception it came
from (its text may quote a signed URL): messages, reprs, logs and tracebacks must never
carry credentials (see :mod:`chunkpool.redaction`).

Stores are opened with zarr-python's synchronous API, so remote (async) filesystems bind
to zarr's own event loop rather than to whatever loop the caller may be running. Every
remote store is wrapped in a :class:`RemoteStore`: all its reads, metadata and chunks
alike, have a timeout per attempt and are retried on transient errors
(:class:`~chunkpool.retry.RetryPolicy`), and it is known by its redacted name only, so
that nothing built on it (zarr arrays and groups, the disk cache) shows credentials.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import zarr
from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import ByteRequest, Store
from zarr.storage import FsspecStore, LocalStore, WrapperStore

from .diskcache import DiskCacheStore
from .errors import SourceError
from .redaction import (
    _SCHEME,
    describe_error,
    redact,
    redact_text,
    remember_secrets,
    split_userinfo,
)
from .retry import RetryPolicy, call_with_retries
from .zarr_compat import wrapped_store

__all__ = [
    "RemoteStore",
    "describe_error",
    "open_node",
    "redact",
    "redact_text",
    "with_retries",
]

T = TypeVar("T")

# s3fs options that already say how to authenticate: then we leave credentials alone.
_S3_AUTH_OPTIONS = frozenset({"anon", "key", "secret", "token", "profile", "session"})

#: Connections s3fs may keep to S3 (above any pool's in-flight window).
S3_CONNECTIONS = 128


def open_node(
    source: zarr.Group | zarr.Array | str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    disk_cache: str | os.PathLike[str] | None = None,
    disk_cache_bytes: int = 2 << 30,
    retry: RetryPolicy | None = None,
) -> tuple[zarr.Group | zarr.Array, str]:
    """Open ``source`` read-only and return ``(node, display name)``.

    ``source`` is a zarr Group or Array (returned as is), a local path (str or
    ``os.PathLike``), or a ``file://``, ``http(s)://``, ``s3://`` (or other fsspec) URL.
    Zarr v2 and v3 are both detected by zarr. ``storage_options`` go to fsspec for URLs
    (unused for local paths). For ``s3://`` without any authentication option and
    without AWS credentials in the environment or config, access is anonymous;
    ``s3://KEY:SECRET@bucket/...`` authenticates with that key and secret.

    A URL's store is a :class:`RemoteStore`: every read (the metadata read here, and
    later every chunk read) follows ``retry`` (default :class:`RetryPolicy()`). With
    ``disk_cache`` (a directory), everything read from a remote store is also kept
    there, within ``disk_cache_bytes`` (see :mod:`chunkpool.diskcache`).

    The display name is the source with credentials removed (see :func:`redact`); use
    it whenever the source is named. Raises :class:`SourceError` on any failure.
    """
    if isinstance(source, zarr.Group | zarr.Array):
        return source, _node_name(source)
    location = os.fspath(source)
    remember_secrets(location, storage_options)
    name = redact(location)
    try:
        store = _make_store(location, storage_options)
        if not isinstance(store, LocalStore):
            remote = store
            store = RemoteStore(remote, name, retry)
            if disk_cache is not None:
                identity = _disk_cache_identity(location, name, storage_options, remote)
                store = DiskCacheStore(
                    store, disk_cache, disk_cache_bytes, location=name, identity=identity
                )
        node = zarr.open(store, mode="r")
    except Exception as err:
        failure = describe_error(err)
    else:
        return node, name
    # raised outside the handler: the library's exception is neither cause nor context
    raise SourceError(f"{name}: {failure}")


class RemoteStore(WrapperStore[Store]):
    """A remote store as chunkpool reads it: every read retried, and a redacted name.

    Each read (``get``, ``get_partial_values``, ``exists``, ``getsize``, listings) is one
    :func:`~chunkpool.retry.call_with_retries` call under ``retry``, so opening and
    loading share one timeout-and-retry mechanism; a read that gives up raises a
    :class:`~chunkpool.errors.ChunkReadError` naming ``name`` and the key. ``str`` and
    ``repr`` show ``name`` only (the wrapped fsspec store's would show the URL as given,
    credentials included), and so do those of zarr arrays and groups on top of it.
    """

    def __init__(self, store: Store, name: str, retry: RetryPolicy | None = None):
        super().__init__(store)
        self.name = name
        self.retry = retry or RetryPolicy()

    def _with_store(self, store: Store) -> RemoteStore:
        return type(self)(store, self.name, self.retry)

    def __str__(self) -> str:
        return self.name

    def __repr__(self) -> str:
        return f"RemoteStore({self.name!r})"

    def _retrying(self, what: str, call: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        return call_with_retries(call, self.retry, f"{self.name}/{what}")

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> Buffer | None:
        return await self._retrying(key, lambda: self._store.get(key, prototype, byte_range))

    async def get_partial_values(
        self, prototype: BufferPrototype, key_ranges: Iterable[tuple[str, ByteRequest | None]]
    ) -> list[Buffer | None]:
        return list(
            await asyncio.gather(*(self.get(key, prototype, rng) for key, rng in key_ranges))
        )

    async def _get_many(
        self, requests: Iterable[tuple[str, BufferPrototype, ByteRequest | None]]
    ) -> AsyncIterator[tuple[str, Buffer | None]]:
        for key, prototype, byte_range in requests:
            yield key, await self.get(key, prototype, byte_range)

    async def exists(self, key: str) -> bool:
        return await self._retrying(key, lambda: self._store.exists(key))

    async def is_empty(self, prefix: str) -> bool:
        return await self._retrying(prefix, lambda: self._store.is_empty(prefix))

    async def getsize(self, key: str) -> int:
        return await self._retrying(key, lambda: self._store.getsize(key))

    async def list(self) -> AsyncIterator[str]:
        for item in await self._retrying("", lambda: _collect(self._store.list())):
            yield item

    async def list_prefix(self, prefix: str) -> AsyncIterator[str]:
        for item in await self._retrying(prefix, lambda: _collect(self._store.list_prefix(prefix))):
            yield item

    async def list_dir(self, prefix: str) -> AsyncIterator[str]:
        for item in await self._retrying(prefix, lambda: _collect(self._store.list_dir(prefix))):
            yield item


def with_retries(store: Store, name: str, retry: RetryPolicy | None = None) -> Store:
    """``store`` itself if a :class:`RemoteStore` is in it (under any wrappers, e.g. the
    disk cache), else ``store`` wrapped in one: so that a read is retried by exactly one
    layer, whoever opened the store."""
    inner: Store = store
    while isinstance(inner, WrapperStore):
        if isinstance(inner, RemoteStore):
            return store
        inner = wrapped_store(inner)
    return RemoteStore(store, name, retry)


async def _collect(items: AsyncIterator[str]) -> list[str]:
    return [item async for item in items]


def _disk_cache_identity(
    location: str, name: str, storage_options: dict[str, Any] | None, store: Store
) -> str:
    """Who reads ``location``, for the disk cache to keep identities apart: the URL as
    given (user info, secret query parameters), the storage options, and for s3 without
    authentication options the access key id (and endpoint) botocore finds in the
    environment. Empty when there is none of these. Only a digest of it is kept."""
    parts: dict[str, Any] = {}
    if location != name:
        parts["url"] = location
    if storage_options:
        parts["options"] = storage_options
    fs = getattr(store, "fs", None)
    if "s3" in getattr(fs, "protocol", ()):
        for variable in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
            if os.environ.get(variable):
                parts[variable] = os.environ[variable]
        if not fs.anon and not _S3_AUTH_OPTIONS & (storage_options or {}).keys():
            import botocore.session  # only needed for s3://, and slow to import

            credentials = botocore.session.Session().get_credentials()
            parts["aws_access_key_id"] = credentials and credentials.access_key
    return json.dumps(parts, sort_keys=True, default=repr) if parts else ""


def _node_name(node: zarr.Group | zarr.Array) -> str:
    """A display name for an already open zarr node: its store location plus its path."""
    store = node.store
    while isinstance(store, WrapperStore) and not isinstance(store, RemoteStore):
        store = wrapped_store(store)
    if isinstance(store, LocalStore):
        base = str(store.root)
    elif isinstance(store, RemoteStore):
        base = store.name
    elif isinstance(store, FsspecStore):
        base = store.fs.unstrip_protocol(store.path)
    else:  # e.g. ObjectStore: object_store://HTTPStore("https://user:pw@host/x")
        base = redact_text(str(store))
    return redact(f"{base.rstrip('/')}/{node.path}" if node.path else base)


def _make_store(location: str, storage_options: dict[str, Any] | None) -> Store:
    """A read-only zarr store for a local path or URL (nothing is read yet)."""
    match = _SCHEME.match(location)
    if match is None:
        return LocalStore(Path(location).expanduser(), read_only=True)
    location = location.lstrip()  # " https://..." is a URL, not a relative path
    scheme = match.group(1).lower()
    if scheme == "file":
        return LocalStore(_file_url_path(location), read_only=True)
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        location, options = _s3_userinfo(location, options)
        options = _s3_options(options)
    return FsspecStore.from_url(location, storage_options=options, read_only=True)


def _file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///x`` or ``file://localhost/x``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL names a remote host {parts.netloc!r}")
    return Path(url2pathname(parts.path))


def _s3_userinfo(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``s3://KEY:SECRET@bucket/x`` as ``s3://bucket/x`` with ``key``/``secret`` options
    (s3fs would take ``KEY:SECRET@bucket`` for the bucket's name, and quote it in its
    errors). Explicit options win over the URL's."""
    userinfo, url = split_userinfo(url)
    key, _, secret = userinfo.partition(":")
    if not secret:
        return url, options
    return url, {"key": unquote(key), "secret": unquote(secret), **options}


def _s3_options(options: dict[str, Any]) -> dict[str, Any]:
    """s3fs options for reading many small objects fast, plus ``anon=True`` when nothing
    says how to authenticate and botocore finds no credentials (so public buckets open
    without any AWS setup).

    Measured here (tests/benchmarks/bench_remote.py): s3fs's defaults send a HEAD before
    every whole-object GET (``max_concurrency`` > 1) and keep at most 10 connections
    (botocore's pool), which together made chunk reads 2-3x slower.
    """
    options = {"max_concurrency": 1, **options}
    config = {"max_pool_connections": S3_CONNECTIONS, **options.get("config_kwargs", {})}
    options["config_kwargs"] = config
    if _S3_AUTH_OPTIONS & options.keys() or _aws_credentials_available():
        return options
    return {**options, "anon": True}


def _aws_credentials_available() -> bool:
    """Whether botocore's credential chain (environment, config files, instance
    metadata, ...) yields credentials."""
    import botocore.session  # only needed for s3://, and slow to import

    return botocore.session.Session().get_credentials() is not None
