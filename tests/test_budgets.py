"""One pool budget and one texture budget under a long session: three layers (two
images and labels) under a viewer's memory budget and a small texture budget, moved
1000 times at random (pans, zooms, slices); at every step the pools' counted memory
and the texture bytes stay within their budgets, and the view still shows the right
pixels at the end. Also: a chunk released by the budget is asked for again."""

from __future__ import annotations

import pathlib
import threading
import time

import numpy as np
import pytest
from support.images import noise_image, write_pyramid
from support.moves import RandomMoves
from test_render import settle

from chunkpool import ChunkManager, ChunkPool, MemoryBudget
from viewer import TextureBudget, TileSet, View, Viewer

pytestmark = pytest.mark.render

SIZE = (160, 120)
MOVES = 1000


def test_a_thousand_moves_over_three_layers_stay_within_both_budgets(
    tmp_path: pathlib.Path,
) -> None:
    rng = np.random.default_rng(7)
    stack = noise_image((4, 512, 512), seed=1)  # (z, y, x)
    a = write_pyramid(
        tmp_path / "a.ome.zarr", stack, chunks=(1, 64, 64), n_levels=4, axes=["z", "y", "x"]
    )
    b = write_pyramid(
        tmp_path / "b.ome.zarr", noise_image((512, 512), seed=2), chunks=(64, 64), n_levels=4
    )
    ids = (noise_image((512, 512), seed=3) // 32).astype(np.uint32)
    lab = write_pyramid(tmp_path / "l.ome.zarr", ids, chunks=(64, 64), n_levels=1)
    memory = MemoryBudget(3 << 20)
    textures = TextureBudget(2 << 20)
    viewer = Viewer(
        str(a.path),
        None,
        size=SIZE,
        colormap="gray",
        clim=(0, 255),
        show_hud=False,
        memory_budget=memory,
        texture_budget=textures,
    )
    try:
        viewer.add_image(str(b.path), colormap="magenta", clim=(0, 255), cache_bytes=1 << 20)
        viewer.add_labels(str(lab.path))
        peak_memory = peak_textures = 0
        move_at_random = RandomMoves(viewer, rng, ("pan", "zoom", "z", "cursor"), extent=512)
        for move in range(MOVES):
            move_at_random()
            viewer.refresh()
            if move % 100 == 0:
                viewer.screenshot()
            used = sum(layer.pool.memory_usage for layer in viewer.layers)
            assert used == memory.used <= memory.limit, (move, used)
            peak_memory = max(peak_memory, used)
            peak_textures = max(peak_textures, textures.scene_bytes + textures.spare_bytes)
            assert textures.scene_bytes + textures.spare_bytes <= textures.nbytes, move
        print(
            f"\n{MOVES} moves: peak pool memory {peak_memory / 2**20:.2f} of "
            f"{memory.limit / 2**20:.0f} MiB; peak textures {peak_textures / 2**20:.2f} of "
            f"{textures.nbytes / 2**20:.0f} MiB; budget releases "
            f"{sum(layer.pool.stats.budget_releases for layer in viewer.layers)}"
        )
        # and the view is still right: level 0 of z=1 at 1:1, image a alone
        viewer.set_index("z", 1)
        for layer in viewer.layers[1:]:
            layer.visible = False
        viewer.show_region(100, 50, 100 + SIZE[0], 50 + SIZE[1])
        shot = settle(viewer, timeout=60)
        assert (shot[..., 0] == stack[1, 50 : 50 + SIZE[1], 100 : 100 + SIZE[0]]).all()
    finally:
        viewer.close()


def test_a_chunk_the_budget_releases_is_asked_for_again(tmp_path: pathlib.Path) -> None:
    """Two images under one budget that holds one view's worth: showing the second
    image's tiles (more urgent: visible) releases the first's prefetch; once the
    second layer is hidden again the first one's view loads back in full."""
    pa = write_pyramid(
        tmp_path / "a.ome.zarr", noise_image((512, 512), seed=4), chunks=(32, 32), n_levels=1
    )
    pb = write_pyramid(
        tmp_path / "b.ome.zarr", noise_image((512, 512), seed=5), chunks=(32, 32), n_levels=1
    )
    budget = MemoryBudget(50 * (32 * 32 * 1 + 1024))  # 50 uint8 chunks, overhead included
    viewer = Viewer(
        str(pa.path),
        None,
        size=(128, 128),
        colormap="gray",
        clim=(0, 255),
        show_hud=False,
        memory_budget=budget,
    )
    try:
        viewer.show_region(128, 128, 256, 256)  # 16 visible + a ring of 20 prefetch
        settle(viewer)
        viewer.add_image(str(pb.path), colormap="gray", clim=(0, 255))
        settle(viewer)
        assert budget.used <= budget.limit
        assert all(layer.status().loaded == 16 for layer in viewer.layers)
        first = viewer.layers[0]
        assert first.pool.stats.budget_releases > 0  # its prefetch gave way
        held = len(list(first.tiles.tiles()))
        assert sum(t.plane is not None for t in first.tiles.tiles()) < held
        viewer.remove_layer(viewer.layers[1])
        deadline = time.monotonic() + 60
        while sum(t.plane is not None for t in first.tiles.tiles()) < held:
            assert time.monotonic() < deadline, "the released prefetch did not load again"
            viewer.refresh()
            threading.Event().wait(0.01)
        shot = settle(viewer)
        assert budget.used <= budget.limit
        assert (shot[..., 0] == noise_image((512, 512), seed=4)[128:256, 128:256]).all()
    finally:
        viewer.close()


def test_a_tile_set_hears_of_a_release_it_was_never_told_about(tmp_path: pathlib.Path) -> None:
    """A chunk that loads and is released by the budget before its load was delivered
    gets no handler call at all (the queue drops calls about chunks nobody heard of):
    the tile set still sees it gone at its next update, and asks for it again."""
    p = write_pyramid(
        tmp_path / "a.ome.zarr", noise_image((512, 512), seed=6), chunks=(32, 32), n_levels=1
    )
    pool = ChunkPool.from_zarr_node(str(p.path), memory_budget=40 * (32 * 32 + 1024))[0]
    pool.enable_polled_load_handlers(lambda: None)
    tiles = TileSet(pool, [(0, True)])
    other = ChunkManager(pool)
    try:
        view = View(127.5, 127.5, 255.5, 255.5, 128, 128)  # 16 visible + 20 prefetch
        tiles.update(view)
        pool.wait_for_chunks_to_load(timeout=60)  # loaded; the load calls not yet run
        assert pool.stats.loads == 36
        # a more urgent user takes room: some of the tile set's prefetch is released
        for i in range(8):
            other.get_chunk(0, (15, i), priority=-1.0)
        pool.wait_for_chunks_to_load(timeout=60)
        assert pool.stats.budget_releases > 0
        other.drop_chunks(other.held_chunks())
        pool.run_pending_handlers()
        tiles.update(view)  # the same view: only the check sees what went
        deadline = time.monotonic() + 60
        while pool.run_pending_handlers() or sum(t.plane is not None for t in tiles.tiles()) < 36:
            assert time.monotonic() < deadline, "released tiles were not asked for again"
            tiles.update(view)
            threading.Event().wait(0.01)
    finally:
        tiles.close()
        pool.destroy()
