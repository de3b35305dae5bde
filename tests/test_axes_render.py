"""Axis names decide what is shown: x horizontally, y vertically, whatever the array order.

An image stored as (x, y), (x, c, y) or with z anywhere must draw the same picture as
the same data stored in OME's (c, z, y, x) order. The ground truth is the picture as a
(y, x) numpy array; the store holds it transposed (and stacked) as the axes say. The
plane rule itself is checked without a GPU (:func:`test_plane_follows_axis_names`);
the rendered checks are pixel-exact, as in ``test_render.py`` (whose helpers they use).
"""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import numpy as np
import pytest
import zarr
from PIL import Image
from support.images import Pyramid, expected_view, noise_image, region_world, write_pyramid
from test_render import GRAY, assert_view, grey, settle

from chunkpool import SourceError, read_multiscales
from viewer import Viewer
from viewer.slicing import Plane

#: Picture size (y, x): not square, so that a swap of x and y cannot go unnoticed.
HEIGHT, WIDTH = 72, 120
#: Chunk size of every test image: tiles straddle the picture on both axes.
CHUNK = 32
ARTIFACTS = pathlib.Path(__file__).parent / "_artifacts"


# -- the plane rule, without a GPU ------------------------------------------------------


def plane_of_axes(
    tmp_path: pathlib.Path, names: list[str], types: list[str | None] | None = None
) -> Plane:
    """The plane of a one-level OME image with axes ``names`` (typed ``types``, by
    default as OME types x/y/z/c/t; untyped where None)."""
    kinds = {"x": "space", "y": "space", "z": "space", "c": "channel", "t": "time"}
    types = types if types is not None else [kinds.get(n) for n in names]
    axes = [{"name": n, **({"type": t} if t else {})} for n, t in zip(names, types, strict=True)]
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        attributes={
            "ome": {"version": "0.5", "multiscales": [{"axes": axes, "datasets": [{"path": "0"}]}]}
        },
    )
    group.create_array("0", shape=tuple(4 + i for i in range(len(names))), dtype="uint8")
    (info,) = read_multiscales(group, "test")
    return Plane.of(info)


@pytest.mark.parametrize(
    ("names", "types", "y_x", "channel", "sliders"),
    [
        (["y", "x"], None, (0, 1), None, ()),
        (["x", "y"], None, (1, 0), None, ()),
        (["x", "c", "y"], None, (2, 0), 1, ()),
        (["c", "x", "y"], None, (2, 1), 0, ()),
        (["z", "y", "x"], None, (1, 2), None, (0,)),
        (["x", "y", "z"], None, (1, 0), None, (2,)),
        (["z", "x", "y"], None, (2, 1), None, (0,)),
        (["y", "z", "x"], None, (0, 2), None, (1,)),
        (["t", "x", "z", "c", "y"], None, (4, 1), 3, (0, 2)),
        (["X", "Y"], None, (1, 0), None, ()),  # names are matched ignoring case
        # names other than x and y: the last two spatial axes are (y, x), as always
        (["a", "b"], ["space", "space"], (0, 1), None, ()),
        (["a", "b", "d"], ["space", "space", "space"], (1, 2), None, (0,)),
        # one of the two named: it keeps its role, the last other spatial axis takes the other
        (["x", "z"], None, (1, 0), None, ()),
        (["z", "y", "b"], ["space", "space", "space"], (1, 2), None, (0,)),
    ],
)
def test_plane_follows_axis_names(
    tmp_path: pathlib.Path,
    names: list[str],
    types: list[str | None] | None,
    y_x: tuple[int, int],
    channel: int | None,
    sliders: tuple[int, ...],
) -> None:
    """The axis named x is the screen's horizontal, the one named y its vertical;
    without those names, the last two spatial axes are (y, x)."""
    plane = plane_of_axes(tmp_path, names, types)

    assert (plane.y_axis, plane.x_axis) == y_x
    assert plane.channel_axis == channel
    assert plane.slider_axes == sliders


def test_plane_of_a_chunk_is_y_by_x(tmp_path: pathlib.Path) -> None:
    """``plane_of`` turns a chunk of an (x, c, y) image into its (y, x) plane."""
    plane = plane_of_axes(tmp_path, ["x", "c", "y"])
    data = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # (x, c, y)
    index, select = plane.chunk_and_selection(0, 0, 0, channel=3, position=())

    assert index == (0, 0, 0)
    np.testing.assert_array_equal(plane.plane_of(data, select), data[:, 3, :].T)


@pytest.mark.parametrize(
    ("pixel_size", "shift", "problem"),
    [
        (1e-300, 0.0, "pixel size 1e-300 along y is outside 1e-30..1e+30"),
        (1e-40, 0.0, "pixel size 1e-40 along y"),
        (1e300, 0.0, "pixel size 1e+300 along y"),
        (1.0, 1e35, "world coordinates along x reach beyond 1e+32"),
        (1e-9, 0.0, None),  # nanometres in metres
        (1e-30, 1e-25, None),
        (1e20, 1e30, None),
    ],
)
def test_plane_refuses_what_float32_cannot_draw(
    tmp_path: pathlib.Path, pixel_size: float, shift: float, problem: str | None
) -> None:
    """Pixel sizes and world coordinates beyond float32's range drew a black canvas
    (and exited 0): they are a SourceError; anything in range is shown."""
    pyramid = write_pyramid(
        tmp_path / "img.ome.zarr",
        noise_image((8, 8)),
        chunks=(8, 8),
        n_levels=1,
        pixel_size=pixel_size,
        level_translations=[(0.0, shift)],
    )
    (info,) = read_multiscales(zarr.open_group(pyramid.path, mode="r"), "img")

    if problem is None:
        assert (Plane.of(info).y_axis, Plane.of(info).x_axis) == (0, 1)
    else:
        with pytest.raises(
            SourceError, match="^img: level 0 cannot be shown: .*" + re.escape(problem)
        ):
            Plane.of(info)


# -- rendered -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def make_viewer() -> Iterator[Callable[..., Viewer]]:
    """``make_viewer(source, **options)``: an offscreen gray viewer of the picture's
    size, closed at the end of the module."""
    made: list[Viewer] = []

    def make(source: Any, **options: Any) -> Viewer:
        viewer = Viewer(source, None, size=(WIDTH, HEIGHT), **{**GRAY, **options})
        made.append(viewer)
        return viewer

    yield make
    for viewer in made:
        viewer.close()


def stored_as(
    root: pathlib.Path, picture: np.ndarray, axes: str, n_levels: int
) -> tuple[Pyramid, Pyramid]:
    """Write ``picture`` ((..., y, x) in the order of ``axes`` without x and y, then y,
    x) as an OME-Zarr image whose dimensions are ``axes``; return the written pyramid
    and its ground truth (the same levels with the axes back in (..., y, x) order).

    Only images whose last two axes are x and y (either way round) get more than one
    level: ``write_pyramid`` halves the last two."""
    leading = [a for a in axes if a not in "yx"]
    order = [*leading, "y", "x"]
    stored = np.transpose(picture, [order.index(a) for a in axes])
    pyramid = write_pyramid(
        root / f"{axes}.ome.zarr",
        stored,
        chunks=tuple(1 if a in "cz" else CHUNK for a in axes),
        n_levels=n_levels,
        axes=list(axes),
    )
    back = [axes.index(a) for a in order]
    truth = replace(pyramid, levels=[np.transpose(level, back) for level in pyramid.levels])
    return pyramid, truth


def save(image: np.ndarray, name: str) -> None:
    """Keep a screenshot in tests/_artifacts/ (to look at when a test fails)."""
    ARTIFACTS.mkdir(exist_ok=True)
    Image.fromarray(image).save(ARTIFACTS / f"axes-{name}.png")


def check_view(
    viewer: Viewer, truth: Pyramid, zoom: int, plane: tuple[int, ...], name: str
) -> None:
    """At ``zoom`` level-0 pixels per screen pixel from the top-left corner, the canvas
    shows level log2(zoom) of the truth's ``plane`` exactly."""
    region = (0, 0, WIDTH * zoom, HEIGHT * zoom)
    viewer.show_region(*region)
    shot = settle(viewer)
    save(shot, f"{name}-{zoom}x")
    level = zoom.bit_length() - 1
    assert viewer.layer.target_level == level
    world = region_world(truth, region)
    expected = expected_view(truth, level, world, (WIDTH, HEIGHT), plane=plane)
    assert_view(grey(shot), expected, what=f"{name} at {zoom}x")


@pytest.mark.render
@pytest.mark.parametrize("zarr_format", [3, 2])
def test_xy_image_shows_x_horizontally(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer], zarr_format: int
) -> None:
    """An image stored as (x, y) shows as the (y, x) picture, at every level, and the
    hover read-out gives the value of the pixel under world (x, y)."""
    picture = noise_image((HEIGHT, WIDTH), seed=21)
    stored = picture.T
    pyramid = write_pyramid(
        tmp_path / "xy.ome.zarr",
        stored,
        chunks=(CHUNK, CHUNK),
        n_levels=2,
        axes=["x", "y"],
        zarr_format=zarr_format,
    )
    truth = replace(pyramid, levels=[level.T for level in pyramid.levels])
    viewer = make_viewer(str(pyramid.path))

    check_view(viewer, truth, 2, (), f"xy-v{zarr_format}")
    check_view(viewer, truth, 1, (), f"xy-v{zarr_format}")
    for row, col in ((0, WIDTH - 1), (HEIGHT - 1, 0), (5, 100), (70, 3), (33, 64)):
        ((_, value),) = viewer.layer.values_at(float(col), float(row))  # world (x, y)
        assert value == picture[row, col], f"value at row {row}, column {col}"


@pytest.mark.render
def test_xcy_image_shows_each_channel_with_x_horizontally(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """An (x, c, y) image: each channel is its (y, x) picture."""
    picture = noise_image((3, HEIGHT, WIDTH), seed=22)  # (c, y, x)
    pyramid, truth = stored_as(tmp_path, picture, "xcy", n_levels=1)
    assert pyramid.levels[0].shape == (WIDTH, 3, HEIGHT)
    viewer = make_viewer(str(pyramid.path), channels=[2], rgb=False)  # 3 x uint8: not RGB

    check_view(viewer, truth, 1, (2,), "xcy-c2")
    viewer.toggle_channel(2)
    viewer.toggle_channel(0)
    check_view(viewer, truth, 1, (0,), "xcy-c0")


@pytest.mark.render
@pytest.mark.parametrize(("axes", "n_levels"), [("zxy", 2), ("xyz", 1), ("yzx", 1), ("zyx", 2)])
def test_3d_image_slices_z_and_shows_x_horizontally(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer], axes: str, n_levels: int
) -> None:
    """A 3-D image with its axes in any order: ``z=`` picks a plane along the axis
    named z, shown with x horizontal; stepping z moves along that axis."""
    picture = noise_image((3, HEIGHT, WIDTH), seed=23)  # (z, y, x)
    pyramid, truth = stored_as(tmp_path, picture, axes, n_levels)
    z_axis = axes.index("z")
    viewer = make_viewer(str(pyramid.path), z=2)

    assert [a for a, _ in viewer.layer.position] == [z_axis]
    for zoom in (2**level for level in reversed(range(n_levels))):
        check_view(viewer, truth, zoom, (2,), f"{axes}-z2")
    viewer.step_axis(z_axis, -2)
    check_view(viewer, truth, 1, (0,), f"{axes}-z0")
