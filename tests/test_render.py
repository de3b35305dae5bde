"""Rendered pixels against numpy ground truth: the viewer offscreen, on a real GPU stack.

Every test here renders with wgpu/pygfx (lavapipe on CI machines) through the public
API: ``Viewer(source, None, size=...)``, ``show_region`` / ``show_world``,
``wait_settled``, ``screenshot``. Test images are small OME-Zarr pyramids written by
:mod:`support.images`, whose levels are exact 2x2 block means; the ground truth of a
view is nearest sampling of the level the viewer chose at the screen pixel centres
(where a centre lies exactly on a texel edge, either neighbour is accepted).
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image
from support.images import (
    Pyramid,
    border_lines,
    expected_view,
    noise_image,
    region_world,
    write_pyramid,
)
from support.teststores import AsyncGatedStore, GatedStore
from zarr.storage import LocalStore

from viewer import Viewer

ROOT = pathlib.Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.render

#: Canvas size (W, H) of most tests: not square, so a swap of x and y shows.
SIZE = (240, 160)
GRAY: dict[str, Any] = {"colormap": "gray", "clim": (0, 255), "show_hud": False}


# -- helpers --------------------------------------------------------------------------


def settle(viewer: Viewer, timeout: float = 30.0) -> np.ndarray:
    """Wait until the view has loaded, then render it; the (H, W, 3) screenshot."""
    assert viewer.wait_settled(timeout), f"the view did not settle: {viewer.layer.status()}"
    return viewer.screenshot()


def grey(image: np.ndarray) -> np.ndarray:
    """The grey levels of a screenshot of gray-colormap data (R == G == B asserted)."""
    assert (image[..., 0] == image[..., 1]).all() and (image[..., 1] == image[..., 2]).all()
    return image[..., 0].astype(np.int64)


def mismatches(got: np.ndarray, candidates: np.ndarray, tolerance: int = 0) -> np.ndarray:
    """Mask of the pixels of ``got`` farther than ``tolerance`` from every candidate."""
    return ~(np.abs(candidates - got[None]) <= tolerance).any(axis=0)


def assert_view(
    got: np.ndarray,
    candidates: np.ndarray,
    tolerance: int = 0,
    what: str = "view",
    where: np.ndarray | None = None,
) -> None:
    """``got`` (H, W) matches the candidates of :func:`expected_view`, pixel by pixel
    (only ``where`` that mask is true, if given)."""
    bad = mismatches(got, candidates, tolerance)
    if where is not None:
        bad &= where
    if bad.any():
        rows, cols = np.nonzero(bad)
        sample = [
            f"(row {r}, col {c}): got {got[r, c]}, expected one of "
            + str(sorted({int(v) for v in candidates[:, r, c]}))
            for r, c in list(zip(rows, cols, strict=True))[:5]
        ]
        pytest.fail(
            f"{what}: {bad.sum()} of {bad.size} pixels wrong, in rows {rows.min()}..{rows.max()}"
            f", columns {cols.min()}..{cols.max()}; e.g. " + "; ".join(sample)
        )


def aligned_region(
    x0: float, y0: float, zoom: float, size: tuple[int, int] = SIZE
) -> tuple[float, float, float, float]:
    """The level-0 region from (x0, y0) that fills a canvas of ``size`` at ``zoom``
    level-0 pixels per screen pixel."""
    width, height = size
    return (x0, y0, x0 + width * zoom, y0 + height * zoom)


def centred_region(
    cx: float, cy: float, zoom: float, size: tuple[int, int] = SIZE
) -> tuple[float, float, float, float]:
    """The level-0 region centred on (cx, cy) that fills ``size`` at ``zoom``."""
    width, height = size
    return aligned_region(cx - width * zoom / 2, cy - height * zoom / 2, zoom, size)


def matched_level(zoom: float, n_levels: int) -> int:
    """The level a block-mean pyramid shows at ``zoom``: the coarsest whose pixels are no
    larger than a screen pixel."""
    level = 0
    while level + 1 < n_levels and 2 ** (level + 1) <= zoom * (1 + 1e-9):
        level += 1
    return level


#: Seconds after which a gated store lets every read through, whatever the test does.
WATCHDOG_SECONDS = 30.0


@pytest.fixture
def gated() -> Iterator[Callable[..., zarr.Group]]:
    """``gated(pyramid, store_class)``: the pyramid's group opened through a store that
    can hold back or fail reads (``group.store.rec``).

    A watchdog opens every gate after WATCHDOG_SECONDS, so that code waiting for held
    reads (a frame that should not) fails the test instead of hanging it; and every
    gate is opened at the end (closing a viewer joins its threads)."""
    recorders: list[Any] = []
    watchdog = threading.Timer(WATCHDOG_SECONDS, lambda: [r.open_gate() for r in recorders])
    watchdog.start()

    def open_gated(pyramid: Pyramid, store_class: type = GatedStore) -> zarr.Group:
        group = zarr.open_group(store_class(LocalStore(pyramid.path)), mode="r")
        recorders.append(group.store.rec)
        return group

    yield open_gated
    fired = not watchdog.is_alive()
    watchdog.cancel()
    for rec in recorders:
        rec.open_gate()
    assert not fired, "the watchdog had to open the gates: something waited for held reads"


def hold_again(rec: Any) -> None:
    """Hold every new chunk read again (after an ``open_gate``, whose spare permits
    would otherwise let reads through)."""
    while rec.gate.acquire(blocking=False):
        pass
    rec.hold()


@pytest.fixture(scope="module")
def make_viewer() -> Iterator[Callable[..., Viewer]]:
    """``make_viewer(source, **options)``: an offscreen viewer, closed at the end of the
    module (each viewer compiles its shaders once: reuse them across checks)."""
    made: list[Viewer] = []

    def make(source: Any, **options: Any) -> Viewer:
        options.setdefault("size", SIZE)
        viewer = Viewer(source, None, **options)
        made.append(viewer)
        return viewer

    yield make
    for viewer in made:
        viewer.close()


# -- gray pyramids: exact pixels -------------------------------------------------------


@pytest.fixture(scope="module", params=["v3", "v2"])
def gray(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    make_viewer: Callable[..., Viewer],
) -> tuple[Pyramid, Viewer]:
    """A uint8 noise pyramid of 4 levels and a gray viewer of it: OME-Zarr 0.5 (2048²,
    128² chunks, pixels of 1 world unit), or OME-Zarr 0.4 (1024², 96² chunks so that
    every level has cropped edge chunks, pixels of 0.5 world units)."""
    root = tmp_path_factory.mktemp("gray")
    if request.param == "v3":
        pyramid = write_pyramid(
            root / "noise.ome.zarr", noise_image((2048, 2048)), chunks=(128, 128), n_levels=4
        )
    else:
        pyramid = write_pyramid(
            root / "noise.ome.zarr",
            noise_image((1024, 1024), seed=1),
            chunks=(96, 96),
            n_levels=4,
            zarr_format=2,
            pixel_size=0.5,
        )
    return pyramid, make_viewer(str(pyramid.path), **GRAY)


@pytest.mark.parametrize("level", range(4))
def test_matched_zoom_is_exact(gray: tuple[Pyramid, Viewer], level: int) -> None:
    """At 2**L level-0 pixels per screen pixel (1:1 for L = 0), with screen pixels on
    texels, the screenshot is exactly level L (regions straddle chunk borders; the
    coarse ones run off the image, where the background is black)."""
    pyramid, viewer = gray
    zoom = 2**level
    chunk = pyramid.chunks[0] * zoom  # a chunk border of level L, in level-0 pixels
    region = aligned_region(chunk - (SIZE[0] // 3) * zoom, chunk - (SIZE[1] // 3) * zoom, zoom)
    viewer.show_region(*region)
    got = grey(settle(viewer))
    assert viewer.layer.target_level == level
    expected = expected_view(pyramid, level, region_world(pyramid, region), SIZE)
    assert (expected == expected[0]).all(), "test set-up: screen pixels must not tie"
    assert_view(got, expected, what=f"level {level} at {zoom}x")


def test_image_corners_and_background_are_exact(gray: tuple[Pyramid, Viewer]) -> None:
    """1:1 views over each corner of the image: the data stops at its last pixel and
    the rest is black background."""
    pyramid, viewer = gray
    side = pyramid.levels[0].shape[0]
    width, height = SIZE
    for x0 in (-width // 2, side - width // 2):
        for y0 in (-height // 2, side - height // 2):
            region = aligned_region(x0, y0, 1)
            viewer.show_region(*region)
            got = grey(settle(viewer))
            expected = expected_view(pyramid, 0, region_world(pyramid, region), SIZE)
            assert_view(got, expected, what=f"corner view {region}")
            assert (expected[0] == 0).sum() > SIZE[0] * SIZE[1] // 2  # mostly background


def test_a_view_with_nothing_in_it_is_black(gray: tuple[Pyramid, Viewer]) -> None:
    """Panned off the image, or with its only channel hidden, the canvas is black: not
    the previous frame (pygfx clears only when it draws something)."""
    pyramid, viewer = gray
    side = pyramid.levels[0].shape[0]
    viewer.show_region(*aligned_region(0, 0, 1))
    assert grey(settle(viewer)).all()
    viewer.show_region(*aligned_region(side + 100, side + 100, 1))
    assert not settle(viewer).any(), "off the image"
    viewer.show_region(*aligned_region(0, 0, 1))
    assert grey(settle(viewer)).all()
    viewer.toggle_channel(0)
    try:
        assert not settle(viewer).any(), "the only channel hidden"
    finally:
        viewer.toggle_channel(0)


ODD_ZOOMS = (0.37, 0.81, 1.3, 1.93, 2.5, 3.7, 6.1, 13.0)


def test_non_integer_zooms_sample_the_chosen_level(gray: tuple[Pyramid, Viewer]) -> None:
    """Zoomed in and out by non-integer factors, off the pixel grid: the chosen level is
    the coarsest whose pixels are no larger than a screen pixel, and every screen pixel
    is its nearest texel (exactly; at a texel edge either neighbour)."""
    pyramid, viewer = gray
    side = pyramid.levels[0].shape[0]
    for zoom in ODD_ZOOMS:
        region = centred_region(0.53 * side + 0.37, 0.41 * side + 0.71, zoom)
        viewer.show_region(*region)
        got = grey(settle(viewer))
        level = viewer.layer.target_level
        assert level == matched_level(zoom, len(pyramid.levels)), f"zoom {zoom}"
        expected = expected_view(pyramid, level, region_world(pyramid, region), SIZE)
        assert_view(got, expected, what=f"zoom {zoom} (level {level})")


def test_finer_tiles_fetched_ahead_are_not_shown(gray: tuple[Pyramid, Viewer]) -> None:
    """Right after zooming in, the next finer level is prefetched around the focus;
    zooming straight back out, those tiles (loaded, in view) must not cover the chosen
    level: the screen is exactly the level chosen for the zoom."""
    pyramid, viewer = gray
    viewer.show_region(*aligned_region(256, 256, 2))
    settle(viewer)
    viewer.show_region(*aligned_region(256, 256, 1))  # zoom in: level 0 is the target
    settle(viewer)
    region = aligned_region(192, 192, 2)  # and out again, within the prefetch window
    viewer.show_region(*region)
    got = grey(settle(viewer))
    assert viewer.layer.target_level == 1
    expected = expected_view(pyramid, 1, region_world(pyramid, region), SIZE)
    assert_view(got, expected, what="zoomed back out to level 1")


def test_fit_shows_the_whole_image(gray: tuple[Pyramid, Viewer]) -> None:
    """``fit()``: the whole image, centred, with square pixels, at a non-integer zoom."""
    pyramid, viewer = gray
    viewer.fit()
    got = grey(settle(viewer))
    view = viewer.view()
    world = (view.x0, view.y0, view.x1, view.y1)
    assert (view.x1 - view.x0) / SIZE[0] == pytest.approx((view.y1 - view.y0) / SIZE[1])
    level = viewer.layer.target_level
    assert_view(got, expected_view(pyramid, level, world, SIZE), what="fit")
    columns = np.nonzero(got.any(axis=0))[0]
    assert got.any(axis=1).all(), "the image fills the canvas's height"
    assert abs(columns[0] - (SIZE[0] - 1 - columns[-1])) <= 1, "centred horizontally"


@pytest.mark.parametrize("factor", [1.0, 1.37, 0.43])
@pytest.mark.parametrize("level", range(4))
def test_no_seams_at_chunk_borders(gray: tuple[Pyramid, Viewer], level: int, factor: float) -> None:
    """Around a chunk corner of level L, at L's matched zoom and at odd zooms (sub-pixel
    offsets): the screen rows and columns on both sides of every chunk border of the
    shown level hold the right texels: no 1-px line of wrong or black values."""
    pyramid, viewer = gray
    zoom = 2**level * factor
    corner = pyramid.chunks[0] * 2**level
    region = centred_region(corner + 0.29, corner + 0.61, zoom)
    viewer.show_region(*region)
    got = grey(settle(viewer))
    shown = viewer.layer.target_level
    world = region_world(pyramid, region)
    rows, cols = border_lines(pyramid, shown, world, SIZE)
    assert rows and cols, "the view must contain chunk borders"
    expected = expected_view(pyramid, shown, world, SIZE)
    assert_view(got[rows], expected[:, rows], what=f"rows at chunk borders {rows}")
    assert_view(got[:, cols], expected[:, :, cols], what=f"columns at chunk borders {cols}")
    assert_view(got, expected, what=f"level {shown} at zoom {zoom}")


# -- OME translations -----------------------------------------------------------------


@pytest.fixture(scope="module")
def translated(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Pyramid]:
    """The same 512² noise pyramid (3 levels, 128² chunks) untranslated, and moved by
    (y 32, x 64) world units through every level's own translation ("levels"), through
    a multiscale-level transformation ("multiscale"), or moved by (0, 64) only from
    level 1 on ("coarse")."""
    root = tmp_path_factory.mktemp("translated")
    data = noise_image((512, 512), seed=2)
    common: dict[str, Any] = {"chunks": (128, 128), "n_levels": 3}
    return {
        "plain": write_pyramid(root / "plain.ome.zarr", data, **common),
        "levels": write_pyramid(
            root / "levels.ome.zarr", data, level_translations=[(32, 64)] * 3, **common
        ),
        "multiscale": write_pyramid(
            root / "multiscale.ome.zarr", data, multiscale_translation=(32, 64), **common
        ),
        "coarse": write_pyramid(
            root / "coarse.ome.zarr",
            data,
            level_translations=[(0, 0), (0, 64), (0, 64)],
            zarr_format=2,
            **common,
        ),
    }


def world_view(viewer: Viewer, zoom: int) -> np.ndarray:
    """Grey screenshot of the world rectangle from (-0.5, -0.5) (the untranslated
    image's top-left corner) at ``zoom`` world units per screen pixel."""
    width, height = SIZE
    viewer.show_world(-0.5, -0.5, -0.5 + width * zoom, -0.5 + height * zoom)
    return grey(settle(viewer))


@pytest.mark.parametrize("how", ["levels", "multiscale"])
def test_translation_moves_the_image(
    translated: dict[str, Pyramid], make_viewer: Callable[..., Viewer], how: str
) -> None:
    """A translation of (y 32, x 64) world units shows the image 32 rows lower and 64
    columns to the right at 1:1 (16 and 32 at 2x), over black where it has no data."""
    plain = translated["plain"].levels
    viewer = make_viewer(str(translated[how].path), **GRAY)
    for zoom, level in ((1, 0), (2, 1)):
        got = world_view(viewer, zoom)
        assert viewer.layer.target_level == level
        dy, dx = 32 // zoom, 64 // zoom
        height, width = got.shape
        assert (got[:dy] == 0).all() and (got[:, :dx] == 0).all(), "background"
        np.testing.assert_array_equal(got[dy:, dx:], plain[level][: height - dy, : width - dx])


def test_translation_of_coarse_levels_only(
    translated: dict[str, Pyramid], make_viewer: Callable[..., Viewer]
) -> None:
    """Levels 1+ moved by 64 world units in x, level 0 not (OME-Zarr 0.4): each level
    lands where its own metadata says: unmoved at 1:1, 32 screen px right at 2x."""
    plain = translated["plain"].levels
    viewer = make_viewer(str(translated["coarse"].path), **GRAY)
    np.testing.assert_array_equal(world_view(viewer, 1), plain[0][: SIZE[1], : SIZE[0]])
    got = world_view(viewer, 2)
    assert (got[:, :32] == 0).all(), "background left of the moved level 1"
    np.testing.assert_array_equal(got[:, 32:], plain[1][: SIZE[1], : SIZE[0] - 32])


# -- channels ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def channels(tmp_path_factory: pytest.TempPathFactory) -> Pyramid:
    """A (c, y, x) uint8 image of 3 channels, 256² (2 levels, 128² chunks) made of
    uniform quadrants, with OME ``omero`` display metadata: channel 0 red, window
    0-255; channel 1 lime, window 0-128; channel 2 blue but inactive.

    Quadrants (top-left, top-right, bottom-left, bottom-right): channel 0 is 128, 128,
    0, 200; channel 1 is 64, 0, 100, 0; channel 2 is 255 everywhere."""
    data = np.zeros((3, 256, 256), np.uint8)
    data[0, :128] = 128
    data[0, 128:, 128:] = 200
    data[1, :128, :128] = 64
    data[1, 128:, :128] = 100
    data[2] = 255

    def channel(label: str, color: str, end: int, active: bool) -> dict[str, Any]:
        window = {"start": 0, "end": end, "min": 0, "max": 255}
        return {"label": label, "color": color, "window": window, "active": active}

    omero = {
        "channels": [
            channel("red", "FF0000", 255, True),
            channel("lime", "00FF00", 128, True),
            channel("blue", "0000FF", 255, False),
        ]
    }
    root = tmp_path_factory.mktemp("channels")
    return write_pyramid(
        root / "channels.ome.zarr",
        data,
        chunks=(1, 128, 128),
        n_levels=2,
        axes="cyx",
        omero=omero,
    )


def quadrants(image: np.ndarray) -> list[list[int]]:
    """The RGB colour of each quadrant of a 1:1 view of the 256² channel image
    (top-left, top-right, bottom-left, bottom-right), asserting each is uniform."""
    colours = []
    for rows in (slice(0, 128), slice(128, 256)):
        for cols in (slice(0, 128), slice(128, 256)):
            part = image[rows, cols].reshape(-1, 3)
            assert (part == part[0]).all(), "a quadrant is not uniform"
            colours.append(part[0].tolist())
    return colours


def test_channels_add_up_in_their_omero_colours(
    channels: Pyramid, make_viewer: Callable[..., Viewer]
) -> None:
    """By default each active channel is shown in its omero colour through its omero
    window, and the channels add up: red 128 + lime 64/128 = (128, 128, 0); where one
    channel is zero the other's pure colour shows; the inactive blue channel is hidden."""
    viewer = make_viewer(str(channels.path), size=(256, 256), show_hud=False)
    assert [(d.colormap, d.clim, d.visible) for d in viewer.layer.displays] == [
        ("#FF0000", (0.0, 255.0), True),
        ("#00FF00", (0.0, 128.0), True),
        ("#0000FF", (0.0, 255.0), False),
    ]
    viewer.show_region(0, 0, 256, 256)
    got = quadrants(settle(viewer))
    lime_100 = round(100 / 128 * 255)
    assert got[0] == [128, 128, 0]
    assert got[1] == [128, 0, 0]
    assert got[2][0] == 0 and abs(got[2][1] - lime_100) <= 1 and got[2][2] == 0
    assert got[3] == [200, 0, 0]


def test_channel_selection(channels: Pyramid, make_viewer: Callable[..., Viewer]) -> None:
    """``channels=[1]`` shows channel 1 alone; toggling channels (as keys 1-9 do) shows
    the others, even the one omero marks inactive: red and blue add up to magenta."""
    viewer = make_viewer(str(channels.path), size=(256, 256), show_hud=False, channels=[1])
    viewer.show_region(0, 0, 256, 256)
    got = quadrants(settle(viewer))
    assert got[0] == [0, 128, 0] and got[1] == [0, 0, 0] and got[3] == [0, 0, 0]
    viewer.toggle_channel(1)
    viewer.toggle_channel(0)
    viewer.toggle_channel(2)
    got = quadrants(settle(viewer))
    assert got == [[128, 0, 255], [128, 0, 255], [0, 0, 255], [200, 0, 255]]


# -- coarse fallback while loading ------------------------------------------------------


@pytest.fixture(scope="module")
def pyramid_1k(tmp_path_factory: pytest.TempPathFactory) -> Pyramid:
    """1024² uint8 noise, 128² chunks, 4 levels (the coarsest is a single chunk)."""
    root = tmp_path_factory.mktemp("p1k")
    return write_pyramid(
        root / "noise.ome.zarr", noise_image((1024, 1024), seed=3), chunks=(128, 128), n_levels=4
    )


def test_coarser_levels_stand_in_while_tiles_load(
    pyramid_1k: Pyramid,
    make_viewer: Callable[..., Viewer],
    gated: Callable[..., zarr.Group],
) -> None:
    """While the reads of the view's tiles are held back, the screen is never black:
    after a jump it shows the coarsest level scaled up; after a zoom out or in, the
    tiles of the previous level stay until the new ones arrive. Once they have, it is
    exactly the new level. (No chunk cache: every new tile needs a read.)"""
    group = gated(pyramid_1k)
    rec = group.store.rec
    viewer = make_viewer(group, cache_bytes=0, **GRAY)
    coarsest = len(pyramid_1k.levels) - 1

    def check(region: Sequence[float], *levels: int) -> None:
        """Every screen pixel shows its nearest texel in one of ``levels``, and there
        is no black where the image has data."""
        got = grey(viewer.screenshot())
        world = region_world(pyramid_1k, region)
        candidates = np.concatenate([expected_view(pyramid_1k, L, world, SIZE) for L in levels])
        assert_view(got, candidates, what=f"{region} showing levels {levels}")
        inside = expected_view(pyramid_1k, 0, world, SIZE)[0] > 0  # noise is never 0
        assert got[inside].all(), "black where the image has data"

    def move_while_held(region: Sequence[float], level: int) -> None:
        """Show ``region`` (of ``level``) while every read waits at the gate."""
        hold_again(rec)
        before = len(rec.started)
        viewer.show_region(*region)
        viewer.refresh()
        assert not viewer.settled()
        assert viewer.layer.target_level == level
        assert viewer.layer.status().loaded == 0
        new_reads = rec.wait_started(before + 1)[before:]
        assert all(key.startswith(f"{level}/") for key in new_reads), new_reads

    def release(region: Sequence[float], level: int) -> None:
        rec.open_gate()
        got = grey(settle(viewer))
        world = region_world(pyramid_1k, region)
        assert_view(got, expected_view(pyramid_1k, level, world, SIZE), what=f"{region}")

    # loaded: 1:1 in the top-left corner (and the whole coarsest level, always held)
    viewer.show_region(*aligned_region(0, 0, 1))
    settle(viewer)
    # jump far away: the coarsest level stands in
    far = aligned_region(640, 640, 1)
    move_while_held(far, 0)
    check(far, coarsest)
    release(far, 0)
    # zoom out 2x around it: the level-0 tiles around the old view stay, the coarsest
    # level stands in for the rest; the old view itself shows level 0
    wide = centred_region(640 + SIZE[0] / 2, 640 + SIZE[1] / 2, 2)
    move_while_held(wide, 1)
    check(wide, 0, coarsest)
    got = grey(viewer.screenshot())[SIZE[1] // 4 : -SIZE[1] // 4, SIZE[0] // 4 : -SIZE[0] // 4]
    level0 = expected_view(pyramid_1k, 0, region_world(pyramid_1k, wide), SIZE)
    assert_view(got, level0[:, SIZE[1] // 4 : -SIZE[1] // 4, SIZE[0] // 4 : -SIZE[0] // 4])
    release(wide, 1)
    # zoom back in: level 1, loaded, stands in for level 0 (dropped and not cached)
    move_while_held(far, 0)
    check(far, 1)
    release(far, 0)


# -- frames never wait for data ---------------------------------------------------------


@pytest.mark.parametrize(
    "store_class",
    [pytest.param(GatedStore, id="sync"), pytest.param(AsyncGatedStore, id="async")],
)
def test_frames_keep_coming_while_loads_are_held(
    tmp_path: pathlib.Path,
    make_viewer: Callable[..., Viewer],
    gated: Callable[..., zarr.Group],
    store_class: type,
) -> None:
    """With 100 visible tiles (and their prefetch ring) waiting behind a gate, in
    synchronous (IO threads) or asynchronous (zarr's loop) reads, every frame still
    renders promptly, showing the coarse level; once the gate opens, the view loads."""
    pyramid = write_pyramid(
        tmp_path / "noise.ome.zarr", noise_image((1024, 1024), seed=4), chunks=(64, 64), n_levels=5
    )
    group = gated(pyramid, store_class)
    size = (640, 640)
    viewer = make_viewer(group, size=size, **GRAY)
    viewer.show_region(0, 0, 16384, 16384)  # zoomed out: the coarsest level alone
    settle(viewer)  # it is loaded (and stays: it is resident)
    group.store.rec.hold()
    loads_before = viewer.pool.stats.loads
    region = (64, 64, 704, 704)  # 10 x 10 tiles of level 0, ring 12 x 12
    viewer.show_region(*region)
    viewer.refresh()
    assert not viewer.settled()  # (this also asks for the view's tiles)
    world = region_world(pyramid, region)
    coarse = expected_view(pyramid, len(pyramid.levels) - 1, world, size)
    for frame in range(6):
        started = time.perf_counter()
        got = grey(viewer.screenshot())
        seconds = time.perf_counter() - started
        assert seconds < 5, f"frame {frame} took {seconds:.1f} s"
        stats = viewer.pool.stats
        assert stats.chunks_pending >= 100 and stats.chunks_waiting > 0, stats
        assert stats.loads == loads_before, "held loads completed"
        assert viewer.layer.status().pending == 100
        assert_view(got, coarse, what=f"frame {frame}")
    group.store.rec.open_gate()
    got = grey(settle(viewer, timeout=60))
    assert_view(got, expected_view(pyramid, 0, world, size))


# -- failed tiles -----------------------------------------------------------------------


def test_failed_tiles_are_hatched(
    pyramid_1k: Pyramid, make_viewer: Callable[..., Viewer], gated: Callable[..., zarr.Group]
) -> None:
    """A level-0 chunk whose read fails: the view settles all the same, the status
    counts it, and its tile shows a red diagonal hatch (neither the data nor black);
    the other tiles are exact, and the viewer goes on working."""
    group = gated(pyramid_1k)
    group.store.rec.fail_keys.add("0/c/1/2")  # level 0, rows 128-255, columns 256-383
    viewer = make_viewer(group, **GRAY)
    region = (200, 100, 440, 260)
    viewer.show_region(*region)
    shot = settle(viewer)
    assert viewer.layer.status().failed == 1
    # the tile's rows 128-255, columns 256-383 are screen rows 28-155, columns 56-183
    tile = (slice(28, 156), slice(56, 184))
    expected = expected_view(pyramid_1k, 0, region_world(pyramid_1k, region), SIZE)
    outside = np.ones(SIZE[::-1], bool)
    outside[tile] = False
    assert (shot[outside] == shot[outside][:, :1]).all(), "grey outside the failed tile"
    assert_view(shot[..., 0].astype(int), expected, what="other tiles", where=outside)
    hatched = shot[tile].astype(int)
    red, green = hatched[..., 0], hatched[..., 1]
    assert (red > green).all(), "the hatch tints the whole tile red"
    # the hatch is a 16 x 16 texture over the tile: texel (i, j) is a bright stripe
    # where (i + j) % 8 < 3; here a texel is 8 x 8 screen pixels
    i, j = np.mgrid[0:128, 0:128] // 8
    stripes = (i + j) % 8 < 3
    assert red[stripes].min() > red[~stripes].max(), "bright stripes on a dark ground"
    assert not (hatched == 0).all(axis=-1).any(), "black in the failed tile"
    # it goes on: other views load; coming back retries the read, which fails again
    viewer.show_region(*centred_region(512, 512, 2.5))
    settle(viewer)
    viewer.show_region(*region)
    assert (settle(viewer)[tile] == shot[tile]).all()
    assert group.store.rec.started.count("0/c/1/2") == 2


# -- dtypes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "clim"),
    [
        pytest.param("uint8", (0, 100), id="uint8"),
        pytest.param("uint16", (0, 1000), id="uint16"),
        pytest.param("int16", (-1000, 1000), id="int16"),
        pytest.param("float32", (0.0, 1.0), id="float32"),
        pytest.param("float64", (-1e-3, 1e-3), id="float64"),
    ],
)
def test_dtypes_map_through_the_window(
    tmp_path: pathlib.Path,
    make_viewer: Callable[..., Viewer],
    dtype: str,
    clim: tuple[float, float],
) -> None:
    """Each dtype renders, its values mapped linearly through ``clim`` onto the gray
    colormap (clipped outside it): e.g. 500 in (0, 1000) is grey 128."""
    lo, hi = clim
    # a ramp across the columns from below the window to above it, rows shifted a bit
    t = (np.arange(256)[None, :] + np.arange(256)[:, None] % 7) / 255 * 1.2 - 0.1
    data = (lo + t * (hi - lo)).astype(dtype)
    data[:8] = (lo + hi) / 2  # and the window's middle
    pyramid = write_pyramid(tmp_path / f"{dtype}.ome.zarr", data, chunks=(128, 128), n_levels=2)
    viewer = make_viewer(str(pyramid.path), size=(256, 256), **{**GRAY, "clim": clim})
    viewer.show_region(0, 0, 256, 256)
    got = grey(settle(viewer))
    wanted = np.clip((data.astype(np.float64) - lo) / (hi - lo), 0, 1) * 255
    assert np.abs(got - wanted).max() <= 1.0
    assert (np.abs(got[:8] - 127.5) <= 1).all()


# -- nD images --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tczyx(tmp_path_factory: pytest.TempPathFactory) -> Pyramid:
    """A (t, c, z, y, x) = (2, 2, 3, 256, 256) uint8 image, different noise in every
    plane, 2 levels (z is not downsampled), one plane of 128² per chunk."""
    data = np.stack(
        [
            np.stack([noise_image((3, 256, 256), seed=10 + 2 * t + c) for c in range(2)])
            for t in range(2)
        ]
    )
    root = tmp_path_factory.mktemp("tczyx")
    return write_pyramid(root / "tczyx.ome.zarr", data, chunks=(1, 1, 1, 128, 128), n_levels=2)


def assert_plane(viewer: Viewer, pyramid: Pyramid, plane: tuple[int, ...]) -> None:
    """The 256² canvas shows the (t, c, z) ``plane`` of level 0, at 1:1 from (0, 0)."""
    got = grey(viewer.screenshot())
    world = region_world(pyramid, (0, 0, 256, 256))
    assert_view(got, expected_view(pyramid, 0, world, (256, 256), plane=plane), what=f"{plane}")


def test_z_and_t_select_the_plane(tczyx: Pyramid, make_viewer: Callable[..., Viewer]) -> None:
    """``z=`` and ``t=`` pick the plane shown; ``layer.set_position`` and
    ``step_axis`` move to others (clamped to the image); by default z is mid-stack and
    t is 0."""
    t_axis, z_axis = 0, 2
    viewer = make_viewer(str(tczyx.path), size=(256, 256), channels=[1], z=2, t=1, **GRAY)
    viewer.show_region(0, 0, 256, 256)
    settle(viewer)
    assert_plane(viewer, tczyx, (1, 1, 2))
    viewer.set_index(t_axis, 0)
    viewer.set_index("z", 0)
    settle(viewer)
    assert_plane(viewer, tczyx, (0, 1, 0))
    viewer.step_axis(z_axis, 1)
    settle(viewer)
    assert_plane(viewer, tczyx, (0, 1, 1))
    viewer.step_axis(t_axis, 1)
    settle(viewer)
    assert_plane(viewer, tczyx, (1, 1, 1))
    viewer.step_axis(z_axis, 5)  # past the end: the last plane
    settle(viewer)
    assert_plane(viewer, tczyx, (1, 1, 2))
    default = make_viewer(str(tczyx.path), size=(256, 256), channels=[0], **GRAY)
    default.show_region(0, 0, 256, 256)
    assert default.layer.position == ((t_axis, 0), (z_axis, 1))
    settle(default)
    assert_plane(default, tczyx, (0, 0, 1))


def test_previous_slice_stands_in_until_the_new_one_loads(
    tczyx: Pyramid, make_viewer: Callable[..., Viewer], gated: Callable[..., zarr.Group]
) -> None:
    """Stepping z while the new plane's reads are held: the old plane stays on screen
    (not black, not a mix), until the new one has loaded."""
    group = gated(tczyx)
    viewer = make_viewer(group, size=(256, 256), channels=[0], z=0, **GRAY)
    viewer.show_region(0, 0, 256, 256)
    settle(viewer)
    assert_plane(viewer, tczyx, (0, 0, 0))
    group.store.rec.hold()
    viewer.step_axis(2, 1)
    viewer.refresh()
    assert not viewer.settled()
    assert_plane(viewer, tczyx, (0, 0, 0))
    group.store.rec.open_gate()
    settle(viewer)
    assert_plane(viewer, tczyx, (0, 0, 1))


# -- the command line -------------------------------------------------------------------


def run_cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m viewer ARGS`` in a subprocess running this checkout's code, with
    ``env`` added to the environment; ``timeout`` bounds it (TimeoutExpired fails)."""
    return subprocess.run(
        [sys.executable, "-m", "viewer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)},
    )


def test_cli_screenshot_equals_the_ground_truth(
    pyramid_1k: Pyramid, tmp_path: pathlib.Path
) -> None:
    """``--screenshot`` writes a PNG of the region at the size asked, exactly the data
    (here level 1 at 2x), reports it on stderr and exits 0."""
    out = tmp_path / "out.png"
    region = (300, 200, 780, 520)
    result = run_cli(
        str(pyramid_1k.path),
        *("--screenshot", str(out), "--size", "240", "160"),
        *("--region", *map(str, region)),
        *("--colormap", "gray", "--clim", "0", "255"),
    )
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stderr and "Traceback" not in result.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape == (160, 240, 3)
    expected = expected_view(pyramid_1k, 1, region_world(pyramid_1k, region), (240, 160))
    assert_view(grey(image), expected)


def write_bad_inputs(root: pathlib.Path) -> dict[str, pathlib.Path]:
    """Sources the CLI must refuse: nothing there, a directory that is not Zarr, an
    image with one spatial axis, and one of an unsupported dtype (complex64)."""
    not_zarr = root / "not_zarr"
    not_zarr.mkdir()
    (not_zarr / "notes.txt").write_text("not an image\n")
    one_axis = zarr.open_group(root / "one_axis.ome.zarr", mode="w")
    one_axis.create_array("0", shape=(2, 64), chunks=(1, 64), dtype="uint8")
    one_axis.attrs["ome"] = {
        "version": "0.5",
        "multiscales": [
            {
                "axes": [{"name": "c", "type": "channel"}, {"name": "x", "type": "space"}],
                "datasets": [
                    {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1, 1]}]}
                ],
            }
        ],
    }
    zarr.create_array(root / "complex.zarr", shape=(64, 64), chunks=(32, 32), dtype="complex64")
    return {
        "missing": root / "missing.zarr",
        "not_zarr": not_zarr,
        "one_axis": root / "one_axis.ome.zarr",
        "complex": root / "complex.zarr",
    }


@pytest.mark.parametrize(
    ("source", "options", "says"),
    [
        pytest.param("missing", (), "no such file", id="missing"),
        pytest.param("not_zarr", (), "not a Zarr store", id="not-zarr"),
        pytest.param("one_axis", (), "spatial axes", id="one-spatial-axis"),
        pytest.param("complex", (), "unsupported dtype complex64", id="complex64"),
        pytest.param("good", ("--colormap", "nosuchmap"), "nosuchmap", id="bad-colormap"),
    ],
)
def test_cli_bad_input_is_one_line_and_status_2(
    pyramid_1k: Pyramid,
    tmp_path: pathlib.Path,
    source: str,
    options: tuple[str, ...],
    says: str,
) -> None:
    """Bad input prints one line on stderr saying what is wrong, no traceback, and
    exits 2 without writing anything."""
    sources = {**write_bad_inputs(tmp_path), "good": pyramid_1k.path}
    result = run_cli(
        str(sources[source]), "--screenshot", str(tmp_path / "out.png"), *options, timeout=60
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("zarrscope: error: "), result.stderr
    assert says in lines[0]
    assert not (tmp_path / "out.png").exists()


def test_telemetry_reports_first_pixel_frames_and_settling(
    gray: tuple[Pyramid, Viewer],
) -> None:
    """``telemetry()``: time to first pixel, frame times, and how long the last view
    took to settle, measured from when it was first drawn."""
    _, viewer = gray
    viewer.show_region(*aligned_region(64, 64, 1))
    viewer.screenshot()  # the new view's first frame
    settle(viewer)
    t = viewer.telemetry()
    assert 0 < t["time_to_first_pixel"] < 600
    assert 0 < t["frame_time_median"] <= t["frame_time_p90"]
    assert t["last_settle"] is not None and t["last_settle"] >= 0
    assert t["stats"].loads > 0
