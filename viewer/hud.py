"""The heads-up display: a few lines of text and a progress bar in a screen-space scene.

:func:`hud_lines` formats what the viewer tells it (:class:`HudInfo`: the layers and
their progress, the zoom, the slice, the cursor and the values under it, the active
channel's window) as text, without a GPU; :class:`Hud` draws the lines in its own
scene, after the image, with a ``ScreenCoordsCamera`` (origin at the bottom-left,
logical pixels), so panning and zooming never move it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pygfx as gfx

from .tileset import TileStatus

__all__ = [
    "Hud",
    "HudInfo",
    "LayerSummary",
    "format_count",
    "format_value",
    "hud_lines",
    "scale_bar",
]

#: OME-Zarr (UDUNITS-2) length units, as the scale bar writes them.
UNIT_SYMBOLS = {
    "angstrom": "Å", "nanometer": "nm", "micrometer": "µm", "micron": "µm",
    "millimeter": "mm", "centimeter": "cm", "meter": "m", "kilometer": "km",
    "inch": "in", "foot": "ft", "mile": "mi", "parsec": "pc",
}  # fmt: skip
#: How long the colorbar is, in logical pixels.
COLORBAR_PX = 160.0
#: How long the scale bar is at most, in logical pixels.
SCALE_BAR_PX = 120.0


@dataclass(frozen=True)
class LayerSummary:
    """One layer as the HUD lists it."""

    name: str
    kind: str
    visible: bool
    active: bool
    status: TileStatus
    n_levels: int


@dataclass(frozen=True)
class HudInfo:
    """What the HUD shows, as plain values."""

    layers: tuple[LayerSummary, ...]
    zoom: float  # level-0 pixels of the active layer per screen pixel, inverted
    position: tuple[tuple[str, int], ...] = ()
    cursor: tuple[float, float, float, float, str] | None = None  # col, row, x, y, unit
    values: tuple[tuple[str, Any], ...] = ()  # (label, stored value or None)
    channel: tuple[str, tuple[float, float]] | None = None  # the active channel, window
    hidden_labels: tuple[str, ...] = ()  # label images found in labels/ and not shown
    live: bool = False  # following its stores
    live_age: float | None = None  # seconds since a store last changed (None: not yet)
    live_problem: str | None = None  # why a watched store cannot be followed now


def hud_lines(info: HudInfo) -> list[str]:
    """The HUD's text: the active layer's level and the zoom; the visible tiles of every
    shown layer (loaded, pending, failed), or "zoom in" when there are too many; the
    slice; the layer list (when more than one); the label images found and not
    shown; the active channel and its window; the
    cursor's position and the stored value of every shown channel under it."""
    active = next((layer for layer in info.layers if layer.active), info.layers[0])
    lines = [f"level {active.status.level}/{active.n_levels - 1}   zoom {info.zoom * 100:.4g}%"]
    shown = [layer.status for layer in info.layers if layer.visible] or [active.status]
    overflow = max(s.overflow for s in shown)
    if overflow:
        lines.append(f"zoom in: {format_count(overflow)} tiles in view at the coarsest level")
    else:
        loaded, pending, failed = (
            sum(getattr(s, f) for s in shown) for f in ("loaded", "pending", "failed")
        )
        lines.append(
            f"tiles {loaded} loaded, {pending} pending, {failed} failed"
            + ("" if pending == 0 else "   loading…")
        )
    if info.position:
        lines.append(", ".join(f"{name}={index}" for name, index in info.position))
    if info.live:
        age = "no new data yet" if info.live_age is None else f"newest {info.live_age:.1f} s ago"
        lines.append(f"live: {age}")
        if info.live_problem:
            lines.append(f"live: {info.live_problem}")
    if len(info.layers) > 1:
        for layer in info.layers:
            mark = ">" if layer.active else " "
            eye = "" if layer.visible else "  (hidden)"
            lines.append(f"{mark} {layer.name} [{layer.kind}]{eye}")
    if info.hidden_labels:
        lines.append(f"labels: {', '.join(info.hidden_labels)}   (k shows)")
    if info.channel is not None:
        label, (lo, hi) = info.channel
        lines.append(f"{label}: window {format_value(lo)} – {format_value(hi)}")
    if info.cursor is not None:
        col, row, x, y, unit = info.cursor
        lines.append(f"x {col:.1f}  y {row:.1f} px   ({x:.4g}, {y:.4g}) {unit}".rstrip())
        values = [f"{label}: {'—' if v is None else format_value(v)}" for label, v in info.values]
        lines.append("   ".join(values))
    return lines


def scale_bar(world_per_px: float, unit: str | None) -> tuple[float, str] | None:
    """A scale bar for a view of ``world_per_px`` world units per logical pixel: its
    length in pixels (at most ``SCALE_BAR_PX``, at least a third of it) and label, a
    round length (1, 2 or 5 times a power of ten) in ``unit``; None without a unit."""
    if not unit or not world_per_px > 0 or not math.isfinite(world_per_px):
        return None
    most = SCALE_BAR_PX * world_per_px
    power = 10.0 ** math.floor(math.log10(most))
    length = max(m * power for m in (1, 2, 5) if m * power <= most)
    symbol = UNIT_SYMBOLS.get(unit.lower(), unit)
    return length / world_per_px, f"{length:g} {symbol}"


def format_count(n: int) -> str:
    """A count, exact up to a million, else like 1.2e+19."""
    return str(n) if n < 1_000_000 else f"{n:.2g}"


def format_value(value: Any) -> str:
    """A value as stored: integers exact (uint64 and int64 included), floats as the
    shortest text that reads back as the same number of their own precision."""
    if isinstance(value, (int, np.integer, bool, np.bool_)):
        return str(int(value))
    number = float(value)
    if number.is_integer() and abs(number) < 1e15:
        return str(int(number))
    return str(value) if isinstance(value, np.floating) else repr(number)


MARGIN = 8
PAD = 5
BAR_HEIGHT = 4


class Hud:
    """Text lines in the top-left corner on a translucent box, and a progress bar.

    Its pygfx objects are made when it is first drawn or given something to show, not
    when it is created: its text labels and colour bar are ~25 ms of Python, which a
    viewer would otherwise spend (for its HUD and its help) before asking for its
    first chunks, whether it ever shows them or not."""

    def __init__(self) -> None:
        self._scene: gfx.Scene | None = None
        self._visible = True
        self._lines: tuple[str, ...] = ()
        self._progress: float | None = None
        self._size: tuple[float, float] = (0, 0)
        self._corner = "top-left"

    @property
    def scene(self) -> gfx.Scene:
        """What the HUD draws (made on first use)."""
        if self._scene is None:
            self._build()
        assert self._scene is not None
        return self._scene

    @property
    def camera(self) -> gfx.ScreenCoordsCamera:
        """The camera to draw :attr:`scene` with (made on first use)."""
        if self._scene is None:
            self._build()
        return self._camera

    def _build(self) -> None:
        self._scene = gfx.Scene()
        self._scene.visible = self._visible
        self._camera = gfx.ScreenCoordsCamera()
        self._text = _label(13, "top-left")
        self._box = _rect((0, 0, 0, 0.6), order=0)
        self._bar_back = _rect((1, 1, 1, 0.15), order=1)
        self._bar = _rect((0.3, 0.8, 1.0, 0.9), order=2)
        self._scale = _rect((1, 1, 1, 0.9), order=2)
        self._scale_text = _label(12, "bottom-left")
        self._scale_shown: tuple[float, str] | None = None
        self._scene.add(self._box, self._bar_back, self._bar, self._text)
        self._scene.add(self._scale, self._scale_text)
        self._colorbar = gfx.Image(
            gfx.Geometry(grid=gfx.Texture(np.zeros((1, 256, 4), np.float32), dim=2)),
            gfx.ImageBasicMaterial(clim=(0, 1), interpolation="nearest", depth_test=False),
        )
        self._colorbar.render_order = 2
        self._colorbar_low = _label(12, "bottom-left")
        self._colorbar_high = _label(12, "bottom-right")
        self._colorbar_shown: tuple | None = None
        self._scene.add(self._colorbar, self._colorbar_low, self._colorbar_high)
        self.show_colorbar(None, (0.0, 1.0), (0, 0))

    @property
    def visible(self) -> bool:
        return self._visible

    @visible.setter
    def visible(self, value: bool) -> None:
        self._visible = bool(value)
        if self._scene is not None:
            self._scene.visible = self._visible

    def update(
        self,
        lines: list[str],
        progress: float | None,
        size: tuple[float, float],
        corner: str = "top-left",
    ) -> None:
        """Show ``lines`` in ``corner`` ("top-left" or "top-right"); ``progress`` in
        [0, 1] draws the bar (None hides it)."""
        if self._scene is None:
            self._build()
        lines_t = tuple(lines)
        if (lines_t, progress, size, corner) == (
            self._lines,
            self._progress,
            self._size,
            self._corner,
        ):
            return
        if lines_t != self._lines:
            self._text.set_text("\n".join(lines_t) or " ")
        self._lines, self._progress, self._size, self._corner = lines_t, progress, size, corner
        self._layout()

    def show_scale_bar(self, bar: tuple[float, str] | None, size: tuple[float, float]) -> None:
        """Draw ``bar`` (length in logical pixels, label: :func:`scale_bar`) at the
        bottom-left corner; None hides it."""
        if self._scene is None:
            self._build()
        self._scale.visible = self._scale_text.visible = bar is not None
        if bar is None or (bar, size) == self._scale_shown:
            return
        self._scale_shown = (bar, size)
        length, label = bar
        _place(self._scale, MARGIN, MARGIN, MARGIN + length, MARGIN + 4)
        self._scale_text.set_text(label)
        self._scale_text.local.position = (MARGIN, MARGIN + 8, 0.5)

    def show_colorbar(
        self, lut: np.ndarray | None, clim: tuple[float, float], size: tuple[float, float]
    ) -> None:
        """Draw ``lut`` ((256, 4) RGBA, the active channel's colormap) as a bar at the
        bottom-right corner, labelled with the ends of its window ``clim``; None hides it."""
        if self._scene is None:
            self._build()
        shown = lut is not None
        for part in (self._colorbar, self._colorbar_low, self._colorbar_high):
            part.visible = shown
        key = None if lut is None else (lut.tobytes(), clim, size)
        if lut is None or key == self._colorbar_shown:
            return
        self._colorbar_shown = key
        self._colorbar.geometry.grid.set_data(np.ascontiguousarray(lut[None], np.float32))
        width, _ = size
        x0 = width - MARGIN - COLORBAR_PX
        self._colorbar.local.scale = (COLORBAR_PX / lut.shape[0], 8, 1)
        self._colorbar.local.position = (x0 + COLORBAR_PX / lut.shape[0] / 2, MARGIN + 4, 0.4)
        self._colorbar_low.set_text(format_value(clim[0]))
        self._colorbar_low.local.position = (x0, MARGIN + 10, 0.5)
        self._colorbar_high.set_text(format_value(clim[1]))
        self._colorbar_high.local.position = (width - MARGIN, MARGIN + 10, 0.5)

    def _layout(self) -> None:
        width, height = self._size
        self._text.local.position = (MARGIN + PAD, height - MARGIN - PAD, 0.5)
        self._text._update_object()  # lay the text out now, to size the box around it
        (x0, y0, _), (x1, y1, _) = self._text.get_world_bounding_box()
        if self._corner == "top-right":
            shift = width - MARGIN - PAD - x1
            self._text.local.x += shift
            x0, x1 = x0 + shift, x1 + shift
        width = max(x1 - x0, 160)
        bottom = y0 - (BAR_HEIGHT + PAD if self._progress is not None else 0)
        _place(self._box, x0 - PAD, bottom - PAD, x0 + width + PAD, y1 + PAD)
        show_bar = self._progress is not None
        self._bar.visible = self._bar_back.visible = show_bar
        if show_bar:
            _place(self._bar_back, x0, bottom, x0 + width, bottom + BAR_HEIGHT)
            done = max(0.0, min(1.0, self._progress or 0.0))
            _place(self._bar, x0, bottom, x0 + max(width * done, 1), bottom + BAR_HEIGHT)


def _label(font_size: int, anchor: str) -> gfx.Text:
    text = gfx.Text(
        text=" ",
        font_size=font_size,
        screen_space=False,
        anchor=anchor,
        material=gfx.TextMaterial(color="#f0f0f0", depth_test=False, alpha_mode="blend"),
    )
    text.render_order = 2
    return text


def _rect(color: tuple[float, float, float, float], order: int) -> gfx.Mesh:
    mesh = gfx.Mesh(
        gfx.plane_geometry(1, 1),
        gfx.MeshBasicMaterial(color=color, alpha_mode="blend", depth_test=False),
    )
    mesh.render_order = order
    return mesh


def _place(mesh: gfx.Mesh, x0: float, y0: float, x1: float, y1: float) -> None:
    mesh.local.position = ((x0 + x1) / 2, (y0 + y1) / 2, 0.4)
    mesh.local.scale = (max(x1 - x0, 1e-3), max(y1 - y0, 1e-3), 1)
