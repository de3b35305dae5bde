"""Viewer: a multiscale Zarr image in any rendercanvas canvas, or offscreen.

The viewer wires the pieces together: a :class:`~chunkpool.ChunkPool` for the image,
an :class:`~viewer.layer.ImageLayer` that holds the tiles of the view, a pygfx
renderer and camera (y down, so array row 0 is at the top), a pan/zoom controller,
keys, and the heads-up display.

Chunk loads complete in the pool's worker threads; their handlers are queued in the
viewer's inbox and run on the canvas's event loop (or inside :meth:`wait_settled`
and the next draw when there is no running loop), where textures are created and a
redraw is requested. A frame never waits for data.

Closing (:meth:`Viewer.close`) never tears anything down under a frame that is being
drawn or presented: see there for why and how.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import numpy as np
import pygfx as gfx
from rendercanvas.offscreen import RenderCanvas as OffscreenCanvas

from chunkpool import ChunkPool, ChunkPoolError, MultiscaleInfo

from .display import ChannelDisplay, default_channels, parse_colormap, percentile_window
from .hud import Hud
from .layer import ImageLayer
from .slicing import Plane, SlicePosition
from .tiling import View

__all__ = ["Viewer"]

#: How long after a zoom-in step the next finer level keeps being prefetched.
ZOOM_PREFETCH_SECONDS = 0.6
#: Chunks of the coarsest level read at start-up to pick default contrast windows.
CONTRAST_SAMPLE_CHUNKS = 16
#: How long start-up waits for those chunks at most (the ones still loading are skipped).
CONTRAST_SAMPLE_SECONDS = 10.0


class Viewer:
    """Shows the first multiscale image of ``source`` and lets the user explore it.

    ``source`` is anything :meth:`ChunkPool.from_zarr_node` opens (path, URL, zarr
    node). With ``canvas=None`` the viewer renders offscreen at ``size`` (for
    screenshots and tests); otherwise it draws into the given rendercanvas canvas
    (glfw, Qt widget, Jupyter, ...). ``channels`` limits the shown channels;
    ``colormap`` and ``clim`` apply to every shown channel; ``z`` and ``t`` are
    level-0 indices. ``disk_cache`` (a directory) keeps what is read from a remote
    store on disk, up to ``disk_cache_bytes``. ``pool_options`` go to the
    :class:`~chunkpool.ChunkPool` (e.g. ``remote_io_concurrency``, ``retry``).
    """

    def __init__(
        self,
        source: Any,
        canvas: Any = None,
        *,
        size: tuple[int, int] = (1280, 800),
        channels: Sequence[int] | None = None,
        colormap: str | None = None,
        clim: tuple[float, float] | None = None,
        z: int | None = None,
        t: int | None = None,
        bias: float = 1.0,
        cache_bytes: int = 512 << 20,
        texture_budget: int = 512 << 20,
        storage_options: dict[str, Any] | None = None,
        disk_cache: str | None = None,
        disk_cache_bytes: int = 2 << 30,
        pool_options: dict[str, Any] | None = None,
        show_hud: bool = True,
    ):
        if colormap is not None:
            parse_colormap(colormap)  # fail early, before any I/O
        self.opened_at = time.perf_counter()
        pools = ChunkPool.from_zarr_node(
            source,
            cache_bytes=cache_bytes,
            storage_options=storage_options,
            disk_cache=disk_cache,
            disk_cache_bytes=disk_cache_bytes,
            **(pool_options or {}),
        )
        for extra in pools[1:]:
            extra.destroy()
        self.pool = pools[0]
        try:
            self._setup(
                canvas, size, channels, colormap, clim, z, t, bias, texture_budget, show_hud
            )
        except BaseException:
            self.pool.destroy()
            raise

    def _setup(
        self, canvas, size, channels, colormap, clim, z, t, bias, texture_budget, show_hud
    ) -> None:
        info = self.pool.multiscale_info
        self.plane = Plane.of(info)
        position = self._initial_position(z, t)
        displays = self._initial_displays(channels, colormap, clim, position)
        self._owns_canvas = canvas is None
        self.canvas = canvas if canvas is not None else OffscreenCanvas(size=size, pixel_ratio=1)
        self.renderer = gfx.WgpuRenderer(self.canvas, pixel_filter="nearest", ppaa="none")
        # one internal pixel per physical pixel: data pixels stay crisp, no SSAA cost
        self.renderer.pixel_scale = 1
        self.scene = gfx.Scene()
        # pygfx clears the frame only in a render pass: a background is always drawn,
        # so that a view with nothing in it (channels hidden, panned off the image) is
        # black instead of the previous frame
        self.scene.add(gfx.Background.from_color("#000000"))
        self._inbox: deque[Callable[[], Any]] = deque()
        self._inbox_lock = threading.Lock()
        self._wake = threading.Event()
        self._wake_scheduled = False
        self._loop = _canvas_loop(self.canvas)
        self._busy = 0  # depth of our own frame / handler-batch code on the GUI thread
        self._closed = False
        self._close_pending = False  # close() was asked for where it had to wait
        self.layer = ImageLayer(
            self.pool,
            self.scene,
            displays,
            position=position,
            request_draw=self._request_draw,
            bias=bias,
            texture_budget=texture_budget,
            call_later=None if self._loop is None else self._loop.call_later,
        )
        self.pool.enable_async_load_handlers(self._post)
        extent = self.layer.depth_extent + 2
        self.camera = gfx.OrthographicCamera(
            *size, maintain_aspect=False, depth_range=(-extent, extent)
        )
        self.camera.local.scale_y = -1  # y down: array row 0 at the top
        # the camera is placed relative to the layer's render origin, as the tiles are
        # (float32 on the GPU): its local position stays in world coordinates
        self._camera_frame = gfx.Group()
        self._camera_frame.add(self.camera)
        self.controller = gfx.PanZoomController(self.camera, register_events=self.renderer)
        self.controller.controls.pop("mouse2", None)  # it would stretch x and y apart
        self.hud = Hud()
        self.hud.visible = show_hud
        self.active_channel = next((d.index for d in displays if d.visible), 0)
        self.cursor: tuple[float, float] | None = None
        #: Called with the new slice position when z, t, ... change (e.g. Qt sliders).
        self.position_listeners: list[Callable[[SlicePosition], None]] = []
        #: Called (no arguments, on the GUI thread) after each frame is drawn.
        self.frame_listeners: list[Callable[[], None]] = []
        self.frame_times: deque[float] = deque(maxlen=240)
        self.first_pixel_at: float | None = None
        self._shown: tuple | None = None  # the view last drawn
        self._view_changed_at: float | None = None  # when it was first drawn, until settled
        self.last_settle_seconds: float | None = None
        self._last_width = None
        self._zoom_in_until = 0.0
        self._view_chosen = False  # by show_world/show_region, as opposed to fit()
        self._canvas_size = self._size()
        self.renderer.add_event_handler(self._on_pointer, "pointer_move", "pointer_leave")
        self.renderer.add_event_handler(self._on_key, "key_down")
        self.renderer.add_event_handler(self._on_resize, "resize")
        self.fit()
        self.canvas.request_draw(self._draw)

    # -- set-up helpers -------------------------------------------------------------

    def _initial_position(self, z: int | None, t: int | None) -> SlicePosition:
        plane, scale = self.plane, self.pool.multiscale_info.levels[0]
        position = dict(plane.default_position())
        for value, axis in ((z, _z_axis(plane)), (t, scale.time_axis)):
            if value is None:
                continue
            if axis is None or axis not in plane.slider_axes:
                raise ValueError(f"{self.pool.multiscale_info.source}: the image has no such axis")
            if not 0 <= value < scale.shape[axis]:
                raise ValueError(
                    f"index {value} out of range for axis {scale.axes[axis].name!r} "
                    f"(size {scale.shape[axis]})"
                )
            position[axis] = value
        return plane.clamp(position)

    def _initial_displays(
        self,
        channels: Sequence[int] | None,
        colormap: str | None,
        clim: tuple[float, float] | None,
        position: SlicePosition,
    ) -> list[ChannelDisplay]:
        n = self.plane.n_channels
        if channels is not None:
            bad = [c for c in channels if not 0 <= c < n]
            if bad:
                raise ValueError(f"no channel {bad[0]}: the image has {n} channel(s)")
        info = self.pool.multiscale_info
        samples = self._contrast_samples(position)
        displays = default_channels(n, info.channels, samples)
        result = []
        for d in displays:
            visible = d.visible if channels is None else d.index in channels
            d = replace(d, colormap=colormap or d.colormap, visible=visible)
            result.append(d.with_clim(*clim) if clim is not None else d)
        if not any(d.visible for d in result):
            result[0] = replace(result[0], visible=True)
        return result

    def _contrast_samples(self, position: SlicePosition) -> list[np.ndarray]:
        """Per channel, data of the coarsest level (a few chunks around its centre).

        A sample chunk that fails to load (its tile shows hatched) or has not arrived
        within ``CONTRAST_SAMPLE_SECONDS`` is left out: sampling never stops the viewer
        from opening (a channel without samples gets a default window)."""
        plane = self.plane
        level = len(self.pool.multiscale_info.levels) - 1
        scale = self.pool.multiscale_info.levels[level]
        gy, gx = scale.chunk_grid_shape[plane.y_axis], scale.chunk_grid_shape[plane.x_axis]
        side = max(1, int(math.sqrt(CONTRAST_SAMPLE_CHUNKS)))
        ys = range(max(0, gy // 2 - side // 2), min(gy, gy // 2 - side // 2 + side))
        xs = range(max(0, gx // 2 - side // 2), min(gx, gx // 2 - side // 2 + side))
        ref = "contrast-samples"
        samples = [
            (c, self.pool.get_chunk(level, index, ref), select)
            for c in range(plane.n_channels)
            for iy in ys
            for ix in xs
            for index, select in [plane.chunk_and_selection(level, iy, ix, c, position)]
        ]
        planes: list[list[np.ndarray]] = [[] for _ in range(plane.n_channels)]
        deadline = time.monotonic() + CONTRAST_SAMPLE_SECONDS
        try:
            for c, loc, select in samples:
                try:
                    data = loc.wait(max(0.0, deadline - time.monotonic()))
                except (ChunkPoolError, TimeoutError):
                    continue
                planes[c].append(plane.plane_of(data, select).ravel())
        finally:
            self.pool.drop_chunks([loc.key for _, loc, _ in samples], ref)
        return [np.concatenate(p) if p else np.empty(0, scale.dtype) for p in planes]

    # -- event loop plumbing --------------------------------------------------------

    def _post(self, callback: Callable[[], Any]) -> None:
        """The pool's ``call_soon_threadsafe``: queue a handler batch for the GUI thread,
        and wake the canvas's loop (if it runs) to process it."""
        with self._inbox_lock:
            self._inbox.append(callback)
            schedule = not self._wake_scheduled and self._loop is not None
            self._wake_scheduled = self._wake_scheduled or schedule
        self._wake.set()
        if schedule:
            try:
                self._loop.call_soon_threadsafe(self._process_inbox)
            except (AttributeError, RuntimeError):  # the loop is not running (yet)
                with self._inbox_lock:
                    self._wake_scheduled = False

    def _process_inbox(self) -> bool:
        """Run queued handlers (they create textures and request a redraw); whether
        there were any. After close, queued calls are dropped: what they would show or
        release is gone."""
        with self._inbox_lock:
            callbacks = list(self._inbox)
            self._inbox.clear()
            self._wake_scheduled = False
        if self._closed:
            return False
        with self._busy_section():
            for callback in callbacks:
                callback()
        return bool(callbacks)

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
        self.canvas.request_draw()

    # -- view -----------------------------------------------------------------------

    def _size(self) -> tuple[float, float]:
        return tuple(self.canvas.get_logical_size())  # type: ignore[return-value]

    def view(self) -> View:
        """The current view in world coordinates."""
        cam = self.camera
        x, y, _ = cam.local.position
        w, h = cam.width, cam.height
        pw, ph = self.canvas.get_physical_size()
        return View(x - w / 2, y - h / 2, x + w / 2, y + h / 2, max(pw, 1), max(ph, 1), self.cursor)

    def show_world(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Map the world rectangle (edges) onto the whole canvas."""
        self._view_chosen = True
        self._set_camera(x0, y0, x1, y1)

    def _set_camera(self, x0: float, y0: float, x1: float, y1: float) -> None:
        self.camera.width, self.camera.height = x1 - x0, y1 - y0
        self.camera.local.position = ((x0 + x1) / 2, (y0 + y1) / 2, 0)
        self.canvas.request_draw()

    def show_region(self, x0: float, y0: float, x1: float, y1: float) -> None:
        """Map a region of level-0 pixels (x0, y0 inclusive; x1, y1 exclusive) onto the
        whole canvas."""
        (oy, ox), (sy, sx) = self._level0_transform()
        self.show_world(
            ox + (x0 - 0.5) * sx, oy + (y0 - 0.5) * sy, ox + (x1 - 0.5) * sx, oy + (y1 - 0.5) * sy
        )

    def fit(self) -> None:
        """Show the whole image, centred, with square pixels."""
        level0 = self.layer.levels[0]
        y0, _, x0, _ = level0.tile_bounds(0, 0)
        gy, gx = level0.grid
        _, y1, _, x1 = level0.tile_bounds(gy - 1, gx - 1)
        w, h = self._size()
        per_px = max((x1 - x0) / w, (y1 - y0) / h)
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        self._set_camera(
            cx - w * per_px / 2, cy - h * per_px / 2, cx + w * per_px / 2, cy + h * per_px / 2
        )

    def _level0_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        level0 = self.layer.levels[0]
        return level0.offset, level0.scale

    def world_to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """World (x, y) to level-0 pixel (column, row) coordinates."""
        (oy, ox), (sy, sx) = self._level0_transform()
        return (x - ox) / sx, (y - oy) / sy

    # -- drawing --------------------------------------------------------------------

    def _draw(self) -> None:
        if self._closed:
            return
        with self._busy_section():
            self._draw_frame()
        for listener in list(self.frame_listeners):
            listener()

    def _draw_frame(self) -> None:
        started = time.perf_counter()
        self._process_inbox()
        view = self.view()
        width = view.x1 - view.x0
        if self._last_width is not None and width < self._last_width * 0.999:
            self._zoom_in_until = started + ZOOM_PREFETCH_SECONDS
        elif self._last_width is not None and width > self._last_width * 1.001:
            self._zoom_in_until = 0.0  # zooming out: the finer level is not wanted
        self._last_width = width
        zoom_in = started < self._zoom_in_until
        self.layer.update(view, zoom_in=zoom_in)
        if self._process_inbox():  # chunks the update found in the pool's cache: show them
            self.layer.update(view, zoom_in=zoom_in)  # now, and let what they replace go
        ox, oy = self.layer.origin
        self._camera_frame.local.position = (-ox, -oy, 0)
        status = self.layer.status()
        if self.first_pixel_at is None and status.loaded:
            self.first_pixel_at = started
        shown = (view.x0, view.y0, view.x1, view.y1, view.width, view.height, self.layer.position)
        if shown != self._shown:  # a new view (the cursor alone does not count)
            self._shown, self._view_changed_at = shown, started
        if status.settled and self._view_changed_at is not None:
            self.last_settle_seconds = time.perf_counter() - self._view_changed_at
            self._view_changed_at = None
        if self.hud.visible:
            self.hud.update(self._hud_lines(view, status), self._progress(status), self._size())
            self.renderer.render(self.scene, self.camera, flush=False)
            self.renderer.render(self.hud.scene, self.hud.camera)
        else:
            self.renderer.render(self.scene, self.camera)
        self.frame_times.append(time.perf_counter() - started)

    def telemetry(self) -> dict[str, Any]:
        """What the user experienced, in seconds: time to the first pixel of data after
        opening, the median and 90th percentile frame (CPU) time, how long the last
        view took to settle; and the pool's counters (``stats``)."""
        frames = sorted(self.frame_times)
        first = None if self.first_pixel_at is None else self.first_pixel_at - self.opened_at
        return {
            "time_to_first_pixel": first,
            "frame_time_median": frames[len(frames) // 2] if frames else None,
            "frame_time_p90": frames[int(len(frames) * 0.9)] if frames else None,
            "last_settle": self.last_settle_seconds,
            "stats": self.pool.stats,
        }

    @staticmethod
    def _progress(status: Any) -> float | None:
        total = status.loaded + status.pending + status.failed
        if status.settled or total == 0:
            return None
        return (status.loaded + status.failed) / total

    def _hud_lines(self, view: View, status: Any) -> list[str]:
        info: MultiscaleInfo = self.pool.multiscale_info
        level0 = self.layer.levels[0]
        zoom = level0.pixel_size / view.pixel_size
        lines = [
            f"level {status.level}/{len(self.layer.levels) - 1}   zoom {zoom * 100:.4g}%",
            (
                f"zoom in: {_fmt_count(status.overflow)} tiles in view at the coarsest level"
                if status.overflow
                else f"tiles {status.loaded} loaded, {status.pending} pending, "
                f"{status.failed} failed" + ("" if status.settled else "   loading…")
            ),
        ]
        position = ", ".join(f"{info.levels[0].axes[a].name}={i}" for a, i in self.layer.position)
        if position:
            lines.append(position)
        if self.cursor is not None:
            x, y = self.cursor
            col, row = self.world_to_pixel(x, y)
            unit = info.levels[0].axes[self.plane.x_axis].unit or ""
            lines.append(f"x {col:.1f}  y {row:.1f} px   ({x:.4g}, {y:.4g}) {unit}".rstrip())
            values = [
                f"{d.label}: {'—' if v is None else _fmt(v)}" for d, v in self.layer.value_at(x, y)
            ]
            lines.append("   ".join(values))
        return lines

    # -- events ---------------------------------------------------------------------

    def _on_pointer(self, event: Any) -> None:
        if event.type == "pointer_leave":
            self.cursor = None
        else:
            view, (w, h) = self.view(), self._size()
            self.cursor = (
                view.x0 + event.x / w * (view.x1 - view.x0),
                view.y0 + event.y / h * (view.y1 - view.y0),
            )
        self.canvas.request_draw()

    def _on_resize(self, event: Any) -> None:
        old_w, old_h = self._canvas_size
        self._canvas_size = (event.width, event.height)
        if not self.frame_times:
            # a window gets its real size only once shown: fit to that, or keep the
            # region asked for, mapped onto the whole canvas
            if not self._view_chosen:
                self.fit()
        elif old_w and old_h:
            self.camera.width *= event.width / old_w
            self.camera.height *= event.height / old_h
        self.canvas.request_draw()

    def _on_key(self, event: Any) -> None:
        key = event.key
        action = _KEYS.get(key) or _KEYS.get(key.lower())
        if action is not None:
            action(self)
        elif key.isdigit() and key != "0":
            self.toggle_channel(int(key) - 1)
        self.canvas.request_draw()

    def pan(self, fx: float, fy: float) -> None:
        """Move the view by a fraction of its size."""
        x, y, z = self.camera.local.position
        self.camera.local.position = (x + fx * self.camera.width, y + fy * self.camera.height, z)

    def zoom(self, factor: float) -> None:
        """Zoom around the cursor (else the centre); factor > 1 zooms in."""
        x, y, z = self.camera.local.position
        fx, fy = self.cursor if self.cursor is not None else (x, y)
        self.camera.width /= factor
        self.camera.height /= factor
        self.camera.local.position = (fx + (x - fx) / factor, fy + (y - fy) / factor, z)

    def set_index(self, axis: int, index: int) -> None:
        """Show plane ``index`` (a level-0 index, clamped) along a slider axis (z, t...).

        The previous plane stays on screen until the new one has loaded."""
        if axis not in self.plane.slider_axes:
            raise ValueError(f"axis {axis} is not a slider axis of this image")
        position = dict(self.layer.position)
        position[axis] = index
        position_t = self.plane.clamp(position)
        if position_t != self.layer.position:
            self.layer.set_position(position_t)
            for listener in self.position_listeners:
                listener(position_t)

    def step_axis(self, axis: int | None, delta: int) -> None:
        """Move the slice position along ``axis`` (z, t, ...) by ``delta``."""
        if axis is not None and axis in self.plane.slider_axes:
            self.set_index(axis, dict(self.layer.position)[axis] + delta)

    def toggle_channel(self, index: int) -> None:
        displays = self.layer.displays
        if 0 <= index < len(displays):
            self.layer.set_display(replace(displays[index], visible=not displays[index].visible))
            self.active_channel = index

    def adjust_window(self, *, scale: float = 1.0, shift: float = 0.0) -> None:
        """Narrow/widen (``scale``) or move (``shift``) the active channel's window."""
        d = self.layer.displays[self.active_channel]
        self.layer.set_display(d.scaled_window(scale).shifted_window(shift))

    def auto_contrast(self) -> None:
        """Window the active channel on the percentiles of the loaded visible tiles."""
        data = self.layer.visible_planes(self.active_channel)
        if data:
            d = self.layer.displays[self.active_channel]
            self.layer.set_display(d.with_clim(*percentile_window(np.concatenate(data))))

    def cycle_active_channel(self) -> None:
        self.active_channel = (self.active_channel + 1) % len(self.layer.displays)

    # -- waiting and screenshots ----------------------------------------------------

    def settled(self) -> bool:
        """Whether every visible tile at the view's level has loaded or failed, or there
        are too many to load any (``layer.status().overflow``); runs the pending
        handlers and bookkeeping first."""
        self._process_inbox()
        self.layer.update(self.view(), zoom_in=False)
        return self.layer.status().settled

    def wait_settled(self, timeout: float | None = 60.0) -> bool:
        """Block until the view is settled; False on timeout. For scripts and tests;
        inside a running event loop use ``await viewer.until_settled()``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.settled():
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return False
            self._wake.wait(0.05 if remaining is None else min(0.05, remaining))
            self._wake.clear()
        return True

    async def until_settled(self, timeout: float | None = 60.0) -> bool:
        """Await until the view is settled (works on asyncio and trio loops)."""
        from rendercanvas.utils.asyncs import sleep

        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.settled():
            if deadline is not None and time.monotonic() > deadline:
                return False
            await sleep(0.02)
        return True

    def screenshot(self) -> np.ndarray:
        """Render now and return the frame as an (H, W, 3) uint8 array."""
        with self._busy_section():
            if self._owns_canvas:
                return np.asarray(self.canvas.draw())[..., :3].copy()
            self.canvas.force_draw()
            return np.asarray(self.renderer.snapshot())[..., :3].copy()

    def close(self) -> None:
        """Drop everything, stop the pool's threads, close the canvas if it is ours, or
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
        exit, a deleted Qt object. Then the layer drops its chunks, the pool is destroyed
        (its worker threads joined), and handler calls still queued are dropped.
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
        self.layer.close()
        self.pool.destroy()
        with self._inbox_lock:
            self._inbox.clear()
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


def _fmt_count(n: int) -> str:
    """A count, exact up to a million, else like 1.2e+19."""
    return str(n) if n < 1_000_000 else f"{n:.2g}"


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:.4g}"


_KEYS: dict[str, Callable[[Viewer], None]] = {
    "ArrowLeft": lambda v: v.pan(-0.1, 0),
    "ArrowRight": lambda v: v.pan(0.1, 0),
    "ArrowUp": lambda v: v.pan(0, -0.1),
    "ArrowDown": lambda v: v.pan(0, 0.1),
    "=": lambda v: v.zoom(1.25),
    "+": lambda v: v.zoom(1.25),
    "-": lambda v: v.zoom(0.8),
    "0": Viewer.fit,
    "r": Viewer.fit,
    "PageUp": lambda v: v.step_axis(_z_axis(v.plane), -1),
    "PageDown": lambda v: v.step_axis(_z_axis(v.plane), 1),
    ",": lambda v: v.step_axis(v.pool.multiscale_info.levels[0].time_axis, -1),
    ".": lambda v: v.step_axis(v.pool.multiscale_info.levels[0].time_axis, 1),
    "c": Viewer.cycle_active_channel,
    "[": lambda v: v.adjust_window(scale=0.8),
    "]": lambda v: v.adjust_window(scale=1.25),
    ";": lambda v: v.adjust_window(shift=-0.1),
    "'": lambda v: v.adjust_window(shift=0.1),
    "a": Viewer.auto_contrast,
    "h": lambda v: setattr(v.hud, "visible", not v.hud.visible),
    "q": Viewer.close,
    "Escape": Viewer.close,
}
