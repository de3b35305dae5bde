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

**Versions of remote objects** (for :meth:`ChunkPool.refresh`). zarr's stores drop the
headers of their responses, so :meth:`RemoteStore.get_stamped` reads an object itself,
the same request zarr's store would send, and keeps the validator the response carries
(:data:`RemoteStamp`): over HTTP(S) the ``ETag`` and ``Last-Modified`` headers, over S3
(s3fs) and obstore stores the ``ETag``. No extra request: the version comes with the
bytes, so it is the version of exactly those bytes. :meth:`RemoteStore.check_stamp` asks
for the version now: over HTTP a HEAD with ``If-None-Match`` (or ``If-Modified-Since``
when there is no ETag), which a current copy gets as ``304 Not Modified``; over S3 and
obstore a HEAD (a HEAD has no body either way). Both go through the same retries as any
read. Used here, beyond zarr's API: fsspec's ``HTTPFileSystem.set_session`` /
``.kwargs`` / ``.encode_url`` and s3fs's ``S3FileSystem._call_s3`` / ``.split_path``
(the requests those file systems make for zarr, with their sessions, options and
credentials); obstore's public ``get_async`` / ``head_async``. Other stores give no
versions: their chunks are never revalidated.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import zarr
from zarr.abc.buffer import Buffer, BufferPrototype
from zarr.abc.store import (
    ByteRequest,
    OffsetByteRequest,
    RangeByteRequest,
    Store,
    SuffixByteRequest,
)
from zarr.storage import FsspecStore, LocalStore, ObjectStore, WrapperStore

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
from .zarr_compat import open_node as open_zarr_node
from .zarr_compat import wrapped_store

__all__ = [
    "MISSING_OBJECT",
    "RemoteStamp",
    "RemoteStore",
    "check_stamp",
    "describe_error",
    "import_store_modules",
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

#: A remote object's version: ``(ETag, Last-Modified)`` as its store reported them
#: (either may be ``""``), or :data:`MISSING_OBJECT` for an object that does not exist.
RemoteStamp = tuple[str, str] | tuple[int, int]
MISSING_OBJECT: tuple[int, int] = (-1, -1)


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
        node = open_zarr_node(store)  # zarr.open's probes, at once
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
        self._versions = _versions_of(store)

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

    async def get_stamped(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None = None
    ) -> tuple[Buffer | None, RemoteStamp | None]:
        """:meth:`get`, and the object's version its response carried (None: this store
        gives none; :data:`MISSING_OBJECT` with no buffer: there is no such object)."""
        versions = self._versions
        if versions is None:
            return await self.get(key, prototype, byte_range), None
        return await self._retrying(key, lambda: versions.get(key, prototype, byte_range))

    async def check_stamp(self, key: str, stamp: RemoteStamp) -> RemoteStamp | None:
        """The version of ``key`` now: ``stamp`` itself if a conditional request against
        it was answered "not modified" (no body either way); None: the store cannot say.
        Raises ChunkReadError when the attempts run out."""
        versions = self._versions
        if versions is None:
            return None
        return await self._retrying(key, lambda: versions.check(key, stamp))

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


async def check_stamp(store: Any, key: str, stamp: Any) -> Any:
    """``store.check_stamp(key, stamp)`` for the stores that know versions (a
    :class:`RemoteStore`, the disk cache over one), else None."""
    check = getattr(store, "check_stamp", None)
    return None if check is None else await check(key, stamp)


class _Versions(Protocol):
    """Reads of one kind of remote store that also say the object's version."""

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> tuple[Buffer | None, RemoteStamp | None]: ...

    async def check(self, key: str, stamp: RemoteStamp) -> RemoteStamp | None: ...


def _versions_of(store: Store) -> _Versions | None:
    """How to read ``store`` with versions, if it is one of the kinds that have them."""
    if isinstance(store, FsspecStore):
        protocols = store.fs.protocol
        protocols = {protocols} if isinstance(protocols, str) else set(protocols)
        if protocols & {"http", "https"}:
            return _HTTPVersions(store)
        if protocols & {"s3", "s3a"}:
            return _S3Versions(store)
    if isinstance(store, ObjectStore):
        return _ObjectStoreVersions(store)
    return None


def _range_header(byte_range: ByteRequest) -> str | None:
    """The HTTP ``Range`` value of a byte request; None for an empty range."""
    if isinstance(byte_range, RangeByteRequest):
        if byte_range.end <= byte_range.start:
            return None
        return f"bytes={byte_range.start}-{byte_range.end - 1}"
    if isinstance(byte_range, OffsetByteRequest):
        return f"bytes={byte_range.offset}-"
    if isinstance(byte_range, SuffixByteRequest):
        return f"bytes=-{byte_range.suffix}"
    raise ValueError(f"unexpected byte range {byte_range!r}")


def _object_path(store: FsspecStore, key: str) -> str:
    """The file system path of ``key`` in an fsspec store (as zarr spells it)."""
    root = store.path.rstrip("/")
    return (f"{root}/{key}" if root else key).rstrip("/")


def _stamp_of(etag: str | None, last_modified: Any = None) -> RemoteStamp | None:
    """A version from an object's validators: the ETag, else the modification time."""
    if etag:
        return (etag, "")
    return ("", str(last_modified)) if last_modified else None


class _HTTPVersions:
    """GET and conditional HEAD through an fsspec ``HTTPFileSystem``'s own session and
    options (headers, auth), as its ``_cat_file`` sends them."""

    def __init__(self, store: FsspecStore):
        self._store = store
        self._fs = store.fs

    def _request(self, key: str, headers: dict[str, str]) -> tuple[Any, dict[str, Any]]:
        kw = dict(self._fs.kwargs)
        kw["headers"] = {**(kw.get("headers") or {}), **headers}
        return self._fs.encode_url(_object_path(self._store, key)), kw

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> tuple[Buffer | None, RemoteStamp | None]:
        headers = {}
        if byte_range is not None:
            spec = _range_header(byte_range)
            if spec is None:
                return prototype.buffer.from_bytes(b""), None
            headers["Range"] = spec
        url, kw = self._request(key, headers)
        session = await self._fs.set_session()
        async with session.get(url, **kw) as response:
            body = await response.read()
            if response.status == 404:
                return None, MISSING_OBJECT
            response.raise_for_status()
            stamp = _stamp_of(response.headers.get("ETag"), response.headers.get("Last-Modified"))
        return prototype.buffer.from_bytes(body), stamp

    async def check(self, key: str, stamp: RemoteStamp) -> RemoteStamp | None:
        etag, modified = stamp
        headers = {}
        if isinstance(etag, str) and etag:
            headers["If-None-Match"] = etag
        elif isinstance(modified, str) and modified:
            headers["If-Modified-Since"] = modified
        url, kw = self._request(key, headers)
        kw.setdefault("allow_redirects", True)
        session = await self._fs.set_session()
        async with session.head(url, **kw) as response:
            if response.status == 304:
                return stamp
            if response.status == 404:
                return MISSING_OBJECT
            response.raise_for_status()
            return _stamp_of(response.headers.get("ETag"), response.headers.get("Last-Modified"))


class _S3Versions:
    """``get_object`` / ``head_object`` through an s3fs file system's own client (its
    credentials, endpoint and options), as its ``_cat_file`` and ``_info`` call them."""

    def __init__(self, store: FsspecStore):
        self._store = store
        self._fs = store.fs

    def _where(self, key: str) -> dict[str, Any]:
        bucket, path, version = self._fs.split_path(_object_path(self._store, key))
        return {"Bucket": bucket, "Key": path, **({"VersionId": version} if version else {})}

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> tuple[Buffer | None, RemoteStamp | None]:
        where = self._where(key)
        if byte_range is not None:
            spec = _range_header(byte_range)
            if spec is None:
                return prototype.buffer.from_bytes(b""), None
            where["Range"] = spec
        try:
            response = await self._fs._call_s3("get_object", **where)
        except FileNotFoundError:
            return None, MISSING_OBJECT
        except OSError as err:
            if "not satisfiable" in str(err):  # as zarr's FsspecStore answers it
                return prototype.buffer.from_bytes(b""), None
            raise
        try:
            body = await response["Body"].read()
        finally:
            response["Body"].close()
        return prototype.buffer.from_bytes(body), _stamp_of(response.get("ETag"))

    async def check(self, key: str, stamp: RemoteStamp) -> RemoteStamp | None:
        try:
            info = await self._fs._call_s3("head_object", **self._where(key))
        except FileNotFoundError:
            return MISSING_OBJECT
        return _stamp_of(info.get("ETag"))


class _ObjectStoreVersions:
    """``get_async`` / ``head_async`` of obstore, on a zarr ``ObjectStore``'s store."""

    _ABSENT = (FileNotFoundError, IsADirectoryError, NotADirectoryError)

    def __init__(self, store: ObjectStore):
        self._store = store.store

    async def get(
        self, key: str, prototype: BufferPrototype, byte_range: ByteRequest | None
    ) -> tuple[Buffer | None, RemoteStamp | None]:
        import obstore

        options: dict[str, Any] = {}
        if isinstance(byte_range, RangeByteRequest):
            if byte_range.end <= byte_range.start:
                return prototype.buffer.from_bytes(b""), None
            options["range"] = (byte_range.start, byte_range.end)
        elif isinstance(byte_range, OffsetByteRequest):
            options["range"] = {"offset": byte_range.offset}
        elif isinstance(byte_range, SuffixByteRequest):
            options["range"] = {"suffix": byte_range.suffix}
        try:
            response = await obstore.get_async(self._store, key, options=options)
            body = await response.bytes_async()
        except self._ABSENT:
            return None, MISSING_OBJECT
        meta = response.meta
        stamp = _stamp_of(meta.get("e_tag"), meta.get("last_modified"))
        return prototype.buffer.from_bytes(body), stamp  # type: ignore[arg-type]

    async def check(self, key: str, stamp: RemoteStamp) -> RemoteStamp | None:
        import obstore

        try:
            meta = await obstore.head_async(self._store, key)
        except self._ABSENT:
            return MISSING_OBJECT
        return _stamp_of(meta.get("e_tag"), meta.get("last_modified"))


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


def import_store_modules(source: object) -> None:
    """Import what opening ``source`` (a path or URL; anything else: nothing) will use,
    reading nothing: for a URL, its fsspec file system and what that imports (over
    HTTP, aiohttp: ~0.2 s of Python, most of the time before the first request).

    For a caller that starts other Python work in threads as it opens a source (the
    viewer: its GPU device): importing first gets the source's first request out
    before that work competes for the interpreter, so the work runs while the
    requests travel. Anything wrong with the source is left for opening to report."""
    if not isinstance(source, str | os.PathLike):
        return
    match = _SCHEME.match(os.fspath(source))
    if match is None or match.group(1).lower() == "file":
        return
    try:
        import fsspec

        fsspec.get_filesystem_class(match.group(1).lower())
    except Exception:  # an unknown protocol, a missing package: open_node says which
        return


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
