"""Labels layers in the viewer: colours from the ID table over an image, outline mode,
the selected ID, IDs above 2^53, OME ``labels/`` discovery, and bad labels.
Pixel-exact on lavapipe (blending in linear light, to within one level)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zarr
from support.images import noise_image, write_pyramid
from test_huge_and_retry import save
from test_layers import to_linear, to_srgb
from test_render import settle

from viewer import Viewer
from viewer.labels import label_colors

pytestmark = pytest.mark.render

SIZE = (96, 64)


def blend(image: np.ndarray, ids: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The expected (H, W, 3) screen: label colours over a gray image, per-pixel alpha."""
    colours = label_colors(ids)[..., :3]
    a = alpha[..., None]
    return to_srgb(to_linear(colours) * a + to_linear(image[..., None]) * (1 - a))


def label_picture(dtype: Any = np.uint32) -> np.ndarray:
    """(H, W) IDs: a square of 7, a square of 9 beside it, 0 elsewhere; a strip of
    many IDs below."""
    ids = np.zeros((SIZE[1], SIZE[0]), dtype)
    ids[8:24, 8:24] = 7
    ids[8:24, 40:56] = 9
    ids[40:56, :] = (np.arange(SIZE[0]) % 24 + 1).astype(dtype)[None, :]
    return ids


def write_scene(tmp_path: pathlib.Path, ids: np.ndarray) -> tuple[Any, Any, np.ndarray]:
    image = noise_image((SIZE[1], SIZE[0]), seed=21)
    img = write_pyramid(tmp_path / "img.ome.zarr", image, chunks=(32, 32), n_levels=1)
    lab = write_pyramid(tmp_path / "lab.ome.zarr", ids, chunks=(32, 32), n_levels=1)
    return img, lab, image


def test_labels_over_an_image_take_the_tables_colours(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """Each labelled pixel is its ID's table colour at the layer's opacity over the
    image; 0 is transparent (the image shows as it is)."""
    ids = label_picture()
    img, lab, image = write_scene(tmp_path, ids)
    viewer = make_viewer(str(img.path), colormap="gray", clim=(0, 255))
    labels = viewer.add_labels(str(lab.path), opacity=0.5)
    viewer.show_region(0, 0, *SIZE)
    shot = settle(viewer).astype(float)
    save("labels-over-image.png", shot.astype(np.uint8))
    expected = blend(image, ids, np.where(ids > 0, 0.5, 0.0))
    assert np.abs(shot - expected).max() <= 1.0
    assert (shot[ids == 0] == image[ids == 0][:, None]).all()
    assert labels.kind == "labels" and viewer.pick(10.0, 10.0)["lab.ome.zarr"] == 7


def test_outline_draws_only_the_edges_of_each_region(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """In outline mode a square shows only its one-pixel border (the pixels whose
    4-neighbour holds another ID); its inside shows the image alone."""
    ids = label_picture()
    img, lab, image = write_scene(tmp_path, ids)
    viewer = make_viewer(str(img.path), colormap="gray", clim=(0, 255))
    viewer.add_labels(str(lab.path), opacity=1.0, outline=True)
    viewer.show_region(0, 0, *SIZE)
    shot = settle(viewer).astype(float)
    save("labels-outline.png", shot.astype(np.uint8))
    border = np.zeros(ids.shape, bool)
    border[8:24, 8:24] = True
    border[9:23, 9:23] = False
    inside = np.zeros(ids.shape, bool)
    inside[9:23, 9:23] = True
    colour = label_colors(np.array([7], np.uint32))[0, :3]
    assert (shot[border] == colour).all()
    assert (shot[inside] == image[inside][:, None]).all()


def test_a_selected_id_is_opaque_and_the_others_dimmed(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """Selecting ID 9 (``layer.selected``, what a click does): its pixels show its
    colour opaque, every other ID at opacity x dim (0.5 x 0.5)."""
    ids = label_picture()
    img, lab, image = write_scene(tmp_path, ids)
    viewer = make_viewer(str(img.path), colormap="gray", clim=(0, 255))
    labels = viewer.add_labels(str(lab.path), opacity=0.5)
    viewer.show_region(0, 0, *SIZE)
    settle(viewer)
    labels.selected = labels.id_at(48.0, 16.0)
    assert labels.selected == 9
    shot = settle(viewer).astype(float)
    save("labels-selected.png", shot.astype(np.uint8))
    alpha = np.where(ids == 9, 1.0, np.where(ids > 0, 0.25, 0.0))
    assert np.abs(shot - blend(image, ids, alpha)).max() <= 1.0
    assert viewer.state.layers[1].selected == 9 or labels.selected == 9


def test_ids_above_2_53_stay_exact(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """uint64 IDs that float32 (or float64) would merge get their own colours, and
    ``pick`` gives them exactly."""
    base = np.uint64(2**60)
    ids = np.zeros((SIZE[1], SIZE[0]), np.uint64)
    ids[:, : SIZE[0] // 2] = base + np.uint64(1)
    ids[:, SIZE[0] // 2 :] = base + np.uint64(2)
    lab = write_pyramid(tmp_path / "big.ome.zarr", ids, chunks=(32, 32), n_levels=1)
    viewer = make_viewer()
    viewer.add_labels(str(lab.path), opacity=1.0)
    viewer.show_region(0, 0, *SIZE)
    shot = settle(viewer)
    colours = label_colors(np.array([2**60 + 1, 2**60 + 2], np.uint64))[:, :3]
    assert (colours[0] != colours[1]).any()
    assert (shot[:, : SIZE[0] // 2] == colours[0]).all()
    assert (shot[:, SIZE[0] // 2 :] == colours[1]).all()
    assert int(viewer.pick(80.0, 3.0)["big.ome.zarr"]) == 2**60 + 2


def test_ome_labels_are_discovered_and_shown_by_name(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """An OME image's ``labels/`` group is read: its label images are listed (the HUD
    says so), ``add_labels(name)`` / the ``k`` key shows one."""
    ids = label_picture()
    image = noise_image((SIZE[1], SIZE[0]), seed=21)
    img = write_pyramid(tmp_path / "img.ome.zarr", image, chunks=(32, 32), n_levels=1)
    group = zarr.open_group(img.path / "labels", mode="w")
    group.attrs["ome"] = {"version": "0.5", "labels": ["cells", "missing"]}
    write_pyramid(img.path / "labels" / "cells", ids, chunks=(32, 32), n_levels=1)
    viewer = make_viewer(str(img.path), colormap="gray", clim=(0, 255), show_hud=True)
    assert viewer.label_names == ["cells"]
    viewer.show_region(0, 0, *SIZE)
    settle(viewer)
    assert "labels: cells   (k shows)" in viewer.hud_lines()
    viewer.show_next_labels()
    assert [layer.name for layer in viewer.layers] == ["img.ome.zarr", "cells"]
    settle(viewer)
    assert viewer.pick(10.0, 10.0)["cells"] == 7
    assert not any(line.startswith("labels:") for line in viewer.hud_lines())


def test_float_labels_are_refused_with_one_clear_error(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Viewer]
) -> None:
    """Labels must be integers: a float array is a ValueError naming it, and the viewer
    (with its other layers) keeps running."""
    img, _, _ = write_scene(tmp_path, label_picture())
    floats = write_pyramid(
        tmp_path / "f.ome.zarr", np.zeros((32, 32), np.float32), chunks=(32, 32), n_levels=1
    )
    viewer = make_viewer(str(img.path), colormap="gray", clim=(0, 255))
    with pytest.raises(ValueError, match="labels must be integers, not float32"):
        viewer.add_labels(str(floats.path))
    assert len(viewer.layers) == 1
    viewer.show_region(0, 0, *SIZE)
    settle(viewer)
