"""Real windows: the viewer on a virtual X server (Xvfb).

The tests start their own ``Xvfb`` on a free display number and run the viewer in
subprocesses with ``DISPLAY`` pointing at it: a script that opens a glfw window, waits
for the view to load, takes a screenshot and closes; and the ``zarrscope`` command in
interactive mode (a Qt window if a Qt binding is installed, else glfw), closed by its
``q`` key or by Ctrl+C (SIGINT). Skipped only when Xvfb is not installed.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
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
#: Seconds the console script is left to load its view and go idle before Ctrl+C:
#: rendercanvas's Qt canvas logs a traceback ("Present finish error") when it is closed
#: while a frame's asynchronous read-back is in flight, so the tests close idle viewers.
QUIET = 3.0


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
# window once the viewer has drawn, loaded its view and gone idle (no new frame for
# half a second: see QUIET for why). Records what it saw. The
# Viewer class is wrapped to get hold of the instance the command makes; the timer
# runs on the loop the command runs (Qt's if a binding is installed, else glfw's).
COMMAND_SCRIPT = """
import json, pathlib, sys, time
import viewer.app

made = []

class Recorded(viewer.app.Viewer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        made.append(self)

viewer.app.Viewer = Recorded  # before the window modules import it
from viewer.__main__ import main
try:
    from viewer.qtwindow import loop
except ImportError:
    from rendercanvas.glfw import loop

out = pathlib.Path(sys.argv[1])
started = time.monotonic()
frames_before = [-1]

def press_q():
    v = made[0] if made else None
    frames = len(v.frame_times) if v is not None else -1
    idle = frames > 0 and frames == frames_before[0] and v.settled()
    frames_before[0] = frames
    if not idle and time.monotonic() < started + 30:
        loop.call_later(0.5, press_q)
        return
    info = {"made": len(made), "frames": len(v.frame_times) if v else 0,
            "settled": bool(v and v.settled()), "hud": bool(v and v.hud.visible)}
    (out / "info.json").write_text(json.dumps(info))
    v.canvas.submit_event({"event_type": "key_down", "key": "q", "modifiers": ()})

loop.call_later(0.1, press_q)
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
    image (the X server lists it; without ``xwininfo``, it just keeps running), and
    exits 0 on SIGINT, without a traceback."""
    script = shutil.which("zarrscope", path=os.path.dirname(sys.executable))
    assert script is not None, "the zarrscope console script is not installed"
    proc = subprocess.Popen(
        [script, str(image.path), "--size", *map(str, SIZE)],
        env=x_env(display),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        title = f"zarrscope — {image.path}"
        started = time.monotonic()
        while not window_listed(display, title, started):
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < started + DEADLINE, "no zarrscope window appeared"
            time.sleep(0.2)
        time.sleep(QUIET)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr


def window_listed(display: str, title: str, since: float) -> bool:
    """Whether a window whose title contains ``title`` exists on ``display``; without
    ``xwininfo`` to ask, whether 5 s have passed ``since``."""
    if shutil.which("xwininfo") is None:
        return time.monotonic() > since + 5
    tree = subprocess.run(
        ["xwininfo", "-root", "-tree"],
        env=x_env(display),
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    return title in tree
