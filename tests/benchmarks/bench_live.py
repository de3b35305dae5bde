"""Live benchmark: write-to-screen latency of a viewer following a growing store.

A writer process (``sample_data.acquire``, time mode: 512² uint16, 256² chunks, two
levels) appends time points; an offscreen viewer (512 x 512, level 0 at 1:1: four
tiles a time point) follows the store with ``live=0.25``, locally (file-system events
wake it; the 0.25 s poll is the fallback) and over HTTP (the test server, in another
process, 50 ms added latency per request; polled). For each append, the latency is
the time from the writer's last metadata rename to the first frame that shows the new
time point: the viewer is refreshed every 5 ms (a frame loop), and once it is at the new
point with every tile loaded, one frame is rendered and its pixels are checked against
numpy ground truth (the time point through the window) and the time taken. The next
append comes a random 0-0.25 s after that (so appends fall at every phase of the poll).

The goal beside it, from parts measured in the same run: ``interval + 2 round trips +
one chunk load``, where a round trip is the median time to read one metadata document
(``zarr.json``: a file read, or an HTTP GET) and a chunk load the median time a fresh
pool takes to load one level-0 chunk. Reported: median and 90th percentile latency over
``--appends`` (default 20) appends, and their ratio to the goal.

    python tests/benchmarks/bench_live.py [--appends 20] [--interval 0.25] [--modes http]
"""

from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import random
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from typing import TYPE_CHECKING, Any

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from support.httpserver import ZarrHTTPServer  # noqa: E402

from chunkpool import ChunkPool  # noqa: E402
from sample_data.acquire import Acquisition, time_point  # noqa: E402
from viewer import Viewer  # noqa: E402

if TYPE_CHECKING:
    from tests.benchmarks.figures import Figure

SIDE, CHUNK, CLIM = 512, 256, (0.0, 4000.0)
LATENCY = 0.05
FRAME = 0.005  # seconds between refreshes of the viewer (its frame loop)


def writer(path: str, conn: Any) -> None:
    """Append a time point each time told to; answer with the time its metadata landed."""
    acquisition = Acquisition(path, size=(SIDE, SIDE), channels=0, chunk=CHUNK)
    acquisition.step()
    conn.send(time.monotonic())
    while conn.recv():
        acquisition.step()
        conn.send(time.monotonic())


def serve(root: str, conn: Any) -> None:
    with ZarrHTTPServer(root, latency=LATENCY) as server:
        conn.send(server.url)
        conn.recv()  # until told to stop


def windowed(t: int) -> np.ndarray:
    data = time_point(t, SIDE, SIDE, 0).astype(np.float64)
    return np.clip((data - CLIM[0]) / (CLIM[1] - CLIM[0]), 0, 1) * 255


def measure(source: str, write: Any, appends: int, interval: float) -> list[float]:
    """Latencies (s) of ``appends`` appends, seen by a live viewer of ``source``."""
    viewer = Viewer(source, None, size=(SIDE, SIDE), show_hud=False, clim=CLIM, live=interval)
    pause = threading.Event()
    rng = random.Random(7)
    latencies = []
    try:
        viewer.show_region(0, 0, SIDE, SIDE)
        assert viewer.wait_settled(120)
        for _ in range(appends):
            pause.wait(rng.uniform(0, interval))
            t = viewer.dims()["t"]
            written = write()
            deadline = written + 60
            while True:
                viewer.refresh()
                if viewer.position["t"] == t and viewer.settled():
                    shot = viewer.screenshot()
                    shown = time.monotonic()
                    break
                assert time.monotonic() < deadline, f"t={t} not shown within 60 s"
                pause.wait(FRAME)
            error = np.abs(shot[..., 0] - windowed(t)).max()
            assert error <= 1.0, f"t={t}: the frame differs from the ground truth by {error}"
            latencies.append(shown - written)
    finally:
        viewer.close()
    return latencies


def round_trip(url_or_path: str) -> float:
    """Median time to read one metadata document."""
    times = []
    for _ in range(9):
        start = time.monotonic()
        if url_or_path.startswith("http"):
            with urllib.request.urlopen(url_or_path + "/0/zarr.json") as answer:
                answer.read()
        else:
            pathlib.Path(url_or_path, "0", "zarr.json").read_bytes()
        times.append(time.monotonic() - start)
    return statistics.median(times)


def chunk_load(source: str) -> float:
    """Median time a fresh pool takes to load one level-0 chunk (the last time point)."""
    times = []
    for i in range(5):
        (pool,) = ChunkPool.from_zarr_node(source)
        try:
            last = pool.multiscale_info.levels[0].shape[0] - 1
            start = time.monotonic()
            pool.get_chunk(0, (last, i % 2, i // 2 % 2), "bench").wait(60)
            times.append(time.monotonic() - start)
        finally:
            pool.destroy()
    return statistics.median(times)


def report(
    name: str, latencies: list[float], interval: float, rtt: float, load: float
) -> tuple[float, float, float]:
    """Print the latencies beside their goal; (median, p90, goal) in seconds."""
    ordered = sorted(latencies)
    median = statistics.median(ordered)
    p90 = ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]
    goal = interval + 2 * rtt + load
    print(
        f"{name:5s}  median {median * 1000:6.0f} ms  p90 {p90 * 1000:6.0f} ms   goal "
        f"{goal * 1000:4.0f} ms (interval {interval * 1000:.0f} + 2 x RTT {rtt * 1000:.1f} + "
        f"chunk load {load * 1000:.1f})   median/goal {median / goal:.2f}  p90/goal "
        f"{p90 / goal:.2f}   (n={len(ordered)}, min {ordered[0] * 1000:.0f}, max "
        f"{ordered[-1] * 1000:.0f} ms)"
    )
    return median, p90, goal


MODES = ("local", "http")


def run(
    appends: int, interval: float, modes: tuple[str, ...] = MODES
) -> dict[str, tuple[list[float], float, float]]:
    """Per mode of ``modes`` ("local", "http"): the latencies of ``appends`` appends,
    the round trip and the chunk load, measured in the same run."""
    context = multiprocessing.get_context("spawn")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in modes:
            path = str(pathlib.Path(tmp, f"{name}.ome.zarr"))
            ours, theirs = context.Pipe()
            writing = context.Process(target=writer, args=(path, theirs), daemon=True)
            writing.start()
            ours.recv()  # the store exists
            server = serve_end = None
            source = path
            if name == "http":
                serve_end, theirs_srv = context.Pipe()
                server = context.Process(target=serve, args=(tmp, theirs_srv), daemon=True)
                server.start()
                source = serve_end.recv() + "/" + pathlib.Path(path).name

            def write(ours: Any = ours) -> float:
                ours.send(True)
                return ours.recv()

            try:
                latencies = measure(source, write, appends, interval)
                rtt, load = round_trip(source), chunk_load(source)
            finally:
                ours.send(False)
                writing.join(30)
                if server is not None:
                    serve_end.send(None)
                    server.join(30)
            results[name] = latencies, rtt, load
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--appends", type=int, default=20)
    parser.add_argument("--interval", type=float, default=0.25)
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    args = parser.parse_args()
    for name, (latencies, rtt, load) in run(args.appends, args.interval, tuple(args.modes)).items():
        report(name, latencies, args.interval, rtt, load)


if __name__ == "__main__":
    main()


def collect(quick: bool = False) -> list[Figure]:
    """Write-to-screen latency (median and p90), local and over HTTP, beside its goal
    (interval + 2 round trips + one chunk load, measured in the same run)."""
    from tests.benchmarks.figures import Figure, quartiles

    appends, interval = (3 if quick else 20), 0.25
    figures = []
    for name, (latencies, rtt, load) in run(appends, interval).items():
        median, p90, goal = report(name, latencies, interval, rtt, load)
        note = (
            f"goal = interval {interval * 1000:.0f} + 2 x RTT {rtt * 1000:.1f} + chunk load"
            f" {load * 1000:.1f} ms"
            + (f"; HTTP {LATENCY * 1000:.0f} ms latency" if name == "http" else "")
        )
        spread = quartiles([x / goal for x in latencies])
        for what, value in (("median", median), ("p90", p90)):
            figures.append(
                Figure(
                    "live stores",
                    f"write-to-screen latency {what}, {name}",
                    value * 1000,
                    "ms",
                    "goal: interval + 2 RTT + chunk load",
                    goal * 1000,
                    value / goal,
                    spread if what == "median" else None,
                    1.0,
                    False,
                    len(latencies),
                    note,
                )
            )
    return figures
