"""Camera: what part of the world the canvas shows. Pure arithmetic, no GPU.

The world is the images' physical space (OME-Zarr scale and translation), x to the
right and y *down* (array row 0 at the top). The camera is the world rectangle mapped
onto the whole canvas: its centre and its world width and height; the canvas has a
logical size (screen coordinates, origin top-left, y down: pointer events) and a
physical size in pixels (what the tiles are planned for). Pan, zoom, fit and region
choice change the rectangle; the viewer copies it into pygfx's orthographic camera
before each frame.
"""

from __future__ import annotations

from dataclasses import dataclass

from .tiling import View

__all__ = ["Camera"]


@dataclass
class Camera:
    """The world rectangle shown on a canvas of ``size`` logical pixels."""

    x: float = 0.0
    y: float = 0.0
    width: float = 1.0
    height: float = 1.0
    size: tuple[float, float] = (1.0, 1.0)

    @property
    def edges(self) -> tuple[float, float, float, float]:
        """World (x0, y0, x1, y1) of the canvas's edges."""
        return (
            self.x - self.width / 2,
            self.y - self.height / 2,
            self.x + self.width / 2,
            self.y + self.height / 2,
        )

    def view(
        self, physical_size: tuple[int, int], cursor: tuple[float, float] | None = None
    ) -> View:
        """The view for tile planning, on a canvas of ``physical_size`` pixels."""
        x0, y0, x1, y1 = self.edges
        pw, ph = physical_size
        return View(x0, y0, x1, y1, max(int(pw), 1), max(int(ph), 1), cursor)

    def show_world(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Map the world rectangle (edges) onto the whole canvas."""
        self.x, self.y = (x0 + x1) / 2, (y0 + y1) / 2
        self.width, self.height = x1 - x0, y1 - y0

    def fit(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Show the world rectangle whole, centred, with square pixels."""
        w, h = self.size
        per_px = max((x1 - x0) / max(w, 1e-9), (y1 - y0) / max(h, 1e-9))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        self.show_world(
            cx - w * per_px / 2, cy - h * per_px / 2, cx + w * per_px / 2, cy + h * per_px / 2
        )

    def pan(self, fx: float, fy: float) -> None:
        """Move the view by a fraction of its size."""
        self.x += fx * self.width
        self.y += fy * self.height

    def pan_screen(self, dx: float, dy: float) -> None:
        """Move the world under the pointer by (dx, dy) logical pixels (a drag)."""
        w, h = self.size
        self.x -= dx * self.width / max(w, 1e-9)
        self.y -= dy * self.height / max(h, 1e-9)

    def zoom(self, factor: float, around: tuple[float, float] | None = None) -> None:
        """Zoom by ``factor`` (> 1 zooms in), keeping world point ``around`` (default:
        the centre) where it is on the canvas."""
        fx, fy = around if around is not None else (self.x, self.y)
        self.width /= factor
        self.height /= factor
        self.x = fx + (self.x - fx) / factor
        self.y = fy + (self.y - fy) / factor

    def resize(self, width: float, height: float) -> None:
        """The canvas changed size: keep the scale (world units per logical pixel) and
        the centre."""
        old_w, old_h = self.size
        if old_w > 0 and old_h > 0:
            self.width *= width / old_w
            self.height *= height / old_h
        self.size = (width, height)

    def screen_to_world(self, sx: float, sy: float) -> tuple[float, float]:
        """Logical canvas coordinates (top-left origin) to world (x, y)."""
        x0, y0, x1, y1 = self.edges
        w, h = self.size
        return x0 + sx / w * (x1 - x0), y0 + sy / h * (y1 - y0)

    def world_to_screen(self, x: float, y: float) -> tuple[float, float]:
        """World (x, y) to logical canvas coordinates."""
        x0, y0, x1, y1 = self.edges
        w, h = self.size
        return (x - x0) / (x1 - x0) * w, (y - y0) / (y1 - y0) * h

    def to_dict(self) -> dict[str, float]:
        return {"x": self.x, "y": self.y, "width": self.width, "height": self.height}
