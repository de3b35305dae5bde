"""The last step of a frame, from the renderer's picture to the screen, changes no pixel.

pygfx draws the scene into an internal ``rgba8unorm-srgb`` texture and then copies it
to the canvas in an output pass. At 1:1 (``pixel_scale`` 1, ``pixel_filter`` "nearest")
that copy must be exact. The tests of :mod:`test_render` use canvases a few hundred
pixels wide, where a copy that filters its source by a hair still rounds back to the
same bytes; here the canvas is as wide as a full HD screen, and every dark value stands
between two white ones, so any weight a screen pixel takes from its neighbours (read in
linear light, where a white neighbour outweighs a dark step hundreds of times) shows.
"""

from __future__ import annotations

import logging
import pathlib
import types

import numpy as np
import pytest
from support.images import write_pyramid

from viewer import Viewer
from viewer.output import use_exact_output

pytestmark = pytest.mark.render

#: A full HD screen's width; a strip of it is cheap to draw.
WIDTH, HEIGHT = 1920, 16


def dark_between_white(width: int, height: int) -> np.ndarray:
    """Columns alternate: a dark value (1..32, shifted per row) and white (255)."""
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    dark = (1 + (x // 2 + 5 * y) % 32).astype(np.uint8)
    return np.where(x % 2 == 0, dark, np.uint8(255)).astype(np.uint8)


@pytest.mark.parametrize("chunks", [(HEIGHT, WIDTH), (HEIGHT, 128)], ids=["one", "tiled"])
def test_wide_screens_show_dark_values_exactly(
    tmp_path: pathlib.Path, chunks: tuple[int, int]
) -> None:
    """A 1920-pixel-wide 1:1 view of uint8 data through the grey colormap over the
    dtype's range is the data, byte for byte, up to the last column (as one texture and
    as 15 tiles)."""
    image = dark_between_white(WIDTH, HEIGHT)
    pyramid = write_pyramid(tmp_path / "strip.ome.zarr", image, chunks=chunks, n_levels=1)
    viewer = Viewer(
        str(pyramid.path),
        None,
        size=(WIDTH, HEIGHT),
        colormap="gray",
        clim=(0, 255),
        show_hud=False,
    )
    try:
        viewer.show_region(0, 0, WIDTH, HEIGHT)
        assert viewer.wait_settled(60), viewer.layer.status()
        shot = viewer.screenshot()
    finally:
        viewer.close()
    off = (shot != image[..., None]).any(axis=-1)
    ys, xs = np.nonzero(off)
    assert not off.any(), (
        f"{off.sum()} pixels differ from the data, at x {xs.min()}..{xs.max()}: "
        f"data {image[ys[:5], xs[:5]].tolist()} shown as {shot[ys[:5], xs[:5], 0].tolist()}"
    )


def test_an_unknown_output_pass_is_left_alone_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If pygfx's renderer no longer keeps the output pass this viewer replaces, the
    renderer is not touched (frames still show) and a warning says what may be off."""
    renderer = types.SimpleNamespace(_output_pass=object())
    before = renderer._output_pass
    with caplog.at_level(logging.WARNING, logger="zarrscope"):
        use_exact_output(renderer)  # type: ignore[arg-type]
    assert renderer._output_pass is before
    assert "output pass" in caplog.text
