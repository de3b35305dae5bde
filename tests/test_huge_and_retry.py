"""Huge images and failed tiles, rendered: no hang, a clear word, and recovery.

- A 2^40 x 2^40 array (no pyramid) and a pyramid whose coarsest level is 2^30 wide: zarr
  writes nothing for absent chunks, so they cost a few written chunks. Seen whole, far
  more tiles are in view than the screen can use: the view loads nothing, is settled at
  once and says "zoom in"; the CLI returns at once with that message. Zoomed in, the
  written chunks show exactly, even 2^39 pixels from the origin (float32 on the GPU).
- A failed tile, resident (the coarsest level) or in view, is tried again with backoff
  until it loads: hatched meanwhile, the ground truth after the fault is gone. The
  backoff runs on a fake clock, so nothing waits for real time; what the tests wait for
  (reads, loads) they wait on with a generous deadline.
"""

from __future__ import annotations

import pathlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image
from support.images import Pyramid, expected_view, halve, noise_image, write_pyramid
from support.teststores import GatedStore
from test_render import GRAY, SIZE, assert_view, grey, run_cli, settle
from zarr.storage import LocalStore

from chunkpool import ChunkLoadError, ChunkPool
from viewer import TileSet, Viewer
from viewer.tiling import RetrySchedule, View

pytestmark = pytest.mark.render

ARTIFACTS = pathlib.Path(__file__).parent / "_artifacts"
HUGE = 1 << 40
#: How long a test waits for something that should happen at once (loaded machines).
DEADLINE = 60.0


def save(name: str, image: np.ndarray) -> None:
    """Keep a screenshot under tests/_artifacts/ to look at."""
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(image).save(ARTIFACTS / name)


def wait_for(viewer: Viewer, condition: Callable[[], bool], what: str) -> None:
    """Run the viewer's pending handlers until ``condition`` holds; fail after DEADLINE."""
    deadline = time.monotonic() + DEADLINE
    pause = threading.Event()
    while not (viewer.refresh() and viewer.settled() and condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {DEADLINE:g} s ({viewer.layer.status()})")
        pause.wait(0.01)


class FakeClock:
    """Seconds that pass only when a test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# -- huge images ------------------------------------------------------------------------


@dataclass
class Sparse:
    """A huge image with a few chunks written: its path, and a small window of each
    level around the written blocks as a :class:`Pyramid` (world placement included),
    for :func:`expected_view`."""

    path: pathlib.Path
    windows: dict[str, Pyramid]


def write_sparse(
    path: pathlib.Path, level0_shape: int, n_levels: int, blocks: dict[str, tuple[int, int]]
) -> Sparse:
    """An OME-Zarr 0.5 block-mean pyramid of ``n_levels`` levels, level 0 ``level0_shape``
    pixels square (a plain array when ``n_levels`` is 1), 256² chunks, zero elsewhere;
    at each named (row, column) of level 0, a 1024² block of noise and its halvings."""
    chunk = 256
    group = zarr.open_group(path, mode="w", zarr_format=3)
    arrays = [
        group.create_array(
            str(lv),
            shape=(level0_shape >> lv,) * 2,
            chunks=(chunk, chunk),
            dtype="uint8",
            fill_value=0,
            dimension_names=["y", "x"],
        )
        for lv in range(n_levels)
    ]
    windows = {}
    for seed, (name, (row, col)) in enumerate(blocks.items()):
        block = noise_image((1024, 1024), seed=seed)
        crops, offsets = [], []
        for lv, arr in enumerate(arrays):
            r, c = row >> lv, col >> lv
            arr[r : r + block.shape[0], c : c + block.shape[1]] = block
            crops.append(block)
            shift = (2**lv - 1) / 2
            offsets.append((shift + r * 2**lv, shift + c * 2**lv))
            block = halve(block)
        scales = [(2.0**lv, 2.0**lv) for lv in range(n_levels)]
        windows[name] = Pyramid(path, crops, scales, offsets, (chunk, chunk))
    group.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": "y", "type": "space"}, {"name": "x", "type": "space"}],
                "datasets": [
                    {
                        "path": str(lv),
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [2.0**lv] * 2},
                            {"type": "translation", "translation": [(2**lv - 1) / 2] * 2},
                        ],
                    }
                    for lv in range(n_levels)
                ],
            }
        ],
    }
    return Sparse(path, windows)


@pytest.fixture(scope="module")
def huge_array(tmp_path_factory: pytest.TempPathFactory) -> Sparse:
    """2^40 x 2^40 pixels, one level: noise at the origin and at (2^39, 2^39)."""
    root = tmp_path_factory.mktemp("huge")
    return write_sparse(
        root / "huge.ome.zarr", HUGE, 1, {"origin": (0, 0), "far": (HUGE // 2, HUGE // 2)}
    )


@pytest.fixture(scope="module")
def deep_pyramid(tmp_path_factory: pytest.TempPathFactory) -> Sparse:
    """Three levels, 2^32 to 2^30 pixels wide: noise at the origin and far out."""
    root = tmp_path_factory.mktemp("deep")
    far = (3 << 30, 5 << 29)
    return write_sparse(root / "deep.ome.zarr", 1 << 32, 3, {"origin": (0, 0), "far": far})


def test_cli_screenshot_of_a_2_40_image_seen_whole_returns_at_once(
    huge_array: Sparse, tmp_path: pathlib.Path
) -> None:
    """``zarrscope HUGE --screenshot out.png --timeout 5``: about 2^64 tiles in view. It
    returns at once with one line saying there are too many tiles to show and to zoom
    in, status 1, and writes nothing. With a --region of the far block it writes that
    block's pixels exactly."""
    out = tmp_path / "out.png"
    result = run_cli(str(huge_array.path), "--screenshot", str(out), "--timeout", "5", timeout=90)
    # (the graphics stack may add its own warnings: only the CLI's lines count)
    lines = [line for line in result.stderr.splitlines() if line.startswith("zarrscope")]
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert len(lines) == 1 and lines[0].startswith("zarrscope: error: nothing to show"), lines
    assert f"{(HUGE // 256) ** 2} tiles" in lines[0] and "--region" in lines[0]
    assert not out.exists()
    row = col = HUGE // 2 - 100
    region = (col, row, col + 480, row + 320)  # 2 level-0 pixels per screen pixel
    result = run_cli(
        str(huge_array.path),
        *("--screenshot", str(out), "--size", *map(str, SIZE), "--timeout", "30"),
        *("--region", *map(str, region), "--colormap", "gray", "--clim", "0", "255"),
        timeout=90,
    )
    assert result.returncode == 0, result.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    save("huge_2_40_far_region.png", image)
    world = (col - 0.5, row - 0.5, col + 479.5, row + 319.5)
    assert_view(grey(image), expected_view(huge_array.windows["far"], 0, world, SIZE))
    assert (grey(image)[:50, :50] == 0).all() and (grey(image)[50:, 50:] > 0).all()


@pytest.fixture
def deep_viewer(deep_pyramid: Sparse) -> Iterator[Viewer]:
    viewer = Viewer(str(deep_pyramid.path), None, size=SIZE, **GRAY)
    yield viewer
    viewer.close()


def test_a_pyramid_whose_coarsest_level_is_2_30_wide(
    deep_pyramid: Sparse, deep_viewer: Viewer
) -> None:
    """Seen whole: settled at once with nothing loaded or held, the HUD says how many
    tiles are in view and to zoom in, the screen is black. Zoomed in: exact pixels of
    the level chosen, near the origin and 2^31 pixels out; zoomed out again: nothing
    held any more."""
    viewer = deep_viewer
    viewer.fit()
    assert viewer.wait_settled(DEADLINE)
    status = viewer.layer.status()
    coarsest_tiles = ((1 << 30) // 256) ** 2
    assert status.level == 2 and status.settled and status.loaded == status.pending == 0
    assert coarsest_tiles * 9 // 16 <= status.overflow <= coarsest_tiles
    assert viewer.layer.tiles.held_chunks() == []
    hud = viewer.hud_lines()
    assert hud[1] == f"zoom in: {status.overflow:.2g} tiles in view at the coarsest level"
    shot = viewer.screenshot()
    save("deep_fit.png", shot)
    assert (shot == 0).all()
    for name, zoom, level in [("origin", 1, 0), ("far", 2, 1), ("far", 4, 2), ("origin", 4, 2)]:
        window = deep_pyramid.windows[name]
        (oy, ox) = window.offsets[0]
        x0, y0 = ox - 100.5, oy - 60.5  # the block's corner on screen, at (100, 60) / zoom
        world = (x0, y0, x0 + SIZE[0] * zoom, y0 + SIZE[1] * zoom)
        viewer.show_world(*world)
        got = grey(settle(viewer, DEADLINE))
        save(f"deep_{name}_zoom{zoom}.png", np.repeat(got[..., None].astype(np.uint8), 3, -1))
        assert viewer.layer.target_level == level
        assert_view(got, expected_view(window, level, world, SIZE), what=f"{name} at {zoom}x")
        assert got[int(70 / zoom), int(110 / zoom)] > 0  # data, not the background
        assert len(viewer.layer.tiles.held_chunks()) < 100
    viewer.fit()
    assert viewer.wait_settled(DEADLINE) and viewer.layer.status().overflow
    assert viewer.layer.tiles.held_chunks() == []


# -- failed tiles are tried again --------------------------------------------------------


@pytest.fixture(scope="module")
def pyramid_32(tmp_path_factory: pytest.TempPathFactory) -> Pyramid:
    """1024² noise, 32² chunks, 3 levels: the coarsest is 8 x 8 tiles, all resident."""
    root = tmp_path_factory.mktemp("p32")
    return write_pyramid(
        root / "noise.ome.zarr", noise_image((1024, 1024), seed=7), chunks=(32, 32), n_levels=3
    )


@pytest.fixture
def gated_viewer(pyramid_32: Pyramid) -> Iterator[tuple[Viewer, Any, FakeClock]]:
    """A gray viewer of ``pyramid_32`` through a GatedStore (its recorder), its failed
    tiles retried on a fake clock (1 s, doubling, capped at 30 s)."""
    group = zarr.open_group(GatedStore(LocalStore(pyramid_32.path)), mode="r")
    rec = group.store.rec
    # the chunk the first test fails, failing from the start: the viewer asks for the
    # coarsest level as it opens
    rec.fail_keys.add("2/c/0/0")
    viewer = Viewer(group, None, size=SIZE, **GRAY)
    clock = FakeClock()
    viewer.layer.tiles.retry = RetrySchedule(first=1.0, factor=2.0, cap=30.0, clock=clock)
    yield viewer, rec, clock
    rec.open_gate()
    viewer.close()


def view_world(viewer: Viewer) -> tuple[float, float, float, float]:
    view = viewer.view()
    return (view.x0, view.y0, view.x1, view.y1)


def screen_slice(lo: float, hi: float, edge: float, per_px: float) -> slice:
    """The screen pixels wholly inside world ``[lo, hi]`` along one axis, for a view
    whose edge is at ``edge`` with ``per_px`` world units per screen pixel."""
    return slice(int(np.ceil((lo - edge) / per_px)), int(np.floor((hi - edge) / per_px)))


def assert_hatched(shot: np.ndarray, where: tuple[slice, slice]) -> None:
    """The failed tile's hatch: tinted red all over, never black."""
    tile = shot[where].astype(int)
    assert (tile[..., 0] > tile[..., 1]).all(), "the hatch tints the tile red"
    assert not (tile == 0).all(axis=-1).any()


def test_a_failed_resident_tile_is_retried_with_backoff_until_it_loads(
    pyramid_32: Pyramid, gated_viewer: tuple[Viewer, Any, FakeClock]
) -> None:
    """A chunk of the always-resident coarsest level fails. It stays hatched while it
    keeps failing, through moves and fits; it is read again only when its backoff
    (1 s, then 2 s) has passed, and a try in flight keeps the hatch. Once the fault is
    gone, the next try loads it and the fitted view is the ground truth, hatch gone."""
    viewer, rec, clock = gated_viewer
    key, chunk = "2/c/0/0", (2, (0, 0))  # level 2, rows and columns 0-31 (level-0 0-127)
    rec.fail_keys.add(key)
    viewer.fit()
    shot = settle(viewer)
    world = view_world(viewer)
    assert viewer.layer.target_level == 2 and viewer.layer.status().failed == 1
    # the tile is level-0 pixels 0-127 (world -0.5 to 127.5): 6.4 per screen pixel
    per_px = (world[2] - world[0]) / SIZE[0]
    assert per_px == pytest.approx(6.4)
    tile = (
        screen_slice(-0.5, 127.5, world[1], per_px),
        screen_slice(-0.5, 127.5, world[0], per_px),
    )
    save("retry_hatched.png", shot)
    assert_hatched(shot, tile)
    outside = np.ones(SIZE[::-1], bool)
    outside[tile] = False
    assert (shot[outside] == shot[outside][:, :1]).all(), "grey outside the failed tile"
    expected = expected_view(pyramid_32, 2, world, SIZE)
    assert_view(shot[..., 0].astype(int), expected, what="other tiles", where=outside)
    assert rec.started.count(key) == 1
    # move in to level 0 elsewhere and back: the resident tile is held, not re-read
    viewer.show_region(600, 600, 840, 760)
    settle(viewer)
    viewer.fit()
    settle(viewer)
    # prefetch loads still in flight would be counted below: let them land first
    wait_for(viewer, lambda: viewer.pool.stats.chunks_pending == 0, "the prefetch")
    misses = viewer.pool.stats.misses
    clock.now += 0.999  # not yet due: no new load
    assert viewer.refresh() and viewer.settled() and viewer.pool.stats.misses == misses
    clock.now += 0.001  # due: one try, which fails again
    assert viewer.refresh() and viewer.settled()
    wait_for(viewer, lambda: viewer.layer.tiles.retry.failures(chunk) == 2, "the second failure")
    assert rec.started.count(key) == 2
    assert_hatched(viewer.screenshot(), tile)
    # the fault goes; the next try (2 s later) is held at the gate: still hatched
    rec.fail_keys.clear()
    rec.hold()
    clock.now += 1.999
    assert viewer.refresh() and viewer.settled() and viewer.pool.stats.misses == misses + 1
    clock.now += 0.001
    wait_for(viewer, lambda: rec.started.count(key) == 3, "the third read")
    status = viewer.layer.status()
    assert status.failed == 1 and status.settled, "a retrying tile counts as failed"
    assert_hatched(viewer.screenshot(), tile)
    rec.open_gate()
    wait_for(viewer, lambda: viewer.layer.status().failed == 0, "the recovered tile")
    shot = viewer.screenshot()
    save("retry_recovered.png", shot)
    assert_view(grey(shot), expected_view(pyramid_32, 2, world, SIZE), what="recovered view")
    assert rec.started.count(key) == 3 and len(viewer.layer.tiles.retry) == 0


def test_a_failed_tile_in_view_is_retried_without_moving(
    pyramid_32: Pyramid, gated_viewer: tuple[Viewer, Any, FakeClock]
) -> None:
    """A level-0 tile in a view that does not move: hatched, then, the fault gone and
    its backoff passed, exactly the data."""
    viewer, rec, clock = gated_viewer
    key = "0/c/10/10"  # rows and columns 320-351
    rec.fail_keys.add(key)
    region = (300, 300, 540, 460)
    viewer.show_region(*region)
    shot = settle(viewer)
    assert viewer.layer.status().failed == 1
    assert_hatched(shot, (slice(21, 51), slice(21, 51)))
    rec.fail_keys.clear()
    clock.now += 1.0
    wait_for(viewer, lambda: viewer.layer.status().failed == 0, "the recovered tile")
    world = (299.5, 299.5, 539.5, 459.5)
    assert_view(grey(viewer.screenshot()), expected_view(pyramid_32, 0, world, SIZE))
    assert rec.started.count(key) == 2


def test_a_failure_asks_for_a_frame_when_its_retry_is_due(pyramid_32: Pyramid) -> None:
    """In a window nothing draws unless asked: a failure schedules, with the canvas
    loop's ``call_later``, the frame that tries again, after the backoff delay."""
    group = zarr.open_group(GatedStore(LocalStore(pyramid_32.path)), mode="r")
    group.store.rec.fail_keys.add("2/c/3/3")
    pool = ChunkPool.from_zarr_node(group)[0]
    later: list[tuple[float, Callable[[], None]]] = []
    draws: list[int] = []
    layer = TileSet(
        pool,
        [(0, True)],
        request_draw=lambda: draws.append(1),
        call_later=lambda delay, callback: later.append((delay, callback)),
    )
    try:
        clock = FakeClock()
        layer.retry = RetrySchedule(first=1.0, clock=clock)
        view = View(-0.5, -0.5, 1023.5, 1023.5, 160, 160)  # level 2, all 64 tiles
        layer.update(view)
        with pytest.raises(ChunkLoadError):  # it runs the load handlers, here
            pool.wait_for_chunks_to_load(timeout=DEADLINE)
        assert layer.status().failed == 1
        assert [delay for delay, _ in later] == [1.0]
        group.store.rec.fail_keys.clear()
        clock.now += 1.0
        drawn = len(draws)
        later[0][1]()  # the loop calls it back: a frame is asked for...
        assert len(draws) == drawn + 1
        layer.update(view)  # ... whose update tries again
        pool.wait_for_chunks_to_load(timeout=DEADLINE)
        status = layer.status()
        assert (status.loaded, status.failed) == (64, 0)
        assert len(later) == 1
    finally:
        layer.close()
        pool.destroy()


def test_a_failed_contrast_sample_opens_the_viewer_with_its_tile_hatched(
    pyramid_32: Pyramid,
) -> None:
    """The coarsest level's centre chunk, one of those start-up samples for contrast
    windows, fails: the viewer opens all the same, that tile hatched, the rest drawn."""
    store = GatedStore(LocalStore(pyramid_32.path))
    store.rec.fail_keys.add("2/c/4/4")  # the coarsest level is 8 x 8 tiles
    with Viewer(zarr.open_group(store, mode="r"), None, size=SIZE, colormap="gray") as viewer:
        viewer.fit()
        settle(viewer)
        status = viewer.layer.status()
        assert status.level == 2 and status.failed == 1 and status.loaded == 63
        assert store.rec.started.count("2/c/4/4") >= 1
