"""Shared fixtures: small images on disk or in memory, and pools that are always destroyed."""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import zarr

from chunkpool import ChunkPool, read_multiscales


@pytest.fixture(scope="session", autouse=True)
def runtime_dir() -> Iterator[None]:
    """An ``XDG_RUNTIME_DIR``, as a desktop session has one: without it Mesa's Vulkan
    loader prints "XDG_RUNTIME_DIR is invalid" on stderr in every process that renders,
    which the tests of the command's one-line messages would count."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        yield
        return
    with tempfile.TemporaryDirectory(prefix="zarrscope-runtime-") as path:
        os.chmod(path, 0o700)
        os.environ["XDG_RUNTIME_DIR"] = path
        try:
            yield
        finally:
            del os.environ["XDG_RUNTIME_DIR"]


def ramp(shape: tuple[int, ...], dtype: str = "uint16") -> np.ndarray:
    """Distinct values everywhere (modulo the dtype), so any misplaced pixel shows."""
    return (np.arange(int(np.prod(shape))) % np.iinfo(dtype).max).astype(dtype).reshape(shape)


def make_array(
    store: Any,
    data: np.ndarray,
    chunks: tuple[int, ...],
    **kwargs: Any,
) -> zarr.Array:
    """Write ``data`` as a zarr array into ``store`` (a path or a store object)."""
    arr = zarr.create_array(store, shape=data.shape, chunks=chunks, dtype=data.dtype, **kwargs)
    arr[...] = data
    return arr


@pytest.fixture
def pools() -> Iterator[Callable[..., ChunkPool]]:
    """``pools(node, **kwargs)`` makes a ChunkPool for a zarr node; all are destroyed at
    teardown, and no chunkpool thread may outlive them."""
    made: list[ChunkPool] = []

    def make(node: zarr.Array | zarr.Group, **kwargs: Any) -> ChunkPool:
        (info,) = read_multiscales(node, "test")
        pool = ChunkPool(info, **kwargs)
        made.append(pool)
        return pool

    yield make
    for pool in made:
        pool.destroy()
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("chunkpool-")]
    assert not leftover, f"threads left running after destroy(): {leftover}"


@pytest.fixture()
def make_viewer(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``make_viewer(source=None, **options)``: an offscreen viewer of the test module's
    ``SIZE`` without HUD (unless the options say otherwise), closed after the test.
    (Modules with viewers to keep across tests define their own.)"""
    from viewer import Viewer

    made: list[Any] = []

    def make(source: Any = None, **options: Any) -> Any:
        options.setdefault("size", request.module.SIZE)
        options.setdefault("show_hud", False)
        viewer = Viewer(source, None, **options)
        made.append(viewer)
        return viewer

    yield make
    for viewer in made:
        viewer.close()
