"""The ``zarrscope`` command: open multiscale Zarr images in a window, or screenshot them.

    zarrscope [SOURCE ...] [--labels L ...] [--channel C ...] [--colormap NAME ...]
              [--clim LO HI ...] [--rgb | --no-rgb] [--z N] [--t N]
    zarrscope SOURCE --screenshot out.png --size W H --region X0 Y0 X1 Y1 [...]
    zarrscope --state view.json [--screenshot out.png]

Each SOURCE is an image layer, drawn over the ones before it; ``--channel``,
``--colormap``, ``--clim`` and ``--rgb`` set up the first. ``--labels`` adds labels
layers (a path or URL, or the name of a label image in the first source's OME
``labels/`` group). ``--state`` restores a saved view (the ``s`` key saves one).

Bad input (missing or invalid source, bad option values) prints one line on stderr
and exits with status 2. In screenshot mode, ``--timeout`` bounds the whole command
(opening, loading, drawing): when it expires, one line on stderr and status 1. The
window closes, and the command exits 0, on its "q" key, when the window is closed, and
on SIGINT (Ctrl+C) or SIGTERM.

Log records (WARNING and up, or ``--log-level``) go to stderr through
:class:`~chunkpool.redaction.RedactingFilter`, third-party ones included, so that no
credential of the source is printed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from chunkpool import ChunkPoolError, RetryPolicy
from chunkpool.diskcache import default_cache_dir
from chunkpool.redaction import RedactingFilter
from chunkpool.stores import redact

from .tiling import LINK_BUDGET

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="zarrscope",
        description="View a huge multiscale Zarr / OME-Zarr image (local path, file://, "
        "http(s):// or s3:// URL). Without SOURCE, opens the built-in sample.",
    )
    p.add_argument(
        "source", nargs="*", help="image(s) to open, as layers (default: the built-in sample)"
    )
    p.add_argument(
        "--labels",
        action="append",
        metavar="L",
        help="labels layer: a path/URL, or a name in the first image's labels/ (repeatable)",
    )
    p.add_argument("--channel", type=int, nargs="+", metavar="C", help="channel(s) to show")
    p.add_argument(
        "--colormap",
        action="append",
        metavar="NAME",
        help="colormap or colour, e.g. gray, viridis: once for every channel, or repeated "
        "once per shown channel",
    )
    p.add_argument(
        "--clim",
        type=float,
        nargs=2,
        action="append",
        metavar=("LO", "HI"),
        help="contrast window: once for every channel, or repeated once per shown channel",
    )
    p.add_argument(
        "--rgb",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="show 3 or 4 channels as true colour (default: when the image looks RGB)",
    )
    p.add_argument("--state", metavar="FILE", help="restore a view saved with the s key")
    p.add_argument(
        "--live",
        type=float,
        nargs="?",
        const=1.0,
        metavar="SECONDS",
        help="follow stores being written: look for new data every SECONDS (default 1)",
    )
    p.add_argument("--z", type=int, metavar="N", help="z index (level-0 planes)")
    p.add_argument("--t", type=int, metavar="N", help="time point")
    p.add_argument(
        "--bias",
        type=float,
        default=1.0,
        help="level choice: >1 coarser (faster), <1 sharper (default 1)",
    )
    p.add_argument(
        "--link-budget",
        metavar="SECONDS",
        default=None,
        help="after a jump, show first the level whose missing tiles arrive within SECONDS "
        "over the measured link, then the level just above the one of the zoom, then that "
        f"one (default {LINK_BUDGET:g}: a screen covered ~2.5x sooner on a slow link); 'off': "
        "the level of the zoom first, every tile at once (the sharp picture a little sooner)",
    )
    p.add_argument(
        "--disk-cache",
        metavar="DIR",
        nargs="?",
        const=str(default_cache_dir()),
        help="keep what is read from remote sources on disk (default dir: %(const)s)",
    )
    p.add_argument(
        "--disk-cache-mb",
        type=int,
        default=2048,
        metavar="MB",
        help="size bound of the disk cache (default 2048)",
    )
    p.add_argument(
        "--memory-mb",
        type=int,
        default=2048,
        metavar="MB",
        help="bound on the chunks held and cached in memory, all layers together "
        "(default 2048; visible tiles come first, prefetch gives way)",
    )
    p.add_argument(
        "--telemetry",
        metavar="PATH",
        default=None,
        help="log every chunk load (requested, fetched, decoded, delivered) and when each "
        "chunk was first drawn, as JSON lines (rotated at 32 MB); draw one jump of it "
        "with zarrscope-report PATH",
    )
    p.add_argument(
        "--log-level",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        default="WARNING",
        help="log records shown on stderr, credentials removed (default WARNING)",
    )
    p.add_argument(
        "--print-ready",
        action="store_true",
        help="print 'zarrscope: ready' on stderr once the window has drawn its first frame "
        "and Ctrl+C / SIGTERM close it (for scripts that drive the viewer)",
    )
    shot = p.add_argument_group("screenshot mode (offscreen, then exit)")
    shot.add_argument("--screenshot", metavar="OUT.png", help="write a PNG and exit")
    shot.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("W", "H"),
        default=None,
        help="image / window size in pixels",
    )
    shot.add_argument(
        "--region",
        type=float,
        nargs=4,
        metavar=("X0", "Y0", "X1", "Y1"),
        help="level-0 pixel region to show (default: the whole image)",
    )
    shot.add_argument(
        "--timeout",
        type=float,
        default=120.0,
        help="seconds the whole command may take: opening, loading, drawing (default 120)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.size is not None and (args.size[0] < 1 or args.size[1] < 1):
        parser.error("--size must be positive")
    if args.region is not None and not (
        args.region[2] > args.region[0] and args.region[3] > args.region[1]
    ):
        parser.error("--region needs X1 > X0 and Y1 > Y0")
    if any(not hi > lo for lo, hi in args.clim or ()):
        parser.error("--clim needs HI > LO")
    if args.state and (args.source or args.labels):
        parser.error("--state restores its own layers: give no SOURCE or --labels with it")
    if args.live is not None and not args.live > 0:
        parser.error("--live needs a positive number of seconds")
    if args.memory_mb < 1:
        parser.error("--memory-mb must be at least 1")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    link_budget = _link_budget(args.link_budget)
    if link_budget is False:
        parser.error("--link-budget needs a positive number of seconds, or 'off'")
    args.link_budget = link_budget
    handler = _log_to_stderr(args.log_level)
    try:
        if args.screenshot:
            return _screenshot(args, handler)
        return _interactive(args)
    except (ChunkPoolError, ValueError, OSError) as err:
        print(f"zarrscope: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        _stop_logging(handler)


def _link_budget(text: str | None) -> float | bool | None:
    """``--link-budget``'s value: seconds, None for ``off``, the default when not
    given; False when it is neither a positive number nor ``off``."""
    if text is None:
        return LINK_BUDGET
    if text.strip().lower() == "off":
        return None
    try:
        seconds = float(text)
    except ValueError:
        return False
    return seconds if 0 < seconds < math.inf else False


def _sources(args: argparse.Namespace) -> list[str]:
    if args.source:
        return list(args.source)
    from sample_data import ensure_sample

    return [str(ensure_sample())]


def _named(args: argparse.Namespace) -> str:
    """What the command shows, for messages (without credentials)."""
    if args.state:
        return args.state
    return ", ".join(redact(s) for s in args.source) if args.source else "the sample"


def _make_viewer(
    args: argparse.Namespace, canvas: Any, size: tuple[int, int], **options: Any
) -> Any:
    """The viewer the arguments describe, in ``canvas`` (None: offscreen). ``options``
    go to :class:`Viewer` and to the opening of every source."""
    from .app import Viewer
    from .state import ViewState

    if args.telemetry:
        options["kpi_log"] = args.telemetry
    options.setdefault("link_budget", args.link_budget)
    open_options = {
        "disk_cache": args.disk_cache,
        "disk_cache_bytes": args.disk_cache_mb << 20,
        **options.pop("open_options", {}),
    }
    if args.state:
        try:
            text = Path(args.state).read_text()
        except OSError as err:
            raise OSError(f"cannot read {args.state}: {err.strerror or err}") from None
        options.setdefault("memory_budget", args.memory_mb << 20)
        return Viewer.from_state(
            ViewState.from_json(text), canvas, size=size, **options, **open_options
        )
    sources = _sources(args)
    clims = [tuple(c) for c in args.clim] if args.clim else None
    viewer = Viewer(
        sources[0],
        canvas,
        size=size,
        channels=args.channel,
        colormap=args.colormap,
        clim=clims[0] if clims and len(clims) == 1 else clims,
        rgb=args.rgb,
        z=args.z,
        t=args.t,
        bias=args.bias,
        memory_budget=args.memory_mb << 20,
        live=args.live,
        **options,
        **open_options,
    )
    try:
        for source in sources[1:]:
            viewer.add_image(source, bias=args.bias, **open_options)
        for labels in args.labels or ():
            viewer.add_labels(labels, bias=args.bias, **open_options)
        viewer.fit()
    except BaseException:
        viewer.close()
        raise
    return viewer


def _log_to_stderr(level: str) -> logging.Handler:
    """Show log records of ``level`` and up (and warnings) on stderr, redacted, until
    :func:`_stop_logging`; the handler doing it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.setFormatter(logging.Formatter("zarrscope: %(levelname)s [%(name)s] %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    logging.captureWarnings(True)
    return handler


def _stop_logging(handler: logging.Handler) -> None:
    """Undo :func:`_log_to_stderr` (``main`` may run again in the same process, on
    another stderr)."""
    logging.captureWarnings(False)
    logging.getLogger().removeHandler(handler)
    handler.close()


#: Seconds past --timeout that the watchdog lets the command wind down before it ends
#: the process (a synchronous read that never returns cannot be interrupted).
WATCHDOG_GRACE = 2.0


def _screenshot(args: argparse.Namespace, log: logging.Handler) -> int:
    """Open, load and draw within ``--timeout`` seconds, all together.

    Every remote read follows a retry policy whose deadline is the end of the command,
    so opening a server that never answers and loading from one give up in time; what
    opening leaves of the time is what loading gets. Reads nothing can interrupt (a
    local file that never answers) are covered by a watchdog, which ends the process
    shortly after the deadline with the same one line. Failed chunk loads are not
    logged one by one (on ``log``): the closing line counts the failed tiles; nor,
    once the deadline has passed, anything of chunkpool's: the one line says it all.
    """
    deadline = time.monotonic() + args.timeout
    verbose = logging.getLogger().getEffectiveLevel() <= logging.INFO
    abandoned = _PoolRecordsAfter(deadline, chunks=verbose)
    log.addFilter(abandoned)
    expired = f"zarrscope: error: {_named(args)} did not load within {args.timeout:g} s"
    watchdog = _Watchdog(deadline + max(WATCHDOG_GRACE, args.timeout / 2), expired)
    try:
        return _screenshot_within(args, deadline, expired, watchdog)
    finally:
        watchdog.cancel()
        log.removeFilter(abandoned)


class _PoolRecordsAfter(logging.Filter):
    """Drops chunkpool's per-chunk failure records (unless ``chunks``), and all of
    chunkpool's records once ``deadline`` (:func:`time.monotonic`) has passed."""

    def __init__(self, deadline: float, *, chunks: bool):
        super().__init__()
        self._deadline = deadline
        self._chunks = chunks

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "chunkpool.chunks" and not self._chunks:
            return False
        return record.name.split(".")[0] != "chunkpool" or time.monotonic() < self._deadline


def _screenshot_within(
    args: argparse.Namespace, deadline: float, expired: str, watchdog: _Watchdog
) -> int:
    from PIL import Image

    size = tuple(args.size) if args.size else (1024, 1024)
    retry = RetryPolicy(timeout=min(RetryPolicy.timeout, args.timeout), deadline=deadline)
    try:
        viewer = _make_viewer(
            args, None, size, show_hud=False, open_options={"pool_options": {"retry": retry}}
        )
    except ChunkPoolError as err:
        if time.monotonic() < deadline:
            raise
        watchdog.report(f"{expired} ({' '.join(str(err).split())})")
        return 1
    with viewer:
        if args.region is not None:
            viewer.show_region(*args.region)
        elif not args.state:
            viewer.fit()
        started = time.perf_counter()
        settled = viewer.wait_settled(max(0.0, deadline - time.monotonic()))
        # tiles whose reads gave up at the deadline settle the view as failed, maybe
        # just before the wait's own deadline: that is the time running out too
        if not settled or (viewer.layer.status().failed and time.monotonic() >= deadline):
            watchdog.report(expired)
            return 1
        settled_in = time.perf_counter() - started
        overflow = viewer.layer.status().overflow
        if overflow:
            print(
                f"zarrscope: error: nothing to show: {overflow} tiles of the coarsest level "
                "are in view, too many to load; show a smaller --region",
                file=sys.stderr,
            )
            return 1
        image = viewer.screenshot()
        Image.fromarray(image).save(args.screenshot)
        failed = viewer.layer.status().failed
        print(
            f"zarrscope: wrote {args.screenshot} ({image.shape[1]}x{image.shape[0]}, "
            f"level {viewer.layer.target_level}, settled in {settled_in:.2f} s"
            + (f", {failed} tiles failed" if failed else "")
            + ")",
            file=sys.stderr,
        )
    return 0


class _Watchdog:
    """Ends the process with status 1 at ``at`` (a :func:`time.monotonic` time) unless
    cancelled first, printing ``message`` unless a line was already reported."""

    def __init__(self, at: float, message: str):
        self._message = message
        self._lock = threading.Lock()
        self._reported = False
        self._cancelled = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(at,), name="zarrscope-watchdog", daemon=True
        )
        self._thread.start()

    def report(self, line: str) -> None:
        """Print the command's one error line (once)."""
        with self._lock:
            if not self._reported:
                self._reported = True
                print(line, file=sys.stderr, flush=True)

    def cancel(self) -> None:
        self._cancelled.set()
        self._thread.join()

    def _run(self, at: float) -> None:
        if self._cancelled.wait(max(0.0, at - time.monotonic())):
            return
        self.report(f"{self._message} (a read never returned)")
        os._exit(1)


def _interactive(args: argparse.Namespace) -> int:
    """Open a window: Qt (with sliders for z, t, ...) if a binding is installed, else glfw.

    Without SOURCE, a missing sample is made while the window shows it (see
    :func:`_start_sample`); the making stops when the window closes.

    Once the window is closed, the viewer (closed) is freed here, on the main thread,
    with the GPU objects its reference cycles hold (renderer, textures, the canvas's
    surface): left to the cyclic GC, they would be finalised at a moment and on a thread
    of its choosing, such as zarr's event-loop thread while zarr's exit handler waits
    for it, or during interpreter shutdown after glfw has terminated and closed the X
    connection the surface belongs to (a SIGSEGV at exit)."""
    if sys.platform.startswith("linux") and not (
        os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
    ):
        raise OSError("no display to open a window on (use --screenshot, or run under X)")
    job = None
    if not args.state and not args.source:
        job = _start_sample(args)
    try:
        return _window(args, job)
    finally:
        if job is not None:
            job.cancel(SAMPLE_STOP_SECONDS)
        gc.collect()  # the viewer's frames are gone: free its cycles now, on this thread


def _window(args: argparse.Namespace, job: Any) -> int:
    size = tuple(args.size) if args.size else (1280, 800)
    title = f"zarrscope — {_named(args)}"
    try:
        from .qtwindow import ViewerWindow, loop
    except ImportError:
        return _glfw_window(size, title, args, job)
    window = ViewerWindow(lambda canvas: _make_viewer(args, canvas, size), size, title)
    window.show()
    _run(loop, window.viewer, window.close, args.print_ready, job)
    return 0


def _glfw_window(size: tuple[int, int], title: str, args: argparse.Namespace, job: Any) -> int:
    from rendercanvas.glfw import RenderCanvas, loop

    canvas = RenderCanvas(size=size, title=title, update_mode="ondemand")
    try:
        viewer = _make_viewer(args, canvas, size)
    except BaseException:
        canvas.close()
        raise
    _run(loop, viewer, viewer.close, args.print_ready, job)
    return 0


#: Seconds between the viewer's looks at the sample while it is being made.
SAMPLE_LIVE_SECONDS = 0.5
#: Seconds the command waits for the sample to be openable (another process may be
#: making it: then until that one is done).
SAMPLE_READY_SECONDS = 600.0
#: Seconds the command waits, when it ends, for the making of the sample to stop.
SAMPLE_STOP_SECONDS = 10.0


def _start_sample(args: argparse.Namespace) -> Any:
    """The built-in sample as the source; if it is missing, start making it in the
    background (:func:`sample_data.make_sample.start_sample`, progress on stderr) and
    follow it: ``--live`` (default ``SAMPLE_LIVE_SECONDS``), so the window fills in
    as the tiles are written. The :class:`~sample_data.make_sample.SampleJob`, or None
    if the sample was there."""
    from sample_data.make_sample import start_sample

    job = start_sample(progress=sys.stderr)
    try:
        if job.generating:
            from . import app  # noqa: F401  (the viewer loads while the sample starts)

            if not job.wait_ready(SAMPLE_READY_SECONDS):
                raise OSError(f"the sample at {job.path} was not ready in time")
            if args.live is None:
                args.live = SAMPLE_LIVE_SECONDS
    except BaseException:
        job.cancel(SAMPLE_STOP_SECONDS)
        raise
    args.source = [str(job.path)]
    return job if job.generating else None


class SampleFollower:
    """While the sample is being made in the background: the HUD says so, with the
    tiles done, and the first layer's contrast windows follow those of the coarsest
    level written so far (ending on the sample's own), except for channels whose window
    was set otherwise (``--clim``, keys). :meth:`tick` on the GUI thread; with a
    ``loop``, it runs again every ``SAMPLE_LIVE_SECONDS`` until the job ends."""

    def __init__(self, viewer: Any, job: Any, loop: Any = None):
        self._viewer = viewer
        self._job = job
        self._loop = loop
        first = job.first_windows
        self._mine = {
            d.index: d.clim for d in viewer.layers[0].displays if d.clim == first[d.index]
        }

    def tick(self) -> bool:
        """Show the progress and follow the windows; whether the job is still running."""
        viewer, job = self._viewer, self._job
        if viewer.canvas.get_closed():
            return False
        done = job.done()  # before the windows: the final ones once done
        layer, windows = viewer.layers[0], job.windows()
        for display in layer.displays if windows else ():
            lo_hi = windows[display.index]
            if self._mine.get(display.index) == display.clim != lo_hi:
                followed = display.with_clim(*lo_hi)
                layer.set_display(followed)
                self._mine[display.index] = followed.clim
        if not done:
            tiles, total = job.progress
            share = f"{tiles}/{total} tiles" if total else "starting"
            viewer.hud_notes[:] = [f"generating the sample: {share}"]
        elif job.error is not None:
            viewer.hud_notes[:] = [f"the sample could not be made: {job.error}"]
            print(f"zarrscope: error: the sample could not be made: {job.error}", file=sys.stderr)
        else:
            viewer.hud_notes.clear()
        viewer.canvas.request_draw()
        if not done and self._loop is not None:
            self._loop.call_later(SAMPLE_LIVE_SECONDS, self.tick)
        return not done


def _run(
    loop: Any,
    viewer: Any,
    close_window: Callable[[], None],
    print_ready: bool,
    job: Any = None,
) -> None:
    """Run the GUI loop until the window is closed; SIGINT and SIGTERM close it. With
    the ``job`` making the sample, a :class:`SampleFollower` shows its progress."""
    signals = _StopSignals(loop, close_window)

    def install() -> None:  # in the loop: after loop.run() installed rendercanvas's handler
        signals.install()
        if job is not None:
            SampleFollower(viewer, job, loop).tick()
        if print_ready:
            if viewer.frame_times:
                ready()
            else:
                viewer.frame_listeners.append(ready)

    def ready() -> None:
        if ready in viewer.frame_listeners:
            viewer.frame_listeners.remove(ready)
        print("zarrscope: ready", file=sys.stderr, flush=True)

    loop.call_soon(install)
    try:
        loop.run()
    finally:
        signals.restore()
        viewer.close()


class _StopSignals:
    """SIGINT and SIGTERM close the window from the event loop, between two events.

    ``loop.run()`` of rendercanvas installs a SIGINT handler that closes the canvases
    right inside the handler, that is wherever the GUI thread was interrupted: mostly in
    the middle of drawing or presenting a frame. The frame then goes on with the
    canvas's released present texture and wgpu-native aborts ("Texture ... does not
    exist", exit -6) or uses freed memory (SIGSEGV); a frame whose image was still being
    read back resolves on a deleted widget (a "Present finish error" traceback). And it
    leaves SIGTERM to its default action: the process dies with no cleanup (exit -15).
    These handlers replace it (so they are installed from inside the running loop) and
    only schedule ``close_window`` on the loop, which runs it after the current callback,
    i.e. after the frame; :meth:`Viewer.close` finishes the read-back before the canvas
    closes. A second signal of the same kind gets the default action, so a stuck close
    can still be interrupted; a signal ignored when the command started (``SIG_IGN``,
    e.g. SIGINT for a background job of a shell) stays ignored.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, loop: Any, close_window: Callable[[], None]):
        self._loop = loop
        self._close_window = close_window
        # None: a handler not installed from Python (left alone, as rendercanvas does)
        self._original = {
            sig: handler for sig in self.SIGNALS if (handler := signal.getsignal(sig)) is not None
        }

    def install(self) -> None:
        for sig, original in self._original.items():
            if original is not signal.SIG_IGN:
                signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: object) -> None:
        signal.signal(signum, signal.SIG_DFL)
        self._loop.call_soon(self._close_window)

    def restore(self) -> None:
        """Put back the handlers there were before the loop ran."""
        for sig, original in self._original.items():
            signal.signal(sig, original)


if __name__ == "__main__":
    sys.exit(main())
