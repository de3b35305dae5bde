"""Layers: what a view shows of one multiscale image, and the thin GPU part drawing it.

A layer pairs a :class:`~viewer.tileset.TileSet` (GPU-free: which tiles are held and
which are to be drawn) with display settings and a pygfx group that mirrors the tile
set: :meth:`Layer.sync` makes the scene match the tile set whenever its version
changed, creating textures for tiles to be drawn (spares reused, budget shared across
layers: :mod:`viewer.textures`), hiding the rest, hatching failed tiles.

A layer draws *stacks*: the channels that make one texture per tile, with one
material. An image layer has a stack per channel (its colormap over its contrast
window, channels added up), or, shown as true colour (RGB(A)), one stack of three or
four channels; a labels layer has one stack, its IDs coloured on the GPU.

Drawing order (checked pixel-exact on lavapipe): layers in turn, and inside a layer its
stacks in turn, each with the layer's blending; inside a stack, tiles sit in a depth
band with finer levels nearer the camera and drawn first, so a loaded fine tile hides
the coarse ones beneath it (depth test) while the stacks still add up. Tiles of a
previous slice sit at the back of the band, so they stand in until the new slice has
loaded. Layers sit in consecutive bands (:attr:`Layer.depth_extent` each), placed by
the viewer with :meth:`Layer.place`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Literal

import numpy as np
import pygfx as gfx

from chunkpool import ChunkPool

from .display import AutoWindow, ChannelDisplay, texture_dtype
from .labels import label_texture_data, label_texture_format
from .materials import LabelMaterial, RGBMaterial, rgb_texture_data
from .slicing import SlicePosition
from .textures import Candidate, TextureBudget
from .tileset import ChannelTile, ChunkKey, Tile, TileSet, TileStatus
from .tiling import LINK_BUDGET, View, tile_count, view_level

__all__ = ["BLENDINGS", "ImageLayer", "LabelsLayer", "Layer"]

Blending = Literal["additive", "translucent", "opaque"]
#: How a layer's tiles combine with what is beneath: pygfx alpha modes.
BLENDINGS: dict[str, str] = {"additive": "add", "translucent": "blend", "opaque": "solid"}

# A tile of a stack: (position, level, iy, ix).
TilePos = tuple[SlicePosition, int, int, int]


def _stripes() -> np.ndarray:
    """A 16 x 16 RGBA diagonal hatch, drawn over tiles that failed to load."""
    i, j = np.mgrid[0:16, 0:16]
    hatch = np.zeros((16, 16, 4), np.uint8)
    on = ((i + j) % 8) < 3
    hatch[on] = (230, 60, 60, 200)
    hatch[~on] = (60, 20, 20, 110)
    return hatch


@dataclass(eq=False)
class _Stack:
    """Channels (indices into the tile set's channels) drawn as one texture per tile."""

    order: int
    channels: tuple[int, ...]
    material: gfx.Material
    group: gfx.Group
    images: dict[TilePos, gfx.Image] = field(default_factory=dict)
    nbytes: dict[TilePos, int] = field(default_factory=dict)
    last_shown: dict[TilePos, int] = field(default_factory=dict)
    #: The planes each image shows (a tile whose planes are replaced, a chunk reloaded
    #: because its stored data changed, gets the new data into its texture).
    planes: dict[TilePos, tuple[np.ndarray, ...]] = field(default_factory=dict)


class Layer:
    """Base of the layers: a tile set, a root group, stacks, hatches. Subclasses say
    what the stacks are and how a tile's planes become a texture."""

    kind: ClassVar[str] = "layer"

    def __init__(
        self,
        pool: ChunkPool,
        channels: list[tuple[int, bool]],
        *,
        name: str,
        textures: TextureBudget,
        position: SlicePosition | None = None,
        request_draw: Callable[[], None] = lambda: None,
        bias: float = 1.0,
        prefetch_ring: int = 1,
        call_later: Callable[[float, Callable[[], None]], object] | None = None,
        link_budget: float | None = LINK_BUDGET,
        opacity: float = 1.0,
        blending: Blending = "additive",
        visible: bool = True,
    ):
        if blending not in BLENDINGS:
            raise ValueError(f"blending must be one of {', '.join(BLENDINGS)}, not {blending!r}")
        self.pool = pool
        self.name = name
        self.tiles = TileSet(
            pool,
            channels,
            position=position,
            bias=bias,
            prefetch_ring=prefetch_ring,
            request_draw=request_draw,
            call_later=call_later,
            link_budget=link_budget,
        )
        self.textures = textures
        self._request_draw = request_draw
        self._opacity = float(opacity)
        self._blending: Blending = blending
        self.root = gfx.Group(visible=visible)
        self._overlays = gfx.Group()
        self._hatch_geometry = gfx.Geometry(grid=gfx.Texture(_stripes(), dim=2))
        self._hatch_material = gfx.ImageBasicMaterial(
            clim=(0, 255), interpolation="nearest", alpha_mode="blend", depth_test=False
        )
        self._hatches: dict[TilePos, gfx.Image] = {}
        self._stacks: list[_Stack] = []
        self._synced = -1
        #: With ``track_drawn``, the chunks whose data syncs put in the scene since the
        #: viewer last took them (a new or reloaded tile): after rendering a frame, the
        #: viewer logs them as drawn (``--telemetry``) and clears the list.
        self.track_drawn = False
        self.newly_drawn: list[ChunkKey] = []
        self._placed_position = self.tiles.position
        self._depth_base = 0.0
        self._early: list[tuple[int, tuple[int, ...]]] = []  # see request_coarsest
        self._early_ref = f"first-chunks-{id(self):x}"
        # showing the coarsest level alone until a frame has drawn it (request_coarsest):
        # the status of that level as of the last update, and the view's own level then
        self._coarse_first = False
        self._coarse_drawn = False  # a frame drew it: the next update ends it
        self._coarse_status: TileStatus | None = None
        self._waiting_target: TileStatus | None = None
        self.root.add(self._overlays)
        textures.register(self)

    def _add_stack(self, channels: tuple[int, ...], material: gfx.Material) -> _Stack:
        material.opacity = self._opacity
        material.alpha_mode = BLENDINGS[self._blending]
        stack = _Stack(len(self._stacks), channels, material, gfx.Group())
        self._stacks.append(stack)
        self.root.add(stack.group)
        return stack

    def _texture_data(self, stack: _Stack, planes: list[np.ndarray]) -> np.ndarray:
        """What is uploaded for one tile of ``stack``, from its channels' planes."""
        raise NotImplementedError

    def _texture(self, data: np.ndarray) -> gfx.Texture:
        """A new texture for ``data`` (from :meth:`_texture_data`)."""
        return gfx.Texture(data, dim=2)

    # -- display settings -----------------------------------------------------------

    @property
    def visible(self) -> bool:
        return self.root.visible

    @visible.setter
    def visible(self, value: bool) -> None:
        self.root.visible = bool(value)
        self._request_draw()

    @property
    def opacity(self) -> float:
        return self._opacity

    @opacity.setter
    def opacity(self, value: float) -> None:
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"opacity must be in [0, 1], not {value}")
        self._opacity = float(value)
        for stack in self._stacks:
            stack.material.opacity = self._opacity
        self._request_draw()

    @property
    def blending(self) -> Blending:
        return self._blending

    @blending.setter
    def blending(self, value: Blending) -> None:
        if value not in BLENDINGS:
            raise ValueError(f"blending must be one of {', '.join(BLENDINGS)}, not {value!r}")
        self._blending = value
        for stack in self._stacks:
            stack.material.alpha_mode = BLENDINGS[value]
        self._request_draw()

    # -- geometry -------------------------------------------------------------------

    @property
    def levels(self) -> list:
        return self.tiles.levels

    @property
    def position(self) -> SlicePosition:
        return self.tiles.position

    def set_position(self, position: SlicePosition) -> None:
        """Show another slice (z, t, ...); the current one stands in until it loads."""
        self.tiles.set_position(position)
        self._request_draw()

    @property
    def target_level(self) -> int:
        """The level the view is to be shown at (while the coarsest is shown first,
        the one to come)."""
        if self._waiting_target is not None:
            return self._waiting_target.level
        return self.tiles.target_level

    @property
    def band(self) -> int:
        """Depth units per stack band."""
        return len(self.tiles.levels) + 2

    @property
    def depth_extent(self) -> float:
        """Depth units the layer spans, from its base."""
        return self.band * (len(self._stacks) + 1)

    def place(self, order: int, depth_base: float) -> None:
        """Draw after the layers of lower ``order`` (render orders ``order`` on: each
        stack takes one, then the hatches), in the depth band from ``depth_base``."""
        self._depth_base = depth_base
        for stack in self._stacks:
            stack.group.render_order = order + stack.order
            for pos, image in stack.images.items():
                self._place(stack, pos, image)
        self._overlays.render_order = order + len(self._stacks)
        for hatch in self._hatches.values():
            hatch.local.z = depth_base + self.depth_extent - 1

    @property
    def render_orders(self) -> int:
        """How many render orders :meth:`place` takes."""
        return len(self._stacks) + 1

    # -- per frame ------------------------------------------------------------------

    def request_coarsest(self) -> None:
        """Ask the pool now for the whole coarsest level at the layer's slice (every
        channel shown): what any first view draws first, whatever view the caller then
        picks. For start-up, while the GPU gets ready.

        The layer then shows that level *alone* (:attr:`coarse_first`) until a frame
        has drawn some of it, or all of it has arrived (or failed): the viewer says so
        (:meth:`coarse_frame_drawn`), and the next :meth:`update` (the next frame, which
        the viewer asks for at once) asks for the view's own tiles; the viewer's
        :meth:`~viewer.Viewer.refresh` outside a frame asks for them at once
        (:meth:`end_coarse_first`). Measured over HTTP with 50 ms latency on the
        built-in sample (2 cores, lavapipe): asked for at once, the 128 chunks of the
        view's level arrived while the first frames were drawn, and their reads,
        decoding and uploads made a second viewer's first image 0.92-1.11 s against
        0.45-0.49 s; asked for right after the coarse frame's render rather than at
        the next frame, that frame still took 0.24-0.26 s against 0.15-0.19 s. The
        early hold lasts as long (then the tile set holds what it shows)."""
        from .tiling import RESIDENT_TILES, VISIBLE

        tiles, level = self.tiles, len(self.tiles.levels) - 1
        gy, gx = tiles.levels[level].grid
        if gy * gx > RESIDENT_TILES:
            return  # too many to be the first thing shown
        self._early = [
            (level, tiles.plane.chunk_and_selection(level, iy, ix, ch.index, tiles.position)[0])
            for ch in tiles.channels
            if ch.visible
            for iy in range(gy)
            for ix in range(gx)
        ]
        self.pool.get_chunks(self._early, self._early_ref, priority=VISIBLE)
        self._coarse_first = bool(self._early)

    @property
    def coarse_first(self) -> bool:
        """Whether the layer shows its coarsest level alone, the view's own level not
        asked for yet (see :meth:`request_coarsest`)."""
        return self._coarse_first

    @property
    def coarse_drawable(self) -> bool:
        """Whether, showing the coarsest level first, the last :meth:`update` found
        some of it to draw in view, or all of it arrived or failed: the frame drawn
        after that update shows what there is to show before the view's own level."""
        status = self._coarse_status
        return status is not None and (status.loaded > 0 or status.settled)

    def update(
        self, view: View, *, path: tuple[tuple[float, View], ...] = (), still: bool = True
    ) -> None:
        """Bring the held tiles in line with ``view`` and the predicted ``path`` (see
        :class:`TileSet`); the coarsest level only, while :attr:`coarse_first`."""
        if self._coarse_first and not self._coarse_drawn:
            self._update_coarse(view, path, still)
        elif self._coarse_first:
            self.end_coarse_first(view, path=path, still=still)
        else:
            self.tiles.update(view, path=path, still=still)
            self._drop_early()

    def coarse_frame_drawn(self) -> None:
        """Told by the viewer after a frame drew what :attr:`coarse_drawable` said
        there was: the next :meth:`update` asks for the view's own tiles."""
        if self._coarse_first and self.coarse_drawable:
            self._coarse_drawn = True

    def _update_coarse(self, view: View, path: tuple[tuple[float, View], ...], still: bool) -> None:
        tiles, coarsest = self.tiles, len(self.tiles.levels) - 1
        target, overflow = view_level(tiles.levels, view, tiles.bias)
        if overflow or target == coarsest:  # nothing to show sooner than the view's level
            self.end_coarse_first(view, path=path, still=still)
            return
        bias, tiles.bias = tiles.bias, math.inf  # the coarsest level, for any view
        try:
            tiles.update(view, path=path, still=still)
        finally:
            tiles.bias = bias
        self._coarse_status = tiles.status()
        rect = (view.y0, view.y1, view.x0, view.x1)
        waiting = tile_count(tiles.levels[target].tile_range(*rect))
        shown = sum(ch.visible for ch in tiles.channels)
        self._waiting_target = TileStatus(target, 0, waiting * shown, 0)

    def end_coarse_first(
        self, view: View, *, path: tuple[tuple[float, View], ...] = (), still: bool = True
    ) -> None:
        """Stop showing the coarsest level alone: ask for the view's own tiles now
        (what the tile set shows of the coarsest level stands in until they arrive)."""
        self._coarse_first = self._coarse_drawn = False
        self._coarse_status = self._waiting_target = None
        self.tiles.invalidate()  # its bias was another while the coarsest was shown
        self.tiles.update(view, path=path, still=still)
        self._drop_early()

    def _drop_early(self) -> None:
        if self._early:
            self.pool.drop_chunks(self._early, self._early_ref)
            self._early = []

    def status(self) -> TileStatus:
        """How far the visible tiles of the view's level have got (none asked for
        yet while the coarsest level is shown first)."""
        if self._waiting_target is not None:
            return self._waiting_target
        return self.tiles.status()

    def sync(self) -> None:
        """Make the scene show what the tile set says (cheap when it did not change)."""
        tiles = self.tiles
        if tiles.version == self._synced:
            return
        self._synced = tiles.version
        if tiles.position != self._placed_position:
            self._placed_position = tiles.position
            for stack in self._stacks:
                for pos, image in stack.images.items():
                    self._place(stack, pos, image)
        frame = self.textures.frame
        for stack in self._stacks:
            self._sync_stack(stack, frame)
        self._sync_hatches()

    def _members(self, stack: _Stack, pos: TilePos) -> list[Tile] | None:
        """The tiles of every channel of ``stack`` at ``pos``, if all are held."""
        members = []
        for c in stack.channels:
            tile = self.tiles.channels[c].tiles.get(ChannelTile(self.tiles.channels[c].index, *pos))
            if tile is None:
                return None
            members.append(tile)
        return members

    def _sync_stack(self, stack: _Stack, frame: int) -> None:
        first = self.tiles.channels[stack.channels[0]]
        for pos in [p for p in stack.images if self._members(stack, p) is None]:
            self._free(stack, pos)
        for key in first.tiles:
            pos: TilePos = (key.position, key.level, key.iy, key.ix)
            members = self._members(stack, pos)
            if members is None:
                continue
            loaded = all(t.plane is not None for t in members)
            image = stack.images.get(pos)
            if not loaded:
                if image is not None:
                    self._free(stack, pos)
                continue
            shown = all(t.shown for t in members)
            planes = [t.plane for t in members]
            if image is not None and any(
                a is not b for a, b in zip(stack.planes[pos], planes, strict=True)
            ):
                self._free(stack, pos)  # reloaded: the new data replaces the old
                image = self._make_image(stack, pos, planes)
                if self.track_drawn:
                    self.newly_drawn += [t.chunk for t in members]
            elif image is None and shown:
                image = self._make_image(stack, pos, planes)
                if self.track_drawn:
                    self.newly_drawn += [t.chunk for t in members]
            if image is not None:
                if image.visible != shown:
                    image.visible = shown
                if shown:
                    stack.last_shown[pos] = frame

    def _sync_hatches(self) -> None:
        tiles = self.tiles
        failed: dict[TilePos, bool] = {}
        for ch in tiles.channels:
            for key, tile in ch.tiles.items():
                if tile.failed:
                    pos = (key.position, key.level, key.iy, key.ix)
                    failed[pos] = failed.get(pos, False) or (
                        tile.in_view and key.position == tiles.position
                    )
        for pos in [p for p in self._hatches if p not in failed]:
            self._overlays.remove(self._hatches.pop(pos))
        for pos, shown in failed.items():
            hatch = self._hatches.get(pos)
            if hatch is None:
                hatch = self._hatches[pos] = self._hatch(pos)
            if hatch.visible != shown:
                hatch.visible = shown

    def _make_image(self, stack: _Stack, pos: TilePos, planes: list[np.ndarray]) -> gfx.Image:
        """Show a loaded tile: reuse a spare image of the same shape (its texture gets
        the new data), else create one."""
        data = self._texture_data(stack, planes)
        spare_key = (id(stack.material), data.shape, data.dtype)
        image = self.textures.take_spare(spare_key)
        if image is not None:
            image.geometry.grid.set_data(data)
        else:
            image = gfx.Image(gfx.Geometry(grid=self._texture(data)), stack.material)
            self.textures.added(data.nbytes)
        _, level, iy, ix = pos
        geo = self.tiles.levels[level]
        (cy, cx), (sy, sx), (oy, ox) = geo.chunk, geo.scale, geo.offset
        image.local.position = (ox + ix * cx * sx, oy + iy * cy * sy, 0)
        image.local.scale = (sx, sy, 1)
        self._place(stack, pos, image)
        stack.images[pos] = image
        stack.nbytes[pos] = data.nbytes
        stack.planes[pos] = tuple(planes)
        stack.group.add(image)
        return image

    def _place(self, stack: _Stack, pos: TilePos, image: gfx.Image) -> None:
        """Depth and draw order of a tile's image: in its stack's band, finer levels
        nearer and drawn first; tiles of another slice behind those of the current one."""
        position, level, _, _ = pos
        current = position == self.tiles.position
        n = len(self.tiles.levels)
        image.local.z = self._depth_base + stack.order * self.band + (n - level) + current
        image.render_order = level + (0 if current else n)

    def _free(self, stack: _Stack, pos: TilePos) -> None:
        """Take a tile's image out of the scene (kept as a spare while the budget
        allows)."""
        image = stack.images.pop(pos)
        nbytes = stack.nbytes.pop(pos)
        stack.last_shown.pop(pos, None)
        stack.planes.pop(pos)
        stack.group.remove(image)
        grid = image.geometry.grid
        self.textures.removed((id(stack.material), grid.data.shape, grid.data.dtype), image, nbytes)

    def eviction_candidates(self) -> Iterable[Candidate]:
        """Hidden images, with when they were last shown and their distance to the
        view's focus (for :class:`TextureBudget`)."""
        view = self.tiles.view
        if view is None:
            return []
        fx, fy = view.focus
        candidates = []
        for stack in self._stacks:
            for pos, image in stack.images.items():
                if image.visible:
                    continue
                _, level, iy, ix = pos
                y0, y1, x0, x1 = self.tiles.levels[level].tile_bounds(iy, ix)
                distance = math.hypot((x0 + x1) / 2 - fx, (y0 + y1) / 2 - fy)
                when = (stack.last_shown.get(pos, -1), -distance)
                candidates.append((when, lambda s=stack, p=pos: self._free(s, p)))
        return candidates

    def _hatch(self, pos: TilePos) -> gfx.Image:
        _, level, iy, ix = pos
        y0, y1, x0, x1 = self.tiles.levels[level].tile_bounds(iy, ix)
        image = gfx.Image(self._hatch_geometry, self._hatch_material)
        side = max(y1 - y0, x1 - x0) / 16
        image.local.scale = (side, side, 1)
        image.local.position = (
            x0 + side / 2,
            y0 + side / 2,
            self._depth_base + self.depth_extent - 1,
        )
        self._overlays.add(image)
        return image

    def placeholder_images(self) -> list[gfx.Image]:
        """One 1 x 1 image per stack, with the stack's material and a texture of the
        format its tiles will have (never added to the scene): for compiling the
        render pipelines before the first tile arrives (:mod:`viewer.startup`)."""
        dtype = self.pool.multiscale_info.dtype
        images = []
        for stack in self._stacks:
            planes = [np.zeros((1, 1), dtype) for _ in stack.channels]
            data = self._texture_data(stack, planes)
            images.append(gfx.Image(gfx.Geometry(grid=self._texture(data)), stack.material))
        return images

    # -- values ---------------------------------------------------------------------

    def values_at(self, x: float, y: float) -> list[tuple[str, Any]]:
        """Per shown channel, its label and the stored value under world (x, y) (a
        numpy scalar, exact; None where nothing is loaded there)."""
        raise NotImplementedError

    def close(self) -> None:
        """Drop every chunk and take the layer out of its scene."""
        self._drop_early()
        self.tiles.close()
        for stack in self._stacks:
            for pos in list(stack.images):
                self._free(stack, pos)
        self.textures.unregister(self, {id(stack.material) for stack in self._stacks})
        if self.root.parent is not None:
            self.root.parent.remove(self.root)


class ImageLayer(Layer):
    """An image: a stack per shown channel (its colormap over its contrast window,
    channels added up), or with ``rgb`` its three or four uint8 / uint16 channels as
    one true-colour texture (the stored colour, no window; a fourth channel is alpha).

    The channels listed in ``auto_windows`` (list indices) take their windows from
    their data as it arrives (:class:`~viewer.display.AutoWindow`): the first planes
    loaded set it before they are drawn, and the visible tiles of the coarsest level,
    once all are in, refine it once (unless that barely moves it); until then
    :meth:`status` counts those tiles as pending, so a settled view has its final
    windows. :meth:`set_display` stops that for its channel (its window is the
    caller's), unless told to keep it."""

    kind: ClassVar[str] = "image"

    def __init__(
        self,
        pool: ChunkPool,
        displays: list[ChannelDisplay],
        *,
        rgb: bool = False,
        auto_windows: Iterable[int] = (),
        **options: Any,
    ):
        self._displays = list(displays)
        self.rgb = rgb
        self._auto: dict[int, AutoWindow] = {} if rgb else {i: AutoWindow() for i in auto_windows}
        channels = [(d.index, d.visible or rgb) for d in displays]
        super().__init__(pool, channels, **options)
        if rgb:
            material = RGBMaterial(depth_test=True, depth_write=True)
            self._add_stack(tuple(range(len(displays))), material)
        else:
            for i, display in enumerate(displays):
                material = gfx.ImageBasicMaterial(
                    clim=display.clim,
                    map=_lut_map(display),
                    interpolation="nearest",
                    depth_test=True,
                    depth_write=True,
                )
                stack = self._add_stack((i,), material)
                stack.group.visible = display.visible

    @property
    def displays(self) -> list[ChannelDisplay]:
        return list(self._displays)

    def set_display(self, display: ChannelDisplay, *, keep_estimate: bool = False) -> None:
        """Change a channel's colormap, window or visibility (``display.index`` says
        which channel). Its window is the one given from now on, no longer estimated
        from the data, unless ``keep_estimate`` (for a change of colour or visibility
        alone: the estimate, if still running, then goes on)."""
        i = next(i for i, d in enumerate(self._displays) if d.index == display.index)
        if not keep_estimate:
            self._auto.pop(i, None)  # the caller's window wins over the estimate
        self._set_display(i, display)

    def _set_display(self, i: int, display: ChannelDisplay) -> None:
        old, self._displays[i] = self._displays[i], display
        if not self.rgb:
            stack = self._stacks[i]
            stack.material.clim = display.clim
            if display.colormap != old.colormap:
                stack.material.map = _lut_map(display)
            stack.group.visible = display.visible
            self.tiles.set_channel_visible(i, display.visible)
        self._request_draw()

    # -- windows from the data ------------------------------------------------------

    def sync(self) -> None:
        if self._auto and self.tiles.version != self._synced:
            self._estimate_windows()  # before the new tiles are drawn
        super().sync()

    def status(self) -> TileStatus:
        status = super().status()
        waiting = sum(self._window_sample(i)[2] for i in self._auto)
        if waiting and not status.overflow:
            status = replace(status, pending=status.pending + waiting)
        return status

    def _window_sample(self, i: int) -> tuple[list[np.ndarray], bool, int]:
        """Channel ``i``'s sample for its window: the loaded planes of its visible
        tiles at the coarsest level it holds in view (else of any level), whether all
        those coarsest tiles are done, and how many are not."""
        ch = self.tiles.channels[i]
        here = [
            (k, t) for k, t in ch.tiles.items() if t.in_view and k.position == self.tiles.position
        ]
        if not ch.visible or not here:
            return [], False, 0
        coarsest = max(k.level for k, _ in here)
        sample = [t for k, t in here if k.level == coarsest]
        planes = [t.plane for t in sample if t.plane is not None]
        if not planes:
            planes = [t.plane for _, t in here if t.plane is not None]
        waiting = sum(not t.done for t in sample)
        return planes, waiting == 0, waiting

    def _estimate_windows(self) -> None:
        for i, auto in list(self._auto.items()):
            planes, complete, _ = self._window_sample(i)
            clim = auto.update(self._displays[i].clim, planes, complete)
            if clim is not None:
                self._set_display(i, self._displays[i].with_clim(*clim))
            if auto.final:
                del self._auto[i]

    def _texture_data(self, stack: _Stack, planes: list[np.ndarray]) -> np.ndarray:
        if not self.rgb:
            (plane,) = planes
            return np.ascontiguousarray(plane, dtype=texture_dtype(plane.dtype))
        return rgb_texture_data(np.stack(planes, axis=-1))

    def values_at(self, x: float, y: float) -> list[tuple[str, Any]]:
        return [
            (d.label, self.tiles.value_at(i, x, y))
            for i, d in enumerate(self._displays)
            if d.visible or self.rgb
        ]

    def visible_planes(self, channel: int) -> list[np.ndarray]:
        """The loaded planes of channel ``channel`` (its index) in view."""
        i = next(i for i, d in enumerate(self._displays) if d.index == channel)
        return self.tiles.visible_planes(i)


class LabelsLayer(Layer):
    """Segmentation labels: integer IDs (up to 64 bits, exact on the GPU), a colour per
    ID from :mod:`viewer.labels`' table (0 transparent), blended over the layers
    beneath at ``opacity``; ``outline`` draws only the edges of each ID's regions;
    ``selected`` (an ID, or None) is drawn opaque and the others dimmed. Coarse levels
    show as stored (nearest, never interpolated). Of an image with a channel axis, the
    first channel."""

    kind: ClassVar[str] = "labels"

    def __init__(self, pool: ChunkPool, *, outline: bool = False, **options: Any):
        dtype = pool.multiscale_info.dtype
        if dtype.kind not in "iub":
            raise ValueError(f"{pool.multiscale_info.source}: labels must be integers, not {dtype}")
        options.setdefault("opacity", 0.5)
        options.setdefault("blending", "translucent")
        super().__init__(pool, [(0, True)], **options)
        self._material = LabelMaterial(outline=outline, depth_test=True, depth_write=True)
        self._add_stack((0,), self._material)
        self._selected: int | None = None

    @property
    def outline(self) -> bool:
        return self._material.outline

    @outline.setter
    def outline(self, value: bool) -> None:
        self._material.outline = bool(value)
        self._request_draw()

    @property
    def selected(self) -> int | None:
        """The highlighted ID (None: none)."""
        return self._selected

    @selected.setter
    def selected(self, value: int | None) -> None:
        self._selected = None if value is None or int(value) == 0 else int(value)
        self._material.selected = self._selected or 0
        self._request_draw()

    def id_at(self, x: float, y: float) -> int | None:
        """The ID stored under world (x, y) (a Python int), None where not loaded."""
        value = self.tiles.value_at(0, x, y)
        return None if value is None else int(value)

    def _texture_data(self, stack: _Stack, planes: list[np.ndarray]) -> np.ndarray:
        (plane,) = planes
        return label_texture_data(plane)

    def _texture(self, data: np.ndarray) -> gfx.Texture:
        return gfx.Texture(data, dim=2, format=label_texture_format(data))

    def values_at(self, x: float, y: float) -> list[tuple[str, Any]]:
        return [("label", self.tiles.value_at(0, x, y))]


def _lut_map(display: ChannelDisplay) -> gfx.TextureMap:
    """The channel's colormap as an exact 256-entry lookup texture."""
    return gfx.TextureMap(gfx.Texture(display.lut(256), dim=1), filter="nearest", wrap="clamp")
