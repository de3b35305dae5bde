"""Opening over HTTP in as few sequential round trips as the metadata allows (issue 10 §1).

Every round trip before the first chunk request is latency added to the time to first
image. These tests count them from the test server's request log: a request depends on
another when it was sent after that one was answered, and the longest chain of such
dependencies is the number of sequential round trips. The server adds a latency long
enough that requests sent together (one ``asyncio.gather``) start well within it even on
a loaded machine, so the count is a count, not a time.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
from collections.abc import Callable, Sequence

import numpy as np
import pytest
import zarr
from support.httpserver import RequestRecord, ZarrHTTPServer
from support.images import noise_image, write_pyramid

from chunkpool import ChunkPool
from viewer import Viewer

SIZE = (64, 48)
LATENCY = 0.5  # far above the spread of one concurrent batch of requests


def round_trips(records: Sequence[RequestRecord]) -> dict[int, int]:
    """For each request (by index in ``records``), the number of sequential round trips
    up to and including it: 1 + the most of any request answered before it was sent."""
    order = sorted(range(len(records)), key=lambda i: records[i].start)
    depth: dict[int, int] = {}
    for i in order:
        before = [depth[j] for j in depth if records[j].end <= records[i].start]
        depth[i] = 1 + max(before, default=0)
    return depth


@pytest.mark.parametrize("zarr_format", [3, 2])
def test_opening_an_ome_zarr_takes_two_round_trips(
    tmp_path: pathlib.Path, zarr_format: int
) -> None:
    """The root's metadata (whatever the format: probed at once, each document read
    once), then every level's (at once): two round trips, not one more per probe."""
    image = noise_image((256, 256), seed=3)
    write_pyramid(
        tmp_path / "img.ome.zarr", image, chunks=(64, 64), n_levels=3, zarr_format=zarr_format
    )
    with ZarrHTTPServer(tmp_path, latency=LATENCY) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/img.ome.zarr")
        try:
            assert pool.multiscale_info.n_levels == 3
            records = server.requests
        finally:
            pool.destroy()
    depth = round_trips(records)
    assert max(depth.values()) == 2, [(r.path, depth[i]) for i, r in enumerate(records)]
    paths = [r.path for r in records]
    assert len(paths) == len(set(paths)), paths  # and each document read once


def test_a_remote_plain_array_opens_in_one_round_trip(tmp_path: pathlib.Path) -> None:
    """An array at the root (no group) is found by the same concurrent probe."""
    data = noise_image((64, 64), seed=4)
    arr = zarr.create_array(
        tmp_path / "a.zarr", shape=data.shape, chunks=(32, 32), dtype=data.dtype
    )
    arr[...] = data
    with ZarrHTTPServer(tmp_path, latency=LATENCY) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/a.zarr")
        try:
            level = pool.multiscale_info.levels[0]
            assert level.shape == data.shape
            records = server.requests
        finally:
            pool.destroy()
    assert max(round_trips(records).values()) == 1


def test_the_first_image_does_not_wait_for_the_labels_group(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """The ``labels/`` group is read while the image loads, not before: with its read
    held at the server, the viewer opens and settles on the image (no labels yet); once
    it is let go, the listed label images are found (read at once)."""
    image = noise_image((SIZE[1], SIZE[0]), seed=5)
    img = write_pyramid(tmp_path / "img.ome.zarr", image, chunks=(32, 32), n_levels=2)
    group = zarr.open_group(img.path / "labels", mode="w")
    group.attrs["ome"] = {"version": "0.5", "labels": ["a", "b", "c"]}
    ids = np.arange(SIZE[0] * SIZE[1], dtype=np.uint32).reshape(SIZE[1], SIZE[0])
    for name in "abc":
        write_pyramid(img.path / "labels" / name, ids, chunks=(32, 32), n_levels=1)
    with ZarrHTTPServer(tmp_path) as server:
        stalled = server.add_fault("/img.ome.zarr/labels/zarr.json", "stall")
        viewer = make_viewer(f"{server.url}/img.ome.zarr", colormap="gray", clim=(0, 255))
        assert viewer.wait_settled()
        assert viewer.screenshot().any()
        assert stalled.hits == 1  # the labels read, still held:
        assert not any("/labels/" in r.path for r in server.requests)
        server.stall_release.set()
        assert viewer.label_names == ["a", "b", "c"]


_IMPORTS = r"""
import json, sys
from chunkpool.stores import import_store_modules
def loaded():
    return sorted(m for m in ("aiohttp", "fsspec.implementations.http") if m in sys.modules)
before = loaded()
import_store_modules(sys.argv[2])  # a local path
import_store_modules(object())  # a zarr node, say: nothing to import
import_store_modules("nosuchprotocol://x/y")  # left for opening to report
local = loaded()
import_store_modules(sys.argv[1])
print(json.dumps({"before": before, "local": local, "url": loaded()}))
"""


def test_a_urls_http_stack_is_imported_before_opening_and_nothing_read(
    tmp_path: pathlib.Path,
) -> None:
    """The viewer imports what a URL's store needs (aiohttp: ~0.2 s) before its GPU
    thread starts, so that the first request goes out before that thread competes
    for the interpreter: a fresh process, nothing read; a path imports nothing."""
    write_pyramid(tmp_path / "img.ome.zarr", noise_image((64, 64)), chunks=(32, 32), n_levels=1)
    root = pathlib.Path(__file__).resolve().parent.parent
    with ZarrHTTPServer(tmp_path) as server:
        out = subprocess.run(
            [sys.executable, "-c", _IMPORTS, f"{server.url}/img.ome.zarr", str(tmp_path)],
            capture_output=True,
            text=True,
            check=True,
            cwd=root,
            env={**os.environ, "PYTHONPATH": str(root)},
            timeout=120,
        )
        assert server.requests == []
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["before"] == result["local"] == []
    assert result["url"] == ["aiohttp", "fsspec.implementations.http"]
