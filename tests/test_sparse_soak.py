"""Memory that is counted is memory that is used, through a viewer: panning over a
sparse 2^20 x 2^20 image (no chunk stored: every chunk is the fill value) visits
100,000 distinct empty chunks with a small chunk cache and texture budget; the process
grows by no more than 1.2 x those budgets plus a fixed overhead."""

from __future__ import annotations

import os
import pathlib

import pytest
import zarr

from viewer import TextureBudget, Viewer

pytestmark = pytest.mark.render

CHUNKS = 100_000
CACHE = 4 << 20
TEXTURES = 4 << 20
#: What a viewer's first views cost whatever the budgets (Python objects, allocator).
FIXED = 32 << 20


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_a_sparse_image_soak_stays_within_its_budgets(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "sparse.zarr"
    zarr.create_array(path, shape=(1 << 20, 1 << 20), chunks=(64, 64), dtype="uint8")
    size = (640, 448)  # 10 x 7 chunks on screen at 1:1
    viewer = Viewer(
        str(path),
        None,
        size=size,
        colormap="gray",
        clim=(0, 255),
        show_hud=False,
        cache_bytes=CACHE,
        texture_budget=TextureBudget(TEXTURES),
    )
    try:
        viewer.show_region(0, 0, *size)
        viewer.refresh()
        start = peak = rss()
        visited: set[tuple[int, int]] = set()
        row = 0
        while len(visited) < CHUNKS:
            for step in range(0, (1 << 20) - size[0], size[0]):
                viewer.show_region(step, row, step + size[0], row + size[1])
                viewer.refresh()
                for tile in viewer.layer.tiles.tiles():
                    visited.add(tile.chunk.index)
                if len(visited) >= CHUNKS:
                    break
                if step % (size[0] * 256) == 0:
                    peak = max(peak, rss())
            row += size[1]
        end = rss()
        peak = max(peak, end)
        stats = viewer.pool.stats
        print(
            f"\n{len(visited)} empty chunks: RSS start {start / 2**20:.1f} MiB, peak "
            f"{peak / 2**20:.1f}, end {end / 2**20:.1f}; counted {stats.memory_usage / 2**20:.2f}"
            f" MiB, cache {stats.cache_bytes / 2**20:.2f} MiB"
        )
        assert stats.cache_bytes <= CACHE
        assert peak - start <= 1.2 * (CACHE + TEXTURES) + FIXED
    finally:
        viewer.close()
