"""Small test images for the rendering tests, and their numpy ground truth.

Pyramids are written as OME-Zarr (0.5 on Zarr v3, or 0.4 on Zarr v2) whose level ``L``
is the 2x2 block mean of level ``L - 1`` (rounded half up), with scale ``2**L`` and
translation ``(2**L - 1) / 2`` per spatial axis: the block-mean pixel-centre convention
(times an optional pixel size, plus optional extra translations). :func:`expected_view`
computes what a view of such an image must show, by nearest sampling of one level at
the centres of the screen pixels, the way the viewer's GPU does it.
"""

from __future__ import annotations

import pathlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr

__all__ = [
    "Pyramid",
    "border_lines",
    "expected_view",
    "halve",
    "noise_image",
    "region_world",
    "texel_coordinates",
    "write_pyramid",
]

#: How far (in texels) a screen pixel centre may lie from a texel edge and still tie.
_NUDGE = 1e-3


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 block mean over the last two axes, rounded half up (integers) or exact
    (floats): the pyramid's rule."""
    if image.dtype.kind == "f":
        return (
            image[..., 0::2, 0::2]
            + image[..., 1::2, 0::2]
            + image[..., 0::2, 1::2]
            + image[..., 1::2, 1::2]
        ) / 4
    wide = image.astype(np.int64)
    total = wide[..., 0::2, 0::2] + wide[..., 1::2, 0::2] + wide[..., 0::2, 1::2]
    total += wide[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(image.dtype)


def noise_image(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """Independent random uint8 values from 1 to 255: any misplaced or resampled pixel
    shows, and black (0) never is data."""
    return np.random.default_rng(seed).integers(1, 256, size=shape, dtype=np.uint8)


@dataclass
class Pyramid:
    """A written multiscale image and what the viewer must show of it.

    ``levels`` are the arrays as written (finest first); ``scales`` and ``offsets``
    give per level the (y, x) world size of a pixel and world position of pixel
    (0, 0)'s centre, all transforms included.
    """

    path: pathlib.Path
    levels: list[np.ndarray]
    scales: list[tuple[float, float]]
    offsets: list[tuple[float, float]]
    chunks: tuple[int, ...]


def write_pyramid(
    path: pathlib.Path,
    level0: np.ndarray,
    *,
    chunks: tuple[int, ...],
    n_levels: int,
    zarr_format: int = 3,
    axes: Sequence[str] | None = None,
    pixel_size: float = 1.0,
    level_translations: Sequence[Sequence[float]] | None = None,
    multiscale_translation: Sequence[float] | None = None,
    omero: dict[str, Any] | None = None,
) -> Pyramid:
    """Write ``level0`` and its block-mean levels as an OME-Zarr image at ``path``.

    ``axes`` names the dimensions (default: the last ``ndim`` of t, c, z, y, x); only
    the last two (y, x) are downsampled. ``level_translations[L]`` is added to level
    L's own translation (one value per axis), ``multiscale_translation`` is a
    multiscale-level coordinateTransformation applied to every level after its own
    ones. ``zarr_format`` 3 writes OME-Zarr 0.5, 2 writes 0.4.
    """
    ndim = level0.ndim
    names = list(axes) if axes is not None else ["t", "c", "z", "y", "x"][-ndim:]
    kinds = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}
    levels = [level0]
    for _ in range(1, n_levels):
        levels.append(halve(levels[-1]))
    group = zarr.open_group(path, mode="w", zarr_format=zarr_format)
    extra: dict[str, Any] = (
        {"dimension_names": names}
        if zarr_format == 3
        else {"chunk_key_encoding": {"name": "v2", "separator": "/"}}
    )
    datasets, scales, offsets = [], [], []
    image_shift = list(multiscale_translation) if multiscale_translation else [0.0] * ndim
    for level, data in enumerate(levels):
        arr = group.create_array(
            str(level), shape=data.shape, chunks=chunks, dtype=data.dtype, fill_value=0, **extra
        )
        arr[...] = data
        factor = 2**level
        scale = [1.0] * (ndim - 2) + [factor * pixel_size] * 2
        shift = [0.0] * (ndim - 2) + [(factor - 1) / 2 * pixel_size] * 2
        if level_translations is not None:
            shift = [s + t for s, t in zip(shift, level_translations[level], strict=True)]
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {"type": "scale", "scale": scale},
                    {"type": "translation", "translation": shift},
                ],
            }
        )
        scales.append((scale[-2], scale[-1]))
        offsets.append((shift[-2] + image_shift[-2], shift[-1] + image_shift[-1]))
    multiscale: dict[str, Any] = {
        "name": path.name,
        "axes": [{"name": n, "type": kinds[n]} for n in names],
        "datasets": datasets,
        "type": "mean",
    }
    if multiscale_translation is not None:
        multiscale["coordinateTransformations"] = [  # the spec wants a scale first
            {"type": "scale", "scale": [1.0] * ndim},
            {"type": "translation", "translation": list(multiscale_translation)},
        ]
    meta: dict[str, Any] = {"multiscales": [multiscale]}
    if omero is not None:
        meta["omero"] = omero
    if zarr_format == 3:
        attrs = {"ome": {"version": "0.5", **meta}}
    else:
        attrs = {**meta, "multiscales": [{"version": "0.4", **multiscale}]}
    group.attrs.update(attrs)
    return Pyramid(path, levels, scales, offsets, chunks)


def region_world(pyramid: Pyramid, region: Sequence[float]) -> tuple[float, float, float, float]:
    """The world edges (x0, y0, x1, y1) of a region of level-0 pixels (x0, y0 inclusive,
    x1, y1 exclusive), as ``Viewer.show_region`` computes them."""
    x0, y0, x1, y1 = region
    (sy, sx), (oy, ox) = pyramid.scales[0], pyramid.offsets[0]
    return (ox + (x0 - 0.5) * sx, oy + (y0 - 0.5) * sy, ox + (x1 - 0.5) * sx, oy + (y1 - 0.5) * sy)


def texel_coordinates(
    pyramid: Pyramid, level: int, world: Sequence[float], size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Where the centres of the screen pixels fall in ``level``, in texels (y for each
    row, x for each column; texel ``k`` spans ``[k, k + 1)``) when the world rectangle
    ``world`` (x0, y0, x1, y1 edges) fills a canvas of ``size`` (W, H)."""
    x0, y0, x1, y1 = world
    width, height = size
    (sy, sx), (oy, ox) = pyramid.scales[level], pyramid.offsets[level]
    v = (y0 + (np.arange(height) + 0.5) * (y1 - y0) / height - oy) / sy + 0.5
    u = (x0 + (np.arange(width) + 0.5) * (x1 - x0) / width - ox) / sx + 0.5
    return v, u


def border_lines(
    pyramid: Pyramid, level: int, world: Sequence[float], size: tuple[int, int]
) -> tuple[list[int], list[int]]:
    """The screen rows and columns showing a texel of ``level`` next to a chunk border
    (on either side of it), or at the edge of the image: where seams would be."""
    lines = []
    for centres, n, chunk in zip(
        texel_coordinates(pyramid, level, world, size),
        pyramid.levels[level].shape[-2:],
        pyramid.chunks[-2:],
        strict=True,
    ):
        starts = np.arange(0, n, chunk)
        edge_texels = np.union1d(np.union1d(starts, starts - 1), [n - 1])
        texels = np.floor(centres).astype(int)
        lines.append(np.nonzero(np.isin(texels, edge_texels[edge_texels >= 0]))[0].tolist())
    return lines[0], lines[1]


def expected_view(
    pyramid: Pyramid,
    level: int,
    world: Sequence[float],
    size: tuple[int, int],
    *,
    plane: tuple[int, ...] = (),
    background: float = 0,
) -> np.ndarray:
    """What a (H, W) canvas shows of ``level`` when the world rectangle ``world``
    (x0, y0, x1, y1 edges) fills it: the nearest texel at each screen pixel centre.

    Returns an array of shape (4, H, W): the samples at the centres nudged by a tiny
    amount either way along y and x. The four agree except where a centre lies on a
    texel edge, where either neighbour is a right answer. ``plane`` indexes the
    level's leading (non-yx) axes; ``background`` is shown where the level has no
    pixel.
    """
    data = pyramid.levels[level][plane]
    v, u = texel_coordinates(pyramid, level, world, size)
    candidates = []
    for dv in (-_NUDGE, _NUDGE):
        for du in (-_NUDGE, _NUDGE):
            rows, cols = np.floor(v + dv).astype(int), np.floor(u + du).astype(int)
            inside = ((rows >= 0) & (rows < data.shape[0]))[:, None] & (
                (cols >= 0) & (cols < data.shape[1])
            )[None, :]
            rows, cols = np.clip(rows, 0, data.shape[0] - 1), np.clip(cols, 0, data.shape[1] - 1)
            candidates.append(np.where(inside, data[rows][:, cols], background))
    return np.stack(candidates)
