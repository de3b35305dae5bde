"""Keeping credentials out of everything chunkpool prints: messages, reprs, logs.

A source may carry credentials in many places: URL userinfo (``https://user:pw@host``,
``s3://KEY:SECRET@bucket``), signed or token query parameters (``X-Amz-Signature``,
``sig``, ``token``...), the fragment (``#access_token=...``), ``storage_options`` and the
environment (``AWS_SECRET_ACCESS_KEY``...). Three layers keep them out of what the
project shows:

- :func:`redact` turns a source URL into its display name (used for every store name);
- :func:`redact_text` cleans free text (third-party exception messages, log records):
  every URL in it is redacted, header-like ``Authorization: ...``, ``Signature=...``,
  ``Credential=...`` values are masked, and so is every secret value chunkpool has seen
  in a source it opened (:func:`remember_secrets`) or finds in credential variables of
  the environment (so even ``Invalid bucket name "KEY:SECRET@bucket"`` is clean);
- :class:`RedactingFilter` applies :func:`redact_text` to the log records of a handler.
  chunkpool installs no handler; the ``zarrscope`` command puts the filter on its own.
  A third-party logger (fsspec, s3fs, botocore, aiohttp) at DEBUG writes to *your*
  handlers unfiltered unless you add the filter to them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import SplitResult, unquote, unquote_plus, urlsplit, urlunsplit

from zarr.errors import MetadataValidationError, NodeNotFoundError, UnknownCodecError

from .errors import ChunkPoolError

__all__ = [
    "RedactingFilter",
    "describe_error",
    "redact",
    "redact_text",
    "remember_secrets",
    "split_userinfo",
]

#: What replaces a secret.
MASK = "***"

_SCHEME = re.compile(r"^\s*([A-Za-z][A-Za-z0-9+._-]*)://")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+._-]*://[^\s'\"<>()]+")
# A ":" in the text before an "@" that is not a port (digits up to "/" or the end).
_PASSWORD_COLON = re.compile(r":(?!\d*(?:/|$))")

# Query parameters that carry secrets: presigned S3/GCS URLs, Azure SAS, API tokens.
_SECRET_PARAMS = frozenset(
    {"sig", "key", "apikey", "api_key", "awsaccesskeyid", "policy", "key-pair-id"}
)
_SECRET_PARAM_PREFIXES = ("x-amz-", "x-goog-")
_SECRET_NAME_PARTS = ("token", "secret", "signature", "password", "credential")

# Header-like "name: value" / "name=value" pairs whose value is a secret, as botocore,
# aiohttp and requests print them at DEBUG (dict reprs, header lines, signing strings).
_SECRET_FIELD = (
    r"[\w-]*(?:authorization|token|secret|signature|password|credential|x-amz-security)[\w-]*"
)
_QUOTED_FIELD = re.compile(
    rf"""(?ix)
    (['"]?{_SECRET_FIELD}['"]?\s*[:=]\s*b?)   # 'Authorization': b'...', password='...'
    (['"])(?:(?!\2).)*\2
    """
)
_PLAIN_FIELD = re.compile(
    rf"""(?ix)
    (\b{_SECRET_FIELD}\s*[:=]\s*)          # Authorization: Basic ..., Signature=abc
    (?:(?:basic|bearer|aws4-hmac-sha256|aws)\s+)?
    [^\s,;'"&]+
    """
)

# Environment variables whose values are credentials (AWS, GCS, Azure, tokens).
_SECRET_ENV = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|API_KEY|CREDENTIAL|SAS")
# Known secrets shorter than this are not masked in free text (they would mask words);
# the patterns above still cover them where they appear as URL parts or fields.
_MIN_SECRET = 4
_MIN_ENV_SECRET = 8

# storage_options keys whose (string) values are credentials.
_SECRET_OPTIONS = ("key", "secret", "token", "password", "credential", "signature", "sas")

_MAX_DETAIL = 300

# obstore's exception types for refused credentials (stores it backs raise them as is)
_OBSTORE_DENIED = frozenset({"PermissionDeniedError", "UnauthenticatedError"})

_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()


def redact(url: str) -> str:
    """``url`` without credentials: no userinfo, no secret query parameters, no fragment.

    Secret parameters are those of signed or token-authenticated URLs (``X-Amz-*``,
    ``X-Goog-*``, ``sig``, ``token``, ``key``, ``signature``, ...); other parameters are
    kept. The fragment is never sent to a server, so it is dropped (it may hold an
    ``access_token``). Userinfo typed with raw reserved characters (``user:p#ss@host``)
    is removed up to the last ``@``. Leading whitespace is dropped. Strings that are not
    URLs (local paths) are returned unchanged.
    """
    if not _SCHEME.match(url):
        return url
    _, url = split_userinfo(url.lstrip())
    try:
        parts = urlsplit(url)
    except ValueError:  # malformed (e.g. a bad IPv6 host): drop everything risky
        return _mask_known(url.split("?", 1)[0].split("#", 1)[0])
    return _mask_known(urlunsplit(_redacted_parts(parts)))


def split_userinfo(url: str) -> tuple[str, str]:
    """``(userinfo, url without it)`` of a ``scheme://`` URL (userinfo ``""`` if none).

    Userinfo is what precedes the last ``@`` of the authority; when a password was
    typed with raw reserved characters (``user:p/ss@host``, ``user:p#ss@host``), the
    authority seems to end early, so an ``@`` further on ends the userinfo if what
    precedes it has a ``:`` that is not a port's.
    """
    scheme, _, rest = url.partition("://")
    end = min((i for i in map(rest.find, "/?#") if i >= 0), default=len(rest))
    userinfo, at, host = rest[:end].rpartition("@")
    if at:
        return userinfo, f"{scheme}://{host}{rest[end:]}"
    start = 0
    while (at_index := rest.find("@", start)) >= 0:
        head = rest[:at_index]
        if _PASSWORD_COLON.search(head) and not head.startswith("["):
            return head, f"{scheme}://{rest[at_index + 1 :]}"
        start = at_index + 1
    return "", url


def redact_text(text: str) -> str:
    """``text`` with every URL redacted (:func:`redact`), secret header/field values
    masked, and every known secret value masked."""
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group()), text)
    text = _QUOTED_FIELD.sub(lambda m: f"{m.group(1)}{m.group(2)}{MASK}{m.group(2)}", text)
    text = _PLAIN_FIELD.sub(lambda m: f"{m.group(1)}{MASK}", text)
    return _mask_known(text)


def remember_secrets(location: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Record the secret values in a source's URL and options, so that
    :func:`redact_text` masks them wherever they turn up (third-party messages quote
    them in forms no pattern recognises)."""
    found: set[str] = set()
    if _SCHEME.match(location):
        userinfo, url = split_userinfo(location.lstrip())
        _, colon, password = userinfo.partition(":")
        # "user:password": the password (and the pair); a lone userinfo is a token. A
        # user name alone is not masked in free text (it names local paths too).
        found.update((userinfo, password) if colon else (userinfo,))
        try:
            parts = urlsplit(url)
        except ValueError:
            parts = urlsplit("")
        for param in (*parts.query.split("&"), *parts.fragment.split("&")):
            name, _, value = param.partition("=")
            if value and _is_secret_param(name):
                found.add(value)
        if len(parts.fragment) >= _MIN_ENV_SECRET:  # a bare token (a short one: a name)
            found.add(parts.fragment)
    found.update(_option_secrets(storage_options or {}))
    found |= {unquote(s) for s in found} | {unquote_plus(s) for s in found}
    _add_secrets(s for s in found if len(s) >= _MIN_SECRET)


def describe_error(err: BaseException) -> str:
    """What ``err`` means for a source, as a short phrase for a one-line message.

    The phrase never carries credentials (see :func:`redact_text`).
    """
    if isinstance(err, ChunkPoolError):
        return getattr(err, "reason", None) or _detail(err)
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


class RedactingFilter(logging.Filter):
    """A logging filter that removes credentials from every record it passes.

    Add it to a *handler* (``handler.addFilter(RedactingFilter())``): it then sees the
    records of every logger that reaches the handler, third-party ones included. The
    message (with its arguments), the exception text and the stack are passed through
    :func:`redact_text`; the record is changed in place (handlers after this one see
    the cleaned record too). It never drops a record.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message or record.args:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_text(record.stack_info)
        return True


def _redacted_parts(parts: SplitResult) -> SplitResult:
    netloc = parts.netloc.rpartition("@")[2]
    query = "&".join(
        param
        for param in parts.query.split("&")
        if param and not _is_secret_param(param.partition("=")[0])
    )
    return parts._replace(netloc=netloc, query=query, fragment="")


def _is_secret_param(name: str) -> bool:
    name = unquote_plus(name).lower()
    return (
        name in _SECRET_PARAMS
        or name.startswith(_SECRET_PARAM_PREFIXES)
        or any(part in name for part in _SECRET_NAME_PARTS)
    )


def _option_secrets(options: Mapping[str, Any]) -> Iterable[str]:
    """String values of credential-like keys in (nested) storage options."""
    for name, value in options.items():
        if isinstance(value, Mapping):
            yield from _option_secrets(value)
        elif isinstance(value, str) and any(p in str(name).lower() for p in _SECRET_OPTIONS):
            yield value


def _add_secrets(values: Iterable[str]) -> None:
    global _secrets
    with _lock:
        _secrets = _secrets | frozenset(values)


def _known_secrets() -> list[str]:
    """Remembered secrets and credential values of the environment, longest first (so
    that a secret containing another is masked whole)."""
    env = {
        value
        for name, value in os.environ.items()
        if len(value) >= _MIN_ENV_SECRET and _SECRET_ENV.search(name.upper())
    }
    return sorted(_secrets | env, key=len, reverse=True)


def _mask_known(text: str) -> str:
    for secret in _known_secrets():
        if secret in text:
            text = text.replace(secret, MASK)
    return text


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
