"""Opening sources: local paths, file:// and fsspec URLs, zarr nodes; redaction of
credentials; one-line SourceError messages. No network: remote URLs are only checked
for the store they map to (S3 credentials included), and the fsspec path runs end to
end on fsspec's in-memory filesystem."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import aiohttp
import multidict
import pytest
import yarl
import zarr
from zarr.storage import FsspecStore, LocalStore

from chunkpool.errors import SourceError
from chunkpool.stores import RemoteStore, _make_store, describe_error, open_node, redact


def open_error(source: str | Path) -> str:
    """The one-line message of the SourceError opening ``source`` raises."""
    with pytest.raises(SourceError) as info:
        open_node(source)
    message = str(info.value)
    assert "\n" not in message
    # the library's exception (whose text may hold credentials) is not chained
    assert info.value.__cause__ is None and info.value.__context__ is None
    return message


@pytest.fixture
def v2_group(tmp_path: Path) -> Path:
    group = zarr.open_group(tmp_path / "v2.zarr", mode="w", zarr_format=2)
    group.create_array("0", shape=(8, 8), dtype="uint8")
    return tmp_path / "v2.zarr"


@pytest.fixture
def memory_url() -> str:
    """A fresh URL on fsspec's (process-wide) in-memory filesystem."""
    return f"memory://chunkpool-test-{uuid.uuid4().hex}/img.zarr"


# --- redact --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://user:pa55@example.com/a.zarr", "https://example.com/a.zarr"),
        ("https://token@example.com:8443/a.zarr", "https://example.com:8443/a.zarr"),
        ("s3://AKIA:secret@bucket/a.zarr", "s3://bucket/a.zarr"),
        (
            "https://b.s3.amazonaws.com/a.zarr?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            "&X-Amz-Credential=AKIA%2F20240101&X-Amz-Signature=abc123&X-Amz-Security-Token=t",
            "https://b.s3.amazonaws.com/a.zarr",
        ),
        (
            "https://acct.blob.core.windows.net/c/a.zarr?sv=2022-11-02&sp=r&sig=abc%3D",
            "https://acct.blob.core.windows.net/c/a.zarr?sv=2022-11-02&sp=r",
        ),
        (
            "https://storage.googleapis.com/b/a.zarr?X-Goog-Signature=ff&X-Goog-Date=1",
            "https://storage.googleapis.com/b/a.zarr",
        ),
        ("https://h/a.zarr?token=abc&version=3", "https://h/a.zarr?version=3"),
        ("https://h/a.zarr?access_token=abc", "https://h/a.zarr"),
        ("https://h/a.zarr?key=abc&Signature=x&AWSAccessKeyId=y", "https://h/a.zarr"),
        ("https://h/a.zarr?api_key=1&client_secret=2&password=3", "https://h/a.zarr"),
        ("https://h/a.zarr?format=raw", "https://h/a.zarr?format=raw"),
        ("https://example.com/a.zarr", "https://example.com/a.zarr"),
        ("s3://bucket/a.zarr", "s3://bucket/a.zarr"),
        ("file:///data/a.zarr", "file:///data/a.zarr"),
        ("/data/user:pw@host/a.zarr?token=x", "/data/user:pw@host/a.zarr?token=x"),
        ("relative/a.zarr", "relative/a.zarr"),
        ("http://u:p@[::1/a.zarr?sig=x", "http://[::1/a.zarr"),  # malformed IPv6 host
    ],
)
def test_redact(url: str, expected: str) -> None:
    assert redact(url) == expected


# --- opening local stores ------------------------------------------------------------


def test_open_local_path_string(v2_group: Path) -> None:
    node, name = open_node(str(v2_group))

    assert isinstance(node, zarr.Group)
    assert node.metadata.zarr_format == 2
    assert name == str(v2_group)


def test_open_pathlib_path(v2_group: Path) -> None:
    node, name = open_node(v2_group)

    assert isinstance(node, zarr.Group)
    assert isinstance(node.store, LocalStore)
    assert name == str(v2_group)


@pytest.mark.parametrize("host", ["", "localhost"])
def test_open_file_url(v2_group: Path, host: str) -> None:
    url = f"file://{host}{v2_group}"

    node, name = open_node(url)

    assert isinstance(node, zarr.Group)
    assert isinstance(node.store, LocalStore)
    assert Path(node.store.root) == v2_group
    assert name == url


def test_open_file_url_with_escaped_characters(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "my image.zarr", shape=(4, 4), dtype="uint8")

    node, _ = open_node(f"file://{tmp_path}/my%20image.zarr")

    assert isinstance(node, zarr.Array)


def test_file_url_with_a_remote_host_is_refused() -> None:
    assert "remote host" in open_error("file://fileserver/data/a.zarr")


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_array(tmp_path: Path, zarr_format: int) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(4, 4), dtype="uint8", zarr_format=zarr_format)

    node, _ = open_node(tmp_path / "a.zarr")

    assert isinstance(node, zarr.Array)
    assert node.metadata.zarr_format == zarr_format


def test_open_v3_group(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=3)

    node, _ = open_node(tmp_path / "g.zarr")

    assert isinstance(node, zarr.Group)
    assert node.metadata.zarr_format == 3


def test_opened_read_only(v2_group: Path) -> None:
    node, _ = open_node(v2_group)

    assert node.store.read_only
    with pytest.raises(ValueError, match="read-only"):
        node.create_array("new", shape=(2,), dtype="uint8")


def test_open_expands_home(v2_group: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(v2_group.parent))

    node, name = open_node("~/v2.zarr")

    assert isinstance(node, zarr.Group)
    assert name == "~/v2.zarr"


@pytest.mark.parametrize("kind", ["group", "array"])
def test_open_node_passes_zarr_nodes_through(tmp_path: Path, kind: str) -> None:
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    node = root.create_array("sub/a", shape=(4, 4), dtype="uint8") if kind == "array" else root

    opened, name = open_node(node)

    assert opened is node
    assert name == str(tmp_path / "g.zarr") + ("/sub/a" if kind == "array" else "")


# --- local failures ------------------------------------------------------------------


def test_missing_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.zarr"

    assert open_error(missing) == f"{missing}: no such file or directory"


def test_missing_file_url(tmp_path: Path) -> None:
    url = f"file://{tmp_path}/nope.zarr"

    assert open_error(url) == f"{url}: no such file or directory"


def test_directory_that_is_not_zarr(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hello")

    assert open_error(tmp_path / "plain") == (
        f"{tmp_path / 'plain'}: not a Zarr store (no zarr.json, .zgroup or .zarray)"
    )


def test_regular_file_is_not_zarr(tmp_path: Path) -> None:
    (tmp_path / "image.tif").write_bytes(b"II*\x00")

    assert "not a Zarr store" in open_error(tmp_path / "image.tif")


def test_only_attributes_is_not_zarr(tmp_path: Path) -> None:
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / ".zattrs").write_text("{}")

    assert "not a Zarr store" in open_error(tmp_path / "x.zarr")


def test_corrupt_metadata(tmp_path: Path) -> None:
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "zarr.json").write_text("{not json\n")

    message = open_error(tmp_path / "x.zarr")

    assert message.startswith(f"{tmp_path / 'x.zarr'}: invalid Zarr metadata (JSONDecodeError: ")


def test_incomplete_metadata(tmp_path: Path) -> None:
    (tmp_path / "x.zarr").mkdir()
    (tmp_path / "x.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "array"}')

    assert open_error(tmp_path / "x.zarr").startswith(f"{tmp_path / 'x.zarr'}: cannot read (")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads everything")
def test_unreadable_directory(v2_group: Path) -> None:
    v2_group.chmod(0)
    try:
        assert open_error(v2_group) == f"{v2_group}: permission denied"
    finally:
        v2_group.chmod(0o755)


# --- fsspec URLs (in memory, no network) ----------------------------------------------


def test_open_fsspec_url(memory_url: str) -> None:
    group = zarr.open_group(memory_url, mode="w", zarr_format=3)
    group.create_array("0", shape=(8, 8), dtype="uint8")

    node, name = open_node(memory_url)

    assert isinstance(node, zarr.Group)
    assert isinstance(node.store, RemoteStore) and isinstance(node.store._store, FsspecStore)
    assert node.store.read_only
    assert list(node.array_keys()) == ["0"]
    assert name == memory_url


def test_missing_fsspec_url_names_it_without_secrets(memory_url: str) -> None:
    message = open_error(f"{memory_url}?token=s3cr3t")

    assert message == f"{memory_url}: not a Zarr store (no zarr.json, .zgroup or .zarray)"


def test_fsspec_node_name(memory_url: str) -> None:
    group = zarr.open_group(memory_url, mode="w")
    array = group.create_array("sub/a", shape=(2, 2), dtype="uint8")

    assert open_node(array)[1].endswith("/img.zarr/sub/a")


def test_unknown_url_scheme() -> None:
    message = open_error("nosuchscheme://bucket/a.zarr")

    assert message.startswith("nosuchscheme://bucket/a.zarr: cannot read (")
    assert "nosuchscheme" in message


def test_http_url_maps_to_an_http_fsspec_store() -> None:
    store = _make_store("https://example.com/data/a.zarr", None)

    assert isinstance(store, FsspecStore)
    assert store.read_only
    assert "http" in store.fs.protocol
    assert store.path == "https://example.com/data/a.zarr"


@pytest.fixture
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An environment where botocore finds no credentials (and asks no metadata server)."""
    for var in list(os.environ):
        if var.startswith("AWS_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.mark.usefixtures("no_aws_credentials")
def test_s3_without_credentials_is_anonymous() -> None:
    store = _make_store("s3://bucket/a.zarr", {"client_kwargs": {"region_name": "eu-west-1"}})

    assert isinstance(store, FsspecStore)
    assert store.read_only
    assert store.fs.anon is True
    assert store.path == "bucket/a.zarr"


@pytest.mark.usefixtures("no_aws_credentials")
def test_s3_with_environment_credentials_is_not_anonymous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "example-secret")

    assert _make_store("s3://bucket/a.zarr", None).fs.anon is False


@pytest.mark.usefixtures("no_aws_credentials")
def test_s3_explicit_authentication_options_are_kept() -> None:
    store = _make_store("s3://bucket/a.zarr", {"key": "AKIAEXAMPLE", "secret": "example"})

    assert store.fs.anon is False
    assert store.fs.key == "AKIAEXAMPLE"


# --- describe_error ------------------------------------------------------------------


def http_error(status: int, reason: str, url: str) -> aiohttp.ClientResponseError:
    real_url = yarl.URL(url)
    info = aiohttp.RequestInfo(
        real_url, "GET", multidict.CIMultiDictProxy(multidict.CIMultiDict()), real_url
    )
    return aiohttp.ClientResponseError(info, (), status=status, message=reason)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FileNotFoundError("x"), "no such file or directory"),
        (PermissionError("x"), "permission denied"),
        (TimeoutError(), "timed out"),
        (
            http_error(403, "Forbidden", "https://h/a.zarr/zarr.json?X-Amz-Signature=abc"),
            "permission denied (HTTP 403 Forbidden)",
        ),
        (http_error(401, "", "https://h/a.zarr/zarr.json"), "permission denied (HTTP 401)"),
        (http_error(500, "Server Error", "https://h/a"), "HTTP error 500 Server Error"),
        (
            aiohttp.ServerDisconnectedError(),
            "connection failed (ServerDisconnectedError: Server disconnected)",
        ),
        (
            OSError("Cannot connect to https://user:pw@h/a.zarr?sig=abc"),
            "cannot read (OSError: Cannot connect to https://h/a.zarr)",
        ),
        (RuntimeError("line one\nline two"), "cannot read (RuntimeError: line one line two)"),
        (RuntimeError(), "cannot read (RuntimeError)"),
    ],
)
def test_describe_error(error: BaseException, expected: str) -> None:
    assert describe_error(error) == expected


def test_describe_error_shortens_long_messages() -> None:
    assert len(describe_error(OSError("x" * 5000))) < 400
