"""Layers: true colour, several images aligned in world coordinates, opacity, exact
picks, two views on one pool, and the view state's round trip. Pixel-exact on lavapipe
against numpy ground truth."""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable

import numpy as np
import pytest
import zarr
from support.images import halve, noise_image, write_pyramid
from support.teststores import GatedStore
from test_huge_and_retry import save
from test_render import settle
from zarr.storage import LocalStore

from chunkpool import ChunkPool
from viewer import Viewer, ViewState, is_rgb

pytestmark = pytest.mark.render

SIZE = (128, 96)


def to_linear(srgb: np.ndarray) -> np.ndarray:
    """sRGB values (0..255) to linear light (0..1): pygfx blends in linear light."""
    c = np.asarray(srgb, float) / 255
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def to_srgb(linear: np.ndarray) -> np.ndarray:
    """Linear light (0..1) to sRGB values (0..255)."""
    c = np.clip(linear, 0, 1)
    return 255 * np.where(c <= 0.0031308, c * 12.92, 1.055 * c ** (1 / 2.4) - 0.055)


def rgb_picture(height: int = 96, width: int = 128) -> np.ndarray:
    """(c, y, x) uint8: bands of red, green, blue, white, black (200s and 255s), then noise."""
    picture = noise_image((3, height, width), seed=5)
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (255, 255, 255), (0, 0, 0)]
    for i, colour in enumerate(colours):
        picture[:, 8 * i : 8 * (i + 1), :] = np.array(colour, np.uint8)[:, None, None]
    return picture


def test_rgb_primaries_and_white_render_as_stored(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """A (c=3, y, x) uint8 image is true colour: at 1:1 a pixel stored as (200, 0, 0)
    renders (200, 0, 0); every pixel is the stored one. ``rgb=False`` opts out (the
    channels are then added up in their default colours)."""
    picture = rgb_picture()
    pyramid = write_pyramid(
        tmp_path / "rgb.ome.zarr", picture, chunks=(3, 32, 32), n_levels=2, axes=["c", "y", "x"]
    )
    viewer = make_viewer(str(pyramid.path))
    assert viewer.layer.rgb and is_rgb(viewer.pool.multiscale_info)
    viewer.show_region(0, 0, *SIZE)
    shot = settle(viewer)
    save("layers-rgb.png", shot)
    assert (shot == np.moveaxis(picture, 0, -1)).all()
    assert tuple(shot[2, 5]) == (200, 0, 0) and tuple(shot[26, 5]) == (255, 255, 255)
    # the coarse level too: level 1 at 2 px per screen pixel
    viewer.show_region(0, 0, 2 * SIZE[0], 2 * SIZE[1])
    shot = settle(viewer)
    level1 = np.moveaxis(pyramid.levels[1], 0, -1)
    assert (shot[: level1.shape[0], : level1.shape[1]] == level1).all()
    additive = make_viewer(str(pyramid.path), rgb=False)
    assert not additive.layer.rgb and len(additive.layer.displays) == 3


def test_rgb_stored_channels_last_and_in_separate_chunks(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """True colour whatever the layout: (y, x, c) in one chunk per tile, and (c, y, x)
    with one chunk per channel (a tile is drawn once all three have loaded)."""
    picture = rgb_picture()
    yxc = write_pyramid(
        tmp_path / "yxc.ome.zarr",
        np.ascontiguousarray(np.moveaxis(picture, 0, -1)),
        chunks=(32, 32, 3),
        n_levels=1,
        axes=["y", "x", "c"],
    )
    split = write_pyramid(
        tmp_path / "split.ome.zarr", picture, chunks=(1, 32, 32), n_levels=1, axes=["c", "y", "x"]
    )
    for pyramid in (yxc, split):
        viewer = make_viewer(str(pyramid.path))
        viewer.show_region(0, 0, *SIZE)
        assert (settle(viewer) == np.moveaxis(picture, 0, -1)).all(), pyramid.path.name


def test_rgba_blends_over_the_layer_beneath(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """An RGBA layer (translucent) over a gray image: each pixel is alpha-blended,
    rgb x a + beneath x (1 - a) in linear light (how pygfx blends), to within rounding
    (one level)."""
    rgba = noise_image((4, SIZE[1], SIZE[0]), seed=9)
    background = noise_image((SIZE[1], SIZE[0]), seed=10)
    under = write_pyramid(tmp_path / "under.ome.zarr", background, chunks=(32, 32), n_levels=1)
    over = write_pyramid(
        tmp_path / "over.ome.zarr", rgba, chunks=(4, 32, 32), n_levels=1, axes=["c", "y", "x"]
    )
    viewer = make_viewer(str(under.path), colormap="gray", clim=(0, 255))
    layer = viewer.add_image(str(over.path), blending="translucent")
    assert layer.rgb
    viewer.show_region(0, 0, *SIZE)
    shot = settle(viewer).astype(float)
    save("layers-rgba.png", shot.astype(np.uint8))
    alpha = rgba[3].astype(float)[..., None] / 255
    expected = to_srgb(
        to_linear(np.moveaxis(rgba[:3], 0, -1)) * alpha
        + to_linear(background[..., None]) * (1 - alpha)
    )
    assert np.abs(shot - expected).max() <= 1.0


def test_two_images_with_other_scales_and_offsets_align(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """Layers meet in world coordinates: a crop of an image translated to where it was
    cut from, and a half-resolution copy (pixel size 2, shifted by half a pixel as a
    level 1 is), each show exactly what the image itself shows there. The image is red,
    the others green: where they cover it, red == green, pixel for pixel."""
    picture = noise_image((256, 256), seed=3)
    full = write_pyramid(tmp_path / "full.ome.zarr", picture, chunks=(64, 64), n_levels=2)
    crop = write_pyramid(
        tmp_path / "crop.ome.zarr",
        picture[32:96, 48:160],
        chunks=(32, 32),
        n_levels=1,
        multiscale_translation=(32.0, 48.0),
    )
    coarse = write_pyramid(
        tmp_path / "coarse.ome.zarr",
        halve(picture),
        chunks=(32, 32),
        n_levels=1,
        pixel_size=2.0,
        multiscale_translation=(0.5, 0.5),
    )
    for other, zoom, covered in (
        (crop, 1, (slice(32, 96), slice(48, 128))),
        (coarse, 2, (slice(0, SIZE[1]), slice(0, SIZE[0]))),
    ):
        viewer = make_viewer(str(full.path), colormap="red", clim=(0, 255))
        viewer.add_image(str(other.path), colormap="lime", clim=(0, 255))
        viewer.show_region(0, 0, SIZE[0] * zoom, SIZE[1] * zoom)
        shot = settle(viewer).astype(int)
        save(f"layers-aligned-{other.path.stem}.png", shot.astype(np.uint8))
        assert [layer.target_level for layer in viewer.layers] == [zoom - 1, 0]
        red, green = shot[..., 0][covered], shot[..., 1][covered]
        assert (red == green).all(), f"{other.path.name}: misaligned"
        outside = np.ones(shot.shape[:2], bool)
        outside[covered] = False
        assert (shot[..., 1][outside] == 0).all()


def test_opacity_scales_an_additive_layer(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """A layer at opacity 0.5 adds half its light (linear light, as pygfx blends; to
    within rounding)."""
    picture = noise_image((SIZE[1], SIZE[0]), seed=4)
    pyramid = write_pyramid(tmp_path / "p.ome.zarr", picture, chunks=(32, 32), n_levels=1)
    viewer = make_viewer(str(pyramid.path), colormap="gray", clim=(0, 255))
    viewer.show_region(0, 0, *SIZE)
    viewer.layer.opacity = 0.5
    shot = settle(viewer).astype(float)
    assert np.abs(shot[..., 0] - to_srgb(to_linear(picture) * 0.5)).max() <= 1.0
    with pytest.raises(ValueError, match="opacity"):
        viewer.layer.opacity = 1.5


def test_pick_gives_stored_values_exactly(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """``pick`` returns every visible layer's value as stored: uint64 above 2^53 exact
    (a float32 texture would make 2^60 + 1 and 2^60 + 2 the same), float64 exact; the
    HUD shows them as stored."""
    big = np.full((64, 64), 2**60, np.uint64) + np.arange(64 * 64, dtype=np.uint64).reshape(64, 64)
    floats = noise_image((64, 64), seed=2).astype(np.float64) / 7.0 + 1e-9  # not float32
    a = write_pyramid(tmp_path / "ids.ome.zarr", big, chunks=(32, 32), n_levels=1)
    b = write_pyramid(tmp_path / "f.ome.zarr", floats, chunks=(32, 32), n_levels=1)
    viewer = make_viewer(str(a.path), name="ids")
    viewer.add_image(str(b.path), name="f")
    viewer.show_region(0, 0, 64, 64)
    settle(viewer)
    picked = viewer.pick(5.0, 3.0)  # world (x, y): row 3, column 5
    assert picked == {"ids": big[3, 5], "f": floats[3, 5]}
    assert int(picked["ids"]) == 2**60 + 3 * 64 + 5 and picked["f"].dtype == np.float64
    viewer.cursor = (5.0, 3.0)
    assert f"ids Channel 0: {2**60 + 3 * 64 + 5}" in viewer.hud_lines()[-1]
    assert repr(float(floats[3, 5])) in viewer.hud_lines()[-1]


def test_two_views_on_one_pool_read_each_chunk_once(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """Two viewers showing one pool: every chunk is read once (counting store), both
    show the same pixels; closing one leaves the other's pool working; once both are
    closed, the pool is the application's again: nothing stays queued for a viewer,
    and its own load handlers run in ``wait()`` as before."""
    picture = noise_image((SIZE[1], SIZE[0]), seed=8)
    pyramid = write_pyramid(tmp_path / "p.ome.zarr", picture, chunks=(32, 32), n_levels=2)
    store = GatedStore(LocalStore(pyramid.path))
    pool = ChunkPool.from_zarr_node(zarr.open_group(store, mode="r"))[0]
    try:
        one = make_viewer(pool, colormap="gray", clim=(0, 255))
        two = make_viewer(pool, colormap="gray", clim=(0, 255))
        for viewer in (one, two):
            viewer.show_region(0, 0, *SIZE)
        shots = [settle(one), settle(two)]
        assert (shots[0] == shots[1]).all() and (shots[0][..., 0] == picture).all()
        reads = store.rec.started
        assert reads and len(reads) == len(set(reads)), reads
        one.close()
        assert not pool.destroyed  # a pool given to a viewer is not the viewer's
        two.show_region(0, 0, SIZE[0] // 2, SIZE[1] // 2)
        settle(two)
        two.close()
        assert pool.pending_handler_calls == 0 and pool.stats.chunks_held == 0
        loaded: list[tuple[int, ...]] = []
        pool.get_chunk(0, (1, 1), load_handler=lambda loc: loaded.append(loc.index)).wait(30)
        assert loaded == [(1, 1)]
    finally:
        for viewer in (one, two):
            viewer.close()
        pool.destroy()


def test_view_state_round_trip_gives_the_same_pixels(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """A view's state, saved as JSON and opened again (``Viewer.from_state``; the same
    as ``zarrscope --state``), shows the same pixels: layers, their settings, the slice,
    the camera."""
    stack = noise_image((3, 2, 128, 128), seed=12)  # (z, c, y, x)
    a = write_pyramid(
        tmp_path / "a.ome.zarr", stack, chunks=(1, 1, 32, 32), n_levels=2, axes=["z", "c", "y", "x"]
    )
    b = write_pyramid(
        tmp_path / "b.ome.zarr",
        rgb_picture(128, 128),
        chunks=(3, 64, 64),
        n_levels=1,
        axes=["c", "y", "x"],
    )
    viewer = make_viewer(str(a.path))
    viewer.add_image(str(b.path), opacity=0.25, name="slide")
    viewer.set_index("z", 2)
    viewer.toggle_channel(1)  # hide channel 1 ...
    viewer.adjust_window(scale=0.5)  # ... and narrow its window
    viewer.show_region(10, 20, 74, 68)
    before = settle(viewer)
    path = viewer.save_state(tmp_path / "state.json")
    data = json.loads(path.read_text())
    assert data["position"] == {"z": 2} and [layer["name"] for layer in data["layers"]] == [
        "a.ome.zarr",
        "slide",
    ]
    restored = Viewer.from_state(ViewState.from_json(path.read_text()), size=SIZE)
    try:
        after = settle(restored)
        assert (after == before).all()
        assert restored.state.to_dict() == viewer.state.to_dict()
    finally:
        restored.close()
    with pytest.raises(ValueError, match="view state"):
        ViewState.from_json('{"version": 99}')


def test_the_command_shows_several_layers_and_restores_a_state(tmp_path: pathlib.Path) -> None:
    """``zarrscope A B --labels L --colormap red --clim 0 255 --screenshot`` draws the
    layers (pixel-exact where only A is non-zero); a saved state given to ``--state``
    gives the same picture; a file that is no state is one line and status 2."""
    from PIL import Image
    from test_render import run_cli

    picture = noise_image((96, 128), seed=40)
    a = write_pyramid(tmp_path / "a.ome.zarr", picture, chunks=(32, 32), n_levels=1)
    zeros = np.zeros((96, 128), np.uint8)
    b = write_pyramid(tmp_path / "b.ome.zarr", zeros, chunks=(32, 32), n_levels=1)
    lab = write_pyramid(
        tmp_path / "l.ome.zarr", zeros.astype(np.uint32), chunks=(32, 32), n_levels=1
    )
    out = tmp_path / "out.png"
    common = ("--screenshot", str(out), "--size", "128", "96", "--region", "0", "0", "128", "96")
    result = run_cli(
        str(a.path),
        str(b.path),
        "--labels",
        str(lab.path),
        "--colormap",
        "red",
        "--clim",
        "0",
        "255",
        *common,
    )
    assert result.returncode == 0, result.stderr
    shot = np.asarray(Image.open(out))[..., :3]
    assert (shot[..., 0] == picture).all() and (shot[..., 1:] == 0).all()
    viewer = Viewer(str(a.path), None, size=SIZE, colormap="red", clim=(0, 255))
    try:
        viewer.show_region(0, 0, 128, 96)
        settle(viewer)
        state = viewer.save_state(tmp_path / "view.json")
    finally:
        viewer.close()
    again = tmp_path / "again.png"
    result = run_cli("--state", str(state), "--screenshot", str(again), "--size", "128", "96")
    assert result.returncode == 0, result.stderr
    assert (np.asarray(Image.open(again))[..., :3] == shot).all()
    (tmp_path / "bad.json").write_text('{"layers": 3}')
    result = run_cli("--state", str(tmp_path / "bad.json"), "--screenshot", str(again))
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "not a zarrscope view state" in result.stderr


def test_bias_picks_coarser_levels_per_layer(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """``bias`` (the viewer's, or a layer's own) moves that layer's level choice."""
    p = write_pyramid(
        tmp_path / "p.ome.zarr", noise_image((256, 256), seed=1), chunks=(32, 32), n_levels=3
    )
    viewer = make_viewer(str(p.path), bias=2.0, colormap="gray", clim=(0, 255))
    viewer.add_image(str(p.path), colormap="gray", clim=(0, 255))
    viewer.show_region(0, 0, *SIZE)
    viewer.refresh()
    assert [layer.target_level for layer in viewer.layers] == [1, 0]
    with pytest.raises(TypeError, match="unknown option"):
        viewer.add_image(str(p.path), colourmap="gray")


def with_unit(path: pathlib.Path, unit: str) -> None:
    """Give the spatial axes of an OME-Zarr 0.5 image written by write_pyramid a unit."""
    group = zarr.open_group(path, mode="r+")
    ome = group.attrs["ome"]
    for axis in ome["multiscales"][0]["axes"]:
        if axis["type"] == "space":
            axis["unit"] = unit
    group.attrs["ome"] = ome


def test_layers_in_other_units_warn_and_keep_running(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer], caplog: pytest.LogCaptureFixture
) -> None:
    """A layer whose axes are in other units than the first layer's (or named
    otherwise) is placed by its numbers, with one warning saying so: the viewer runs."""
    a = write_pyramid(
        tmp_path / "a.ome.zarr", noise_image((64, 64), seed=1), chunks=(32, 32), n_levels=1
    )
    b = write_pyramid(
        tmp_path / "b.ome.zarr", noise_image((64, 64), seed=2), chunks=(32, 32), n_levels=1
    )
    with_unit(a.path, "micrometer")
    with_unit(b.path, "nanometer")
    viewer = make_viewer(str(a.path))
    with caplog.at_level("WARNING", logger="zarrscope"):
        viewer.add_image(str(b.path))
    warnings = [r.getMessage() for r in caplog.records if r.name == "zarrscope"]
    assert any(
        "'b.ome.zarr': x is in nanometer, but in micrometer in layer 'a.ome.zarr'" in w
        for w in warnings
    ), warnings
    viewer.show_region(0, 0, 64, 64)
    settle(viewer)
    assert viewer.settled() and len(viewer.layers) == 2
