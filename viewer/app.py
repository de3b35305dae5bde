"""Viewer: multiscale Zarr images as layers, in any rendercanvas canvas, or offscreen.

The viewer is the controller that wires the pieces together (see ``viewer/README.md``):

- the model: :attr:`Viewer.state` (:class:`~viewer.state.ViewState`), evented and
  serialisable, kept current by the viewer;
- the pure parts: a :class:`~viewer.camera.Camera` (what part of the world is shown),
  the key table (:mod:`viewer.keys`), the HUD's text (:func:`~viewer.hud.hud_lines`),
  each layer's tile set (:class:`~viewer.tileset.TileSet`);
- the views: the layers' pygfx groups, the HUD and help scenes, drawn by one
  renderer into the canvas, with one texture budget (:mod:`viewer.textures`).

Chunk loads complete in the pools' worker threads. Their handler calls are queued in
each pool (its polled mode; :class:`_PoolLink` links it to every viewer showing it);
the first one queued wakes those viewers, which ask for a frame; a frame first runs
what is queued (a layer's handler gives its tiles their planes), then updates the
layers for the view, syncs their scenes and renders. So handlers run on the canvas's
thread, in one place, and a frame never waits for data. Without a running loop
(offscreen), :meth:`refresh` and :meth:`wait_settled` do what a frame does before
rendering.

Closing (:meth:`Viewer.close`) never tears anything down under a frame that is being
drawn or presented: see there for why and how.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pygfx as gfx
import zarr
from rendercanvas.offscreen import RenderCanvas as OffscreenCanvas

from chunkpool import Changes, ChunkPool, KpiLog, MemoryBudget, MultiscaleInfo
from chunkpool.redaction import redact
from chunkpool.refresh import reread
from chunkpool.stores import import_store_modules

from .camera import Camera
from .discovery import LabelSearch
from .display import (
    ChannelDisplay,
    default_channels,
    has_window,
    parse_colormap,
    percentile_window,
)
from .hud import Hud, HudInfo, LayerSummary, hud_lines, scale_bar
from .keys import action_for, help_lines
from .layer import Blending, ImageLayer, LabelsLayer, Layer
from .output import use_exact_output
from .playback import Playback, prefetch_depth
from .prediction import MotionPredictor
from .slicing import Plane
from .startup import GpuStart, warm_pipelines
from .state import LayerState, ViewState
from .textures import TextureBudget
from .tiling import LINK_BUDGET, View, follow_origin

__all__ = ["Viewer", "is_rgb"]

logger = logging.getLogger("zarrscope")

#: Wheel zoom: the view shrinks by 2 for this many units of wheel delta.
WHEEL_UNITS_PER_DOUBLING = 500.0
#: A press and release this close (logical px) is a click, not a drag.
CLICK_SLOP = 3.0
#: Where the ``s`` key saves the view state.
STATE_FILE = "zarrscope-state.json"


def is_rgb(info: MultiscaleInfo) -> bool:
    """Whether an image is true colour: a channel axis of 3 or 4, uint8 or uint16 data,
    and OME channel metadata, if any, that says nothing else: colours red, green, blue
    (and any fourth) in that order, every channel active, windows the whole dtype range
    (as bioformats2raw writes for RGB slides). Channels with other colours, a narrower
    window or one switched off are fluorescence-like channels, added up."""
    scale = info.levels[0]
    if scale.channel_axis is None or scale.shape[scale.channel_axis] not in (3, 4):
        return False
    if scale.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        return False
    full = (0.0, float(np.iinfo(scale.dtype).max))
    primaries = ("FF0000", "00FF00", "0000FF")
    for ch in info.channels:
        if ch.color and ch.index < 3 and ch.color.upper() != primaries[ch.index]:
            return False
        if not ch.active or (ch.window is not None and tuple(ch.window) != full):
            return False
    return True


class _PoolLink:
    """Wakes the viewers showing one pool when it has handler calls for them.

    The pool queues its handler calls (``enable_polled_load_handlers``); the first call
    queued after a drain wakes every viewer of the pool; whichever draws first runs
    them all on its thread (handlers of layers of other viewers request those viewers'
    frames). When the last viewer of a pool it did not open leaves, the pool goes back
    to its default handler mode (handlers run in ``wait()`` and in the dropping thread)
    and the calls still queued, the closed layers' last, run then: the application
    that keeps the pool finds no queue that nobody drains."""

    _links: ClassVar[weakref.WeakKeyDictionary[ChunkPool, _PoolLink]] = weakref.WeakKeyDictionary()

    def __init__(self, pool: ChunkPool):
        self.viewers: weakref.WeakSet[Viewer] = weakref.WeakSet()
        self._pool = weakref.ref(pool)
        pool.enable_polled_load_handlers(self._wake)

    @classmethod
    def of(cls, pool: ChunkPool, viewer: Viewer) -> _PoolLink:
        link = cls._links.get(pool)
        if link is None:
            link = cls._links[pool] = cls(pool)
        link.viewers.add(viewer)
        return link

    def _wake(self) -> None:
        for viewer in list(self.viewers):
            viewer._wake_up()

    def run(self) -> bool:
        """Run the pool's queued handler calls here; whether there were any."""
        pool = self._pool()
        return pool is not None and not pool.destroyed and pool.run_pending_handlers() > 0

    def leave(self, viewer: Viewer) -> None:
        self.viewers.discard(viewer)
        pool = self._pool()
        if self.viewers or pool is None:
            return
        del self._links[pool]
        if not pool.destroyed:
            pool.enable_async_load_handlers("none")
            pool.run_pending_handlers()


class Viewer:
    """Shows multiscale images as layers and lets the user explore them.

    ``source`` (optional) is the first image layer: anything
    :meth:`ChunkPool.from_zarr_node` opens (path, URL, zarr node) or a
    :class:`~chunkpool.ChunkPool`; ``image_options`` go to :meth:`add_image`. With
    ``canvas=None`` the viewer renders offscreen at ``size`` (screenshots, tests);
    otherwise it draws into the given rendercanvas canvas (glfw, Qt widget, Jupyter,
    ...), or ``"jupyter"`` for a notebook canvas. ``z`` and ``t`` are level-0 indices.
    ``texture_budget`` bounds GPU texture bytes: an int for this viewer alone, a
    :class:`TextureBudget` to share, by default the process-wide one.
    ``memory_budget`` (bytes, or a :class:`~chunkpool.MemoryBudget` to share) is one
    hard bound on the held and cached chunks of every pool the viewer opens: the
    visible tiles outrank prefetch, which gives way first. ``kpi_log`` (a path, or a
    :class:`~chunkpool.kpi.KpiLog` to share) logs every load of those pools and when
    each chunk was first drawn, for ``zarrscope-report``. With ``live`` (seconds),
    the stores the viewer opens are looked at that often (:meth:`ChunkPool.watch`):
    grown images extend their layers (and the z / t ranges), rewritten chunks reload
    (the old tiles stay until the new ones arrive), and a view at the newest time point
    follows new ones. ``link_budget`` (seconds): after a move, each layer shows first the
    level whose missing visible tiles arrive within it over its pool's measured link,
    then the level just above the one of the zoom (and ``bias``), then that one, which
    is what it settles on (the same picture either way); None shows that level first,
    every tile at once, whatever the link. The default favours the screen covered: on
    a slow link (2 MB/s, 100 ms) the whole screen at most 2x blurred comes about 2.5x
    sooner than with None, the sharp picture about 1.25x later (the bytes of the
    level above it); None favours the sharp picture (``zarrscope --link-budget off``;
    see viewer/README.md, "A level chosen for the link", and :mod:`viewer.tiling`).
    """

    def __init__(
        self,
        source: Any = None,
        canvas: Any = None,
        *,
        size: tuple[int, int] = (1280, 800),
        z: int | None = None,
        t: int | None = None,
        show_hud: bool = True,
        texture_budget: int | TextureBudget | None = None,
        memory_budget: int | MemoryBudget | None = None,
        live: float | None = None,
        link_budget: float | None = LINK_BUDGET,
        kpi_log: str | os.PathLike[str] | KpiLog | None = None,
        **image_options: Any,
    ):
        self.opened_at = time.perf_counter()
        #: Seconds within which the first level shown after a move should arrive over
        #: each layer's link (None: the target level first, whatever the link).
        self.link_budget = link_budget
        #: The per-chunk KPI log of every pool the viewer opens, with the viewer's own
        #: ``view`` (the view changed) and ``drawn`` (a chunk first on screen) events
        #: (None: none; see :mod:`chunkpool.kpi` and ``zarrscope-report``).
        owned = isinstance(kpi_log, str | os.PathLike)
        self._owned_kpi_log = KpiLog(kpi_log) if owned else None
        self.kpi_log = self._owned_kpi_log if owned else kpi_log
        if live is not None and not live > 0:
            raise ValueError(f"live needs a positive interval in seconds, not {live}")
        #: Seconds between looks at the stores for new data (None: not live).
        self.live = live
        #: The bound on the chunk memory of every pool this viewer opens (None: none).
        self.memory_budget = (
            MemoryBudget(memory_budget) if isinstance(memory_budget, int) else memory_budget
        )
        self._with_viewer_options(image_options)
        colormap = image_options.get("colormap")
        for name in [colormap] if isinstance(colormap, str) else colormap or ():
            parse_colormap(name)  # fail early, before any I/O
        pool = owned = None
        import_store_modules(source)  # the first request out before the GPU thread starts
        gpu = GpuStart()  # the GPU device, made while the image opens and starts loading
        try:
            if source is not None:
                pool, owned = _open(source, image_options, only=False)
            opened = time.perf_counter()
            self._setup(canvas, size, show_hud, texture_budget)
            if pool is not None:
                self._set_initial_position(Plane.of(pool.multiscale_info), z, t)
                self._adopt = pool if owned else None  # opened here: destroyed with it
                self.add_image(pool, **image_options)
            elif z is not None or t is not None:
                raise ValueError("z and t need an image")
            self.fit()
            for layer in self.layers:
                layer.request_coarsest()  # loading, before the GPU is ready
            #: Seconds each start-up step took: ``open`` (metadata), ``layers`` (to the
            #: first chunks asked for), ``device`` (waiting for the GPU device),
            #: ``pipelines`` (compiling the layers' pipelines), and the device thread's
            #: ``types`` and ``device`` as ``gpu_types``, ``gpu_device``.
            self.startup_seconds = {"open": opened - self.opened_at}
            self.startup_seconds["layers"] = time.perf_counter() - opened
            self._start_renderer(gpu)
        except BaseException:
            with contextlib.suppress(BaseException):
                gpu.wait()  # no thread outlives a failed constructor
            for search in getattr(self, "_label_searches", ()):
                search.cancel()  # nor a read of labels
            if owned:
                pool.destroy()
            if getattr(self, "canvas", None) is not None and self._owns_canvas:
                self.canvas.close()
            raise
        self.canvas.request_draw(self._draw)

    @classmethod
    def from_state(
        cls,
        state: ViewState,
        canvas: Any = None,
        *,
        size: tuple[int, int] = (1280, 800),
        show_hud: bool | None = None,
        **options: Any,
    ) -> Viewer:
        """A viewer showing exactly ``state`` (its layers opened from their sources;
        ``show_hud`` overrides its HUD setting; ``texture_budget``,
        ``memory_budget``, ``kpi_log`` and ``link_budget`` go to :class:`Viewer`, the other
        ``options`` to every layer's opening, e.g. ``storage_options``)."""
        own = ("texture_budget", "memory_budget", "kpi_log", "link_budget")
        viewer = cls(
            None,
            canvas,
            size=size,
            show_hud=state.show_hud if show_hud is None else show_hud,
            **{k: v for k, v in options.items() if k in own},
        )
        open_options = {k: v for k, v in options.items() if k not in own}
        try:
            viewer.apply_state(state, **open_options)
            if show_hud is not None:
                viewer.hud.visible = show_hud
        except BaseException:
            viewer.close()
            raise
        return viewer

    def _setup(self, canvas: Any, size: tuple[int, int], show_hud: bool, budget: Any) -> None:
        self._owns_canvas = canvas is None
        if canvas is None:
            canvas = OffscreenCanvas(size=size, pixel_ratio=1)
        elif canvas == "jupyter":
            from rendercanvas.jupyter import RenderCanvas as JupyterCanvas

            canvas = JupyterCanvas(size=size)
            self._owns_canvas = True
        self.canvas = canvas
        if budget is None:
            budget = TextureBudget.shared()
        elif not isinstance(budget, TextureBudget):
            budget = TextureBudget(budget)
        self.textures: TextureBudget = budget
        self.scene = gfx.Scene()
        # pygfx clears the frame only in a render pass: a background is always drawn,
        # so that a view with nothing in it (layers hidden, panned off the image) is
        # black instead of the previous frame
        self.scene.add(gfx.Background.from_color("#000000"))
        # layers are drawn relative to a render origin near the view (float32 on the
        # GPU: see viewer.tiling), and so is the camera: its position stays in world units
        self._world = gfx.Group()
        self.scene.add(self._world)
        self._origin = (0.0, 0.0)
        self._wake = threading.Event()
        self._loop = _canvas_loop(self.canvas)
        self._busy = 0  # depth of our own frame / handler-batch code on the GUI thread
        self._closed = False
        self._close_pending = False  # close() was asked for where it had to wait
        self.layers: list[Layer] = []
        self._owned_pools: list[ChunkPool] = []
        self._links: dict[int, _PoolLink] = {}
        self._label_searches: list[LabelSearch] = []  # one per image layer added
        self._adopt: ChunkPool | None = None  # the constructor's pool, until its layer
        self._store_changes: deque[tuple[ChunkPool, Any]] = deque()
        #: The playback running (:meth:`play`), or None.
        self.playback: Playback | None = None
        self._slice_started: float | None = None  # when the shown slice was asked for
        self._slice_seconds: float | None = None  # how long the last slice took to load
        self._prefetch_slices = True
        #: When a watched store last changed (time.monotonic()), None before that.
        self.newest_data_at: float | None = None
        self._live_problems: dict[ChunkPool, str] = {}  # a watched store unreadable now
        self.camera = Camera(size=self._size())
        self._gfx_camera = gfx.OrthographicCamera(*size, maintain_aspect=False)
        self._gfx_camera.local.scale_y = -1  # y down: array row 0 at the top
        self._camera_frame = gfx.Group()
        self._camera_frame.add(self._gfx_camera)
        self.hud = Hud()
        self.hud.visible = show_hud
        self.help = Hud()
        self.help.visible = False
        self.state = ViewState(show_hud=show_hud)
        self.active_layer = 0
        self.active_channel = 0
        #: Whether the HUD shows the active channel's colormap and window (the ``b`` key).
        self.show_colorbar = False
        self.cursor: tuple[float, float] | None = None
        self.position: dict[str, int] = {}
        #: Called (no arguments, on the GUI thread) after each frame is drawn.
        self.frame_listeners: list[Callable[[], None]] = []
        #: Lines the HUD shows after its own (e.g. "generating the sample: ..."); set
        #: on the GUI thread, shown at the next frame.
        self.hud_notes: list[str] = []
        self.frame_times: deque[float] = deque(maxlen=240)
        self.first_pixel_at: float | None = None
        self._shown: tuple | None = None  # the view last drawn
        self._view_changed_at: float | None = None  # when it was first drawn, until settled
        self.last_settle_seconds: float | None = None
        #: Extrapolates the camera's motion for prefetch (None: no predicted prefetch).
        self.motion: MotionPredictor | None = MotionPredictor()
        self._view_chosen = False  # by show_world/show_region, as opposed to fit()
        self._drag: tuple[float, float, float, float] | None = None  # start x, y; last x, y

    def _start_renderer(self, gpu: GpuStart) -> None:
        """Make the renderer once the GPU device (started in the background) is ready,
        and compile the layers' render pipelines while their first chunks load."""
        started = time.perf_counter()
        gpu.wait()
        self.renderer = gfx.WgpuRenderer(self.canvas, pixel_filter="nearest", ppaa="none")
        use_exact_output(self.renderer)  # the canvas shows the frame's bytes unchanged
        # one internal pixel per physical pixel: data pixels stay crisp, no SSAA cost
        self.renderer.pixel_scale = 1
        self.renderer.add_event_handler(
            self._on_pointer, "pointer_down", "pointer_move", "pointer_up", "pointer_leave"
        )
        self.renderer.add_event_handler(self._on_wheel, "wheel")
        self.renderer.add_event_handler(self._on_key, "key_down")
        self.renderer.add_event_handler(self._on_resize, "resize")
        ready = time.perf_counter()
        placeholders = [image for layer in self.layers for image in layer.placeholder_images()]
        warm_pipelines(self.renderer, placeholders, self.scene)
        self.startup_seconds["device"] = ready - started
        self.startup_seconds["pipelines"] = time.perf_counter() - ready
        self.startup_seconds.update({f"gpu_{k}": v for k, v in gpu.seconds.items()})

    # -- layers ---------------------------------------------------------------------

    def add_image(
        self,
        source: Any,
        *,
        name: str | None = None,
        channels: Sequence[int] | None = None,
        colormap: str | Sequence[str] | None = None,
        clim: tuple[float, float] | Sequence[tuple[float, float]] | None = None,
        opacity: float = 1.0,
        blending: Blending = "additive",
        visible: bool = True,
        rgb: bool | None = None,
        bias: float = 1.0,
        **open_options: Any,
    ) -> ImageLayer:
        """Add an image layer, drawn over the layers before it.

        ``source`` is anything :meth:`ChunkPool.from_zarr_node` opens, or an existing
        :class:`~chunkpool.ChunkPool` (shared: not destroyed with the layer).
        ``channels`` limits the shown channels; ``colormap`` and ``clim`` apply to every
        channel, or, given as a sequence of several, one each to the shown channels in
        order.
        ``rgb`` (default: :func:`is_rgb`) shows a channel axis of 3 or 4 as true colour.
        ``bias`` > 1 picks coarser levels (faster), < 1 sharper ones.
        ``open_options`` (``cache_bytes``, ``memory_budget``, ``storage_options``,
        ``disk_cache``, ``disk_cache_bytes``, ``pool_options``) apply when the source is
        opened here.
        """
        pool, owned = self._open(source, open_options)
        try:
            info = pool.multiscale_info
            plane = Plane.of(info)
            self._label_searches.append(LabelSearch(info))  # read while the image loads
            rgb = is_rgb(info) if rgb is None else bool(rgb)
            if rgb and (
                plane.n_channels not in (3, 4) or info.dtype.kind != "u" or info.dtype.itemsize > 2
            ):
                raise ValueError(
                    f"{info.source}: true colour needs 3 or 4 channels of uint8 or uint16, "
                    f"has {plane.n_channels} of {info.dtype}"
                )
            position = plane.clamp(self._axis_position(plane))
            auto: list[int] = []
            if rgb:
                displays = [
                    ChannelDisplay(c, "RGBA"[c], "gray", (0.0, 1.0))
                    for c in range(plane.n_channels)
                ]
            else:
                displays, auto = _initial_displays(pool, plane, channels, colormap, clim)
            layer = ImageLayer(
                pool,
                displays,
                rgb=rgb,
                auto_windows=auto,
                **self._layer_options(pool, name, opacity, blending, visible, position, bias),
            )
            return self._attach(layer, pool, owned)
        except BaseException:
            if owned:
                pool.destroy()
            raise

    def add_labels(
        self,
        source: Any,
        *,
        name: str | None = None,
        opacity: float = 0.5,
        outline: bool = False,
        visible: bool = True,
        blending: Blending = "translucent",
        bias: float = 1.0,
        **open_options: Any,
    ) -> LabelsLayer:
        """Add a labels layer (integer IDs, coloured per ID) over the layers before it.

        ``source`` is as for :meth:`add_image`, or the name of a label image that an
        image layer's OME ``labels/`` group lists (:attr:`label_names`). Raises
        ValueError for labels that are not integers."""
        if isinstance(source, str) and source in (found := self._label_groups()):
            name = name or source
            source = found[source]
        pool, owned = self._open(source, open_options)
        try:
            plane = Plane.of(pool.multiscale_info)
            position = plane.clamp(self._axis_position(plane))
            layer = LabelsLayer(
                pool,
                outline=outline,
                **self._layer_options(pool, name, opacity, "translucent", visible, position, bias),
            )
        except BaseException:
            if owned:
                pool.destroy()
            raise
        return self._attach(layer, pool, owned)

    def _with_viewer_options(self, open_options: dict[str, Any]) -> dict[str, Any]:
        """``open_options`` with the viewer's memory budget and KPI log (unless
        they give their own)."""
        if self.memory_budget is not None:
            open_options.setdefault("memory_budget", self.memory_budget)
        if self.kpi_log is not None:
            open_options.setdefault("kpi_log", self.kpi_log)
        return open_options

    def _open(self, source: Any, open_options: dict[str, Any]) -> tuple[ChunkPool, bool]:
        """The pool of a layer's source, and whether the viewer owns it (opened here,
        or by the constructor)."""
        if source is self._adopt:
            self._adopt = None
            return source, True
        return _open(source, self._with_viewer_options(open_options))

    @property
    def label_names(self) -> list[str]:
        """The label images the image layers' OME ``labels/`` groups list (by name, for
        :meth:`add_labels`), shown or not."""
        return list(self._label_groups())

    def _label_groups(self, *, wait: bool = True) -> dict[str, zarr.Group]:
        """The label images found, by name (the first of a name wins), in the order of
        the image layers; waiting for the searches still running, or (``wait=False``)
        leaving them out."""
        found: dict[str, zarr.Group] = {}
        for search in self._label_searches:
            if wait or search.done():
                for group in search.result():
                    found.setdefault(group.basename, group)
        return found

    def show_next_labels(self) -> None:
        """Add the first discovered label image not shown yet (the ``k`` key)."""
        shown = {layer.name for layer in self.layers if layer.kind == "labels"}
        for name in self._label_groups():
            if name not in shown:
                self.add_labels(name)
                return

    def _layer_options(
        self,
        pool: ChunkPool,
        name: str | None,
        opacity: float,
        blending: Blending,
        visible: bool,
        position: Any,
        bias: float,
    ) -> dict[str, Any]:
        info = pool.multiscale_info
        return {
            "name": self._unique_name(name or info.name or Path(info.source).name or "image"),
            "textures": self.textures,
            "position": position,
            "request_draw": self._request_draw,
            "call_later": None if self._loop is None else self._loop.call_later,
            "opacity": opacity,
            "blending": blending,
            "visible": visible,
            "bias": bias,
            "link_budget": self.link_budget,
        }

    def _attach(self, layer: Layer, pool: ChunkPool, owned: bool) -> Layer:
        if self.layers:
            for problem in alignment_problems(self.layers[0], layer):
                logger.warning("%s", problem)
        if owned:
            self._owned_pools.append(pool)
            if self.live is not None:
                pool.watch(
                    self.live,
                    on_change=lambda changes, pool=pool: self._store_changed(pool, changes),
                    on_error=lambda problem, pool=pool: self._store_changed(pool, problem),
                )
        self._links[id(pool)] = _PoolLink.of(pool, self)
        layer.track_drawn = self.kpi_log is not None
        self.layers.append(layer)
        axes = layer.tiles.plane.info.levels[0].axes
        for axis, index in layer.position:
            self.position.setdefault(axes[axis].name, index)
        self._world.add(layer.root)
        if hasattr(self, "renderer"):  # a layer added later: its pipelines, before its data
            warm_pipelines(self.renderer, layer.placeholder_images())
        self._place_layers()
        self._publish_state()
        self._request_draw()
        return layer

    def remove_layer(self, layer: Layer) -> None:
        """Take a layer out (its chunks dropped; its pool destroyed if opened here)."""
        self.layers.remove(layer)
        layer.close()
        pool = layer.pool
        if not any(other.pool is pool for other in self.layers):
            link = self._links.pop(id(pool), None)
            if link is not None:
                link.leave(self)
            if pool in self._owned_pools:
                self._owned_pools.remove(pool)
                pool.destroy()
        self.active_layer = min(self.active_layer, max(len(self.layers) - 1, 0))
        self._place_layers()
        self._publish_state()
        self._request_draw()

    def _unique_name(self, name: str) -> str:
        names = {layer.name for layer in self.layers}
        candidate, n = name, 1
        while candidate in names:
            n += 1
            candidate = f"{name} [{n}]"
        return candidate

    def _place_layers(self) -> None:
        """Layers in consecutive render orders and depth bands, in list order."""
        order, depth = 1, 0.0
        for layer in self.layers:
            layer.place(order, depth)
            order += layer.render_orders
            depth += layer.depth_extent
        extent = depth + 2
        self._gfx_camera.depth_range = (-extent, extent)

    @property
    def layer(self) -> Layer:
        """The active layer (the one keys and the HUD's channel line act on)."""
        if not self.layers:
            raise ValueError("the viewer has no layer")
        return self.layers[self.active_layer]

    @property
    def pool(self) -> ChunkPool:
        """The active layer's pool."""
        return self.layer.pool

    # -- slice position -------------------------------------------------------------

    def dims(self) -> dict[str, int]:
        """Every slider axis (z, t, ...) of the layers by name, with its size (the
        largest over the layers)."""
        sizes: dict[str, int] = {}
        for layer in self.layers:
            plane = layer.tiles.plane
            scale = plane.info.levels[0]
            for axis in plane.slider_axes:
                name = scale.axes[axis].name
                sizes[name] = max(sizes.get(name, 0), scale.shape[axis])
        return sizes

    def _axis_position(self, plane: Plane) -> dict[int, int]:
        """The viewer's position as ``plane``'s axis indices (defaults where unset)."""
        axes = plane.info.levels[0].axes
        position = dict(plane.default_position())
        for axis in plane.slider_axes:
            if axes[axis].name in self.position:
                position[axis] = self.position[axes[axis].name]
        return position

    def _set_initial_position(self, plane: Plane, z: int | None, t: int | None) -> None:
        """Start at level-0 indices ``z`` and ``t`` of the first image (checked); live,
        at its newest time point by default (then it follows new ones)."""
        scale = plane.info.levels[0]
        if t is None and self.live is not None and scale.time_axis in plane.slider_axes:
            t = scale.shape[scale.time_axis] - 1
        for value, axis in ((z, _z_axis(plane)), (t, scale.time_axis)):
            if value is None:
                continue
            if axis is None or axis not in plane.slider_axes:
                raise ValueError(f"{plane.info.source}: the image has no such axis")
            if not 0 <= value < scale.shape[axis]:
                raise ValueError(
                    f"index {value} out of range for axis {scale.axes[axis].name!r} "
                    f"(size {scale.shape[axis]})"
                )
            self.position[scale.axes[axis].name] = value

    def _axis_name(self, axis: str | int) -> str | None:
        """An axis's name: ``axis`` itself, "z" / "t" meaning the active layer's
        spatial slider / time axis, or an axis index of the active layer's image."""
        if not self.layers:
            return None
        plane = self.layer.tiles.plane
        axes = plane.info.levels[0].axes
        if isinstance(axis, int):
            return axes[axis].name if axis in plane.slider_axes else None
        if axis in self.dims():
            return axis
        role = {"z": _z_axis(plane), "t": plane.info.levels[0].time_axis}.get(axis)
        return None if role is None or role not in plane.slider_axes else axes[role].name

    def set_index(self, axis: str | int, index: int) -> None:
        """Show plane ``index`` (a level-0 index, clamped) along a slider axis (z, t...),
        by name (or the active image's axis index), in every layer that has it. The
        previous plane stays on screen until the new one has loaded."""
        name = self._axis_name(axis)
        if name is None:
            raise ValueError(f"{axis!r} is not a slider axis of the layers")
        self.position[name] = int(np.clip(index, 0, self.dims()[name] - 1))
        for layer in self.layers:
            plane = layer.tiles.plane
            position = plane.clamp(self._axis_position(plane))
            if position != layer.position:
                layer.set_position(position)
        self._publish_state()

    def step_axis(self, axis: str | int | None, delta: int) -> None:
        """Move the slice position along ``axis`` (see :meth:`set_index`) by ``delta``;
        nothing if the layers have no such axis."""
        name = None if axis is None else self._axis_name(axis)
        if name is not None:
            self.set_index(name, self.position.get(name, 0) + delta)

    # -- view -----------------------------------------------------------------------

    def _size(self) -> tuple[float, float]:
        return tuple(self.canvas.get_logical_size())  # type: ignore[return-value]

    def view(self) -> View:
        """The current view in world coordinates."""
        return self.camera.view(self.canvas.get_physical_size(), self.cursor)

    def show_world(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Map the world rectangle (edges) onto the whole canvas."""
        self._view_chosen = True
        self.camera.show_world(x0, y0, x1, y1)
        self._request_draw()

    def show_region(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Map a region of the active layer's level-0 pixels (x0, y0 inclusive; x1, y1
        exclusive) onto the whole canvas."""
        (oy, ox), (sy, sx) = self._level0_transform()
        self.show_world(
            ox + (x0 - 0.5) * sx, oy + (y0 - 0.5) * sy, ox + (x1 - 0.5) * sx, oy + (y1 - 0.5) * sy
        )

    def fit(self) -> None:
        """Show every layer whole, centred, with square pixels."""
        if not self.layers:
            return
        boxes = [_world_box(layer) for layer in self.layers]
        self.camera.size = self._size()
        self.camera.fit(
            min(b[0] for b in boxes),
            min(b[1] for b in boxes),
            max(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )
        self._request_draw()

    def _level0_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        level0 = self.layer.levels[0]
        return level0.offset, level0.scale

    def world_to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """World (x, y) to the active layer's level-0 pixel (column, row) coordinates."""
        (oy, ox), (sy, sx) = self._level0_transform()
        return (x - ox) / sx, (y - oy) / sy

    def pan(self, fx: float, fy: float) -> None:
        """Move the view by a fraction of its size."""
        self.camera.pan(fx, fy)
        self._request_draw()

    def zoom(self, factor: float) -> None:
        """Zoom around the cursor (else the centre); factor > 1 zooms in."""
        self.camera.zoom(factor, self.cursor)
        self._request_draw()

    # -- display settings -----------------------------------------------------------

    def _image(self) -> ImageLayer | None:
        layer = self.layers[self.active_layer] if self.layers else None
        return layer if isinstance(layer, ImageLayer) and not layer.rgb else None

    def toggle_channel(self, index: int) -> None:
        """Show or hide channel ``index`` of the active image layer (and make it the
        channel that keys adjust)."""
        image = self._image()
        if image is not None and 0 <= index < len(image.displays):
            d = image.displays[index]
            image.set_display(replace(d, visible=not d.visible), keep_estimate=True)
            self.active_channel = index
            self._publish_state()

    def cycle_active_channel(self) -> None:
        image = self._image()
        if image is not None:
            self.active_channel = (self.active_channel + 1) % len(image.displays)
            self._publish_state()

    def cycle_active_layer(self) -> None:
        if self.layers:
            self.active_layer = (self.active_layer + 1) % len(self.layers)
            self.active_channel = 0
            self._publish_state()

    def toggle_active_layer(self) -> None:
        if self.layers:
            self.layer.visible = not self.layer.visible
            self._publish_state()

    def adjust_window(self, *, scale: float = 1.0, shift: float = 0.0) -> None:
        """Narrow/widen (``scale``) or move (``shift``) the active channel's window."""
        image = self._image()
        if image is not None:
            d = image.displays[self.active_channel]
            image.set_display(d.scaled_window(scale).shifted_window(shift))
            self._publish_state()

    def auto_contrast(self) -> None:
        """Window the active channel on the percentiles of the loaded visible tiles."""
        image = self._image()
        if image is None:
            return
        data = image.visible_planes(self.active_channel)
        if data:
            d = image.displays[self.active_channel]
            image.set_display(
                d.with_clim(*percentile_window(np.concatenate([p.ravel() for p in data])))
            )
            self._publish_state()

    def toggle_outline(self) -> None:
        """Labels: draw only the outlines of the active labels layer, or fill again."""
        layer = self.layers[self.active_layer] if self.layers else None
        if layer is not None and hasattr(layer, "outline"):
            layer.outline = not layer.outline
            self._publish_state()

    def toggle_hud(self) -> None:
        self.hud.visible = not self.hud.visible
        self._publish_state()

    def toggle_colorbar(self) -> None:
        self.show_colorbar = not self.show_colorbar
        self._request_draw()

    def toggle_help(self) -> None:
        self.help.visible = not self.help.visible

    # -- picking --------------------------------------------------------------------

    def pick(self, x: float, y: float) -> dict[str, Any]:
        """The stored value of every visible layer at world (x, y), by layer name: the
        value of its one shown channel, or ``{channel label: value}`` for several (an
        RGB pixel: by "R", "G", "B"); exact for every dtype (numpy scalars, uint64 and
        float64 included); None where nothing is loaded there."""
        result: dict[str, Any] = {}
        for layer in self.layers:
            if not layer.visible:
                continue
            values = layer.values_at(x, y)
            result[layer.name] = values[0][1] if len(values) == 1 else dict(values)
        return result

    # -- state ----------------------------------------------------------------------

    def _publish_state(self) -> None:
        """Bring :attr:`state` up to date (its signals fire for what changed)."""
        if not hasattr(self, "state"):
            return
        state = self.state
        state.camera = self.camera.to_dict()
        state.position = dict(self.position)
        state.layers = [_layer_state(layer) for layer in self.layers]
        state.active_layer = self.active_layer
        state.active_channel = self.active_channel
        state.show_hud = self.hud.visible

    def apply_state(self, state: ViewState, **open_options: Any) -> None:
        """Show ``state``: replace the layers by those it lists (opened from their
        sources), and take its display settings, slice position and camera."""
        for layer in list(self.layers):
            self.remove_layer(layer)
        self.position = dict(state.position)
        for spec in state.layers:
            self._add_layer_from_state(spec, open_options)
        self.active_layer = min(state.active_layer, max(len(self.layers) - 1, 0))
        self.active_channel = state.active_channel
        self.hud.visible = state.show_hud
        if state.camera:
            self._view_chosen = True
            self.camera.x = state.camera["x"]
            self.camera.y = state.camera["y"]
            self.camera.width = state.camera["width"]
            self.camera.height = state.camera["height"]
        for name, index in state.position.items():
            if name in self.dims():
                self.set_index(name, index)
        self._publish_state()
        self._request_draw()

    def _add_layer_from_state(self, spec: LayerState, open_options: dict[str, Any]) -> None:
        common = {
            "name": spec.name or None,
            "opacity": spec.opacity,
            "blending": spec.blending,
            "visible": spec.visible,
            **open_options,
        }
        if spec.kind == "labels":
            layer = self.add_labels(spec.source, outline=spec.outline, **common)
            layer.selected = spec.selected
            return
        image = self.add_image(spec.source, rgb=spec.rgb, **common)
        if not spec.rgb:
            for ch in spec.channels:
                image.set_display(
                    ChannelDisplay(
                        int(ch["index"]),
                        str(ch["label"]),
                        str(ch["colormap"]),
                        (float(ch["clim"][0]), float(ch["clim"][1])),
                        bool(ch["visible"]),
                    )
                )

    def save_state(self, path: str | Path = STATE_FILE) -> Path:
        """Write :attr:`state` as JSON (the ``s`` key: ``zarrscope-state.json`` in the
        working directory); restore with ``zarrscope --state FILE``."""
        self._publish_state()
        path = Path(path)
        path.write_text(self.state.to_json())
        return path

    # -- playback -------------------------------------------------------------------

    def play(
        self,
        axis: str = "t",
        fps: float = 5.0,
        mode: str = "smooth",
        *,
        prefetch: bool = True,
        clock: Any = None,
    ) -> Playback:
        """Play a slider axis (by name, or "t" / "z" as for :meth:`set_index`) at
        ``fps``: "smooth" keeps time and shows the best level arrived, "sharp" waits
        for each slice (see :mod:`viewer.playback`). With ``prefetch`` the next slices
        are loaded ahead. The space key plays t (else z) or stops."""
        name = self._axis_name(axis)
        if name is None:
            raise ValueError(f"{axis!r} is not a slider axis of the layers")
        options = {} if clock is None else {"clock": clock}
        self.playback = Playback(name, self.dims()[name], fps, mode, **options)  # type: ignore[arg-type]
        self._prefetch_slices = prefetch
        self._slice_started = self.playback.clock()
        self._request_draw()
        return self.playback

    def stop(self) -> None:
        """Stop playing (the prefetch of slices ahead is dropped)."""
        self.playback = None
        for layer in self.layers:
            layer.tiles.ahead = ()
        self._request_draw()

    def toggle_play(self) -> None:
        if self.playback is not None:
            self.stop()
        elif self._axis_name("t") is not None:
            self.play("t")
        elif self._axis_name("z") is not None:
            self.play("z")

    def _step_playback(self) -> None:
        """Move a playing axis on when it is time (and its slice is in, for sharp
        mode); keep the slices ahead prefetched; ask for the next frame."""
        playback = self.playback
        if playback is None:
            return
        index = self.position.get(playback.axis, 0)
        settled = self.settled()
        if settled and self._slice_started is not None:
            self._slice_seconds = playback.clock() - self._slice_started
            self._slice_started = None
        step = playback.next_index(index, settled)
        if step is not None:
            self.set_index(playback.axis, step)
            index = step
            self._slice_started = playback.clock()
        depth = prefetch_depth(playback.fps, self._slice_seconds) if self._prefetch_slices else 0
        for layer in self.layers:
            plane = layer.tiles.plane
            axes = plane.info.levels[0].axes
            ahead = []
            for i in playback.ahead(index, depth):
                position = self._axis_position(plane)
                for a in plane.slider_axes:
                    if axes[a].name == playback.axis:
                        position[a] = i
                ahead.append(plane.clamp(position))
            layer.tiles.ahead = tuple(p for p in dict.fromkeys(ahead) if p != layer.position)
        if self._loop is not None:
            self._loop.call_later(1.0 / playback.fps / 2, self._request_draw)

    # -- live stores ----------------------------------------------------------------

    def _store_changed(self, pool: ChunkPool, event: Changes | str | None) -> None:
        """A watched store changed, or its refresh failed (a message) or works again
        (None), in the pool's watch thread: apply it on the GUI thread, at the next
        frame."""
        self._store_changes.append((pool, event))
        self._wake_up()

    def _apply_store_changes(self) -> None:
        """Grown images: their layers take the new geometry, the slider ranges grow,
        and an axis at its last index follows to the new last one. (Rewritten chunks
        reload by themselves: the pool calls their load handlers again.) An image that
        had to be opened again (shrunk, another layout) is: its layers move to the new
        pool. A store that cannot be read is one HUD line (the pool logged it) while
        the layers keep what they show."""
        if not self._store_changes:
            return
        before = self.dims()
        grown = False
        reopen: list[ChunkPool] = []
        while self._store_changes:
            pool, event = self._store_changes.popleft()
            if pool.destroyed:  # replaced by a reopened one
                continue
            if not isinstance(event, Changes):
                if event is None:
                    self._live_problems.pop(pool, None)
                else:
                    self._live_problems[pool] = f"store unreadable, showing what was read: {event}"
                continue
            self.newest_data_at = time.monotonic()
            if event.reopened:
                if pool not in reopen:
                    reopen.append(pool)
            elif event.grown or event.added_levels:
                grown = True
                for layer in self.layers:
                    if layer.pool is pool:
                        layer.tiles.regrid()
        for pool in reopen:
            grown = self._reopen(pool) or grown
        if grown:
            self._place_layers()
            for name, size in self.dims().items():
                at = self.position.get(name)
                if at is not None and (at == before.get(name, size) - 1 or at >= size):
                    self.set_index(name, size - 1)  # at the newest: follow it
            self._publish_state()

    def _reopen(self, pool: ChunkPool) -> bool:
        """Open ``pool``'s image again from its store (the same store object: the same
        credentials, cache and options) and move its layers, with their settings and
        places, to the new pool; the old one is destroyed. Whether it was done (if
        not, the old image stays shown, with a HUD line, and it is tried at the next
        change)."""
        options = _REOPEN_OPTIONS.get(pool)
        layers = [layer for layer in self.layers if layer.pool is pool]
        if options is None or not layers:
            return False
        old = pool.multiscale_info
        try:
            fresh = ChunkPool(reread(old), **options)
        except Exception as err:  # SourceError (or an invalid image): keep the old one
            problem = f"store changed and cannot be opened again: {err}"
            if self._live_problems.get(pool) != problem:
                logger.warning("%s", problem)
                self._live_problems[pool] = problem
            return False
        _REOPEN_OPTIONS[fresh] = options
        self._live_problems.pop(pool, None)
        logger.warning(
            "%s changed so that it was opened again (level 0 was %s, is %s)",
            old.source,
            old.levels[0].shape,
            fresh.multiscale_info.levels[0].shape,
        )
        places = [(self.layers.index(layer), _layer_state(layer)) for layer in layers]
        active = self.active_layer
        for layer in layers:
            self.remove_layer(layer)  # destroys the old pool
        try:
            for index, spec in places:
                self._adopt = fresh  # owned: watched, destroyed with its layers
                self._add_layer_from_state(replace(spec, source=fresh), {})
                self.layers.insert(index, self.layers.pop())
        except Exception as err:  # e.g. no longer true colour: the layer is gone
            logger.warning("%s: cannot be shown again: %s", old.source, err)
        finally:
            if self._adopt is fresh:  # no layer took it
                self._adopt = None
                fresh.destroy()
        self.active_layer = min(active, max(len(self.layers) - 1, 0))
        return True

    # -- event loop plumbing --------------------------------------------------------

    def _wake_up(self) -> None:
        """A pool queued handler calls (any thread): ask for a frame, which runs them."""
        self._wake.set()
        if self._loop is not None and not self._closed:
            # (AttributeError, RuntimeError: the loop is not running yet, or any more)
            with contextlib.suppress(AttributeError, RuntimeError):
                self._loop.call_soon_threadsafe(self._request_draw)

    def _run_handlers(self) -> bool:
        """Run the queued handler calls of every pool shown; whether there were any.
        After close, nothing runs: what they would show or release is gone."""
        if self._closed:
            return False
        ran = False
        with self._busy_section():
            for link in list(self._links.values()):
                ran = link.run() or ran
        return ran

    @contextmanager
    def _busy_section(self) -> Iterator[None]:
        """Mark our own code running on the GUI thread (a frame, a handler batch): a
        close() that interrupts it (from a signal handler) waits for its end."""
        self._busy += 1
        try:
            yield
        finally:
            self._busy -= 1
            if not self._busy and self._close_pending:
                self.close()

    def _request_draw(self) -> None:
        if not self._closed:
            self.canvas.request_draw()

    # -- drawing --------------------------------------------------------------------

    def refresh(self) -> View:
        """What a frame does before rendering: run the queued handlers, bring every
        layer's tiles in line with the view, and sync the scenes; the view.

        Called outside a frame (scripts, :meth:`wait_settled`), it also ends the
        layers' showing of their coarsest level first (no frame to draw it sooner)."""
        return self._refresh(in_frame=False)

    def _refresh(self, *, in_frame: bool) -> View:
        started = time.perf_counter()
        self._apply_store_changes()
        self._run_handlers()
        self._step_playback()
        view = self.view()
        path, still = self._predicted_path(view, started)
        for layer in self.layers:
            if layer.coarse_first and not in_frame:
                layer.end_coarse_first(view, path=path, still=still)
            else:
                layer.update(view, path=path, still=still)
        if self._run_handlers():  # chunks the update found in the pool's cache: show them
            for layer in self.layers:  # now, and let what they replace go
                layer.update(view, path=path, still=still)
        self._origin = follow_origin(self._origin, view)
        ox, oy = self._origin
        self._world.local.position = (-ox, -oy, 0)
        self._camera_frame.local.position = (-ox, -oy, 0)
        for layer in self.layers:
            layer.sync()
        self.textures.frame += 1
        self.textures.enforce()
        return view

    def _predicted_path(
        self, view: View, now: float
    ) -> tuple[tuple[tuple[float, View], ...], bool]:
        """Feed the camera to the motion predictor; the views it expects (see
        :mod:`viewer.prediction`), and whether the camera is still (the ring is
        prefetched). A prediction that stopped being made is dropped at the next frame:
        the loads of the predicted tiles ask for one as they finish (none pending: they
        all loaded, nothing to cancel)."""
        if self.motion is None:
            return (), True
        cam = self.camera
        self.motion.observe(now, cam.x, cam.y, cam.width)
        motion = self.motion.predict(now)
        path = () if motion is None else motion.path(view, now)
        still = self.motion.still(now)
        return path, still

    def _draw(self) -> None:
        if self._closed:
            return
        with self._busy_section():
            self._draw_frame()
        for listener in list(self.frame_listeners):
            listener()

    def _draw_frame(self) -> None:
        started = time.perf_counter()
        view = self._refresh(in_frame=True)
        cam = self._gfx_camera
        cam.width, cam.height = self.camera.width, self.camera.height
        cam.local.position = (self.camera.x, self.camera.y, 0)
        statuses = [layer.status() for layer in self.layers if layer.visible]
        if self.first_pixel_at is None and any(s.loaded for s in statuses):
            self.first_pixel_at = started
        position = tuple(sorted(self.position.items()))
        shown = (view.x0, view.y0, view.x1, view.y1, view.width, view.height, position)
        if shown != self._shown:  # a new view (the cursor alone does not count)
            self._shown, self._view_changed_at = shown, started
            if self.kpi_log is not None:
                self.kpi_log.event("view", when=started, view=shown[:6], position=position)
        self._publish_state()
        if all(s.settled for s in statuses) and self._view_changed_at is not None:
            self.last_settle_seconds = time.perf_counter() - self._view_changed_at
            self._view_changed_at = None
        size = self._size()
        overlays = []
        if self.hud.visible and self.layers:
            self.hud.update(self.hud_lines(), _progress(statuses), size)
            plane = self.layer.tiles.plane
            unit = plane.info.levels[0].axes[plane.x_axis].unit
            self.hud.show_scale_bar(scale_bar(self.camera.width / max(size[0], 1), unit), size)
            image = self._image() if self.show_colorbar else None
            if image is None:
                self.hud.show_colorbar(None, (0.0, 1.0), size)
            else:
                display = image.displays[self.active_channel]
                self.hud.show_colorbar(display.lut(256), display.clim, size)
            overlays.append(self.hud)
        if self.help.visible:
            self.help.update(help_lines(), None, size, corner="top-right")
            overlays.append(self.help)
        self.renderer.render(self.scene, self._gfx_camera, flush=not overlays)
        for i, overlay in enumerate(overlays):
            self.renderer.render(overlay.scene, overlay.camera, flush=i == len(overlays) - 1)
        self._after_coarse_frame()
        done = time.perf_counter()
        self.frame_times.append(done - started)
        if self.kpi_log is not None:
            self._log_drawn(done)

    def _after_coarse_frame(self) -> None:
        """After a frame that drew what a layer showing its coarsest level first had
        of it: the next frame (asked for now) asks for the view's own tiles."""
        for layer in self.layers:
            if layer.coarse_first and layer.coarse_drawable:
                layer.coarse_frame_drawn()
                self._request_draw()

    def _log_drawn(self, when: float) -> None:
        """Tell the KPI log which chunks this frame drew for the first time."""
        for layer in self.layers:
            source = layer.pool.multiscale_info.source
            for chunk in layer.newly_drawn:
                self.kpi_log.event(  # type: ignore[union-attr]
                    "drawn", when=when, source=source, level=chunk.level, index=chunk.index
                )
            layer.newly_drawn.clear()

    def hud_lines(self) -> list[str]:
        """The HUD's text for the current view (as of the last frame or refresh)."""
        lines = hud_lines(self._hud_info(self.view())) if self.layers else []
        return lines + self.hud_notes

    def _hud_info(self, view: View) -> HudInfo:
        summaries = tuple(
            LayerSummary(
                layer.name,
                layer.kind,
                layer.visible,
                i == self.active_layer,
                layer.status(),
                len(layer.levels),
            )
            for i, layer in enumerate(self.layers)
        )
        level0 = self.layer.levels[0]
        zoom = level0.pixel_size / view.pixel_size
        cursor = values = None
        if self.cursor is not None:
            x, y = self.cursor
            col, row = self.world_to_pixel(x, y)
            plane = self.layer.tiles.plane
            unit = plane.info.levels[0].axes[plane.x_axis].unit or ""
            cursor = (col, row, x, y, unit)
            several = len(self.layers) > 1
            values = tuple(
                (f"{layer.name} {label}" if several else label, value)
                for layer in self.layers
                if layer.visible
                for label, value in layer.values_at(x, y)
            )
        image = self._image()
        channel = None
        if image is not None and len(image.displays) > 1:
            d = image.displays[self.active_channel]
            channel = (d.label, d.clim)
        return HudInfo(
            layers=summaries,
            zoom=zoom,
            position=tuple(self.position.items()),
            cursor=cursor,
            values=values or (),
            channel=channel,
            live=self.live is not None,
            live_problem=next(iter(self._live_problems.values()), None),
            live_age=None
            if self.newest_data_at is None
            else time.monotonic() - self.newest_data_at,
            hidden_labels=tuple(
                n
                for n in self._label_groups(wait=False)
                if n not in {layer.name for layer in self.layers}
            ),
        )

    def telemetry(self) -> dict[str, Any]:
        """What the user experienced, in seconds: time to the first pixel of data after
        opening, the median and 90th percentile frame (CPU) time, how long the last
        view took to settle; and the active pool's counters (``stats``)."""
        frames = sorted(self.frame_times)
        first = None if self.first_pixel_at is None else self.first_pixel_at - self.opened_at
        return {
            "time_to_first_pixel": first,
            "frame_time_median": frames[len(frames) // 2] if frames else None,
            "frame_time_p90": frames[int(len(frames) * 0.9)] if frames else None,
            "last_settle": self.last_settle_seconds,
            "stats": self.pool.stats if self.layers else None,
        }

    # -- events ---------------------------------------------------------------------

    def _on_pointer(self, event: Any) -> None:
        if event.type == "pointer_leave":
            self.cursor = None
            self._drag = None
        else:
            self.camera.size = self._size()
            self.cursor = self.camera.screen_to_world(event.x, event.y)
            if event.type == "pointer_down" and event.button == 1:
                self._drag = (event.x, event.y, event.x, event.y)
            elif event.type == "pointer_move" and self._drag is not None:
                x0, y0, lx, ly = self._drag
                self.camera.pan_screen(event.x - lx, event.y - ly)
                self._drag = (x0, y0, event.x, event.y)
                self.cursor = self.camera.screen_to_world(event.x, event.y)
            elif event.type == "pointer_up" and self._drag is not None:
                x0, y0, _, _ = self._drag
                self._drag = None
                if math.hypot(event.x - x0, event.y - y0) <= CLICK_SLOP:
                    self._select_at(*self.cursor)
        self._request_draw()

    def _select_at(self, x: float, y: float) -> None:
        """A click: the active labels layer (if any) selects the ID under it."""
        layer = self.layers[self.active_layer] if self.layers else None
        if layer is not None and hasattr(layer, "selected"):
            layer.selected = layer.id_at(x, y)
            self._publish_state()

    def _on_wheel(self, event: Any) -> None:
        self.camera.size = self._size()
        around = self.camera.screen_to_world(event.x, event.y)
        self.camera.zoom(2.0 ** (-event.dy / WHEEL_UNITS_PER_DOUBLING), around)
        self.cursor = around
        self._request_draw()

    def _on_resize(self, event: Any) -> None:
        if self.frame_times:
            self.camera.resize(event.width, event.height)  # same scale, same centre
        else:
            # a window gets its real size only once shown: fit to that, or keep the
            # region asked for, mapped onto the whole canvas
            self.camera.size = (event.width, event.height)
            if not self._view_chosen:
                self.fit()
        self._request_draw()

    def _on_key(self, event: Any) -> None:
        action = action_for(event.key)
        if action is not None:
            action(self)
        self._request_draw()

    # -- waiting and screenshots ----------------------------------------------------

    def settled(self) -> bool:
        """Whether, as of the last frame or :meth:`refresh`, every visible tile of every
        shown layer at its level has loaded or failed, or there are too many to load
        any (``status().overflow``). A pure query."""
        return all(layer.status().settled for layer in self.layers if layer.visible)

    def wait_settled(self, timeout: float | None = 60.0) -> bool:
        """Block until the view is settled (refreshing as data arrives); False on
        timeout. For scripts and tests; inside a running event loop use ``await
        viewer.until_settled()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self._wake.clear()
            self.refresh()
            if self.settled():
                return True
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._wake.wait(0.05 if remaining is None else min(0.05, remaining))

    async def until_settled(self, timeout: float | None = 60.0) -> bool:
        """Await until the view is settled (works on asyncio and trio loops)."""
        from rendercanvas.utils.asyncs import sleep

        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            self.refresh()
            if self.settled():
                return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            await sleep(0.02)

    def screenshot(self) -> np.ndarray:
        """Render now and return the frame as an (H, W, 3) uint8 array."""
        with self._busy_section():
            if self._owns_canvas and isinstance(self.canvas, OffscreenCanvas):
                return np.asarray(self.canvas.draw())[..., :3].copy()
            self.canvas.force_draw()
            return np.asarray(self.renderer.snapshot())[..., :3].copy()

    def close(self) -> None:
        """Drop everything, stop the pools' threads, close the canvas if it is ours, or
        if it is still open.

        Safe to call more than once, after the event loop stopped, and from a signal
        handler. Whatever it interrupts, it never tears down under a frame: a signal
        handler runs between two bytecodes of the GUI thread, typically in the middle of
        drawing or presenting a frame (most of that thread's time). Closing the canvas
        there releases the present texture that the frame then copies or renders into:
        wgpu-native aborts ("Texture ... does not exist") or reads freed memory
        (SIGSEGV). So, called inside our frame or handler code, close() runs when that
        code returns; called while rendercanvas presents a frame, it runs on the event
        loop right after. Before the canvas closes, the asynchronous read-back of the
        last frame (bitmap present, e.g. Qt) is completed synchronously: otherwise it
        resolves later, from wgpu's poll thread, on a deleted widget or, at interpreter
        exit, a deleted Qt object. Then the layers drop their chunks, the pools opened
        here are destroyed (their worker threads joined), and handler calls still queued
        are dropped.
        """
        if self._closed:
            return
        if self._busy or not self._settle_present():
            self._close_pending = True
            if not self._busy and self._loop is not None:
                self._loop.call_soon(self.close)
            return
        self._closed = True
        self._close_pending = False
        for search in self._label_searches:
            search.cancel()
        for layer in self.layers:
            layer.close()
        for link in self._links.values():
            link.leave(self)
        self._links.clear()
        for pool in self._owned_pools:
            pool.destroy()
        self._owned_pools.clear()
        if self._owned_kpi_log is not None:
            self._owned_kpi_log.close()
        if self._owns_canvas or not self.canvas.get_closed():
            self.canvas.close()

    def _settle_present(self) -> bool:
        """Stop drawing, and finish presenting the last frame synchronously (a frame
        whose image is still being read back is completed now); False if a frame is
        being drawn or presented right now (close() was called from inside it)."""
        canvas = self.canvas
        if canvas.get_closed():
            return True
        canvas.request_draw(_no_frame)  # no new frame from here on
        try:
            canvas.force_draw()  # a synchronous present: no read-back left in flight
        except RuntimeError:  # "Cannot force a draw while drawing"
            return False
        return True

    def __enter__(self) -> Viewer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alignment_problems(first: Layer, other: Layer) -> list[str]:
    """What may keep ``other`` from lining up with ``first`` in world coordinates: axes
    of the plane named otherwise, or in other units. Layers are placed by their numbers
    all the same (a warning, not an error: the user may know better), as napari does."""
    problems = []
    for role in ("y", "x"):
        axes = []
        for layer in (first, other):
            plane = layer.tiles.plane
            axes.append(plane.info.levels[0].axes[getattr(plane, f"{role}_axis")])
        (a, b) = axes
        if a.name != b.name:
            problems.append(
                f"layer {other.name!r}: its {role} axis is named {b.name!r}, but "
                f"{a.name!r} in layer {first.name!r}: shown as the same axis"
            )
        if (a.unit or None) != (b.unit or None):
            problems.append(
                f"layer {other.name!r}: {role} is in {b.unit or 'no unit'}, but in "
                f"{a.unit or 'no unit'} in layer {first.name!r}: aligned by their numbers, "
                "not converted"
            )
    return problems


#: The options of :meth:`Viewer.add_image` / ``add_labels`` that concern opening.
OPEN_OPTIONS = (
    "cache_bytes",
    "memory_budget",
    "kpi_log",
    "storage_options",
    "disk_cache",
    "disk_cache_bytes",
    "pool_options",
)


_REOPEN_OPTIONS: weakref.WeakKeyDictionary[ChunkPool, dict[str, Any]] = weakref.WeakKeyDictionary()
"""The :class:`ChunkPool` options of each pool the viewers opened."""


def _open(source: Any, options: dict[str, Any], *, only: bool = True) -> tuple[ChunkPool, bool]:
    """The pool of ``source`` (its first image), and whether it was opened here (then
    the viewer destroys it). ``options`` that concern opening are taken from it; with
    ``only``, any other is a TypeError."""
    opening = {k: options.pop(k) for k in OPEN_OPTIONS if k in options}
    if only and options:
        raise TypeError(f"unknown option(s): {', '.join(sorted(options))}")
    if isinstance(source, ChunkPool):
        opening.pop("memory_budget", None)  # the pool has its own, if any
        opening.pop("kpi_log", None)  # and its own log
        if opening:
            raise ValueError(f"{', '.join(opening)}: only for a source opened here, not a pool")
        return source, False
    pool_options = dict(opening.pop("pool_options", None) or {})
    opening.setdefault("cache_bytes", 512 << 20)
    pools = ChunkPool.from_zarr_node(source, **opening, **pool_options)
    for extra in pools[1:]:
        extra.destroy()
    # what opening it again from its store takes (a live store that shrank)
    _REOPEN_OPTIONS[pools[0]] = {
        "cache_bytes": opening["cache_bytes"],
        "memory_budget": pools[0].memory_budget,
        **pool_options,
    }
    return pools[0], True


def _initial_displays(
    pool: ChunkPool,
    plane: Plane,
    channels: Sequence[int] | None,
    colormap: str | Sequence[str] | None,
    clim: Any,
) -> tuple[list[ChannelDisplay], list[int]]:
    """Every channel's display: from OME metadata, then the options; and the channels
    whose windows are to come from their data as it arrives (neither gives one)."""
    n = plane.n_channels
    if channels is not None:
        bad = [c for c in channels if not 0 <= c < n]
        if bad:
            raise ValueError(f"no channel {bad[0]}: the image has {n} channel(s)")
    windows = {ch.index for ch in pool.multiscale_info.channels if has_window(ch)}
    displays = default_channels(n, pool.multiscale_info.channels, pool.multiscale_info.dtype)
    result = [
        replace(d, visible=d.visible if channels is None else d.index in channels) for d in displays
    ]
    if not any(d.visible for d in result):
        result[0] = replace(result[0], visible=True)
    shown = [d.index for d in result if d.visible]
    colormaps = _per_channel(colormap, shown, n, "colormap")
    clims = _per_channel(
        None if clim is None else [clim] if _is_pair(clim) else list(clim), shown, n, "clim"
    )
    for index in range(n):
        d = result[index]
        if index in colormaps:
            d = replace(d, colormap=colormaps[index])
        if index in clims:
            lo, hi = clims[index]
            if not hi > lo:
                raise ValueError(f"clim needs HI > LO, not {lo} {hi}")
            d = d.with_clim(lo, hi)
        result[index] = d
    auto = [i for i in range(n) if i not in windows and i not in clims]
    return result, auto


def _is_pair(value: Any) -> bool:
    return len(value) == 2 and all(isinstance(v, (int, float, np.number)) for v in value)


def _per_channel(values: Any, shown: list[int], n: int, what: str) -> dict[int, Any]:
    """By channel index: one value for all ``n`` channels, or one for each shown channel,
    in order."""
    if values is None:
        return {}
    if isinstance(values, str):
        values = [values]
    values = list(values)
    if len(values) == 1:
        return dict.fromkeys(range(n), values[0])
    if len(values) != len(shown):
        raise ValueError(
            f"{len(values)} {what} values for {len(shown)} shown channel(s): give one, "
            "or one per shown channel"
        )
    return dict(zip(shown, values, strict=True))


def _layer_state(layer: Layer) -> LayerState:
    spec = LayerState(
        source=redact(layer.pool.multiscale_info.source),
        kind=layer.kind,
        name=layer.name,
        visible=layer.visible,
        opacity=layer.opacity,
        blending=layer.blending,
    )
    if isinstance(layer, ImageLayer):
        spec.rgb = layer.rgb
        spec.channels = [
            {
                "index": d.index,
                "label": d.label,
                "colormap": d.colormap,
                "clim": list(d.clim),
                "visible": d.visible,
            }
            for d in layer.displays
        ]
    else:
        spec.outline = layer.outline
        spec.selected = layer.selected
    return spec


def _world_box(layer: Layer) -> tuple[float, float, float, float]:
    """World (x0, y0, x1, y1) edges of a layer's level 0."""
    level0 = layer.levels[0]
    y0, _, x0, _ = level0.tile_bounds(0, 0)
    gy, gx = level0.grid
    _, y1, _, x1 = level0.tile_bounds(gy - 1, gx - 1)
    return x0, y0, x1, y1


def _progress(statuses: list[Any]) -> float | None:
    loaded = sum(s.loaded for s in statuses)
    failed = sum(s.failed for s in statuses)
    pending = sum(s.pending for s in statuses)
    total = loaded + failed + pending
    if pending == 0 or total == 0:
        return None
    return (loaded + failed) / total


def _no_frame() -> None:
    """The draw function of a closing viewer: draws nothing."""


def _canvas_loop(canvas: Any) -> Any:
    """The rendercanvas loop a canvas runs on (None for offscreen/bitmap canvases)."""
    group = getattr(type(canvas), "_rc_canvas_group", None)
    return None if group is None else group.get_loop()


def _z_axis(plane: Plane) -> int | None:
    """The spatial slider axis (z), if any."""
    spatial = plane.info.levels[0].spatial_axes
    return next((a for a in plane.slider_axes if a in spatial), None)
