"""Playback benchmark: t played at 5 fps (``--fps``) over HTTP with 50 ms latency.

A (t=50, 2048², 256² chunks) uint16 image is served from another process by the test
HTTP server with 50 ms added latency; an offscreen viewer (1024 x 1024, the whole
image: level 1, 16 tiles a slice) plays t. Reported: in smooth mode, the fraction of
slices complete at the target level when left, with the prefetch of slices ahead and
without it (the reference, same run); in sharp mode, the achieved frame rate, with
and without prefetch. The viewer is refreshed every 10 ms (no rendering: lavapipe's
frame time is not the point here).

    python tests/benchmarks/bench_playback.py [--seconds 10] [--fps 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import sys
import tempfile
import threading
import time
from typing import Any

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.httpserver import ZarrHTTPServer  # noqa: E402
from support.images import write_pyramid  # noqa: E402

from viewer import Viewer  # noqa: E402

T, SIDE, CHUNK = 50, 2048, 256


def write_image(root: pathlib.Path) -> pathlib.Path:
    """An OME-Zarr (t, y, x) pyramid of two levels: level 1 is what the fitted view shows."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    data = np.stack([((yy + xx * (t + 1)) % 4096).astype(np.uint16) for t in range(T)])
    return write_pyramid(
        root / "t.ome.zarr", data, chunks=(1, CHUNK, CHUNK), n_levels=2, axes=["t", "y", "x"]
    ).path


def serve(root: str, conn: Any) -> None:
    with ZarrHTTPServer(root, latency=0.05) as server:
        conn.send(server.url)
        conn.recv()  # until told to stop


def play(url: str, mode: str, fps: float, seconds: float, prefetch: bool) -> Any:
    viewer = Viewer(url, None, size=(1024, 1024), show_hud=False, clim=(0, 4095), t=0)
    try:
        viewer.fit()
        assert viewer.wait_settled(120)
        playback = viewer.play("t", fps=fps, mode=mode, prefetch=prefetch)
        pause = threading.Event()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            viewer.refresh()
            pause.wait(0.01)
        return playback
    finally:
        viewer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        source = write_image(pathlib.Path(tmp))
        ours, theirs = multiprocessing.Pipe()
        server = multiprocessing.Process(target=serve, args=(tmp, theirs), daemon=True)
        server.start()
        url = ours.recv() + "/" + source.name
        try:
            for mode in ("smooth", "sharp"):
                for prefetch in (True, False):
                    p = play(url, mode, args.fps, args.seconds, prefetch)
                    print(
                        f"{mode:6} prefetch {'on ' if prefetch else 'off'}: {p.frames} slices, "
                        f"{p.complete_fraction * 100:5.1f}% complete at the target level, "
                        f"{p.achieved_fps:.2f} fps"
                    )
        finally:
            ours.send("stop")
            server.join(10)


if __name__ == "__main__":
    main()
