"""Opening a source (local path, URL or zarr node) read-only as a zarr Group or Array.

Every failure becomes a :class:`~chunkpool.errors.SourceError` whose one-line message
names the source and what is wrong, so an application can show it as is. Sources are
always named through :func:`redact`: messages and logs must never carry credentials.

Stores are opened with zarr-python's synchronous API, so remote (async) filesystems bind
to zarr's own event loop rather than to whatever loop the caller may be running.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, unquote_plus, urlsplit, urlunsplit
from urllib.request import url2pathname

import zarr
from zarr.abc.store import Store
from zarr.errors import MetadataValidationError, NodeNotFoundError, UnknownCodecError
from zarr.storage import FsspecStore, LocalStore

from .diskcache import DiskCacheStore
from .errors import SourceError

__all__ = ["describe_error", "open_node", "redact", "redact_text"]

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+._-]*)://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+._-]*://[^\s'\"<>()]+")
_USERINFO = re.compile(r"(://)[^/@]*@")

# Query parameters that carry secrets: presigned S3/GCS URLs, Azure SAS, API tokens.
_SECRET_PARAMS = frozenset(
    {"sig", "key", "apikey", "api_key", "awsaccesskeyid", "policy", "key-pair-id"}
)
_SECRET_PARAM_PREFIXES = ("x-amz-", "x-goog-")
_SECRET_PARAM_PARTS = ("token", "secret", "signature", "password", "credential")

# s3fs options that already say how to authenticate: then we leave credentials alone.
_S3_AUTH_OPTIONS = frozenset({"anon", "key", "secret", "token", "profile", "session"})

_MAX_DETAIL = 300

# obstore's exception types for refused credentials (stores it backs raise them as is)
_OBSTORE_DENIED = frozenset({"PermissionDeniedError", "UnauthenticatedError"})

#: Connections s3fs may keep to S3 (above any pool's in-flight window).
S3_CONNECTIONS = 128


def open_node(
    source: zarr.Group | zarr.Array | str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    disk_cache: str | os.PathLike[str] | None = None,
    disk_cache_bytes: int = 2 << 30,
) -> tuple[zarr.Group | zarr.Array, str]:
    """Open ``source`` read-only and return ``(node, display name)``.

    ``source`` is a zarr Group or Array (returned as is), a local path (str or
    ``os.PathLike``), or a ``file://``, ``http(s)://``, ``s3://`` (or other fsspec) URL.
    Zarr v2 and v3 are both detected by zarr. ``storage_options`` go to fsspec for URLs
    (unused for local paths). For ``s3://`` without any authentication option and
    without AWS credentials in the environment or config, access is anonymous.

    With ``disk_cache`` (a directory), everything read from a remote store is also kept
    there, within ``disk_cache_bytes`` (see :mod:`chunkpool.diskcache`).

    The display name is the source with credentials removed (see :func:`redact`); use
    it whenever the source is named. Raises :class:`SourceError` on any failure.
    """
    if isinstance(source, zarr.Group | zarr.Array):
        return source, _node_name(source)
    location = os.fspath(source)
    name = redact(location)
    try:
        store = _make_store(location, storage_options)
        if disk_cache is not None and not isinstance(store, LocalStore):
            identity = _disk_cache_identity(location, name, storage_options, store)
            store = DiskCacheStore(
                store, disk_cache, disk_cache_bytes, location=name, identity=identity
            )
        node = zarr.open(store, mode="r")
    except Exception as err:
        raise SourceError(f"{name}: {describe_error(err)}") from err
    return node, name


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
    if isinstance(store, LocalStore):
        base = str(store.root)
    elif isinstance(store, FsspecStore):
        base = store.fs.unstrip_protocol(store.path)
    else:  # e.g. ObjectStore: object_store://HTTPStore("https://user:pw@host/x")
        base = redact_text(str(store))
    return redact(f"{base.rstrip('/')}/{node.path}" if node.path else base)


def redact_text(text: str) -> str:
    """``text`` with every URL in it passed through :func:`redact`."""
    return _URL_IN_TEXT.sub(lambda m: redact(m.group()), text)


def redact(url: str) -> str:
    """``url`` without credentials: no ``user:password@`` and no secret query parameters.

    Secret parameters are those of signed or token-authenticated URLs (``X-Amz-*``,
    ``X-Goog-*``, ``sig``, ``token``, ``key``, ``signature``, ...); other parameters are
    kept. Strings that are not URLs (local paths) are returned unchanged.
    """
    if not _SCHEME.match(url):
        return url
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (e.g. a bad IPv6 host): drop everything risky
        return _USERINFO.sub(r"\1", url.split("?", 1)[0].split("#", 1)[0])
    return urlunsplit(_redacted_parts(parts))


def describe_error(err: BaseException) -> str:
    """What ``err`` means for a source, as a short phrase for a one-line message.

    Any URL quoted in the error's text is passed through :func:`redact`.
    """
    if isinstance(err, NodeNotFoundError):
        return "not a Zarr store (no zarr.json, .zgroup or .zarray)"
    if isinstance(err, FileNotFoundError):
        return "no such file or directory"
    if isinstance(err, PermissionError) or type(err).__name__ in _OBSTORE_DENIED:
        return "permission denied"
    http = _describe_aiohttp_error(err)
    if http is not None:
        return http
    if isinstance(err, TimeoutError):
        return "timed out"
    if isinstance(err, json.JSONDecodeError | MetadataValidationError | UnknownCodecError):
        return f"invalid Zarr metadata ({_detail(err)})"
    return f"cannot read ({_detail(err)})"


def _make_store(location: str, storage_options: dict[str, Any] | None) -> Store:
    """A read-only zarr store for a local path or URL (nothing is read yet)."""
    match = _SCHEME.match(location)
    if match is None:
        return LocalStore(Path(location).expanduser(), read_only=True)
    scheme = match.group(1).lower()
    if scheme == "file":
        return LocalStore(_file_url_path(location), read_only=True)
    options = dict(storage_options or {})
    if scheme in ("s3", "s3a"):
        options = _s3_options(options)
    return FsspecStore.from_url(location, storage_options=options, read_only=True)


def _file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///x`` or ``file://localhost/x``)."""
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise ValueError(f"file:// URL names a remote host {parts.netloc!r}")
    return Path(url2pathname(parts.path))


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


def _redacted_parts(parts: SplitResult) -> SplitResult:
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        param
        for param in parts.query.split("&")
        if param and not _is_secret_param(param.partition("=")[0])
    )
    return parts._replace(netloc=netloc, query=query)


def _is_secret_param(name: str) -> bool:
    name = unquote_plus(name).lower()
    return (
        name in _SECRET_PARAMS
        or name.startswith(_SECRET_PARAM_PREFIXES)
        or any(part in name for part in _SECRET_PARAM_PARTS)
    )


def _describe_aiohttp_error(err: BaseException) -> str | None:
    """The phrase for an HTTP status or connection error of aiohttp (fsspec's HTTP
    client), None for other errors. aiohttp is not imported just for this: if it is not
    loaded, no HTTP store raised ``err``."""
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is None:
        return None
    if isinstance(err, aiohttp.ClientResponseError):
        reason = f" {err.message}" if err.message else ""  # str(err) would show the URL
        if err.status in (401, 403):
            return f"permission denied (HTTP {err.status}{reason})"
        return f"HTTP error {err.status}{reason}"
    if isinstance(err, aiohttp.ClientConnectionError):
        return f"connection failed ({_detail(err)})"
    return None


def _detail(err: BaseException) -> str:
    """``"Type: text"`` of an exception, on one line, redacted and not too long."""
    text = redact_text(" ".join(str(err).split()))
    if len(text) > _MAX_DETAIL:
        text = text[: _MAX_DETAIL - 1] + "…"
    return f"{type(err).__name__}: {text}" if text else type(err).__name__
