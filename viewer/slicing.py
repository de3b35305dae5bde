"""From an nD image to the 2D plane on screen: axes, slice positions, chunk indices.

The displayed plane is spanned by two spatial axes, chosen by name: the axis named x
(any case) is always the screen's horizontal and the one named y its vertical, whatever
their order in the array, so an image stored as (x, y), (x, c, y) or (y, z, x) shows the
same picture as in OME's (..., z, y, x) order. Where one of the names is missing, the
last other spatial axis takes its role; without either name (e.g. spatial axes named a,
b), the last two spatial axes are (y, x). Every other axis is held at a position: the
channel axis by the channel being drawn, the others (z, t, ...) by a slice position
given in level-0 indices and carried to each level through world coordinates (so a z
that is downsampled in coarser levels maps to the right plane). Pure functions: no GPU,
no I/O.

The GPU places tiles in 32-bit floats: an image whose pixel sizes in the plane lie
outside ``MIN_PIXEL_SIZE``..``MAX_PIXEL_SIZE``, or whose world coordinates reach beyond
``MAX_WORLD``, would be drawn black or collapsed, so :meth:`Plane.of` refuses it with a
:class:`~chunkpool.SourceError`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from chunkpool import MultiscaleInfo, ScaleInfo, SourceError

__all__ = ["Plane", "SlicePosition"]

SlicePosition = tuple[tuple[int, int], ...]  # ((axis, level-0 index), ...), hashable

#: The range of pixel sizes and world coordinates the viewer draws (float32 holds about
#: 1.2e-38 to 3.4e38; the camera's matrices multiply and divide these, so keep a margin).
MIN_PIXEL_SIZE, MAX_PIXEL_SIZE, MAX_WORLD = 1e-30, 1e30, 1e32


@dataclass(frozen=True)
class Plane:
    """How an image's axes map to the screen."""

    info: MultiscaleInfo
    y_axis: int
    x_axis: int
    channel_axis: int | None
    slider_axes: tuple[int, ...]  # every other axis (z, t, ...), in array order

    @classmethod
    def of(cls, info: MultiscaleInfo) -> Plane:
        """The plane of an image: its spatial axes named y and x (see the module's
        docstring for the rule). Raises SourceError if the image has fewer than two
        spatial axes."""
        scale = info.levels[0]
        spatial = scale.spatial_axes
        if len(spatial) < 2:
            names = ", ".join(a.name for a in scale.axes)
            raise SourceError(f"{info.source}: needs two spatial axes to show, has axes {names}")
        y_axis, x_axis = _plane_axes(scale)
        for level in info.levels:
            _check_drawable(info, level, (y_axis, x_axis))
        others = tuple(
            i for i in range(scale.ndim) if i not in (y_axis, x_axis, scale.channel_axis)
        )
        return cls(info, y_axis, x_axis, scale.channel_axis, others)

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else self.info.levels[0].shape[self.channel_axis]

    def default_position(self) -> SlicePosition:
        """The middle of every spatial slider axis (e.g. mid-stack z), 0 for the others."""
        scale = self.info.levels[0]
        spatial = set(scale.spatial_axes)
        return tuple((a, scale.shape[a] // 2 if a in spatial else 0) for a in self.slider_axes)

    def clamp(self, position: Mapping[int, int]) -> SlicePosition:
        """A slice position with every slider axis inside the image."""
        shape = self.info.levels[0].shape
        return tuple(
            (a, int(np.clip(position.get(a, 0), 0, shape[a] - 1))) for a in self.slider_axes
        )

    def level_index(self, scale: ScaleInfo, axis: int, index0: int) -> int:
        """The index along ``axis`` at ``scale``'s level of level-0 index ``index0``."""
        level0 = self.info.levels[0]
        if axis not in scale.spatial_axes or level0.shape[axis] == scale.shape[axis]:
            return min(index0, scale.shape[axis] - 1)
        world = level0.translation[axis] + index0 * level0.scale[axis]
        index = round((world - scale.translation[axis]) / scale.scale[axis])
        return int(np.clip(index, 0, scale.shape[axis] - 1))

    def chunk_and_selection(
        self, level: int, iy: int, ix: int, channel: int, position: SlicePosition
    ) -> tuple[tuple[int, ...], tuple[int | slice, ...]]:
        """The chunk index holding tile (iy, ix) of ``channel`` at ``position``, and the
        selection inside that chunk's data that gives the 2D (y, x) plane."""
        scale = self.info.levels[level]
        chunk = scale.chunk_shape
        index = [0] * scale.ndim
        select: list[int | slice] = [slice(None)] * scale.ndim
        index[self.y_axis], index[self.x_axis] = iy, ix
        held = dict(position)
        if self.channel_axis is not None:
            held[self.channel_axis] = channel
        for axis, index0 in held.items():
            i = index0 if axis == self.channel_axis else self.level_index(scale, axis, index0)
            index[axis], select[axis] = divmod(i, chunk[axis])
        return tuple(index), tuple(select)

    def plane_of(self, data: np.ndarray, select: tuple[int | slice, ...]) -> np.ndarray:
        """The 2D (y, x) plane of a chunk's data (a view: transposed when x comes before
        y in the array)."""
        plane = data[select]
        return plane.T if self.x_axis < self.y_axis else plane


def _plane_axes(scale: ScaleInfo) -> tuple[int, int]:
    """(y axis, x axis) of the displayed plane: the spatial axes named y and x; a role
    whose name is absent goes to the last spatial axis left."""
    spatial = scale.spatial_axes
    named = {scale.axes[i].name.lower(): i for i in spatial}
    y_axis, x_axis = named.get("y"), named.get("x")
    rest = [i for i in spatial if i not in (y_axis, x_axis)]
    if x_axis is None:
        x_axis = rest.pop()
    if y_axis is None:
        y_axis = rest.pop()
    return y_axis, x_axis


def _check_drawable(info: MultiscaleInfo, scale: ScaleInfo, axes: tuple[int, int]) -> None:
    """Raise SourceError if a level's geometry in the plane is outside what float32
    world coordinates can draw (see the module's docstring)."""
    for axis in axes:
        size, offset, n = scale.scale[axis], scale.translation[axis], scale.shape[axis]
        name = scale.axes[axis].name
        if not MIN_PIXEL_SIZE <= size <= MAX_PIXEL_SIZE:
            raise SourceError(
                f"{info.source}: level {scale.level} cannot be shown: its pixel size {size!r} "
                f"along {name} is outside {MIN_PIXEL_SIZE:g}..{MAX_PIXEL_SIZE:g}"
            )
        if max(abs(offset - size / 2), abs(offset + (n - 0.5) * size)) > MAX_WORLD:
            raise SourceError(
                f"{info.source}: level {scale.level} cannot be shown: its world coordinates "
                f"along {name} reach beyond {MAX_WORLD:g}"
            )
