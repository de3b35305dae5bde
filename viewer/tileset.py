"""TileSet: which tiles of one multiscale image a layer holds, and in what state. No GPU.

Every frame, :meth:`TileSet.update` turns the view into the set of *channel tiles* to
hold (the plan of :mod:`viewer.tiling`), gets the new ones from the pool with their
priorities, re-ranks the pending ones, and drops the rest (cancelling their loads).
When a chunk arrives, :meth:`TileSet.on_load` (a pool handler, run on the viewer's
thread) gives its tiles their plane, or marks them failed. Nothing here waits for data
or touches the GPU: a layer's drawing part reads :attr:`TileSet.channels` (each held
:class:`Tile` with its plane and whether it is to be drawn, :attr:`Tile.shown`) and
makes the scene match, whenever :attr:`TileSet.version` has changed.

What is drawn: a loaded tile in view, of the target level or coarser, or standing in
for target tiles that are still loading (:func:`~viewer.tiling.tiles_to_keep`), and
tiles of the previous slice until the new slice's target tiles are all done. Finer
tiles fetched ahead (a predicted zoom-in) wait until their level is the target.

Prefetch: while the camera is still, a ring around the view; while it moves, no ring,
but the tiles of the views it is expected to show (``path``, from
:class:`~viewer.prediction.MotionPredictor`: :func:`~viewer.prediction.plan_path`),
sooner first. A prediction that is not made again (the motion stopped or turned) is
dropped like any tile that left the plan: its loads are cancelled, but for a tile whose
chunk is being read, which stays held until it lands (cancelling would not stop the
read, and would throw its data away), then goes to the pool's cache.

A chunk that failed is marked (:attr:`Tile.failed`: the layer hatches it) and tried
again while any tile still holds it: it is dropped and requested anew when
:attr:`TileSet.retry` (exponential backoff) says so, checked at every update;
``call_later`` (the canvas loop's) asks for a frame when a try is due. A view with more
tiles in view than its budget loads nothing and reports how many
(:attr:`TileStatus.overflow`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from chunkpool import ChunkLocation, ChunkManager, ChunkPool, ChunkState

from .prediction import plan_path, reach
from .slicing import Plane, SlicePosition
from .tiling import (
    LINK_BUDGET,
    PlaneLevel,
    RetrySchedule,
    TileKey,
    View,
    add_refinement,
    admit,
    first_level,
    is_visible_priority,
    plan_tiles,
    plane_levels,
    refinement,
    slice_prefetch_priority,
    tile_budget,
    tile_count,
    tiles_to_keep,
    view_complete,
    view_level,
)

__all__ = ["ChannelTile", "ChunkKey", "Tile", "TileSet", "TileStatus"]

#: States of a chunk the pool has let go of.
_GONE = (ChunkState.CANCELLED, ChunkState.DESTROYED)

#: Re-rank a pending tile only when its priority moved by more than this (screen px).
RERANK_THRESHOLD = 128.0


class ChannelTile(NamedTuple):
    """A tile of one channel at one slice position."""

    channel: int
    position: SlicePosition
    level: int
    iy: int
    ix: int

    @property
    def tile(self) -> TileKey:
        return (self.level, self.iy, self.ix)


class ChunkKey(NamedTuple):
    """A chunk of the pool: its level and chunk-grid index."""

    level: int
    index: tuple[int, ...]


@dataclass(frozen=True)
class TileStatus:
    """Progress of the current view: its level, and the state of the visible tiles of
    that level (over every shown channel). ``settled`` when none is pending.

    ``overflow`` is, when not 0, how many tiles of ``level`` (the coarsest) are in view:
    more than the screen can use, so none is loaded (zoom in to see the image)."""

    level: int
    loaded: int
    pending: int
    failed: int
    overflow: int = 0

    @property
    def settled(self) -> bool:
        return self.pending == 0


@dataclass(eq=False)
class Tile:
    """One held channel tile: its chunk and the plane's selection in it; once loaded,
    its 2D plane as stored (a view of the chunk's data, exact dtype: the drawing part
    converts what it uploads); whether its load failed; whether it is to be drawn now."""

    key: ChannelTile
    chunk: ChunkKey
    select: tuple[int | slice, ...]
    priority: float
    bounds: tuple[float, float, float, float]  # world (y0, y1, x0, x1)
    plane: np.ndarray | None = None
    failed: bool = False
    shown: bool = False  # loaded, and to be drawn in the current view
    in_view: bool = False

    @property
    def done(self) -> bool:
        return self.plane is not None or self.failed


@dataclass
class ChannelTiles:
    """The held tiles of one channel, and those kept on screen while others load."""

    index: int
    visible: bool
    tiles: dict[ChannelTile, Tile] = field(default_factory=dict)
    kept: set[ChannelTile] = field(default_factory=set)


class TileSet(ChunkManager):
    """The tiles one layer holds of one multiscale image, for ``channels`` (indices
    along its channel axis, each shown or not)."""

    def __init__(
        self,
        pool: ChunkPool,
        channels: list[tuple[int, bool]],
        *,
        position: SlicePosition | None = None,
        bias: float = 1.0,
        prefetch_ring: int = 1,
        request_draw: Callable[[], None] = lambda: None,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
        link_budget: float | None = LINK_BUDGET,
    ):
        super().__init__(pool)
        self.plane = Plane.of(pool.multiscale_info)
        self.levels: list[PlaneLevel] = plane_levels(
            pool.multiscale_info, self.plane.y_axis, self.plane.x_axis
        )
        self.position = position if position is not None else self.plane.default_position()
        self._previous_position = self.position  # the slice before, standing in
        #: Slice positions to prefetch the view's visible tiles at (playback), nearest
        #: first.
        self.ahead: tuple[SlicePosition, ...] = ()
        self.bias = bias
        self.prefetch_ring = prefetch_ring
        #: Seconds within which the first level shown for a view should arrive over the
        #: pool's link (see :func:`~viewer.tiling.first_level`), new tiles then paced on
        #: it (:func:`~viewer.tiling.admit`); None: the target level first and every tile
        #: requested at once, whatever the link (the sharp picture soonest).
        self.link_budget = link_budget
        self.channels = [ChannelTiles(index, visible) for index, visible in channels]
        self._by_index = {ch.index: ch for ch in self.channels}
        self._request_draw = request_draw
        self._call_later = call_later
        self._chunk_users: dict[ChunkKey, set[ChannelTile]] = {}
        self._locations: dict[ChunkKey, ChunkLocation] = {}  # of the chunks held
        self._drops: list[ChunkKey] = []  # chunks to release at the end of this update
        self._last_state: tuple | None = None
        self.target_level = len(self.levels) - 1
        #: The level shown first for the current view (the target on a fast link).
        self.first_level = self.target_level
        self._link_busy_until = 0.0  # the link's projected end of what was asked
        self._link_wake: float | None = None  # when to ask for the tiles waiting
        #: Tiles in view at the coarsest level when there are too many to load, else 0.
        self.overflow = 0
        self.view: View | None = None
        #: When failed chunks are tried again (keyed by chunk; its clock may be replaced).
        self.retry: RetrySchedule[ChunkKey] = RetrySchedule()
        #: Grows whenever what is to be drawn may have changed.
        self.version = 0

    # -- what is held ---------------------------------------------------------------

    def tiles(self) -> Iterator[Tile]:
        """Every held tile, of every channel."""
        for ch in self.channels:
            yield from ch.tiles.values()

    def set_channel_visible(self, channel: int, visible: bool) -> None:
        self.channels[channel].visible = visible
        self._last_state = None

    def set_position(self, position: SlicePosition) -> None:
        """Show another slice (z, t, ...); the current one stands in until it loads."""
        if position != self.position:
            self._previous_position, self.position = self.position, position
            self._changed()

    def regrid(self) -> None:
        """The image grew (a live store): take the pool's new geometry (more chunks
        along an axis, levels added). Held tiles stay: their chunks are unchanged."""
        info = self.pool.multiscale_info
        self.plane = Plane.of(info)
        self.levels = plane_levels(info, self.plane.y_axis, self.plane.x_axis)
        self._changed()

    def invalidate(self) -> None:
        """Let the next :meth:`update` recompute everything (display settings changed)."""
        self._last_state = None

    def _changed(self) -> None:
        self._last_state = None
        self.version += 1

    def update(
        self, view: View, *, path: tuple[tuple[float, View], ...] = (), still: bool = True
    ) -> None:
        """Bring the held tiles in line with ``view`` and the views the camera is expected
        to show (``path``: (seconds ahead, view), soonest first), and try again the failed
        chunks whose time has come. The ring is prefetched only while the camera is
        ``still`` and nothing is predicted. Cheap when nothing changed."""
        due = self.retry.due()
        if due:
            self._retry_chunks(due)
        if self._link_wake is not None and time.monotonic() >= self._link_wake:
            self._last_state = None  # the link has room for the next tiles
        if self.pool.memory_budget is not None:  # O(held): only under a budget
            for chunk in self._released_silently():
                self._ask_again(chunk)
        state = (
            view,
            path,
            still,
            self.position,
            self.ahead,
            tuple(ch.visible for ch in self.channels),
        )
        if state == self._last_state:
            return
        self._last_state = state
        self.version += 1
        self.view = view
        target, self.overflow = view_level(self.levels, view, self.bias)
        self.target_level = target
        # moving: the predicted views replace the ring (the way ahead, not every way)
        ring = self.prefetch_ring if still and not path else 0
        plan = plan_tiles(self.levels, view, target, prefetch_ring=ring)
        # the path as far as this layer's loads need to arrive in time (no further: the
        # rest is asked for at later frames, once the motion is known better)
        within = reach(self.pool.kpis.records()) if path else math.inf
        for key, priority in plan_path(self.levels, view, target, path, self.bias, within).items():
            if priority < plan.get(key, math.inf):
                plan[key] = priority
        self.first_level = target
        if self.link_budget is not None and not self.overflow:
            plan = self._plan_for_link(plan, view, target, self.link_budget)
        for ch in self.channels:
            self._update_channel(ch, plan, view, target)
        self._flush_drops()

    def _plan_for_link(
        self, plan: dict[TileKey, float], view: View, target: int, budget: float
    ) -> dict[TileKey, float]:
        """``plan`` fitted to the pool's link (see :mod:`viewer.tiling`): the visible
        tiles of the first level and of the refinement added, and of the new tiles only
        those the link has room for now. Unchanged before any estimate, or when the
        link carries the whole plan within ``budget``."""
        self._link_wake = None
        link = self.pool.link_estimate
        channels = [ch.index for ch in self.channels if ch.visible]
        if link is None or not channels:
            return plan
        position, levels, plane = self.position, self.levels, self.plane
        chunks_of: dict[TileKey, set[ChunkKey]] = {}

        def chunks(tile: TileKey) -> set[ChunkKey]:
            got = chunks_of.get(tile)
            if got is None:
                got = chunks_of[tile] = {
                    ChunkKey(tile[0], plane.chunk_and_selection(*tile, c, position)[0])
                    for c in channels
                }
            return got

        scales = self.pool.multiscale_info.levels
        chunk_bytes = [
            math.prod(s.chunk_shape) * s.dtype.itemsize * link.fetched_per_loaded for s in scales
        ]
        tile_bytes = [len(chunks((i, 0, 0))) * b for i, b in enumerate(chunk_bytes)]
        fast = (
            link.seconds(
                tile_count(levels[target].tile_range(view.y0, view.y1, view.x0, view.x1))
                * tile_bytes[target]
            )
            <= budget
        )
        if fast and link.seconds(len(plan) * max(tile_bytes)) <= budget:
            return plan  # the link carries it all at once
        candidates = set(plan)
        for i in range(target, len(levels)):
            iy0, iy1, ix0, ix1 = levels[i].tile_range(view.y0, view.y1, view.x0, view.x1)
            if tile_count((iy0, iy1, ix0, ix1)) <= tile_budget(levels[i], view):
                candidates.update((i, iy, ix) for iy in range(iy0, iy1) for ix in range(ix0, ix1))
        loaded = self.pool.loaded_among({c for t in candidates for c in chunks(t)})
        self.first_level = first_level(
            levels, view, target, link, tile_bytes, lambda t: chunks(t) <= loaded, budget
        )
        add_refinement(plan, levels, view, refinement(self.first_level, target))
        held_chunks = self._locations
        now = time.monotonic()
        loads, nbytes = 0, 0.0  # asked for, not arrived (nor waiting for memory)
        for chunk, loc in held_chunks.items():
            if (
                not loc.loaded
                and loc.error is None
                and not loc.over_budget
                and loc.state not in _GONE
            ):
                loads += 1
                nbytes += chunk_bytes[chunk.level]

        def held(tile: TileKey) -> bool:
            return any(ChannelTile(c, position, *tile) in self._by_index[c].tiles for c in channels)

        def cost(tile: TileKey) -> float:
            return sum(
                chunk_bytes[c.level]
                for c in chunks(tile)
                if c not in loaded and c not in held_chunks
            )

        plan, self._link_busy_until, wake = admit(
            plan, held, cost, link, now, self._link_busy_until, (loads, nbytes)
        )
        self._link_wake = wake
        if wake is not None and self._call_later is not None:
            self._call_later(max(0.0, wake - now), self._request_draw)
        return plan

    def status(self) -> TileStatus:
        """How far the visible tiles of the current level have got. Counts the held
        tiles (O(held)), not the view's range: a visible tile not held is pending. A
        failed tile being tried again counts as failed (it stays hatched)."""
        view, target = self.view, self.target_level
        if view is None:
            return TileStatus(target, 0, 0, 0)
        if self.overflow:
            return TileStatus(target, 0, 0, 0, self.overflow)
        loaded = pending = failed = 0
        tiles = self.levels[target].tile_range(view.y0, view.y1, view.x0, view.x1)
        iy0, iy1, ix0, ix1 = tiles
        in_view = tile_count(tiles)
        for ch in self.channels:
            if not ch.visible:
                continue
            done = 0
            for key, tile in ch.tiles.items():
                if (
                    key.level != target
                    or key.position != self.position
                    or not (iy0 <= key.iy < iy1 and ix0 <= key.ix < ix1)
                    or not tile.done
                ):
                    continue
                done += 1
                if tile.failed:
                    failed += 1
                else:
                    loaded += 1
            pending += in_view - done
        return TileStatus(target, loaded, pending, failed)

    def finest_tile_at(self, channel: int, x: float, y: float) -> Tile | None:
        """The finest loaded tile of ``channel`` (its list index) at the current slice
        under world (x, y)."""
        best: Tile | None = None
        for key, tile in self.channels[channel].tiles.items():
            if tile.plane is None or key.position != self.position:
                continue
            y0, y1, x0, x1 = tile.bounds
            if y0 <= y < y1 and x0 <= x < x1 and (best is None or key.level < best.key.level):
                best = tile
        return best

    def pixel_in_tile(self, tile: Tile, x: float, y: float) -> tuple[int, int] | None:
        """The (row, column) of world (x, y) in ``tile``'s plane, if inside it."""
        geo = self.levels[tile.key.level]
        row = math.floor((y - geo.offset[0]) / geo.scale[0] + 0.5) - tile.key.iy * geo.chunk[0]
        col = math.floor((x - geo.offset[1]) / geo.scale[1] + 0.5) - tile.key.ix * geo.chunk[1]
        plane = tile.plane
        if plane is not None and 0 <= row < plane.shape[0] and 0 <= col < plane.shape[1]:
            return row, col
        return None

    def value_at(self, channel: int, x: float, y: float) -> object | None:
        """The stored value (numpy scalar, exact) of the finest loaded tile of
        ``channel`` (its list index) under world (x, y), or None."""
        tile = self.finest_tile_at(channel, x, y)
        if tile is None or tile.plane is None:
            return None
        pixel = self.pixel_in_tile(tile, x, y)
        return None if pixel is None else tile.plane[pixel]

    def visible_planes(self, channel: int) -> list[np.ndarray]:
        """The loaded planes of ``channel``'s tiles in view at the current slice."""
        view = self.view
        return [
            t.plane
            for k, t in self.channels[channel].tiles.items()
            if t.plane is not None and k.position == self.position and view and t.in_view
        ]

    def close(self) -> None:
        """Drop every chunk."""
        for ch in self.channels:
            for key in list(ch.tiles):
                self._remove_tile(ch, key)
        self._flush_drops()
        self.retry.clear()
        self.version += 1

    # -- handlers (on the viewer's thread) ------------------------------------------

    def on_load(self, chunk_location: ChunkLocation) -> None:
        """A chunk arrived (or failed): give its tiles a plane (or mark them failed,
        and schedule the next try)."""
        chunk = ChunkKey(*chunk_location.key)
        users = self._chunk_users.get(chunk)
        if not users:
            return  # dropped meanwhile
        if chunk_location.error is not None:
            delay = self.retry.failed(chunk)
            if self._call_later is not None:
                self._call_later(delay, self._request_draw)  # the frame that tries again
        else:
            self.retry.forget(chunk)
        for key in users:
            self._loaded(self._by_index[key.channel].tiles[key], chunk_location)
        self._changed()  # tiles to keep may change
        self._request_draw()

    def on_drop(self, chunk_location: ChunkLocation) -> None:
        """A chunk was let go. Dropped by this tile set: nothing to do. Released by
        the pool's memory budget (for a more urgent request) while tiles still want
        it: see :meth:`_ask_again`."""
        chunk = ChunkKey(*chunk_location.key)
        if (
            chunk in self._chunk_users
            and self._locations.get(chunk) is chunk_location
            and self.ref not in chunk_location.refs
        ):
            self._ask_again(chunk)

    def _ask_again(self, chunk: ChunkKey) -> None:
        """The pool let ``chunk`` go while tiles want it: they lose their plane, and it
        is asked for again at their priority (it waits until the budget has room)."""
        tiles = [self._by_index[k.channel].tiles[k] for k in self._chunk_users[chunk]]
        for tile in tiles:
            tile.plane = None
            tile.failed = False
        self._locations[chunk] = self.get_chunk(*chunk, priority=min(t.priority for t in tiles))
        self._changed()
        self._request_draw()

    def _released_silently(self) -> list[ChunkKey]:
        """Chunks the budget released before anything about them reached this tile set
        (a queue drops every call about a chunk nobody heard of): gone, not loaded."""
        return [
            chunk
            for chunk, loc in self._locations.items()
            if loc.state in _GONE and self.ref not in loc.refs
        ]

    def _loaded(self, tile: Tile, loc: ChunkLocation) -> None:
        """A tile's chunk loaded (again, if its stored data changed: the new plane
        replaces the old one) or failed."""
        if loc.error is not None:
            tile.failed = True
        else:
            tile.failed = False
            tile.plane = self.plane.plane_of(loc.data, tile.select)

    # -- internals ------------------------------------------------------------------

    def _flush_drops(self) -> None:
        """Release the chunks no tile uses any more, in one batch (so their loads are
        cancelled together)."""
        if self._drops:
            self.drop_chunks(self._drops)
            self._drops = []

    def _retry_chunks(self, chunks: list[ChunkKey]) -> None:
        """Try failed chunks again: drop them (the pool lets a failed chunk go, it is
        never cached) and request them anew, at their tiles' priority. Their tiles stay
        failed meanwhile; :meth:`on_load` tells how it went."""
        chunks = [c for c in chunks if c in self._chunk_users]
        if not chunks:
            return
        self.drop_chunks(chunks)
        for chunk in chunks:
            tiles = [self._by_index[k.channel].tiles[k] for k in self._chunk_users[chunk]]
            self._locations[chunk] = self.get_chunk(*chunk, priority=min(t.priority for t in tiles))

    def _update_channel(
        self, ch: ChannelTiles, plan: dict[TileKey, float], view: View, target: int
    ) -> None:
        c, position = ch.index, self.position
        wanted: dict[ChannelTile, float] = {}
        ch.kept = set()
        if ch.visible:
            wanted = {ChannelTile(c, position, *k): p for k, p in plan.items()}
            done = {k.tile for k, t in ch.tiles.items() if t.done and k.position == position}
            loaded = [
                k.tile
                for k, t in ch.tiles.items()
                if k.position == position and t.plane is not None and k.level != target
            ]
            for k in tiles_to_keep(loaded, self.levels, view, target, done):
                ch.kept.add(ChannelTile(c, position, *k))
            if not self.overflow and any(k.position == self._previous_position for k in ch.tiles):
                self._keep_previous_slice(ch, view, target, done)
            for key in ch.kept:
                wanted.setdefault(key, ch.tiles[key].priority)
            for ahead, slice_position in enumerate(self.ahead, 1):
                for k, p in plan.items():
                    if k[0] == target and is_visible_priority(p):
                        wanted.setdefault(
                            ChannelTile(c, slice_position, *k),
                            slice_prefetch_priority(p, ahead),
                        )
        for key in [k for k in ch.tiles if k not in wanted]:
            if not self._reading(ch.tiles[key]):
                self._remove_tile(ch, key)
        for key, priority in wanted.items():
            tile = ch.tiles.get(key)
            if tile is None:
                self._add_tile(ch, key, priority)
            elif not tile.done and abs(priority - tile.priority) > RERANK_THRESHOLD:
                tile.priority = priority
                self.get_chunk(*tile.chunk, priority=priority)
        for tile in ch.tiles.values():
            tile.in_view = _intersects(tile.bounds, view)
            # drawn: in view, of the target level or coarser, or standing in for
            # target tiles still loading (finer tiles fetched ahead wait their turn)
            tile.shown = (
                tile.plane is not None
                and tile.in_view
                and (
                    tile.key in ch.kept
                    or (tile.key.level >= target and tile.key.position == position)
                )
            )

    def _reading(self, tile: Tile) -> bool:
        """Whether ``tile``'s chunk is being read. Such a tile stays held until its load
        ends, although it left the plan: cancelling it would not stop the read (its
        data would be thrown away), while a chunk dropped once loaded stays in the
        pool's cache, so that a prediction cut short and then made again, or a tile
        passed over and come back to, costs no second read."""
        loc = self._locations.get(tile.chunk)
        return loc is not None and loc.state is ChunkState.LOADING

    def _keep_previous_slice(
        self, ch: ChannelTiles, view: View, target: int, done: set[TileKey]
    ) -> None:
        """Tiles of the previous slice stay until every visible tile of the new slice
        at the target level is done."""
        if view_complete(self.levels, view, target, done):
            return
        for key, tile in ch.tiles.items():
            if (
                key.position == self._previous_position != self.position
                and tile.plane is not None
                and _intersects(tile.bounds, view)
            ):
                ch.kept.add(key)

    def _add_tile(self, ch: ChannelTiles, key: ChannelTile, priority: float) -> None:
        index, select = self.plane.chunk_and_selection(
            key.level, key.iy, key.ix, ch.index, key.position
        )
        chunk = ChunkKey(key.level, index)
        tile = Tile(
            key, chunk, select, priority, self.levels[key.level].tile_bounds(key.iy, key.ix)
        )
        ch.tiles[key] = tile
        users = self._chunk_users.setdefault(chunk, set())
        users.add(key)
        loc = self._locations[chunk] = self.get_chunk(*chunk, priority=priority)
        if len(users) > 1 and (loc.loaded or loc.error is not None):
            # another tile of this layer already holds the chunk: no new load event comes
            self._loaded(tile, loc)

    def _remove_tile(self, ch: ChannelTiles, key: ChannelTile) -> None:
        tile = ch.tiles.pop(key)
        users = self._chunk_users[tile.chunk]
        users.discard(key)
        if not users:
            del self._chunk_users[tile.chunk]
            del self._locations[tile.chunk]
            self._drops.append(tile.chunk)
            self.retry.forget(tile.chunk)


def _intersects(bounds: tuple[float, float, float, float], view: View) -> bool:
    y0, y1, x0, x1 = bounds
    return y0 < view.y1 and y1 > view.y0 and x0 < view.x1 and x1 > view.x0
