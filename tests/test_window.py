"""Real windows: the viewer on a virtual X server (Xvfb).

The tests start their own ``Xvfb`` on a free display number and run the viewer in
subprocesses with ``DISPLAY`` pointing at it: a script that opens a glfw window, waits
for the view to load, takes a screenshot and closes; and the ``zarrscope`` command in
interactive mode (a Qt window if a Qt binding is installed, else glfw), closed by its
``q`` key, by closing the window, by Ctrl+C (SIGINT) or SIGTERM. Signals are sent once the
command says it is ready (``--print-ready``: its first frame is drawn), while it is still
loading and drawing: a close must be safe at any moment. Skipped only when Xvfb is not
installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from support.images import Pyramid, expected_view, noise_image, region_world, write_pyramid

pytestmark = pytest.mark.render

SIZE = (240, 160)
REGION = (100, 60, 580, 380)  # level 1 at 2x
#: Seconds a windowed subprocess may take, start to exit (imports, shaders, loading).
DEADLINE = 60.0
#: What the command prints on stderr with --print-ready once its first frame is drawn.
READY = "zarrscope: ready"
#: What a crash or an unclean exit leaves on stderr (faulthandler, a wgpu-native panic).
CRASH_MARKS = (
    "Traceback",
    "Fatal Python error",
    "panicked",
    "Error in",
    "finish error",
    "Exception ignored",
)


@pytest.fixture(scope="module")
def display() -> Iterator[str]:
    """A running Xvfb's display name (":N"), stopped at the end of the module."""
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb is not installed")
    for number in range(97, 121):
        socket = pathlib.Path(f"/tmp/.X11-unix/X{number}")
        if socket.exists() or pathlib.Path(f"/tmp/.X{number}-lock").exists():
            continue
        server = subprocess.Popen(
            ["Xvfb", f":{number}", "-screen", "0", "1280x1024x24", "-nolisten", "tcp"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not socket.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if not socket.exists():  # lost a race for this number, or too slow: next one
            server.kill()
            server.wait()
            continue
        try:
            yield f":{number}"
        finally:
            server.terminate()
            server.wait(10)
        return
    pytest.fail("no free X display number in :97..:120")


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Pyramid:
    """A 1024² uint8 noise pyramid, 128² chunks, 3 levels."""
    root = tmp_path_factory.mktemp("window")
    return write_pyramid(
        root / "noise.ome.zarr", noise_image((1024, 1024), seed=5), chunks=(128, 128), n_levels=3
    )


def x_env(display: str) -> dict[str, str]:
    """The environment for a subprocess drawing on ``display`` (X11, not Wayland)."""
    env = {k: v for k, v in os.environ.items() if k != "WAYLAND_DISPLAY"}
    return {**env, "DISPLAY": display}


def default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default action. A shell starts a
    background job with SIGINT ignored, the child inherits that, and the viewer rightly
    keeps ignoring it: a test run from such a job would wait for nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Command:
    """A windowed subprocess whose stderr is read as it comes (by a thread), so that a
    test can wait for a line in it."""

    def __init__(self, argv: list[str], display: str):
        self.proc = subprocess.Popen(
            argv,
            env={**x_env(display), "PYTHONFAULTHANDLER": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=default_sigint,
        )
        self._lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._lines.append(line)
            if line.strip() == READY:
                self._ready.set()
        self._ready.set()  # end of file: nothing more will come

    @property
    def stderr(self) -> str:
        return "".join(self._lines)

    def wait_ready(self) -> None:
        """Until the command prints READY (it fails if the command ends first)."""
        assert self._ready.wait(DEADLINE), f"not ready within {DEADLINE} s:\n{self.stderr}"
        assert self.proc.poll() is None, f"exited {self.proc.returncode}:\n{self.stderr}"

    def finish(self) -> tuple[int, str, str]:
        """Wait for the exit: (exit code, stdout, stderr); killed after DEADLINE."""
        try:
            stdout, _ = self.proc.communicate(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.communicate()
            raise AssertionError(f"no exit within {DEADLINE} s:\n{self.stderr}") from None
        finally:
            self._reader.join(DEADLINE)
        return self.proc.returncode, stdout, self.stderr

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_script(script: str, display: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run a Python script under ``display``; it must exit by itself within DEADLINE."""
    return subprocess.run(
        [sys.executable, "-c", script, *args],
        env=x_env(display),
        capture_output=True,
        text=True,
        timeout=DEADLINE,
        check=False,
    )


# Opens a glfw window with a viewer, and once the view has loaded saves a screenshot
# and what the viewer says about itself, then closes the window so that loop.run()
# returns. Arguments: image path, output directory, W, H, X0, Y0, X1, Y1.
WINDOW_SCRIPT = """
import json, pathlib, sys, time
import numpy as np
from rendercanvas.glfw import RenderCanvas, loop
from viewer import Viewer

path, out = sys.argv[1], pathlib.Path(sys.argv[2])
width, height = map(int, sys.argv[3:5])
region = tuple(map(float, sys.argv[5:9]))
canvas = RenderCanvas(size=(width, height), title="zarrscope test")
viewer = Viewer(path, canvas, size=(width, height), colormap="gray", clim=(0, 255),
                show_hud=False)
viewer.show_region(*region)
started = time.monotonic()

def check():
    if not viewer.settled() and time.monotonic() < started + 30:
        loop.call_later(0.05, check)
        return
    np.save(out / "shot.npy", viewer.screenshot())
    info = {"settled": viewer.settled(), "level": viewer.layer.target_level,
            "frames": len(viewer.frame_times), "size": list(canvas.get_physical_size())}
    (out / "info.json").write_text(json.dumps(info))
    viewer.close()

loop.call_later(0.1, check)
loop.run()
print("loop returned")
"""


def test_window_opens_draws_and_closes(
    display: str, image: Pyramid, tmp_path: pathlib.Path
) -> None:
    """In a glfw window the view loads and its screenshot is exactly the data of the
    region asked for, although it was asked for before the window had its real size
    (X11 sizes windows asynchronously); closing the canvas ends ``loop.run()`` and the
    process exits 0."""
    result = run_script(
        WINDOW_SCRIPT, display, str(image.path), str(tmp_path), *map(str, SIZE), *map(str, REGION)
    )
    assert result.returncode == 0, result.stderr
    assert "loop returned" in result.stdout
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"settled": True, "level": 1, "frames": info["frames"], "size": list(SIZE)}
    assert info["frames"] >= 1
    shot = np.load(tmp_path / "shot.npy")
    assert shot.shape == (SIZE[1], SIZE[0], 3)
    expected = expected_view(image, 1, region_world(image, REGION), SIZE)
    assert (shot == expected[0][..., None]).all()


# Runs the zarrscope command's main() in interactive mode, and presses "q" in its
# window right after the frame that shows the loaded view (a frame listener). Records
# what it saw. The Viewer class is wrapped to get hold of the instance the command
# makes (Qt's window if a binding is installed, else glfw's).
COMMAND_SCRIPT = """
import json, pathlib, sys
import viewer.app

out = pathlib.Path(sys.argv[1])
made = []

class Recorded(viewer.app.Viewer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)
        self.frame_listeners.append(self.press_q_once_settled)

    def press_q_once_settled(self):
        if not self.settled():
            return
        self.frame_listeners.remove(self.press_q_once_settled)
        info = {"made": len(made), "frames": len(self.frame_times),
                "settled": True, "hud": self.hud.visible}
        (out / "info.json").write_text(json.dumps(info))
        self.canvas.submit_event({"event_type": "key_down", "key": "q", "modifiers": ()})

viewer.app.Viewer = Recorded  # before the window modules import it
from viewer.__main__ import main

code = main(sys.argv[2:])
print("main returned", code, "pool destroyed", made[0].pool.destroyed)
sys.exit(code)
"""


def test_zarrscope_command_opens_a_window_and_q_closes_it(
    display: str, image: Pyramid, tmp_path: pathlib.Path
) -> None:
    """The command's interactive mode opens a window, draws (with the HUD), loads the
    fitted view, and its "q" key closes it: main() returns 0 and the pool is
    destroyed."""
    result = run_script(
        COMMAND_SCRIPT, display, str(tmp_path), str(image.path), "--size", *map(str, SIZE)
    )
    assert result.returncode == 0, result.stderr
    assert "main returned 0 pool destroyed True" in result.stdout
    assert "Traceback" not in result.stderr
    info = json.loads((tmp_path / "info.json").read_text())
    assert info == {"made": 1, "frames": info["frames"], "settled": True, "hud": True}
    assert info["frames"] >= 1


def test_zarrscope_console_script_stops_on_ctrl_c(display: str, image: Pyramid) -> None:
    """The installed ``zarrscope`` console script opens its window, titled after the
    image (the X server lists it; without ``xwininfo``, it just keeps running), and on
    SIGINT right after its first frame (while it still loads and draws) exits 0 without
    a traceback or a crash.

    Before the fix this failed about 1 run in 5 on a loaded machine: rendercanvas's own
    SIGINT handler closed the canvas inside the frame it interrupted, and the frame went
    on with the released present texture: wgpu-native aborted (-6) or segfaulted (-11),
    or a pending read-back resolved on the deleted widget ("Present finish error")."""
    script = shutil.which("zarrscope", path=os.path.dirname(sys.executable))
    assert script is not None, "the zarrscope console script is not installed"
    command = Command(
        [script, str(image.path), "--size", *map(str, SIZE), "--print-ready"], display
    )
    try:
        command.wait_ready()
        title = f"zarrscope — {image.path}"
        assert window_listed(display, title), "no zarrscope window listed"
        command.proc.send_signal(signal.SIGINT)
        code, _, stderr = command.finish()
    finally:
        command.kill()
    assert code == 0, stderr
    assert not any(mark in stderr for mark in CRASH_MARKS), stderr


# Runs the zarrscope command's main() with --print-ready (a Qt window, or glfw with
# "glfw" as first argument: the Qt bindings are then made unimportable), and reports
# how it ended: main()'s return value, whether the pool was destroyed and the canvas
# closed, and which threads that main() started are still alive, apart from the
# process-wide ones owned by libraries, which live as long as the process: wgpu's device
# poller, zarr's IO loop thread and its loop's default executor (zarr's local store
# reads files with asyncio.to_thread); whether a task of the viewer or its pool is still
# pending on zarr's loop; and whether the viewer was freed by the time main() returned.
# The cyclic GC is off, so only the command's own collection can free the viewer's
# reference cycles (with its GPU objects): otherwise they would be freed at a moment
# and on a thread of the GC's choosing, maybe at interpreter exit. With "close" as
# second argument, the script closes the window itself once the first frame is drawn.
#: What STOP_SCRIPT reports after a clean exit: status 0, the pool destroyed and the
#: viewer closed, no thread of ours left, no task of ours on zarr's loop, and the viewer
#: freed when main() returned (its reference cycles too, with the cyclic GC off).
CLEAN_EXIT = {
    "code": 0,
    "destroyed": True,
    "closed": True,
    "threads": [],
    "zarr_tasks": 0,
    "viewer_freed": True,
}

STOP_SCRIPT = """
import asyncio, gc, json, sys, threading, weakref
gc.disable()  # only the command's own collection may free the viewer's cycles
backend, how = sys.argv[1], sys.argv[2]
if backend == "glfw":
    for name in ("PySide6", "PyQt6", "PySide2", "PyQt5"):
        sys.modules[name] = None  # import fails: the command opens a glfw window
import viewer.app
import zarr.core.sync
from wgpu.backends.wgpu_native._poller import PollThread

made = []

closed = {}

class Recorded(viewer.app.Viewer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(weakref.ref(self))  # not a reference: the command must free it
        if how == "close":
            self.frame_listeners.append(self.canvas.window().close)

    def close(self):
        super().close()
        if self.pool.destroyed:
            closed.update(destroyed=True, closed=self.canvas.get_closed())

viewer.app.Viewer = Recorded  # before the window modules import it
from viewer.__main__ import main

before = set(threading.enumerate())
code = main(sys.argv[3:])
zarr_loop = zarr.core.sync.loop[0]
executor = getattr(zarr_loop, "_default_executor", None)
libraries = {zarr.core.sync.iothread[0], *getattr(executor, "_threads", ())}
left = [t.name for t in set(threading.enumerate()) - before
        if not isinstance(t, PollThread) and t not in libraries]
ours = [t for t in asyncio.all_tasks(zarr_loop) if "chunkpool" in repr(t) or "viewer" in repr(t)]
print(json.dumps({"code": code, **closed, "threads": left, "zarr_tasks": len(ours),
                  "viewer_freed": made[0]() is None}))
sys.exit(code)
"""


@pytest.mark.parametrize(
    ("backend", "how"),
    [("qt", "SIGTERM"), ("qt", "close"), ("glfw", "SIGINT"), ("glfw", "SIGTERM")],
)
def test_zarrscope_command_closes_cleanly(
    display: str, image: Pyramid, backend: str, how: str
) -> None:
    """SIGTERM or SIGINT right after the first frame, or closing the window then, ends
    the command cleanly, in the Qt and the glfw window: main() returns 0, no traceback,
    the pool is destroyed, the canvas closed, and no thread the viewer or its pool
    started is left. (Before the fix SIGTERM killed the process: exit -15, no cleanup.)"""
    argv = [sys.executable, "-c", STOP_SCRIPT, backend, how, str(image.path)]
    command = Command([*argv, "--size", *map(str, SIZE), "--print-ready"], display)
    try:
        command.wait_ready()
        if how != "close":
            command.proc.send_signal(getattr(signal, how))
        code, stdout, stderr = command.finish()
    finally:
        command.kill()
    assert code == 0, stderr
    assert not any(mark in stderr for mark in CRASH_MARKS), stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report == CLEAN_EXIT


def window_listed(display: str, title: str) -> bool:
    """Whether a window whose title contains ``title`` exists on ``display`` (True
    without ``xwininfo`` to ask)."""
    if shutil.which("xwininfo") is None:
        return True
    tree = subprocess.run(
        ["xwininfo", "-root", "-tree"],
        env=x_env(display),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    return title in tree


# An offscreen viewer whose frame is interrupted by close() (twice), as a signal handler
# interrupts the frame it lands in, then closed again after the frame: saves the frame
# it got and reports the state after. Arguments: image path, output directory, W, H,
# X0, Y0, X1, Y1 (the region shown).
CLOSE_IN_FRAME_SCRIPT = """
import json, pathlib, sys, threading
import numpy as np
from viewer import Viewer

out = pathlib.Path(sys.argv[2])
width, height = map(int, sys.argv[3:5])
v = Viewer(sys.argv[1], None, size=(width, height), colormap="gray", clim=(0, 255),
           show_hud=False)
v.show_region(*map(float, sys.argv[5:9]))
assert v.wait_settled(30)
render = v.renderer.render

def interrupted(*args, **kwargs):
    v.close()
    v.close()
    return render(*args, **kwargs)

v.renderer.render = interrupted
np.save(out / "shot.npy", v.screenshot())
after_frame = {"destroyed": v.pool.destroyed, "closed": v.canvas.get_closed()}
v.close()
print(json.dumps({"after_frame": after_frame, "destroyed": v.pool.destroyed,
                  "closed": v.canvas.get_closed(),
                  "threads": [t.name for t in threading.enumerate()
                              if t.name.startswith("chunkpool-")]}))
"""


def test_close_inside_a_frame_waits_for_its_end(
    display: str, image: Pyramid, tmp_path: pathlib.Path
) -> None:
    """``Viewer.close()`` called in the middle of a frame (as from a signal handler), and
    again, does not tear the scene or the canvas down under it: the frame completes with
    exactly the region's data, the close happens right after it, a further close() is a
    no-op, and no pool thread is left. (Before the fix the close ran inside the frame:
    the scene was emptied under it and the frame came out black; in a window, the canvas
    texture released under a frame makes wgpu-native abort.)"""
    result = run_script(
        CLOSE_IN_FRAME_SCRIPT,
        display,
        str(image.path),
        str(tmp_path),
        *map(str, SIZE),
        *map(str, REGION),
    )
    assert result.returncode == 0, result.stderr
    assert not any(mark in result.stderr for mark in CRASH_MARKS), result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {
        "after_frame": {"destroyed": True, "closed": True},
        "destroyed": True,
        "closed": True,
        "threads": [],
    }
    shot = np.load(tmp_path / "shot.npy")
    expected = expected_view(image, 1, region_world(image, REGION), SIZE)
    assert (shot == expected[0][..., None]).all()


QT_SLIDER_SCRIPT = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from support.images import write_pyramid, noise_image
from viewer.qtwindow import ViewerWindow, QtCore, QtWidgets
from viewer import Viewer
import pathlib
root = pathlib.Path(sys.argv[1])
stack = write_pyramid(root / "zyx.ome.zarr", noise_image((3, 64, 64), seed=1), chunks=(1, 32, 32),
                      n_levels=1, axes=["z", "y", "x"])
other = write_pyramid(root / "b.ome.zarr", noise_image((64, 64), seed=2), chunks=(32, 32),
                      n_levels=1)

def make(canvas):
    viewer = Viewer(str(stack.path), canvas, size=(320, 240))
    viewer.add_image(str(other.path))
    return viewer

window = ViewerWindow(make, (320, 240), "test")
window.show()
app = QtWidgets.QApplication.instance()
for _ in range(20):
    app.processEvents()
label, slider = window.sliders["z"]
assert slider.focusPolicy() == QtCore.Qt.FocusPolicy.NoFocus
assert window.layer_list.focusPolicy() == QtCore.Qt.FocusPolicy.NoFocus
assert window.layer_list.count() == 2 and not window.layer_list.isHidden()
slider.setValue(2)  # the user drags it: the viewer follows
assert window.viewer.position["z"] == 2, window.viewer.position
window.viewer.step_axis("z", -1)  # a key moves it: the slider follows
window.viewer.refresh()
app.processEvents()
assert slider.value() == 1 and label.text() == "z 1", (slider.value(), label.text())
play = window.play_buttons["z"]
assert play.focusPolicy() == QtCore.Qt.FocusPolicy.NoFocus
play.click()
assert window.viewer.playback is not None and window.viewer.playback.axis == "z"
play.click()
assert window.viewer.playback is None
window.layer_list.item(1).setCheckState(QtCore.Qt.CheckState.Unchecked)
assert not window.viewer.layers[1].visible
window.close()
print("ok")
"""


def test_qt_sliders_and_layer_list_follow_the_viewer_and_leave_the_focus(
    display: str, tmp_path: pathlib.Path
) -> None:
    """The Qt window's z slider moves the viewer and follows its keys, the layer list
    ticks layers on and off, and neither takes the keyboard focus (so q and PageDown
    stay the canvas's)."""
    pytest.importorskip("PySide6")
    result = run_script(
        QT_SLIDER_SCRIPT, display, str(tmp_path), str(pathlib.Path(__file__).parent)
    )
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
