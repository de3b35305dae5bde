"""What a multiscale image is: its levels, axes, world transforms and channels.

These objects are plain, immutable descriptions built once when an image is opened
(see :mod:`chunkpool.metadata`). Everything that decides *which* chunks to load (a
viewer's level choice, visible tiles) needs only these, never the store.

Coordinate convention (OME-Zarr's): along each axis, the *centre* of pixel ``i`` of a
level lies at world coordinate ``translation + i * scale``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import zarr

__all__ = ["Axis", "ChannelInfo", "MultiscaleInfo", "ScaleInfo"]


@dataclass(frozen=True)
class Axis:
    """One array dimension: its name, OME type ("space", "time", "channel" or other) and
    unit (e.g. "micrometer"), as far as the metadata says."""

    name: str
    type: str | None = None
    unit: str | None = None


@dataclass(frozen=True)
class ChannelInfo:
    """Display metadata of one channel, from OME ``omero`` when present.

    ``color`` is "RRGGBB" hex; ``window`` is the contrast window (start, end) and
    ``range`` the value range (min, max) the metadata declares.
    """

    index: int
    label: str
    color: str | None = None
    window: tuple[float, float] | None = None
    range: tuple[float, float] | None = None
    active: bool = True


@dataclass(frozen=True, eq=False)
class ScaleInfo:
    """One level of a multiscale image: a zarr array plus its place in the world.

    ``chunk_shape`` is the unit the pool loads: the array's chunk, or its inner chunk
    when the array is sharded (``shard_shape`` is then the shard's shape).
    ``scale`` and ``translation`` give, per axis, the world size of a pixel and the
    world position of pixel 0's centre.
    """

    level: int
    path: str
    array: zarr.Array
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    shard_shape: tuple[int, ...] | None
    dtype: np.dtype
    fill_value: Any
    axes: tuple[Axis, ...]
    scale: tuple[float, ...]
    translation: tuple[float, ...]

    def __repr__(self) -> str:
        return (
            f"<ScaleInfo level={self.level} path={self.path!r} shape={self.shape} "
            f"chunks={self.chunk_shape} dtype={self.dtype}>"
        )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @cached_property
    def spatial_axes(self) -> tuple[int, ...]:
        """Indices of the spatial dimensions, in array order (e.g. z, y, x)."""
        return spatial_axis_indices(self.axes)

    @cached_property
    def channel_axis(self) -> int | None:
        return _axis_of_type(self.axes, "channel")

    @cached_property
    def time_axis(self) -> int | None:
        return _axis_of_type(self.axes, "time")

    @property
    def n_channels(self) -> int:
        return 1 if self.channel_axis is None else self.shape[self.channel_axis]

    @property
    def n_timepoints(self) -> int:
        return 1 if self.time_axis is None else self.shape[self.time_axis]

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """Size in pixels of the spatial dimensions."""
        return tuple(self.shape[i] for i in self.spatial_axes)

    @property
    def spatial_scale(self) -> tuple[float, ...]:
        """World size of one pixel along each spatial dimension."""
        return tuple(self.scale[i] for i in self.spatial_axes)

    @property
    def spatial_offset(self) -> tuple[float, ...]:
        """World position of pixel 0's centre along each spatial dimension."""
        return tuple(self.translation[i] for i in self.spatial_axes)

    @property
    def spatial_chunk_shape(self) -> tuple[int, ...]:
        """Chunk size in pixels along each spatial dimension."""
        return tuple(self.chunk_shape[i] for i in self.spatial_axes)

    @property
    def spatial_chunk_world_shape(self) -> tuple[float, ...]:
        """Chunk size in world units along each spatial dimension."""
        return tuple(self.chunk_shape[i] * self.scale[i] for i in self.spatial_axes)

    @cached_property
    def chunk_grid_shape(self) -> tuple[int, ...]:
        """Number of chunks along each dimension."""
        return tuple(math.ceil(s / c) for s, c in zip(self.shape, self.chunk_shape, strict=True))

    @property
    def n_chunks(self) -> int:
        return math.prod(self.chunk_grid_shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def check_index(self, index: tuple[int, ...]) -> bool:
        """Whether ``index`` is a valid chunk index of this level."""
        return len(index) == self.ndim and all(
            0 <= i < n for i, n in zip(index, self.chunk_grid_shape, strict=True)
        )

    def chunk_slices(self, index: tuple[int, ...]) -> tuple[slice, ...]:
        """The region of the array that chunk ``index`` covers, cropped to the array."""
        return tuple(
            slice(i * c, min((i + 1) * c, s))
            for i, c, s in zip(index, self.chunk_shape, self.shape, strict=True)
        )

    def chunk_data_shape(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the data of chunk ``index`` (edge chunks are cropped to the array)."""
        return tuple(
            min(c, s - i * c) for i, c, s in zip(index, self.chunk_shape, self.shape, strict=True)
        )

    def chunk_nbytes(self, index: tuple[int, ...]) -> int:
        return math.prod(self.chunk_data_shape(index)) * self.itemsize

    def iter_chunk_indices(self) -> Iterator[tuple[int, ...]]:
        """Every chunk index of this level, in C order."""
        return (tuple(int(i) for i in idx) for idx in np.ndindex(*self.chunk_grid_shape))


@dataclass(frozen=True, eq=False)
class MultiscaleInfo:
    """A multiscale image: its levels (finest first), axes and channel metadata.

    ``source`` names the store for messages (never with credentials), ``path`` is the
    image's group path inside it. ``ome_version`` is "0.4" or "0.5" for OME-Zarr images
    and None for a plain array or a plain group of arrays.
    """

    source: str
    path: str
    levels: tuple[ScaleInfo, ...]
    name: str | None = None
    channels: tuple[ChannelInfo, ...] = ()
    ome_version: str | None = None
    attributes: dict[str, Any] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return (
            f"<MultiscaleInfo {self.source}{'/' + self.path if self.path else ''} "
            f"{len(self.levels)} levels, shape={self.levels[0].shape}, dtype={self.dtype}>"
        )

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.levels[0].axes

    @property
    def dtype(self) -> np.dtype:
        return self.levels[0].dtype

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    @property
    def n_channels(self) -> int:
        return self.levels[0].n_channels

    @property
    def n_timepoints(self) -> int:
        return self.levels[0].n_timepoints

    def __getitem__(self, level: int) -> ScaleInfo:
        return self.levels[level]

    def __len__(self) -> int:
        return len(self.levels)

    def __iter__(self) -> Iterator[ScaleInfo]:
        return iter(self.levels)


def spatial_axis_indices(axes: tuple[Axis, ...]) -> tuple[int, ...]:
    """Indices of the spatial axes: those typed "space", else those named x, y or z."""
    typed = tuple(i for i, a in enumerate(axes) if a.type == "space")
    if typed:
        return typed
    return tuple(
        i for i, a in enumerate(axes) if a.type is None and a.name.lower() in ("x", "y", "z")
    )


def _axis_of_type(axes: tuple[Axis, ...], kind: str) -> int | None:
    names = {"channel": ("c", "ch", "channel"), "time": ("t", "time")}[kind]
    for i, a in enumerate(axes):
        if a.type == kind:
            return i
    for i, a in enumerate(axes):
        if a.type is None and a.name.lower() in names:
            return i
    return None
