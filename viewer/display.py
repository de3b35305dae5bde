"""How each channel is displayed: colormap, contrast window, visibility.

Defaults come from OME ``omero`` metadata when present (colour, window, label, active),
else from the data: the 0.5 / 99.5 percentiles of the coarsest level. Colormaps are
``cmap`` colormaps: any name it knows ("gray", "viridis", "magma", ...) or a single
colour, meaning a ramp from black to that colour (how fluorescence channels are shown).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
from cmap import Color, Colormap

from chunkpool import ChannelInfo, ChunkPool, ChunkPoolError

if TYPE_CHECKING:
    from .slicing import Plane, SlicePosition

__all__ = [
    "ChannelDisplay",
    "contrast_samples",
    "default_channels",
    "parse_colormap",
    "percentile_window",
    "texture_dtype",
]

#: Colours given to channels without metadata, in order (napari's choice for 2+).
DEFAULT_COLORS = ("magenta", "lime", "cyan", "yellow", "red", "blue", "orange", "white")

#: Chunks of the coarsest level read at start-up to pick default contrast windows.
CONTRAST_SAMPLE_CHUNKS = 16
#: How long start-up waits for those chunks at most (the ones still loading are skipped).
CONTRAST_SAMPLE_SECONDS = 10.0

#: Texture formats the GPU samples directly; other dtypes are converted on upload.
_TEXTURE_DTYPES = {
    np.dtype(t) for t in ("uint8", "uint16", "uint32", "int8", "int16", "int32", "float32")
}


def parse_colormap(name: str) -> Colormap:
    """A ``cmap`` colormap from a colormap name, or a black-to-colour ramp from a colour
    (a name like "magenta" that is not a colormap, or "#RRGGBB" / "RRGGBB").

    Raises ValueError with a clear message for anything else.
    """
    text = name.strip()
    if len(text) == 6 and all(ch in "0123456789abcdefABCDEF" for ch in text):
        text = "#" + text
    if not text.startswith("#"):
        try:
            return Colormap(text)
        except Exception:  # not a colormap name: perhaps a colour name
            pass
    try:
        color = Color(text)
    except Exception:
        raise ValueError(f"unknown colormap or colour {name!r}") from None
    return Colormap(["black", color.hex], name=f"black-{color.hex}")


@dataclass(frozen=True)
class ChannelDisplay:
    """Display settings of one channel (``index`` along the image's channel axis)."""

    index: int
    label: str
    colormap: str
    clim: tuple[float, float]
    visible: bool = True

    def lut(self, n: int = 256) -> np.ndarray:
        """The colormap as an (n, 4) float32 RGBA table."""
        return np.asarray(parse_colormap(self.colormap).lut(n), dtype=np.float32)

    def with_clim(self, lo: float, hi: float) -> ChannelDisplay:
        if not hi > lo:
            hi = lo + max(abs(lo) * 1e-6, 1e-6)
        return replace(self, clim=(float(lo), float(hi)))

    def scaled_window(self, factor: float) -> ChannelDisplay:
        """The window narrowed (< 1) or widened (> 1) around its centre."""
        lo, hi = self.clim
        mid, half = (lo + hi) / 2, (hi - lo) / 2 * factor
        return self.with_clim(mid - half, mid + half)

    def shifted_window(self, fraction: float) -> ChannelDisplay:
        """The window moved by ``fraction`` of its width."""
        lo, hi = self.clim
        step = (hi - lo) * fraction
        return self.with_clim(lo + step, hi + step)


def percentile_window(
    data: np.ndarray, low: float = 0.5, high: float = 99.5
) -> tuple[float, float]:
    """A contrast window from the data's percentiles (NaNs ignored; never empty)."""
    values = np.asarray(data, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        return (0.0, 1.0)
    lo, hi = np.percentile(values, [low, high])
    if hi <= lo:
        lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1.0
    return (float(lo), float(hi))


def default_channels(
    n_channels: int,
    omero: Sequence[ChannelInfo],
    samples: Sequence[np.ndarray],
) -> list[ChannelDisplay]:
    """Display settings for every channel: from ``omero`` where it says, else a default
    colour (gray for a single channel) and the percentile window of ``samples[c]``."""
    by_index = {ch.index: ch for ch in omero}
    channels = []
    for c in range(n_channels):
        meta = by_index.get(c)
        if meta is not None and meta.color:
            colormap = "#" + meta.color
        elif n_channels == 1:
            colormap = "gray"
        else:
            colormap = DEFAULT_COLORS[c % len(DEFAULT_COLORS)]
        if meta is not None and meta.window is not None and meta.window[1] > meta.window[0]:
            clim = (float(meta.window[0]), float(meta.window[1]))
        else:
            clim = percentile_window(samples[c])
        label = meta.label if meta is not None else f"Channel {c}"
        visible = meta.active if meta is not None else True
        channels.append(ChannelDisplay(c, label, colormap, clim, visible))
    return channels


def texture_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a chunk is uploaded as: itself if the GPU samples it, else float32
    (float64, int64, uint64) or uint8 (bool)."""
    dtype = np.dtype(dtype)
    if dtype in _TEXTURE_DTYPES:
        return dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    return np.dtype(np.float32)


def contrast_samples(pool: ChunkPool, plane: Plane, position: SlicePosition) -> list[np.ndarray]:
    """Per channel, data of the coarsest level (a few chunks around its centre).

    A sample chunk that fails to load (its tile shows hatched) or has not arrived
    within ``CONTRAST_SAMPLE_SECONDS`` is left out: sampling never stops the viewer
    from opening (a channel without samples gets a default window)."""
    info = pool.multiscale_info
    level = len(info.levels) - 1
    scale = info.levels[level]
    gy, gx = scale.chunk_grid_shape[plane.y_axis], scale.chunk_grid_shape[plane.x_axis]
    side = max(1, int(math.sqrt(CONTRAST_SAMPLE_CHUNKS)))
    ys = range(max(0, gy // 2 - side // 2), min(gy, gy // 2 - side // 2 + side))
    xs = range(max(0, gx // 2 - side // 2), min(gx, gx // 2 - side // 2 + side))
    ref = "contrast-samples"
    samples = [
        (c, pool.get_chunk(level, index, ref), select)
        for c in range(plane.n_channels)
        for iy in ys
        for ix in xs
        for index, select in [plane.chunk_and_selection(level, iy, ix, c, position)]
    ]
    planes: list[list[np.ndarray]] = [[] for _ in range(plane.n_channels)]
    deadline = time.monotonic() + CONTRAST_SAMPLE_SECONDS
    try:
        for c, loc, select in samples:
            try:
                data = loc.wait(max(0.0, deadline - time.monotonic()))
            except (ChunkPoolError, TimeoutError):
                continue
            planes[c].append(plane.plane_of(data, select).ravel())
    finally:
        pool.drop_chunks([loc.key for _, loc, _ in samples], ref)
    return [np.concatenate(p) if p else np.empty(0, scale.dtype) for p in planes]
