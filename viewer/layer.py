"""ImageLayer: the tiles of one multiscale image on the GPU, fed by a ChunkPool.

Every frame, :meth:`ImageLayer.update` turns the view into the set of *channel tiles*
to hold (pure logic in :mod:`viewer.tiling`), gets the new ones from the pool with
their priorities, re-ranks the pending ones, and drops the rest (cancelling their
loads). When a chunk arrives, :meth:`on_load` runs on the canvas's event loop, uploads
its plane as a texture, and asks for a redraw. Nothing here waits for data.

A chunk that failed is hatched, and tried again while any tile still holds it: it is
dropped and requested anew when :attr:`ImageLayer.retry` (exponential backoff) says so,
checked at every :meth:`~ImageLayer.update`; ``call_later`` (the canvas loop's) asks for
a frame when a try is due. The hatch stays until a try succeeds. A view with more tiles
in view than its budget (see :mod:`viewer.tiling`) loads nothing and reports how many
(:attr:`LayerStatus.overflow`).

Tiles are placed relative to :attr:`ImageLayer.origin` (the layer's root group sits at
minus it), which follows the view (:func:`~viewer.tiling.follow_origin`): the camera
must be placed relative to it too, for float32 on the GPU to stay exact far out.

Drawing order (checked pixel-exact on lavapipe): each channel is a group drawn in turn
with additive blending; inside a channel, tiles sit in a depth band with finer levels
nearer the camera and drawn first, so a loaded fine tile hides the coarse ones beneath
it (depth test) while the channels still add up. Tiles of a previous slice sit at the
back of the band, so they stand in until the new slice has loaded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pygfx as gfx

from chunkpool import ChunkLocation, ChunkManager, ChunkPool

from .display import ChannelDisplay, texture_dtype
from .slicing import Plane, SlicePosition
from .tiling import (
    PlaneLevel,
    RetrySchedule,
    TileKey,
    View,
    eviction_order,
    follow_origin,
    plan_tiles,
    plane_levels,
    tile_count,
    tiles_to_keep,
    view_complete,
    view_level,
)

__all__ = ["ImageLayer", "LayerStatus"]

# A tile of one channel at one slice position: (channel, position, level, iy, ix).
ChannelTile = tuple[int, SlicePosition, int, int, int]
ChunkKey = tuple[int, tuple[int, ...]]

#: Re-rank a pending tile only when its priority moved by more than this (screen px).
RERANK_THRESHOLD = 128.0


def _stripes() -> np.ndarray:
    """A 16 x 16 RGBA diagonal hatch, drawn over tiles that failed to load."""
    i, j = np.mgrid[0:16, 0:16]
    hatch = np.zeros((16, 16, 4), np.uint8)
    on = ((i + j) % 8) < 3
    hatch[on] = (230, 60, 60, 200)
    hatch[~on] = (60, 20, 20, 110)
    return hatch


@dataclass(frozen=True)
class LayerStatus:
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
class _Tile:
    """One held channel tile: its chunk; once loaded, its 2D plane and (while within
    the texture budget) its image; if the load failed, a hatch overlay."""

    key: ChannelTile
    chunk: ChunkKey
    select: tuple[int | slice, ...]
    priority: float
    bounds: tuple[float, float, float, float]  # world (y0, y1, x0, x1)
    plane: np.ndarray | None = None
    image: gfx.Image | None = None
    failed: bool = False
    overlay: gfx.Image | None = None
    shown: bool = False  # the image's visibility, as last set
    last_shown: int = -1

    @property
    def done(self) -> bool:
        return self.plane is not None or self.failed


@dataclass
class _ChannelGroup:
    display: ChannelDisplay
    group: gfx.Group
    material: gfx.ImageBasicMaterial
    tiles: dict[ChannelTile, _Tile] = field(default_factory=dict)
    kept: set[ChannelTile] = field(default_factory=set)  # shown while target tiles load


class ImageLayer(ChunkManager):
    """Shows one multiscale image in a pygfx scene, channels composited additively."""

    def __init__(
        self,
        pool: ChunkPool,
        parent: gfx.Group,
        displays: list[ChannelDisplay],
        *,
        position: SlicePosition | None = None,
        request_draw: Callable[[], None] = lambda: None,
        bias: float = 1.0,
        prefetch_ring: int = 1,
        texture_budget: int = 512 << 20,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
    ):
        super().__init__(pool)
        self.plane = Plane.of(pool.multiscale_info)
        self.levels: list[PlaneLevel] = plane_levels(
            pool.multiscale_info, self.plane.y_axis, self.plane.x_axis
        )
        self.position = position if position is not None else self.plane.default_position()
        self.bias = bias
        self.prefetch_ring = prefetch_ring
        self.texture_budget = texture_budget
        self._request_draw = request_draw
        self._root = gfx.Group()
        parent.add(self._root)
        self._overlays = gfx.Group()
        self._overlays.render_order = len(displays) + 1
        self._hatch_geometry = gfx.Geometry(grid=gfx.Texture(_stripes(), dim=2))
        self._hatch_material = gfx.ImageBasicMaterial(
            clim=(0, 255), interpolation="nearest", alpha_mode="blend", depth_test=False
        )
        self._channels: list[_ChannelGroup] = []
        for display in displays:
            material = gfx.ImageBasicMaterial(
                clim=display.clim,
                map=_lut_map(display),
                interpolation="nearest",
                alpha_mode="add",
                depth_test=True,
                depth_write=True,
            )
            group = gfx.Group(visible=display.visible)
            group.render_order = display.index
            self._root.add(group)
            self._channels.append(_ChannelGroup(display, group, material))
        self._root.add(self._overlays)
        self._chunk_users: dict[ChunkKey, set[ChannelTile]] = {}
        self._drops: list[ChunkKey] = []  # chunks to release at the end of this update
        self._last_state: tuple | None = None
        self._frame = 0
        self._texture_bytes = 0  # textures of images in the scene
        self._spare_bytes = 0  # textures of spare images, kept for reuse
        self._spares: dict[tuple[int, tuple[int, ...], np.dtype], list[gfx.Image]] = {}
        self.target_level = len(self.levels) - 1
        #: Tiles in view at the coarsest level when there are too many to load, else 0.
        self.overflow = 0
        self.view: View | None = None
        #: World (x, y) that the scene is drawn relative to (see :mod:`viewer.tiling`).
        self.origin: tuple[float, float] = (0.0, 0.0)
        #: When failed chunks are tried again (keyed by chunk; its clock may be replaced).
        self.retry: RetrySchedule[ChunkKey] = RetrySchedule()
        self._call_later = call_later

    # -- public ---------------------------------------------------------------------

    @property
    def displays(self) -> list[ChannelDisplay]:
        return [ch.display for ch in self._channels]

    @property
    def band(self) -> int:
        """Depth units per channel band."""
        return len(self.levels) + 2

    @property
    def depth_extent(self) -> float:
        """The camera must see depths in [0, depth_extent]."""
        return self.band * (len(self._channels) + 1)

    def set_display(self, display: ChannelDisplay) -> None:
        """Change a channel's colormap, window or visibility."""
        ch = self._channels[display.index]
        old, ch.display = ch.display, display
        ch.material.clim = display.clim
        if display.colormap != old.colormap:
            ch.material.map = _lut_map(display)
        ch.group.visible = display.visible
        self._last_state = None
        self._request_draw()

    def set_position(self, position: SlicePosition) -> None:
        """Show another slice (z, t, ...); the current one stands in until it loads."""
        if position != self.position:
            self.position = position
            for ch in self._channels:
                for tile in ch.tiles.values():
                    if tile.image is not None:
                        self._place(tile)
            self._last_state = None
            self._request_draw()

    def update(self, view: View, *, zoom_in: bool = False) -> None:
        """Bring the held tiles in line with ``view``, and try again the failed chunks
        whose time has come. Cheap when nothing changed."""
        due = self.retry.due()
        if due:
            self._retry_chunks(due)
        state = (view, zoom_in, self.position, tuple(ch.display.visible for ch in self._channels))
        if state == self._last_state:
            return
        self._last_state = state
        self._frame += 1
        self.view = view
        origin = follow_origin(self.origin, view)
        if origin != self.origin:
            self.origin = origin
            self._root.local.position = (-origin[0], -origin[1], 0)
        target, self.overflow = view_level(self.levels, view, self.bias)
        self.target_level = target
        plan = plan_tiles(
            self.levels, view, target, prefetch_ring=self.prefetch_ring, zoom_in=zoom_in
        )
        for ch in self._channels:
            self._update_channel(ch, plan, view, target)
        self._flush_drops()
        self._enforce_texture_budget(view)

    def _flush_drops(self) -> None:
        """Release the chunks no tile uses any more, in one batch (so their loads are
        cancelled together)."""
        if self._drops:
            self.drop_chunks(self._drops)
            self._drops = []

    def status(self) -> LayerStatus:
        """How far the visible tiles of the current level have got. Counts the held
        tiles (O(held)), not the view's range: a visible tile not held is pending. A
        failed tile being tried again counts as failed (it stays hatched)."""
        view, target = self.view, self.target_level
        if view is None:
            return LayerStatus(target, 0, 0, 0)
        if self.overflow:
            return LayerStatus(target, 0, 0, 0, self.overflow)
        loaded = pending = failed = 0
        tiles = self.levels[target].tile_range(view.y0, view.y1, view.x0, view.x1)
        iy0, iy1, ix0, ix1 = tiles
        in_view = tile_count(tiles)
        for ch in self._channels:
            if not ch.display.visible:
                continue
            done = 0
            for (_, position, level, iy, ix), tile in ch.tiles.items():
                if (
                    level != target
                    or position != self.position
                    or not (iy0 <= iy < iy1 and ix0 <= ix < ix1)
                    or not tile.done
                ):
                    continue
                done += 1
                if tile.failed:
                    failed += 1
                else:
                    loaded += 1
            pending += in_view - done
        return LayerStatus(target, loaded, pending, failed)

    def value_at(self, x: float, y: float) -> list[tuple[ChannelDisplay, float | None]]:
        """Per shown channel, the value of the finest loaded tile under world (x, y)."""
        values = []
        for ch in self._channels:
            if not ch.display.visible:
                continue
            values.append((ch.display, self._value_in_channel(ch, x, y)))
        return values

    def visible_planes(self, channel: int) -> list[np.ndarray]:
        """The loaded planes of ``channel``'s tiles in view at the current slice."""
        view = self.view
        return [
            t.plane
            for k, t in self._channels[channel].tiles.items()
            if t.plane is not None
            and k[1] == self.position
            and view
            and _intersects(t.bounds, view)
        ]

    def close(self) -> None:
        """Drop every chunk and remove the layer from the scene."""
        for ch in self._channels:
            for key in list(ch.tiles):
                self._remove_tile(ch, key)
        self._flush_drops()
        self.retry.clear()
        self._root.parent.remove(self._root)

    # -- handlers (on the canvas's event loop) ----------------------------------------

    def on_load(self, chunk_location: ChunkLocation) -> None:
        """A chunk arrived (or failed): give its tiles an image (or a hatch, and
        schedule the next try)."""
        chunk = chunk_location.key
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
            self._loaded(self._channels[key[0]], self._channels[key[0]].tiles[key], chunk_location)
        self._last_state = None  # tiles to keep may change
        self._request_draw()

    def _loaded(self, ch: _ChannelGroup, tile: _Tile, loc: ChunkLocation) -> None:
        if loc.error is not None:
            tile.failed = True
            if tile.overlay is None:  # failed again: it keeps its hatch
                tile.overlay = self._hatch(tile.key)
        elif tile.plane is None:
            if tile.overlay is not None:  # a try after failures succeeded
                self._overlays.remove(tile.overlay)
                tile.overlay = None
            tile.failed = False
            plane = self.plane.plane_of(loc.data, tile.select)
            tile.plane = np.ascontiguousarray(plane, dtype=texture_dtype(plane.dtype))
            in_view = self.view is not None and _intersects(tile.bounds, self.view)
            if self._should_show(ch, tile, in_view):
                self._make_image(ch, tile)  # otherwise: made when it is to be shown

    # -- internals ------------------------------------------------------------------

    def _retry_chunks(self, chunks: list[ChunkKey]) -> None:
        """Try failed chunks again: drop them (the pool lets a failed chunk go, it is
        never cached) and request them anew, at their tiles' priority. Their tiles keep
        their hatch meanwhile; :meth:`on_load` tells how it went."""
        chunks = [c for c in chunks if c in self._chunk_users]
        if not chunks:
            return
        self.drop_chunks(chunks)
        for chunk in chunks:
            tiles = [self._channels[k[0]].tiles[k] for k in self._chunk_users[chunk]]
            self.get_chunk(*chunk, priority=min(t.priority for t in tiles))

    def _update_channel(
        self, ch: _ChannelGroup, plan: dict[TileKey, float], view: View, target: int
    ) -> None:
        c, position = ch.display.index, self.position
        wanted: dict[ChannelTile, float] = {}
        ch.kept = set()
        if ch.display.visible:
            wanted = {(c, position, *k): p for k, p in plan.items()}
            done = {k[2:] for k, t in ch.tiles.items() if t.done and k[1] == position}
            loaded = [
                k[2:]
                for k, t in ch.tiles.items()
                if k[1] == position and t.plane is not None and k[2] != target
            ]
            for k in tiles_to_keep(loaded, self.levels, view, target, done):
                ch.kept.add((c, position, *k))
            if not self.overflow and any(k[1] != position for k in ch.tiles):
                self._keep_previous_slice(ch, view, target, done)
            for key in ch.kept:
                wanted.setdefault(key, ch.tiles[key].priority)
        for key in [k for k in ch.tiles if k not in wanted]:
            self._remove_tile(ch, key)
        for key, priority in wanted.items():
            tile = ch.tiles.get(key)
            if tile is None:
                self._add_tile(ch, key, priority)
            elif not tile.done and abs(priority - tile.priority) > RERANK_THRESHOLD:
                tile.priority = priority
                self.get_chunk(*tile.chunk, priority=priority)
        frame = self._frame
        for key, tile in ch.tiles.items():
            in_view = _intersects(tile.bounds, view)
            if tile.plane is not None:
                visible = self._should_show(ch, tile, in_view)
                if tile.image is None and visible:
                    self._make_image(ch, tile)  # its texture was freed while out of view
                if tile.image is not None and tile.shown != visible:
                    tile.image.visible = tile.shown = visible
                if visible:
                    tile.last_shown = frame
            if tile.overlay is not None:
                overlay_visible = in_view and key[1] == position
                if tile.overlay.visible != overlay_visible:
                    tile.overlay.visible = overlay_visible

    def _should_show(self, ch: _ChannelGroup, tile: _Tile, in_view: bool) -> bool:
        """A loaded tile in view is drawn if it is of the target level or coarser, or
        stands in for target tiles still loading. Finer tiles fetched ahead (while
        zooming in) wait until their level is the target: the screen shows exactly the
        level chosen for the zoom."""
        return in_view and (tile.key[2] >= self.target_level or tile.key in ch.kept)

    def _keep_previous_slice(
        self, ch: _ChannelGroup, view: View, target: int, done: set[TileKey]
    ) -> None:
        """Tiles of the previous slice stay until every visible tile of the new slice
        at the target level is done."""
        if view_complete(self.levels, view, target, done):
            return
        for key, tile in ch.tiles.items():
            if (
                key[1] != self.position
                and tile.plane is not None
                and _intersects(tile.bounds, view)
            ):
                ch.kept.add(key)

    def _add_tile(self, ch: _ChannelGroup, key: ChannelTile, priority: float) -> None:
        c, position, level, iy, ix = key
        index, select = self.plane.chunk_and_selection(level, iy, ix, c, position)
        chunk = (level, index)
        tile = _Tile(key, chunk, select, priority, self.levels[level].tile_bounds(iy, ix))
        ch.tiles[key] = tile
        users = self._chunk_users.setdefault(chunk, set())
        users.add(key)
        loc = self.get_chunk(level, index, priority=priority)
        if len(users) > 1 and (loc.loaded or loc.error is not None):
            # another tile of this layer already holds the chunk: no new load event comes
            self._loaded(ch, tile, loc)

    def _remove_tile(self, ch: _ChannelGroup, key: ChannelTile) -> None:
        tile = ch.tiles.pop(key)
        self._free_image(ch, tile)
        if tile.overlay is not None:
            self._overlays.remove(tile.overlay)
        users = self._chunk_users[tile.chunk]
        users.discard(key)
        if not users:
            del self._chunk_users[tile.chunk]
            self._drops.append(tile.chunk)
            self.retry.forget(tile.chunk)

    def _make_image(self, ch: _ChannelGroup, tile: _Tile) -> None:
        """Show a loaded tile's plane: reuse a spare image of the same shape (its
        texture gets the new data), else create one."""
        plane = tile.plane
        assert plane is not None
        spares = self._spares.get((ch.display.index, plane.shape, plane.dtype))
        if spares:
            image = spares.pop()
            self._spare_bytes -= plane.nbytes
            image.geometry.grid.set_data(plane)
        else:
            image = gfx.Image(gfx.Geometry(grid=gfx.Texture(plane, dim=2)), ch.material)
        _, _, level, iy, ix = tile.key
        geo = self.levels[level]
        (cy, cx), (sy, sx), (oy, ox) = geo.chunk, geo.scale, geo.offset
        image.local.position = (ox + ix * cx * sx, oy + iy * cy * sy, 0)
        image.local.scale = (sx, sy, 1)
        in_view = self.view is not None and _intersects(tile.bounds, self.view)
        tile.shown = self._should_show(ch, tile, in_view)
        image.visible = tile.shown
        tile.image = image
        self._place(tile)
        ch.group.add(image)
        self._texture_bytes += plane.nbytes

    def _place(self, tile: _Tile) -> None:
        """Depth and draw order of a tile's image: in its channel's band, finer levels
        nearer and drawn first; tiles of another slice behind those of the current one."""
        assert tile.image is not None
        c, position, level, _, _ = tile.key
        current = position == self.position
        n = len(self.levels)
        tile.image.local.z = c * self.band + (n - level) + (1 if current else 0)
        tile.image.render_order = level + (0 if current else n)

    def _free_image(self, ch: _ChannelGroup, tile: _Tile) -> None:
        """Take a tile's image out of the scene; keep it as a spare while the budget
        allows (creating images and their GPU resources costs far more than reusing)."""
        image, plane = tile.image, tile.plane
        if image is None or plane is None:
            return
        ch.group.remove(image)
        tile.image = None
        self._texture_bytes -= plane.nbytes
        if self._texture_bytes + self._spare_bytes + plane.nbytes <= self.texture_budget:
            self._spares.setdefault((ch.display.index, plane.shape, plane.dtype), []).append(image)
            self._spare_bytes += plane.nbytes

    def _hatch(self, key: ChannelTile) -> gfx.Image:
        _, _, level, iy, ix = key
        y0, y1, x0, x1 = self.levels[level].tile_bounds(iy, ix)
        image = gfx.Image(self._hatch_geometry, self._hatch_material)
        side = max(y1 - y0, x1 - x0) / 16
        image.local.scale = (side, side, 1)
        image.local.position = (x0 + side / 2, y0 + side / 2, self.depth_extent - 1)
        self._overlays.add(image)
        return image

    def _enforce_texture_budget(self, view: View) -> None:
        """Stay within the texture budget: let spare images go, then free the textures
        of tiles out of view, least recently shown first (re-made if needed again)."""
        if self._texture_bytes + self._spare_bytes <= self.texture_budget:
            return
        self._spares.clear()
        self._spare_bytes = 0
        if self._texture_bytes <= self.texture_budget:
            return
        hidden = {
            key: (ch, tile)
            for ch in self._channels
            for key, tile in ch.tiles.items()
            if tile.image is not None and not tile.shown
        }
        last = {k[2:]: t.last_shown for k, (_, t) in hidden.items()}
        by_tile: dict[TileKey, list[ChannelTile]] = {}
        for key in hidden:
            by_tile.setdefault(key[2:], []).append(key)
        for tile_key in eviction_order(by_tile, self.levels, view, last):
            for key in by_tile[tile_key]:
                self._free_image(*hidden[key])
            if self._texture_bytes <= self.texture_budget:
                return

    def _value_in_channel(self, ch: _ChannelGroup, x: float, y: float) -> float | None:
        best: tuple[int, _Tile] | None = None
        for key, tile in ch.tiles.items():
            if tile.plane is None or key[1] != self.position:
                continue
            y0, y1, x0, x1 = self.levels[key[2]].tile_bounds(key[3], key[4])
            if y0 <= y < y1 and x0 <= x < x1 and (best is None or key[2] < best[0]):
                best = (key[2], tile)
        if best is None:
            return None
        level, tile = best
        geo = self.levels[level]
        _, _, _, iy, ix = tile.key
        row = math.floor((y - geo.offset[0]) / geo.scale[0] + 0.5) - iy * geo.chunk[0]
        col = math.floor((x - geo.offset[1]) / geo.scale[1] + 0.5) - ix * geo.chunk[1]
        plane = tile.plane
        if plane is not None and 0 <= row < plane.shape[0] and 0 <= col < plane.shape[1]:
            return float(plane[row, col])
        return None


def _intersects(bounds: tuple[float, float, float, float], view: View) -> bool:
    y0, y1, x0, x1 = bounds
    return y0 < view.y1 and y1 > view.y0 and x0 < view.x1 and x1 > view.x0


def _lut_map(display: ChannelDisplay) -> gfx.TextureMap:
    """The channel's colormap as an exact 256-entry lookup texture."""
    return gfx.TextureMap(gfx.Texture(display.lut(256), dim=1), filter="nearest", wrap="clamp")
