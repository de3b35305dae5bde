"""Hostile tests: no credential in any message, repr, log line or traceback (issue 7, 4).

Credentials are planted everywhere a user may put them: URL userinfo, signed or token
query parameters, URL fragments, URLs with leading spaces, ``s3://KEY:SECRET@bucket``
and AWS credentials in the environment. Then every public object's ``str``/``repr``,
every error's text and formatted traceback, the project's log records at DEBUG and,
through the ``zarrscope`` command, its whole stderr are searched for them.
"""

from __future__ import annotations

import io
import logging
import subprocess
import traceback
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import make_array, ramp
from support.httpserver import ZarrHTTPServer
from support.s3server import REGION, S3Server
from test_render import run_cli as run_command

from chunkpool import ChunkLoadError, ChunkPool, RetryPolicy, SourceError, open_node
from chunkpool.redaction import RedactingFilter, redact, redact_text

USER = "alice-USER-1"
PASSWORD = "pw-SECRET-2"
SIGNATURE = "sig-SECRET-3"
TOKEN = "tok-SECRET-4"
SAS_SIG = "sas-SECRET-5"
FRAGMENT = "frag-SECRET-6"
S3_KEY = "AKIA-S3KEY-7"
S3_SECRET = "s3-SECRET-8"
ENV_KEY = "AKIA-ENVKEY-9"
ENV_SECRET = "env-SECRET-10"
SECRETS = (USER, PASSWORD, SIGNATURE, TOKEN, SAS_SIG, FRAGMENT, S3_KEY, S3_SECRET)
ENV_SECRETS = (ENV_KEY, ENV_SECRET)

FAST_RETRY = RetryPolicy(attempts=2, timeout=2.0, base_delay=0.05, max_delay=0.1)
CLI_BOUND = 120  # seconds a zarrscope subprocess may take, start to exit


def leaks(texts: list[str], secrets: tuple[str, ...] = SECRETS + ENV_SECRETS) -> list[str]:
    """The planted secrets that appear in any of ``texts``."""
    return sorted({s for s in secrets for t in texts if s in t})


def object_texts(pool: ChunkPool) -> list[str]:
    """str and repr of the pool and every public object reachable from it."""
    info = pool.multiscale_info
    objects: list[object] = [pool, info, info.source, pool.stats]
    for level in info.levels:
        array = level.array
        objects += [level, array, array.store, array.store_path, array.metadata]
    return [text for obj in objects for text in (str(obj), repr(obj))]


def error_texts(err: BaseException) -> list[str]:
    """str, repr and the formatted traceback (with its chain) of ``err`` and, for a
    ChunkLoadError, of every chunk's error."""
    texts = [str(err), repr(err), "".join(traceback.format_exception(err))]
    for failure in getattr(err, "failures", {}).values():
        texts += error_texts(failure)
    return texts


def project_log(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Every record of the project's loggers, formatted with its exception."""
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    return [
        formatter.format(record)
        for record in caplog.records
        if record.name.split(".")[0] in ("chunkpool", "viewer", "zarrscope")
    ]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ZarrHTTPServer]:
    data = ramp((64, 64))
    make_array(tmp_path / "img.zarr", data, (32, 32))
    with ZarrHTTPServer(tmp_path) as srv:
        srv.data = data
        yield srv


def with_userinfo(url: str) -> str:
    return url.replace("http://", f"http://{USER}:{PASSWORD}@")


# --- redaction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"https://h/a.zarr#access_token={FRAGMENT}", "https://h/a.zarr"),
        (f"https://h/a.zarr?v=1#{FRAGMENT}", "https://h/a.zarr?v=1"),
        (f"  https://{USER}:{PASSWORD}@h/a.zarr", "https://h/a.zarr"),
        (f"\thttps://h/a.zarr?token={TOKEN}", "https://h/a.zarr"),
        (f"s3://{S3_KEY}:{S3_SECRET}@bucket/a.zarr", "s3://bucket/a.zarr"),
        # reserved characters typed raw in a password: the host is what follows the last @
        (f"https://{USER}:{PASSWORD}#x@h/a.zarr", "https://h/a.zarr"),
        (f"https://{USER}:{PASSWORD}/x@h/a.zarr", "https://h/a.zarr"),
        (f"https://{USER}:{PASSWORD}?x@h/a.zarr", "https://h/a.zarr"),
        # an @ in the path is not userinfo
        ("https://h:8080/pkg@1.0/a.zarr", "https://h:8080/pkg@1.0/a.zarr"),
        ("https://h/a.zarr?email=a@b.org", "https://h/a.zarr?email=a@b.org"),
    ],
)
def test_redact_hostile_urls(url: str, expected: str) -> None:
    assert redact(url) == expected


def test_redact_text_masks_credentials_that_are_not_urls() -> None:
    """What botocore and aiohttp print at DEBUG: headers and signing strings."""
    text = (
        f"headers={{'Authorization': b'AWS4-HMAC-SHA256 Credential={S3_KEY}/20240101/"
        f"us-east-1/s3/aws4_request, SignedHeaders=host, Signature={SIGNATURE}', "
        f"'X-Amz-Security-Token': b'{TOKEN}'}} Authorization: Basic {PASSWORD}"
    )
    clean = redact_text(text)
    assert leaks([clean]) == []
    assert "Authorization" in clean  # the structure stays readable


def test_redacting_filter_cleans_messages_arguments_and_exceptions() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactingFilter())
    log = logging.getLogger("fsspec.http.test_secrets")
    log.addHandler(handler)
    log.setLevel(logging.DEBUG)
    log.propagate = False
    try:
        log.debug("GET %s", with_userinfo(f"http://h/a.zarr?X-Amz-Signature={SIGNATURE}"))
        try:
            raise OSError(f"cannot reach https://h/a.zarr#access_token={FRAGMENT}")
        except OSError:
            log.exception("request failed")
        log.debug("stack", stack_info=True, extra={"url": f"https://h/?token={TOKEN}"})
    finally:
        log.removeHandler(handler)
        log.propagate = True
    output = stream.getvalue()
    assert "GET http://h/a.zarr" in output and "OSError: cannot reach https://h/a.zarr" in output
    assert leaks([output]) == []


# --- through the pool: HTTP -------------------------------------------------------------


def assert_pool_clean(pool: ChunkPool, server: ZarrHTTPServer, caplog) -> None:
    """Objects, a failing chunk's errors and the project's log are free of secrets."""
    server.add_fault("*/img.zarr/c/1/1", "500")
    ok = pool.get_chunk(0, (0, 0))
    np.testing.assert_array_equal(ok.wait(timeout=30), server.data[ok.slices])
    failed = pool.get_chunk(0, (1, 1))
    with pytest.raises(ChunkLoadError) as info:
        pool.wait_for_chunks_to_load(timeout=30)
    texts = object_texts(pool) + error_texts(info.value) + project_log(caplog)
    texts += [str(ok), repr(ok), str(failed), repr(failed)]
    assert "HTTP error 500" in str(info.value)
    assert leaks(texts) == []


@pytest.mark.parametrize("leading", ["", "  ", "\t "])
def test_http_userinfo_never_shows(server, caplog, leading):
    caplog.set_level(logging.DEBUG)
    url = leading + with_userinfo(f"{server.url}/img.zarr")
    (pool,) = ChunkPool.from_zarr_node(url, retry=FAST_RETRY)
    try:
        assert pool.multiscale_info.source == f"{server.url}/img.zarr"
        assert_pool_clean(pool, server, caplog)
    finally:
        pool.destroy()


def test_http_userinfo_with_the_disk_cache(server, caplog, tmp_path):
    caplog.set_level(logging.DEBUG)
    url = with_userinfo(f"{server.url}/img.zarr")
    node, _ = open_node(url, disk_cache=tmp_path / "cache")
    assert leaks([str(node), repr(node), str(node.store), repr(node.store)]) == []
    (pool,) = ChunkPool.from_zarr_node(url, retry=FAST_RETRY, disk_cache=tmp_path / "cache")
    try:
        assert_pool_clean(pool, server, caplog)
    finally:
        pool.destroy()


@pytest.mark.parametrize(
    "suffix",
    [
        f"?X-Amz-Signature={SIGNATURE}&token={TOKEN}&sig={SAS_SIG}",
        f"#access_token={FRAGMENT}",
        f"?token={TOKEN}#access_token={FRAGMENT}",
    ],
)
@pytest.mark.parametrize("userinfo", [False, True])
def test_failed_open_never_shows_secrets(server, caplog, suffix, userinfo):
    """Signed or token URLs name one object, so a Zarr store behind one does not open:
    its error, traceback and log name the store without any secret."""
    caplog.set_level(logging.DEBUG)
    url = f"{server.url}/img.zarr{suffix}"
    url = with_userinfo(url) if userinfo else url
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node(url, retry=FAST_RETRY)
    assert str(info.value).startswith(f"{server.url}/img.zarr")
    assert leaks(error_texts(info.value) + project_log(caplog)) == []


@pytest.mark.parametrize("fault", ["403", "500", "reset"])
def test_metadata_read_failures_never_show_secrets(server, caplog, fault):
    caplog.set_level(logging.DEBUG)
    server.add_fault("*/zarr.json", fault)
    url = with_userinfo(f"{server.url}/img.zarr?token={TOKEN}")
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node(url, retry=FAST_RETRY)
    assert leaks(error_texts(info.value) + project_log(caplog)) == []


def test_errors_do_not_chain_the_raw_exception(server):
    """A user's app printing the traceback must not print the library's exception text
    (aiohttp and s3fs quote signed URLs): nothing is chained, not even as context."""
    server.add_fault("*/zarr.json", "403")
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node(with_userinfo(f"{server.url}/img.zarr"), retry=FAST_RETRY)
    assert info.value.__cause__ is None and info.value.__context__ is None
    server.clear_faults()
    server.add_fault("*/c/0/0", "403")
    (pool,) = ChunkPool.from_zarr_node(with_userinfo(f"{server.url}/img.zarr"))
    try:
        with pytest.raises(ChunkLoadError) as load:
            pool.get_chunk(0, (0, 0)).wait(timeout=30)
    finally:
        pool.destroy()
    for err in [load.value, *load.value.failures.values()]:
        assert err.__cause__ is None and err.__context__ is None


# --- through the pool: S3 ---------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> Iterator[S3Server]:
    tmp = tmp_path_factory.mktemp("s3data")
    make_array(tmp / "img.zarr", ramp((64, 64)), (32, 32))
    with S3Server() as server:
        server.create_bucket("secrets")
        server.upload_dir(tmp / "img.zarr", "secrets", "img.zarr")
        yield server


@pytest.fixture(autouse=True)
def fresh_s3fs() -> None:
    """fsspec reuses an S3FileSystem made with the same options, endpoint and keys from
    the environment included: one made by another module's test would talk to its
    (stopped) server."""
    from s3fs import S3FileSystem

    S3FileSystem.clear_instance_cache()


def test_s3_userinfo_is_used_as_credentials_and_never_shows(s3, caplog, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    caplog.set_level(logging.DEBUG)
    options = {"endpoint_url": s3.endpoint_url, "client_kwargs": {"region_name": REGION}}
    url = f"s3://{S3_KEY}:{S3_SECRET}@secrets/img.zarr"
    (pool,) = ChunkPool.from_zarr_node(url, storage_options=options, retry=FAST_RETRY)
    try:
        assert pool.multiscale_info.source == "s3://secrets/img.zarr"
        np.testing.assert_array_equal(
            pool.get_chunk(0, (1, 1)).wait(timeout=30), ramp((64, 64))[32:, 32:]
        )
        texts = object_texts(pool)
    finally:
        pool.destroy()
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node(
            f"s3://{S3_KEY}:{S3_SECRET}@no-such-bucket-7/img.zarr", storage_options=options
        )
    assert leaks(texts + error_texts(info.value) + project_log(caplog)) == []


def s3_env(s3: S3Server) -> dict[str, str]:
    """The server's environment with distinctive credentials (moto accepts any)."""
    return {**s3.env(), "AWS_ACCESS_KEY_ID": ENV_KEY, "AWS_SECRET_ACCESS_KEY": ENV_SECRET}


def test_s3_environment_credentials_never_show(s3, caplog, monkeypatch):
    for name, value in s3_env(s3).items():
        monkeypatch.setenv(name, value)
    caplog.set_level(logging.DEBUG)
    (pool,) = ChunkPool.from_zarr_node("s3://secrets/img.zarr", retry=FAST_RETRY)
    try:
        pool.get_chunk(0, (0, 1)).wait(timeout=30)
        texts = object_texts(pool)
    finally:
        pool.destroy()
    with pytest.raises(SourceError) as info:
        ChunkPool.from_zarr_node("s3://secrets/missing.zarr")
    assert leaks(texts + error_texts(info.value) + project_log(caplog)) == []


# --- through the command ----------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run_command(*args, timeout=CLI_BOUND, env=env)


@pytest.mark.render
def test_cli_stderr_at_debug_has_no_secrets_over_http(server, tmp_path):
    server.add_fault("*/img.zarr/c/1/1", "500")  # a tile of the view: drawn hatched
    out = tmp_path / "out.png"
    url = with_userinfo(f"{server.url}/img.zarr")
    args = ("--screenshot", str(out), "--size", "64", "64", "--log-level", "DEBUG")
    result = run_cli(url, *args, "--timeout", "60")
    assert result.returncode == 0, result.stderr
    assert "1 tiles failed" in result.stderr.strip().splitlines()[-1]
    assert "DEBUG [fsspec.http]" in result.stderr and "HTTP error 500" in result.stderr
    assert "Traceback" not in result.stderr
    assert leaks([result.stderr, result.stdout]) == []
    # and a source that cannot open, named with every kind of secret
    bad = "  " + with_userinfo(f"{server.url}/img.zarr?token={TOKEN}#access_token={FRAGMENT}")
    result = run_cli(bad, *args, "--timeout", "60")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("zarrscope: error: ")
    assert "Traceback" not in result.stderr
    assert leaks([result.stderr, result.stdout]) == []


@pytest.mark.render
def test_cli_stderr_at_debug_has_no_secrets_over_s3(s3, tmp_path):
    """botocore signs every request and logs the signing at DEBUG: the key id, signature
    and secret never reach zarrscope's stderr."""
    out = tmp_path / "out.png"
    result = run_cli(
        "s3://secrets/img.zarr",
        *("--screenshot", str(out), "--size", "64", "64", "--log-level", "DEBUG"),
        *("--timeout", "60"),
        env=s3_env(s3),
    )
    assert result.returncode == 0, result.stderr
    assert "botocore" in result.stderr  # DEBUG records of third parties went through
    assert leaks([result.stderr, result.stdout]) == []
