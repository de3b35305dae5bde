"""Which tiles to load and show: level choice, visible tiles, prefetch, priorities.

Pure functions on plain numbers, no GPU: the viewer calls them every frame, and the
tests call them alone. World coordinates follow OME-Zarr: along each axis, the centre
of pixel ``i`` of a level is at ``offset + i * scale``; y grows downwards on screen.

A *tile* is one chunk of the displayed plane at one level: ``(level, iy, ix)``. The
plan for a view holds, with a priority each (lower loads sooner):

- **visible** tiles of the target level (the coarsest level whose pixels are no larger
  than a screen pixel, times a bias), and of the coarsest level (the fallback that is
  always there), coarser first, then nearer the cursor (else the view centre) first;
- **prefetch** tiles: a ring around the view at the target level, and, while zooming
  in, the next finer level's tiles around the cursor.

While a view's target tiles load, the tiles shown before stay (:func:`tiles_to_keep`),
so that nothing goes blank or flashes when the level changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from chunkpool import MultiscaleInfo

__all__ = [
    "PREFETCH",
    "VISIBLE",
    "PlaneLevel",
    "TileKey",
    "View",
    "choose_level",
    "eviction_order",
    "plan_tiles",
    "plane_levels",
    "tiles_to_keep",
    "visible_tiles",
]

TileKey = tuple[int, int, int]  # (level, iy, ix)

#: Priority tiers (the most significant part of a priority).
VISIBLE, PREFETCH = 0, 1
_TIER = 1e9
_LEVEL = 1e6
_MAX_DISTANCE = _LEVEL - 1


@dataclass(frozen=True)
class PlaneLevel:
    """One level's geometry in the displayed plane, as (y, x) pairs.

    ``scale`` is the world size of a pixel, ``offset`` the world position of pixel
    (0, 0)'s centre, ``chunk`` the chunk size in pixels.
    """

    level: int
    shape: tuple[int, int]
    chunk: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]

    @property
    def grid(self) -> tuple[int, int]:
        """Number of tiles along y and x."""
        return (
            math.ceil(self.shape[0] / self.chunk[0]),
            math.ceil(self.shape[1] / self.chunk[1]),
        )

    @property
    def pixel_size(self) -> float:
        """World size of one pixel (the smaller of y and x)."""
        return min(self.scale)

    def tile_bounds(self, iy: int, ix: int) -> tuple[float, float, float, float]:
        """World edges ``(y0, y1, x0, x1)`` of tile (iy, ix), cropped to the image."""
        (ny, nx), (cy, cx), (sy, sx), (oy, ox) = self.shape, self.chunk, self.scale, self.offset
        return (
            oy + (iy * cy - 0.5) * sy,
            oy + (min((iy + 1) * cy, ny) - 0.5) * sy,
            ox + (ix * cx - 0.5) * sx,
            ox + (min((ix + 1) * cx, nx) - 0.5) * sx,
        )

    def tile_range(
        self, y0: float, y1: float, x0: float, x1: float, margin: int = 0
    ) -> tuple[int, int, int, int]:
        """Tiles ``[iy0, iy1) x [ix0, ix1)`` that intersect the world rectangle, grown by
        ``margin`` tiles on each side, clipped to the image (may be empty)."""
        gy, gx = self.grid
        iy0, iy1 = _index_range(y0, y1, self.offset[0], self.scale[0], self.chunk[0], gy, margin)
        ix0, ix1 = _index_range(x0, x1, self.offset[1], self.scale[1], self.chunk[1], gx, margin)
        return iy0, iy1, ix0, ix1


def _index_range(
    lo: float, hi: float, offset: float, scale: float, chunk: int, count: int, margin: int
) -> tuple[int, int]:
    """Chunks along one axis whose world extent intersects ``(lo, hi)``."""
    first = math.floor(((lo - offset) / scale + 0.5) / chunk)
    last = math.ceil(((hi - offset) / scale + 0.5) / chunk)
    return max(0, first - margin), min(count, max(first, last) + margin)


@dataclass(frozen=True)
class View:
    """What the canvas shows: world edges of the visible rectangle, canvas size in
    pixels, and the cursor's world position (None when the pointer is elsewhere)."""

    x0: float
    y0: float
    x1: float
    y1: float
    width: int
    height: int
    cursor: tuple[float, float] | None = None

    @property
    def pixel_size(self) -> float:
        """World size of one screen pixel (the smaller of x and y)."""
        return min((self.x1 - self.x0) / self.width, (self.y1 - self.y0) / self.height)

    @property
    def focus(self) -> tuple[float, float]:
        """Where the user looks: the cursor if over the canvas, else the centre (x, y)."""
        if self.cursor is not None:
            return self.cursor
        return ((self.x0 + self.x1) / 2, (self.y0 + self.y1) / 2)


def plane_levels(info: MultiscaleInfo, y_axis: int, x_axis: int) -> list[PlaneLevel]:
    """The (y, x) plane geometry of every level of an image, finest first."""
    return [
        PlaneLevel(
            level=s.level,
            shape=(s.shape[y_axis], s.shape[x_axis]),
            chunk=(s.chunk_shape[y_axis], s.chunk_shape[x_axis]),
            scale=(s.scale[y_axis], s.scale[x_axis]),
            offset=(s.translation[y_axis], s.translation[x_axis]),
        )
        for s in info.levels
    ]


def choose_level(levels: Sequence[PlaneLevel], view: View, bias: float = 1.0) -> int:
    """The coarsest level whose pixels are no larger than ``bias`` screen pixels.

    ``bias`` > 1 prefers coarser levels (less to load), < 1 sharper ones. When even the
    finest level's pixels are larger than a screen pixel (zoomed in), that is level 0.
    """
    limit = view.pixel_size * bias * (1 + 1e-9)
    best = 0
    for i, level in enumerate(levels):
        if level.pixel_size <= limit:
            best = i
    return best


def _priority(tier: int, rank: int, distance: float) -> float:
    return tier * _TIER + rank * _LEVEL + min(distance, _MAX_DISTANCE)


def _add_tiles(
    plan: dict[TileKey, float],
    level: PlaneLevel,
    tiles: tuple[int, int, int, int],
    tier: int,
    rank: int,
    focus: tuple[float, float],
    pixel_size: float,
) -> None:
    """Add a block of tiles to ``plan``, each at its best priority so far."""
    fx, fy = focus
    (cy, cx), (sy, sx), (oy, ox) = level.chunk, level.scale, level.offset
    iy0, iy1, ix0, ix1 = tiles
    base = tier * _TIER + rank * _LEVEL
    for iy in range(iy0, iy1):
        dy = oy + ((iy + 0.5) * cy - 0.5) * sy - fy
        for ix in range(ix0, ix1):
            dx = ox + ((ix + 0.5) * cx - 0.5) * sx - fx
            p = base + min(math.hypot(dx, dy) / pixel_size, _MAX_DISTANCE)
            key = (level.level, iy, ix)
            old = plan.get(key)
            if old is None or p < old:
                plan[key] = p


def plan_tiles(
    levels: Sequence[PlaneLevel],
    view: View,
    target: int,
    *,
    prefetch_ring: int = 1,
    zoom_in: bool = False,
    resident_tiles: int = 64,
) -> dict[TileKey, float]:
    """The tiles to hold for ``view`` at ``target`` level, with their priorities.

    Visible tiles of the coarsest and target levels come first (coarser first, nearer
    the focus first), then the prefetch ring around the view and, when ``zoom_in``,
    the next finer level around the focus. The whole coarsest level is held when it
    has at most ``resident_tiles`` tiles, so it can always stand in.
    """
    plan: dict[TileKey, float] = {}
    coarsest = len(levels) - 1
    rect = (view.y0, view.y1, view.x0, view.x1)
    focus, px = view.focus, view.pixel_size
    top = levels[coarsest]
    gy, gx = top.grid
    if gy * gx <= resident_tiles:
        _add_tiles(plan, top, (0, gy, 0, gx), PREFETCH, 0, focus, px)
    _add_tiles(plan, top, top.tile_range(*rect), VISIBLE, 0, focus, px)
    level = levels[target]
    rank = coarsest - target
    _add_tiles(plan, level, level.tile_range(*rect), VISIBLE, rank, focus, px)
    if prefetch_ring:
        ring = level.tile_range(*rect, margin=prefetch_ring)
        _add_tiles(plan, level, ring, PREFETCH, rank, focus, px)
    if zoom_in and target > 0:
        finer = levels[target - 1]
        fx, fy = focus
        half_w, half_h = (view.x1 - view.x0) / 4, (view.y1 - view.y0) / 4
        around = finer.tile_range(fy - half_h, fy + half_h, fx - half_w, fx + half_w)
        _add_tiles(plan, finer, around, PREFETCH, rank + 1, focus, px)
    return plan


def visible_tiles(level: PlaneLevel, view: View) -> list[TileKey]:
    """The tiles of ``level`` that intersect the view."""
    iy0, iy1, ix0, ix1 = level.tile_range(view.y0, view.y1, view.x0, view.x1)
    return [(level.level, iy, ix) for iy in range(iy0, iy1) for ix in range(ix0, ix1)]


def tiles_to_keep(
    shown: Iterable[TileKey],
    levels: Sequence[PlaneLevel],
    view: View,
    target: int,
    done: Mapping[TileKey, object] | set[TileKey],
) -> set[TileKey]:
    """Which of the tiles shown so far must stay while the view's target tiles load.

    A shown tile outside the new plan stays if it intersects the view and covers a
    target-level tile that is not ``done`` (loaded or failed) yet: it stands in for it.
    """
    keep: set[TileKey] = set()
    rect = (view.y0, view.y1, view.x0, view.x1)
    goal = levels[target]
    for key in shown:
        level, iy, ix = key
        if level == target:
            continue
        y0, y1, x0, x1 = levels[level].tile_bounds(iy, ix)
        if y1 <= rect[0] or y0 >= rect[1] or x1 <= rect[2] or x0 >= rect[3]:
            continue  # out of view
        cy0, cy1, cx0, cx1 = goal.tile_range(
            max(y0, rect[0]), min(y1, rect[1]), max(x0, rect[2]), min(x1, rect[3])
        )
        if any((target, jy, jx) not in done for jy in range(cy0, cy1) for jx in range(cx0, cx1)):
            keep.add(key)
    return keep


def eviction_order(
    candidates: Iterable[TileKey],
    levels: Sequence[PlaneLevel],
    view: View,
    last_shown: Mapping[TileKey, int],
) -> list[TileKey]:
    """Candidates for eviction, first to go first: least recently shown, then farthest
    from the view's focus."""
    fx, fy = view.focus

    def key(tile: TileKey) -> tuple[int, float]:
        level, iy, ix = tile
        y0, y1, x0, x1 = levels[level].tile_bounds(iy, ix)
        distance = math.hypot((x0 + x1) / 2 - fx, (y0 + y1) / 2 - fy)
        return (last_shown.get(tile, -1), -distance)

    return sorted(candidates, key=key)
