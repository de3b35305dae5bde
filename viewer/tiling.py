"""Which tiles to load and show: level choice, visible tiles, prefetch, priorities.

Pure functions on plain numbers, no GPU: the viewer calls them every frame, and the
tests call them alone. World coordinates follow OME-Zarr: along each axis, the centre
of pixel ``i`` of a level is at ``offset + i * scale``; y grows downwards on screen.

A *tile* is one chunk of the displayed plane at one level: ``(level, iy, ix)``. The
plan for a view holds, with a priority each (lower loads sooner):

- **visible** tiles of the target level (the coarsest level whose pixels are no larger
  than a screen pixel, times a bias), and of the coarsest level (the fallback beneath
  them), coarser first, then nearer the cursor (else the view centre) first;
- **prefetch** tiles: a ring around the view at the target level while the camera is
  still; while it moves, the tiles of the views it is expected to show instead
  (:mod:`viewer.prediction`, :func:`predicted_priority`).

While a view's target tiles load, the tiles shown before stay (:func:`tiles_to_keep`),
so that nothing goes blank or flashes when the level changes.

**A level chosen for the link.** The target level (the *ideal* one, from the zoom and
the bias) is what a view settles on, always. With an estimate of the link to the store
(:class:`chunkpool.LinkEstimate`: throughput and latency, measured by the pool), what is
shown *first* is the finest level whose missing visible bytes arrive within a time
budget (:func:`first_level`, ``LINK_BUDGET``: what is loaded or cached is free), then
the level just above the ideal one (at most 2x blurred, a third of the ideal's bytes or
less), then the ideal level (:func:`refinement`). Their visible tiles come before the
ideal's (:func:`add_refinement`), and the link carries them in that order: new tiles
are requested in priority order, paced to keep the link just busy (:func:`admit`: a
closed loop on what is in flight, so the next stage is asked for while the last tiles
of the one before still arrive), since loads in flight together share the link and
would all arrive late. On a fast
link (or before any estimate) the ideal level is shown first and everything is
requested at once: as without it.

**Cost and the tile budget.** Planning costs O(tiles on screen), whatever the size of the
image: tile ranges are computed arithmetically (:meth:`PlaneLevel.tile_range`,
:func:`tile_count`) and only ranges that fit a level's *tile budget* are ever enumerated.
The budget (:func:`tile_budget`) is what the screen can use: the tiles needed to show
``MAX_DENSITY`` texels per screen pixel along each axis, edges included, at least
``RESIDENT_TILES`` and at most ``MAX_TILES``. The level choice gives at most 2 / bias
texels per screen pixel in a pyramid that halves per level, so the budget binds only
when the view is zoomed out beyond the coarsest level (or for a bias below 1/2). Then:

- a level whose tiles in view exceed its budget is never loaded, not even in part: the
  view shows the finest level at or coarser than the chosen one that fits
  (:func:`view_level`);
- when even the coarsest level does not fit (say a 2^40-pixel-wide image without a
  pyramid, or one whose coarsest level is 2^30 wide, seen whole), the view is
  *overflowing*: nothing is loaded, nothing stands in, the view is settled at once (there
  is nothing to wait for), and the viewer says how many tiles are in view ("zoom in").
  Nothing rather than a part: each tile there is far smaller than a screen pixel, and
  a part of the image (the tiles near the cursor, say) would pass for all of it;
- the coarsest level is held whole only when it has at most ``RESIDENT_TILES`` tiles.

So no view plans more than a few budgets' worth of tiles, and a screenshot of an
overflowing view returns at once with that message instead of loading millions of
chunks.

**Precision.** The GPU works in float32: a tile 2^39 world units from the origin would
be placed to within 2^16 units. The scene is therefore drawn relative to a *render
origin* near the view (:func:`follow_origin`), moved when the view gets far from it
relative to its size, so that what is on screen is always within float32's reach.

**Failed tiles** are tried again with exponential, capped backoff
(:class:`RetrySchedule`, on an injected clock) as long as they are held, including the
always-resident coarsest level: a tile that keeps failing stays hatched between tries.
"""

from __future__ import annotations

import heapq
import itertools
import math
import time
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from chunkpool import LinkEstimate, MultiscaleInfo

__all__ = [
    "LINK_BUDGET",
    "MAX_DENSITY",
    "MAX_TILES",
    "ORIGIN_SLACK",
    "PREFETCH",
    "RESIDENT_TILES",
    "VISIBLE",
    "PlaneLevel",
    "RetrySchedule",
    "TileKey",
    "TooManyTilesError",
    "View",
    "add_refinement",
    "admit",
    "choose_level",
    "eviction_order",
    "first_level",
    "follow_origin",
    "is_visible_priority",
    "plan_tiles",
    "plane_levels",
    "predicted_priority",
    "refinement",
    "slice_prefetch_priority",
    "tile_budget",
    "tile_count",
    "tiles_in_view",
    "tiles_to_keep",
    "view_complete",
    "view_level",
    "visible_tiles",
]

TileKey = tuple[int, int, int]  # (level, iy, ix)

#: Priority tiers (the most significant part of a priority).
VISIBLE, PREFETCH = 0, 1
_TIER = 1e9
_LEVEL = 1e6
_MAX_DISTANCE = _LEVEL - 1

#: Texels per screen pixel (along each axis) up to which a level in view is loaded.
MAX_DENSITY = 4
#: The most tiles of one level loaded for one view, whatever the screen and chunks.
MAX_TILES = 1 << 16
#: A coarsest level of at most this many tiles is held whole; budgets are never smaller.
RESIDENT_TILES = 64

#: The render origin moves once the view's centre is this many view sizes away.
ORIGIN_SLACK = 16.0

#: Seconds within which the first level shown for a view should arrive (the default).
LINK_BUDGET = 0.25
#: New tiles are asked for while the link is projected busy for less than this many
#: latencies (to keep it busy while a new request waits out its latency) plus
#: ``LINK_WINDOW_SLACK`` seconds (the frame or so before the viewer asks again).
LINK_WINDOW_LATENCIES = 1.5
LINK_WINDOW_SLACK = 0.05
#: However slow the estimate says the link is, at least this many loads are kept in
#: flight (an estimate too low must not leave the link idle between loads).
LINK_MIN_IN_FLIGHT = 4

TileRange = tuple[int, int, int, int]  # [iy0, iy1) x [ix0, ix1)


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
    """Chunks along one axis whose world extent intersects ``(lo, hi)``. Positions far
    outside the image (or infinite) are clamped first, so the result is exact and cheap
    for any view; NaN gives an empty range."""
    first = ((lo - offset) / scale + 0.5) / chunk
    last = ((hi - offset) / scale + 0.5) / chunk
    if not (first == first and last == last):  # NaN
        return 0, 0
    first = math.floor(min(max(first, -1.0), count + 1.0))
    last = math.ceil(min(max(last, -1.0), count + 1.0))
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


def first_level(
    levels: Sequence[PlaneLevel],
    view: View,
    ideal: int,
    link: LinkEstimate | None,
    tile_bytes: Sequence[float],
    present: Callable[[TileKey], bool],
    budget: float = LINK_BUDGET,
) -> int:
    """The level to show first for ``view``: the finest from ``ideal`` up whose missing
    visible tiles arrive within ``budget`` seconds over ``link``, else the coarsest.

    ``tile_bytes[level]`` is what fetching one tile of a level costs (encoded bytes,
    every channel shown), ``present(key)`` whether a tile needs no fetch (loaded or
    cached: free). Without an estimate, the ideal level (as if the link were fast). A
    level with more tiles in view than its budget is skipped (never loaded). Costs
    O(1) per level whose tiles all fit the budget even if none is present, else
    O(its tiles in view), coarser levels having ever fewer.
    """
    if link is None:
        return ideal
    rect = (view.y0, view.y1, view.x0, view.x1)
    for i in range(ideal, len(levels)):
        level = levels[i]
        tiles = level.tile_range(*rect)
        if not _fits(level, view, tiles):
            continue
        if link.seconds(tile_count(tiles) * tile_bytes[i]) <= budget:
            return i  # even with nothing present
        iy0, iy1, ix0, ix1 = tiles
        missing = sum(
            1 for iy in range(iy0, iy1) for ix in range(ix0, ix1) if not present((i, iy, ix))
        )
        if link.seconds(missing * tile_bytes[i]) <= budget:
            return i
    return len(levels) - 1


def refinement(first: int, ideal: int) -> tuple[int, ...]:
    """The levels coarser than ``ideal`` shown on the way to it, coarsest first: the
    ``first`` level (:func:`first_level`), then the one just above the ideal, which
    shows the view at most 2x blurred for about a third of the ideal's bytes (the
    levels between would cost more than they show). Empty when ``first`` is ideal."""
    if first <= ideal:
        return ()
    return (first,) if first == ideal + 1 else (first, ideal + 1)


def add_refinement(
    plan: dict[TileKey, float], levels: Sequence[PlaneLevel], view: View, stages: Iterable[int]
) -> None:
    """Add to ``plan`` the visible tiles of each level of ``stages`` (:func:`refinement`)
    as visible tiles: coarser levels first, before the target's, nearer the focus
    first. A level whose tiles in view exceed its budget is left out."""
    coarsest = len(levels) - 1
    rect = (view.y0, view.y1, view.x0, view.x1)
    for i in stages:
        level = levels[i]
        tiles = level.tile_range(*rect)
        if _fits(level, view, tiles):
            _add_tiles(plan, level, tiles, VISIBLE, coarsest - i, view.focus, view.pixel_size)


def admit(
    plan: Mapping[TileKey, float],
    held: Callable[[TileKey], bool],
    cost: Callable[[TileKey], float],
    link: LinkEstimate,
    now: float,
    busy_until: float,
    in_flight: tuple[int, float],
) -> tuple[dict[TileKey, float], float, float | None]:
    """The part of ``plan`` to hold now on ``link``, paced: ``(plan part, busy_until,
    when to call again)``.

    ``busy_until`` is when the link is projected to have carried everything asked of
    it so far; ``in_flight`` is what is asked and not arrived: (loads, bytes). The
    projection is cut to what those bytes need (``now`` if nothing is in flight), so
    loads that arrive sooner than projected make room at once (closed loop). The tiles
    already ``held`` stay; the new ones are taken in priority order while the
    projection is less than ``LINK_WINDOW_LATENCIES`` latencies plus
    ``LINK_WINDOW_SLACK`` seconds ahead of ``now`` (what keeps the link busy while a
    new request waits out its latency), or while fewer than ``LINK_MIN_IN_FLIGHT``
    loads are in flight (however slow the estimate), each moving it by its ``cost``
    (bytes) over the throughput, starting a latency from now at the earliest. A new
    tile that costs nothing (loaded, cached) is always taken. The rest waits: the third
    value is when to call again (None if nothing waits). Loads in flight together
    share the link and end together, so asking for everything at once would delay the
    most urgent to the end; asking in time, in order, keeps the link busy and the
    order, and since each stage's tiles (the next level, then prefetch) are asked for
    while the last ones of the stage before are still arriving, the link does not idle
    between stages. Costs O(plan log plan).
    """
    loads, nbytes = in_flight
    busy_until = min(busy_until, now + link.seconds(nbytes))
    out: dict[TileKey, float] = {}
    new: list[tuple[float, TileKey]] = []
    for key, priority in plan.items():
        if held(key):
            out[key] = priority
        else:
            new.append((priority, key))
    new.sort()
    ahead = LINK_WINDOW_LATENCIES * link.latency + LINK_WINDOW_SLACK
    wake: float | None = None
    for priority, key in new:
        c = cost(key)
        if c <= 0:
            out[key] = priority
        elif wake is None and (busy_until - now < ahead or loads < LINK_MIN_IN_FLIGHT):
            out[key] = priority
            busy_until = max(busy_until, now + link.latency) + c / link.throughput
            loads += 1
        elif wake is None:
            wake = busy_until - ahead  # nothing less urgent overtakes it
    return out, busy_until, wake


def follow_origin(origin: tuple[float, float], view: View) -> tuple[float, float]:
    """The render origin (world x, y) to draw ``view`` relative to: ``origin`` while the
    view's centre is within ``ORIGIN_SLACK`` view sizes of it, else the view's centre.

    Everything on screen is then within ``ORIGIN_SLACK`` view sizes (plus a tile) of
    the origin, so float32 places it to about 2^-20 of the view size, a small fraction of
    a screen pixel, however far from the world's origin the view is.
    """
    cx, cy = (view.x0 + view.x1) / 2, (view.y0 + view.y1) / 2
    size = max(view.x1 - view.x0, view.y1 - view.y0)
    if max(abs(cx - origin[0]), abs(cy - origin[1])) <= ORIGIN_SLACK * size:
        return origin
    return (cx, cy)


def tile_count(tiles: TileRange) -> int:
    """Number of tiles in a range ``(iy0, iy1, ix0, ix1)``: O(1), however large."""
    iy0, iy1, ix0, ix1 = tiles
    return max(0, iy1 - iy0) * max(0, ix1 - ix0)


def tiles_in_view(level: PlaneLevel, view: View) -> int:
    """How many tiles of ``level`` intersect the view (counted, not enumerated)."""
    return tile_count(level.tile_range(view.y0, view.y1, view.x0, view.x1))


def tile_budget(level: PlaneLevel, view: View) -> int:
    """The most tiles of ``level`` worth loading for ``view``: enough to show
    ``MAX_DENSITY`` texels per screen pixel along each axis (edge tiles included), at
    least ``RESIDENT_TILES``, at most ``MAX_TILES``. It depends on the canvas size and
    the chunk size only, never on the image size."""
    ny = math.ceil(view.height * MAX_DENSITY / level.chunk[0]) + 2
    nx = math.ceil(view.width * MAX_DENSITY / level.chunk[1]) + 2
    return max(RESIDENT_TILES, min(MAX_TILES, ny * nx))


def _fits(level: PlaneLevel, view: View, tiles: TileRange) -> bool:
    return tile_count(tiles) <= tile_budget(level, view)


def view_level(levels: Sequence[PlaneLevel], view: View, bias: float = 1.0) -> tuple[int, int]:
    """The level to show for ``view``, and how many tiles are in view if there are too
    many to show any level (else 0).

    That is :func:`choose_level`'s level if its tiles in view fit its budget, else the
    finest coarser level that fits; if none does, the view *overflows*: the coarsest
    level is returned with its count of tiles in view, and nothing is to be loaded.
    """
    chosen = choose_level(levels, view, bias)
    for i in range(chosen, len(levels)):
        if tiles_in_view(levels[i], view) <= tile_budget(levels[i], view):
            return i, 0
    return len(levels) - 1, tiles_in_view(levels[-1], view)


def _add_tiles(
    plan: dict[TileKey, float],
    level: PlaneLevel,
    tiles: TileRange,
    tier: int,
    rank: int,
    focus: tuple[float, float],
    pixel_size: float,
) -> None:
    """Add a block of tiles to ``plan``, each at its best priority so far."""
    fx, fy = focus
    (cy, cx), (sy, sx), (oy, ox) = level.chunk, level.scale, level.offset
    iy0, iy1, ix0, ix1 = tiles
    if ix0 >= ix1:
        return  # no column: not a single row to go through (there may be 2^30 of them)
    base = tier * _TIER + rank * _LEVEL
    # a view narrower than float64 can tell apart far out (zoomed in ~2^52 times at
    # 2^40) has pixel size 0: every tile is then as near as any other
    per_pixel = 1.0 / pixel_size if pixel_size > 0 else 0.0
    for iy in range(iy0, iy1):
        dy = oy + ((iy + 0.5) * cy - 0.5) * sy - fy
        for ix in range(ix0, ix1):
            dx = ox + ((ix + 0.5) * cx - 0.5) * sx - fx
            p = base + min(math.hypot(dx, dy) * per_pixel, _MAX_DISTANCE)
            key = (level.level, iy, ix)
            old = plan.get(key)
            if old is None or p < old:
                plan[key] = p


def slice_prefetch_priority(priority: float, ahead: int) -> float:
    """The priority of a visible tile's twin ``ahead`` slices further along a played
    axis: a prefetch, after the ring's nearest, nearer slices first, nearer the focus
    first within a slice."""
    return PREFETCH * _TIER + ahead * _LEVEL + priority % _LEVEL


def predicted_priority(seconds: float) -> float:
    """The priority of a tile the camera is expected to show in ``seconds``: a
    prefetch, sooner first (10 us apart), before the slices ahead and the ring (but
    the coarsest level's, which is ranked by distance alone)."""
    return PREFETCH * _TIER + min(max(seconds, 0.0) * 1e5, _MAX_DISTANCE)


def is_visible_priority(priority: float) -> bool:
    """Whether a planned priority is of the visible tier."""
    return priority < PREFETCH * _TIER


def plan_tiles(
    levels: Sequence[PlaneLevel],
    view: View,
    target: int,
    *,
    prefetch_ring: int = 1,
    resident_tiles: int = RESIDENT_TILES,
) -> dict[TileKey, float]:
    """The tiles to hold for ``view`` at ``target`` level, with their priorities.

    Visible tiles of the coarsest and target levels come first (coarser first, nearer
    the focus first), then the prefetch ring around the view. The whole coarsest level
    is held when it has at most ``resident_tiles`` tiles, so it can always stand in.

    A block of tiles is planned only if it fits its level's :func:`tile_budget` (the
    ring goes with the visible tiles it surrounds), so the plan holds at most
    ``resident_tiles`` plus a few budgets of tiles, and costs as much to make, for any
    image and any ``target``. A target level that does not fit (see
    :func:`view_level`) gets no tiles.
    """
    plan: dict[TileKey, float] = {}
    coarsest = len(levels) - 1
    rect = (view.y0, view.y1, view.x0, view.x1)
    focus, px = view.focus, view.pixel_size
    top = levels[coarsest]
    gy, gx = top.grid
    if gy * gx <= resident_tiles:
        _add_tiles(plan, top, (0, gy, 0, gx), PREFETCH, 0, focus, px)
    top_tiles = top.tile_range(*rect)
    if _fits(top, view, top_tiles):
        _add_tiles(plan, top, top_tiles, VISIBLE, 0, focus, px)
    level = levels[target]
    rank = coarsest - target
    tiles = level.tile_range(*rect)
    if not _fits(level, view, tiles):
        return plan
    _add_tiles(plan, level, tiles, VISIBLE, rank, focus, px)
    if prefetch_ring:
        ring = level.tile_range(*rect, margin=prefetch_ring)
        _add_tiles(plan, level, ring, PREFETCH, rank, focus, px)
    return plan


class TooManyTilesError(ValueError):
    """More tiles are in view than a caller asked to enumerate."""


def visible_tiles(level: PlaneLevel, view: View, limit: int = MAX_TILES) -> list[TileKey]:
    """The tiles of ``level`` that intersect the view; :class:`TooManyTilesError` if
    there are more than ``limit`` (counted first, never enumerated)."""
    tiles = level.tile_range(view.y0, view.y1, view.x0, view.x1)
    count = tile_count(tiles)
    if count > limit:
        raise TooManyTilesError(f"{count} tiles of level {level.level} in view, over {limit}")
    iy0, iy1, ix0, ix1 = tiles
    return [(level.level, iy, ix) for iy in range(iy0, iy1) for ix in range(ix0, ix1)]


def _all_done(level: int, tiles: TileRange, done: Mapping[TileKey, object] | set[TileKey]) -> bool:
    """Whether every tile of ``level`` in the range is in ``done``. A range larger than
    ``done`` cannot be (pigeonhole), so this costs O(min(range, done))."""
    if tile_count(tiles) > len(done):
        return False
    iy0, iy1, ix0, ix1 = tiles
    return all((level, iy, ix) in done for iy in range(iy0, iy1) for ix in range(ix0, ix1))


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
    Nothing stays when the target level has too many tiles in view to be loaded (see
    :func:`view_level`): those tiles would stand in forever. Costs O(shown x
    min(covered, done)), never the size of the image.
    """
    goal = levels[target]
    if tiles_in_view(goal, view) > tile_budget(goal, view):
        return set()
    keep: set[TileKey] = set()
    rect = (view.y0, view.y1, view.x0, view.x1)
    for key in shown:
        level, iy, ix = key
        if level == target:
            continue
        y0, y1, x0, x1 = levels[level].tile_bounds(iy, ix)
        if y1 <= rect[0] or y0 >= rect[1] or x1 <= rect[2] or x0 >= rect[3]:
            continue  # out of view
        covered = goal.tile_range(
            max(y0, rect[0]), min(y1, rect[1]), max(x0, rect[2]), min(x1, rect[3])
        )
        if not _all_done(target, covered, done):
            keep.add(key)
    return keep


def view_complete(
    levels: Sequence[PlaneLevel],
    view: View,
    target: int,
    done: Mapping[TileKey, object] | set[TileKey],
) -> bool:
    """Whether every tile of ``target`` in view is ``done``, in O(min(in view, done))."""
    level = levels[target]
    return _all_done(target, level.tile_range(view.y0, view.y1, view.x0, view.x1), done)


K = TypeVar("K", bound=Hashable)


class RetrySchedule(Generic[K]):
    """When to load again what failed: per key, exponential backoff, capped.

    After the ``n``-th failure in a row of a key (:meth:`failed`), its next try is due
    ``min(cap, first * factor ** (n - 1))`` seconds later; :meth:`due` hands out each key
    whose time has come, once (until it fails again); :meth:`forget` ends a key's
    series (it loaded, or is no longer wanted). ``clock`` gives seconds (monotonic); it is
    injected so that tests step time instead of waiting. Memory: O(keys tracked).
    """

    def __init__(
        self,
        first: float = 1.0,
        factor: float = 2.0,
        cap: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not (first > 0 and factor >= 1 and cap >= first):
            raise ValueError("backoff needs first > 0, factor >= 1 and cap >= first")
        self.first, self.factor, self.cap, self.clock = first, factor, cap, clock
        self._failures: dict[K, int] = {}
        self._when: dict[K, float] = {}  # the keys waiting for their next try
        self._heap: list[tuple[float, int, K]] = []  # (when, order, key); stale ones skipped
        self._order = itertools.count()

    def __len__(self) -> int:
        """How many keys have failed and are not forgotten."""
        return len(self._failures)

    def failures(self, key: K) -> int:
        """Failures in a row of ``key`` so far."""
        return self._failures.get(key, 0)

    def delay(self, failures: int) -> float:
        """Seconds from the ``failures``-th failure in a row to the next try."""
        delay = self.first
        for _ in range(failures - 1):  # at most log(cap / first) steps: it stops at the cap
            if delay >= self.cap or self.factor == 1:
                break
            delay *= self.factor
        return min(self.cap, delay)

    def failed(self, key: K) -> float:
        """``key`` failed (again): schedule its next try; the delay until then."""
        n = self._failures.get(key, 0) + 1
        self._failures[key] = n
        delay = self.delay(n)
        when = self.clock() + delay
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))
        if len(self._heap) > 2 * len(self._when) + 16:  # drop stale entries
            self._heap = [(w, o, k) for w, o, k in self._heap if self._when.get(k) == w]
            heapq.heapify(self._heap)
        return delay

    def due(self) -> list[K]:
        """The keys whose next try is due now (each handed out once)."""
        now, out = self.clock(), []
        while self._heap and self._heap[0][0] <= now:
            when, _, key = heapq.heappop(self._heap)
            if self._when.get(key) == when:
                del self._when[key]
                out.append(key)
        return out

    def next_due(self) -> float | None:
        """Seconds until the next try is due (0 if one is), None if none is waiting."""
        while self._heap and self._when.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        if not self._heap:
            return None
        return max(0.0, self._heap[0][0] - self.clock())

    def forget(self, key: K) -> None:
        """End ``key``'s series: the next failure starts from ``first`` again."""
        self._failures.pop(key, None)
        self._when.pop(key, None)

    def clear(self) -> None:
        """Forget every key."""
        self._failures.clear()
        self._when.clear()
        self._heap.clear()


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
