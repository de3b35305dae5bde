"""How each channel is displayed: colormap, contrast window, visibility.

Defaults come from OME ``omero`` metadata when present (colour, window, label, active),
else from the data as it arrives, never waiting for it (:class:`AutoWindow`): the
0.5 / 99.5 percentiles of the first planes loaded, refined once from the visible tiles
of the coarsest level unless that barely moves the window. Colormaps are
``cmap`` colormaps: any name it knows ("gray", "viridis", "magma", ...) or a single
colour, meaning a ramp from black to that colour (how fluorescence channels are shown).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
from cmap import Color, Colormap

from chunkpool import ChannelInfo

__all__ = [
    "WINDOW_JUMP_TOLERANCE",
    "AutoWindow",
    "ChannelDisplay",
    "default_channels",
    "has_window",
    "parse_colormap",
    "percentile_window",
    "provisional_window",
    "texture_dtype",
    "window_change",
]

#: Colours given to channels without metadata, in order (napari's choice for 2+).
DEFAULT_COLORS = ("magenta", "lime", "cyan", "yellow", "red", "blue", "orange", "white")

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
    n_channels: int, omero: Sequence[ChannelInfo], dtype: np.dtype
) -> list[ChannelDisplay]:
    """Display settings for every channel: from ``omero`` where it says, else a default
    colour (gray for a single channel) and the :func:`provisional_window` of ``dtype``
    (to be replaced from the data as it arrives: :class:`AutoWindow`)."""
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
        if has_window(meta):
            clim = (float(meta.window[0]), float(meta.window[1]))
        else:
            clim = provisional_window(dtype)
        label = meta.label if meta is not None else f"Channel {c}"
        visible = meta.active if meta is not None else True
        channels.append(ChannelDisplay(c, label, colormap, clim, visible))
    return channels


def has_window(meta: ChannelInfo | None) -> bool:
    """Whether OME channel metadata gives a usable contrast window."""
    return meta is not None and meta.window is not None and meta.window[1] > meta.window[0]


def provisional_window(dtype: np.dtype) -> tuple[float, float]:
    """The window a channel starts with before any of its data has arrived: the whole
    range of an integer dtype, (0, 1) for floats and booleans. Nothing is drawn with
    it: the first data replaces it before its texture is shown (:class:`AutoWindow`)."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return (float(info.min), float(info.max))
    return (0.0, 1.0)


def window_change(old: tuple[float, float], new: tuple[float, float]) -> float:
    """The largest change, over every stored value, of where the value falls in the
    window (0 at the low end, 1 at the high end, clipped): how far any pixel's shade
    (its colormap position) moves when ``old`` becomes ``new``. Both mappings are
    piecewise linear with corners at the windows' ends, so so is their difference, and
    its largest size is at one of those four values."""

    def position(window: tuple[float, float], value: float) -> float:
        lo, hi = window
        return min(max((value - lo) / (hi - lo), 0.0), 1.0)

    return max(abs(position(old, v) - position(new, v)) for v in (*old, *new))


#: A new contrast estimate that moves no pixel's shade by more than this (two steps of
#: an 8-bit display) "barely moves": the window is kept, so the picture does not jump.
WINDOW_JUMP_TOLERANCE = 2 / 255


@dataclass
class AutoWindow:
    """The contrast window of a channel that neither the metadata nor the user gave
    one: estimated from its data as it arrives, without blocking the first frame.

    ``stage`` goes ``"provisional"`` (the :func:`provisional_window`: no data yet) ->
    ``"first"`` (the percentile window of the first planes loaded, applied before they
    are drawn) -> ``"final"``, once the sample is complete (every visible tile of the
    coarsest level done: the same data a blocking sample used to read): that estimate
    refines the window once, unless it barely moves from it
    (:data:`WINDOW_JUMP_TOLERANCE`, :func:`window_change`), when the window is kept. A
    sample complete at its first planes goes straight to final (one change, before
    anything of the channel is drawn)."""

    stage: str = "provisional"

    @property
    def final(self) -> bool:
        return self.stage == "final"

    def update(
        self, clim: tuple[float, float], planes: Sequence[np.ndarray], complete: bool
    ) -> tuple[float, float] | None:
        """The new window given the ``planes`` of the sample loaded so far (and whether
        it is ``complete``) and the current window ``clim``; None to keep ``clim``."""
        if self.final or not planes:
            return None
        if self.stage == "first" and not complete:
            return None
        estimate = percentile_window(np.concatenate([np.ravel(p) for p in planes]))
        if self.stage == "provisional":
            self.stage = "final" if complete else "first"
            return estimate
        self.stage = "final"
        return None if window_change(clim, estimate) <= WINDOW_JUMP_TOLERANCE else estimate


def texture_dtype(dtype: np.dtype) -> np.dtype:
    """The dtype a chunk is uploaded as: itself if the GPU samples it, else float32
    (float64, int64, uint64) or uint8 (bool)."""
    dtype = np.dtype(dtype)
    if dtype in _TEXTURE_DTYPES:
        return dtype
    if dtype == np.bool_:
        return np.dtype(np.uint8)
    return np.dtype(np.float32)
