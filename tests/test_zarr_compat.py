"""chunkpool uses zarr-python private names only through chunkpool/zarr_compat.py: the
installed zarr must be one it was checked against, and every name must still exist."""

from __future__ import annotations

import ast
import importlib
import pathlib
import warnings

import pytest
import zarr
from zarr.storage import MemoryStore

from chunkpool import zarr_compat

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _major_minor(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:2])


def test_installed_zarr_is_a_checked_version():
    checked = zarr_compat.CHECKED_ZARR_VERSIONS
    assert zarr.__version__ in checked or _major_minor(zarr.__version__) in {
        _major_minor(v) for v in checked
    }, f"zarr {zarr.__version__} is not among {checked}: check chunkpool/zarr_compat.py"


def test_every_name_it_reexports_still_exists():
    for name in zarr_compat.__all__:
        assert getattr(zarr_compat, name, None) is not None, name
    for cls in (
        zarr_compat.ArraySpec,
        zarr_compat.ShardIndex,
        zarr_compat.DefaultChunkKeyEncoding,
        zarr_compat.V2ChunkKeyEncoding,
    ):
        assert isinstance(cls, type), cls


def _class(dotted: str) -> type:
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize(("owner", "attribute"), zarr_compat.PRIVATE_ATTRIBUTES)
def test_every_private_attribute_still_exists(owner, attribute):
    cls = _class(owner)
    if hasattr(cls, attribute):  # a method or property
        return
    # an instance attribute: made by the constructor
    if owner == "zarr.storage.WrapperStore":
        obj = cls(MemoryStore())
    elif owner == "zarr.Group":
        obj = zarr.open_group(MemoryStore(), mode="w")
    else:
        with warnings.catch_warnings():  # numcodecs wrappers warn: not in the spec
            warnings.simplefilter("ignore")
            obj = cls()
    assert hasattr(obj, attribute), f"{owner}.{attribute}"


def test_the_accessors_work_on_real_zarr_objects():
    from zarr.codecs import BloscCodec, ShardingCodec, ZstdCodec

    assert zarr_compat.numcodecs_compressor(ZstdCodec()).codec_id == "zstd"
    assert zarr_compat.numcodecs_compressor(BloscCodec()).codec_id == "blosc"
    codec = ShardingCodec(chunk_shape=(4, 4))
    assert zarr_compat.shard_index_size(codec, (2, 2)) == 2 * 2 * 16 + 4  # + crc32c
    inner = MemoryStore()
    wrapper = zarr.storage.WrapperStore(MemoryStore())
    zarr_compat.set_wrapped_store(wrapper, inner)
    assert zarr_compat.wrapped_store(wrapper) is inner
    assert zarr_compat.zarr_loop().is_running()
    group = zarr.open_group(MemoryStore(), mode="w")
    group.create_array("a", shape=(4,), dtype="uint8")
    group.create_group("g")
    a, g, missing = zarr_compat.members(group, ["a", "g", "nope"])
    assert isinstance(a, zarr.Array) and a.shape == (4,)
    assert isinstance(g, zarr.Group) and isinstance(missing, KeyError)


@pytest.mark.parametrize("zarr_format", [2, 3])
def test_open_node_opens_what_zarr_open_opens(zarr_format):
    """An array, a group, an array inside a group, and nothing: what zarr.open gives
    (the same kind, format and metadata), or the same kind of error."""
    store = MemoryStore()
    root = zarr.open_group(store, mode="w", zarr_format=zarr_format)
    root.attrs["x"] = 1
    root.create_array("a", shape=(4, 6), chunks=(2, 3), dtype="uint16")
    alone = MemoryStore()
    zarr.create_array(alone, shape=(5,), dtype="int8", zarr_format=zarr_format)
    for where in (store, alone, zarr.storage.StorePath(store, "a")):
        expected, got = zarr.open(where, mode="r"), zarr_compat.open_node(where)
        assert type(got) is type(expected)
        assert got.metadata == expected.metadata
        assert type(got.store) is type(expected.store)  # on the store, not on a wrapper
    with pytest.raises(FileNotFoundError) as expected_error:
        zarr.open(MemoryStore(), mode="r")
    with pytest.raises(type(expected_error.value)):
        zarr_compat.open_node(MemoryStore())


def _zarr_private_uses(path: pathlib.Path) -> list[str]:
    """``zarr.core`` imports, and ``_``-prefixed names imported from zarr, in a file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("zarr"):
            if node.module.startswith("zarr.core") or any(
                a.name.startswith("_") for a in node.names
            ):
                found.append(f"{path.name}:{node.lineno}: from {node.module} import ...")
        elif isinstance(node, ast.Import):
            found += [
                f"{path.name}:{node.lineno}: import {a.name}"
                for a in node.names
                if a.name.startswith("zarr.core")
            ]
    return found


def test_no_other_module_imports_zarr_private_names():
    uses = []
    for package in ("chunkpool", "viewer"):
        for path in sorted((ROOT / package).glob("*.py")):
            if path.name != "zarr_compat.py":
                uses += _zarr_private_uses(path)
    assert uses == []
