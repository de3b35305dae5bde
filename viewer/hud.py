"""The heads-up display: a few lines of text and a progress bar in a screen-space scene.

It lives in its own scene, drawn after the image with a ``ScreenCoordsCamera`` (origin
at the bottom-left, logical pixels), so panning and zooming never move it.
"""

from __future__ import annotations

import pygfx as gfx

__all__ = ["Hud"]

MARGIN = 8
PAD = 5
BAR_HEIGHT = 4


class Hud:
    """Text lines in the top-left corner on a translucent box, and a progress bar."""

    def __init__(self) -> None:
        self.scene = gfx.Scene()
        self.camera = gfx.ScreenCoordsCamera()
        self._text = gfx.Text(
            text=" ",
            font_size=13,
            screen_space=False,
            anchor="top-left",
            material=gfx.TextMaterial(color="#f0f0f0", depth_test=False, alpha_mode="blend"),
        )
        self._text.render_order = 2
        self._box = _rect((0, 0, 0, 0.6), order=0)
        self._bar_back = _rect((1, 1, 1, 0.15), order=1)
        self._bar = _rect((0.3, 0.8, 1.0, 0.9), order=2)
        self.scene.add(self._box, self._bar_back, self._bar, self._text)
        self._lines: tuple[str, ...] = ()
        self._progress: float | None = None
        self._size: tuple[float, float] = (0, 0)
        self.visible = True

    @property
    def visible(self) -> bool:
        return self.scene.visible

    @visible.setter
    def visible(self, value: bool) -> None:
        self.scene.visible = value

    def update(self, lines: list[str], progress: float | None, size: tuple[float, float]) -> None:
        """Show ``lines``; ``progress`` in [0, 1] draws the bar (None hides it)."""
        lines_t = tuple(lines)
        if (lines_t, progress, size) == (self._lines, self._progress, self._size):
            return
        if lines_t != self._lines:
            self._text.set_text("\n".join(lines_t) or " ")
        self._lines, self._progress, self._size = lines_t, progress, size
        self._layout()

    def _layout(self) -> None:
        _, height = self._size
        self._text.local.position = (MARGIN + PAD, height - MARGIN - PAD, 0.5)
        self._text._update_object()  # lay the text out now, to size the box around it
        (x0, y0, _), (x1, y1, _) = self._text.get_world_bounding_box()
        width = max(x1 - x0, 160)
        bottom = y0 - (BAR_HEIGHT + PAD if self._progress is not None else 0)
        _place(self._box, x0 - PAD, bottom - PAD, x0 + width + PAD, y1 + PAD)
        show_bar = self._progress is not None
        self._bar.visible = self._bar_back.visible = show_bar
        if show_bar:
            _place(self._bar_back, x0, bottom, x0 + width, bottom + BAR_HEIGHT)
            done = max(0.0, min(1.0, self._progress or 0.0))
            _place(self._bar, x0, bottom, x0 + max(width * done, 1), bottom + BAR_HEIGHT)


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
