"""Viewer benchmarks: time to first image, per-frame bookkeeping, time to settled.

Runs offscreen on the built-in sample (16384² x 2 channels, 256² chunks; generated on
first use). Reports:

- time to first image: from opening (``Viewer(...)``, imports done) to the first
  screenshot with any non-black pixel, each run in a fresh process (nothing parsed,
  compiled or cached in it; the page cache and Mesa's shader cache are warm), locally
  and over HTTP with 50 ms latency per request (``ZarrHTTPServer``), medians over
  ``--repeats``; beside the pool's own time to open the image and load its coarsest
  level in a fresh process (the floor), and, with ``--main DIR`` (another checkout, e.g.
  of an older commit), the same runs of that checkout's viewer (``PYTHONPATH=DIR``), alternated
  with ours in the same run; with our start-up steps (``Viewer.startup_seconds``);
- CPU time of the per-frame tile bookkeeping (``TileSet.update``) at 1920 x 1080
  while panning (a new view every frame) and when nothing changes;
- time to first pixel after opening, and time to settled after a jump, each beside
  the pool's raw time to load the same chunks (a fresh pool, same process, page cache
  warm), which is the floor the viewer can reach.

    python tests/benchmarks/bench_viewer.py [--frames 200] [--repeats 5] [--main DIR]
    python tests/benchmarks/bench_viewer.py --first-image-only   # that part alone
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import numpy as np

from chunkpool import ChunkPool
from sample_data import ensure_sample
from viewer import Viewer

if TYPE_CHECKING:
    from tests.benchmarks.figures import Figure

W, H = 1920, 1080


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f} ms"


def raw_pool_seconds(source: str, keys: list[tuple[int, tuple[int, ...]]]) -> float:
    """Time for a fresh pool to load ``keys`` (the floor for the viewer)."""
    (pool,) = ChunkPool.from_zarr_node(source)
    started = time.perf_counter()
    for level, index in keys:
        pool.get_chunk(level, index)
    pool.wait_for_chunks_to_load()
    elapsed = time.perf_counter() - started
    pool.destroy()
    return elapsed


def held_keys(viewer: Viewer) -> list[tuple[int, tuple[int, ...]]]:
    return [loc.key for loc in viewer.pool.iter_held(viewer.layer.tiles.ref)]


# -- time to first image, each run in a fresh process -----------------------------------

ROOT = pathlib.Path(__file__).resolve().parents[2]


def open_and_show(source: str) -> tuple[float, float, int, dict]:
    """Open a viewer and screenshot until data shows: seconds to the first image and
    to the viewer constructed, frames drawn, the viewer's start-up steps."""
    opened = time.perf_counter()
    viewer = Viewer(source, None, size=(W, H), show_hud=False)
    constructed = time.perf_counter()
    frames = 0
    while True:
        frames += 1
        if viewer.screenshot().any():
            break
    shown = time.perf_counter()
    steps = getattr(viewer, "startup_seconds", {})
    viewer.close()
    return shown - opened, constructed - opened, frames, steps


def child_first_image(source: str) -> dict:
    """(In a fresh process.) Seconds from opening to the first non-black screenshot;
    and ``again``: a second viewer in the same process (GPU device and pipelines made,
    as neuroglancer's figure is after its page and WebGL have loaded)."""
    first, constructed, frames, steps = open_and_show(source)
    again = open_and_show(source)[0]
    return {
        "first_image": first,
        "constructed": constructed,
        "frames": frames,
        "steps": steps,
        "again": again,
    }


def child_floor(source: str) -> dict:
    """(In a fresh process.) The pool alone: open the image, load its coarsest level."""
    opened = time.perf_counter()
    (pool,) = ChunkPool.from_zarr_node(source)
    level = len(pool.multiscale_info.levels) - 1
    grid = pool.multiscale_info.levels[level].chunk_grid_shape
    for index in np.ndindex(*grid):
        pool.get_chunk(level, tuple(int(i) for i in index))
    pool.wait_for_chunks_to_load()
    seconds = time.perf_counter() - opened
    pool.destroy()
    return {"first_image": seconds}


def run_child(kind: str, source: str, code: pathlib.Path) -> dict:
    """Run ``kind`` ("image" or "floor") in a fresh process on ``code``'s packages."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    out = subprocess.run(
        [sys.executable, __file__, f"--child-{kind}", source],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def first_image(source: str, repeats: int, main_code: pathlib.Path | None) -> None:
    """Time to first image, ours (and main's) beside the floor, local and over HTTP."""
    sys.path.insert(0, str(ROOT / "tests"))
    from support.httpserver import ZarrHTTPServer

    path = pathlib.Path(source)
    codes = {"ours": ROOT} | ({"main": main_code} if main_code else {})
    with ZarrHTTPServer(path.parent, latency=0.05) as server:
        sources = {"local": source, "http 50 ms": f"{server.url}/{path.name}"}
        for where, src in sources.items():
            runs: dict[str, list[dict]] = {name: [] for name in [*codes, "floor"]}
            for _ in range(repeats):  # alternated: load on the machine hits all alike
                for name, code in codes.items():
                    runs[name].append(run_child("image", src, code))
                runs["floor"].append(run_child("floor", src, ROOT))
            med = {k: statistics.median(r["first_image"] for r in v) for k, v in runs.items()}
            line = ", ".join(f"{k} {v:.3f} s" for k, v in med.items())
            print(f"first image, {where}, median of {repeats}: {line}")
            steps = [r["steps"] for r in runs["ours"] if r["steps"]]
            if steps:
                names = steps[0].keys()
                print(
                    "  our steps (median s): "
                    + ", ".join(f"{n} {statistics.median(s[n] for s in steps):.3f}" for n in names)
                )
            for name in codes:
                frames = [r["frames"] for r in runs[name]]
                again = statistics.median(r["again"] for r in runs[name])
                print(
                    f"  {name}: frames drawn up to the first image {frames}; "
                    f"a second viewer in the same process {again:.3f} s"
                )


def bookkeeping(viewer: Viewer, frames: int) -> tuple[list[float], list[float]]:
    """Seconds of the tile bookkeeping (``TileSet.update``) per frame, panning 37 x 11
    screen pixels a frame from a settled 1:1 view, and unchanged (the same view again)."""
    viewer.show_region(4000, 4000, 4000 + W, 4000 + H)
    viewer.wait_settled()
    pan, idle = [], []
    for frame in range(frames):
        viewer.pan(37 / W, 11 / H)  # 37 x 11 screen pixels per frame
        viewer._run_handlers()  # texture data: not bookkeeping, measured apart below
        view = viewer.view()
        t0 = time.perf_counter()
        viewer.layer.update(view)
        pan.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        viewer.layer.update(view)
        idle.append(time.perf_counter() - t0)
        if frame % 20 == 0:
            viewer.wait_settled()
    return pan, idle


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--main", type=pathlib.Path, default=None, help="another checkout to compare with"
    )
    parser.add_argument("--first-image-only", action="store_true")
    parser.add_argument("--child-image")
    parser.add_argument("--child-floor")
    args = parser.parse_args()
    if args.child_image or args.child_floor:
        child = child_first_image if args.child_image else child_floor
        print(json.dumps(child(args.child_image or args.child_floor)))
        return
    source = str(ensure_sample())
    main_code = args.main if args.main is not None and (args.main / "viewer").is_dir() else None
    first_image(source, args.repeats, main_code)
    if args.first_image_only:
        return

    # -- time to first pixel ---------------------------------------------------------
    opened = time.perf_counter()
    viewer = Viewer(source, None, size=(W, H), show_hud=False)
    constructed = time.perf_counter()
    first_frame = None
    while viewer.layer.status().loaded == 0:
        viewer.screenshot()
        first_frame = first_frame or time.perf_counter()
    first_pixel = time.perf_counter()
    viewer.wait_settled()
    viewer.screenshot()
    settled = time.perf_counter()
    keys = held_keys(viewer)
    raw_open = raw_pool_seconds(source, keys)
    print(f"open -> Viewer constructed (metadata, windows)     : {ms(constructed - opened)}")
    print(f"open -> first frame drawn (includes shader compile):    {ms(first_frame - opened)}")
    print(f"open -> first pixel of data on screen:                  {ms(first_pixel - opened)}")
    print(f"open -> settled and drawn:                              {ms(settled - opened)}")
    print(f"pool alone, same {len(keys)} chunks:                      {ms(raw_open)}")

    # -- jump: settle a far 1:1 view -------------------------------------------------
    jumps = []
    for x0, y0 in [(9000, 11000), (2000, 3000), (12000, 2500)]:
        viewer.show_region(x0, y0, x0 + W, y0 + H)
        started = time.perf_counter()
        viewer.wait_settled()
        viewer.screenshot()
        jump = time.perf_counter() - started
        raw = raw_pool_seconds(source, [k for k in held_keys(viewer) if k[0] == 0])
        jumps.append((jump, raw))
        print(
            f"jump to ({x0}, {y0}) at 1:1: settled+drawn {ms(jump)}; "
            f"pool alone for its {viewer.layer.status().loaded} level-0 tiles {ms(raw)}"
        )

    # -- per-frame bookkeeping -------------------------------------------------------
    pan, idle = bookkeeping(viewer, args.frames)
    held = len(held_keys(viewer))
    print(f"per-frame bookkeeping at {W}x{H}, 256² chunks, 2 channels, ~{held} chunks held:")
    print(
        f"  panning:   median {ms(statistics.median(pan))}, p90 {ms(float(np.percentile(pan, 90)))}"
    )
    print(
        f"  unchanged: median {ms(statistics.median(idle))}, "
        f"p90 {ms(float(np.percentile(idle, 90)))}"
    )
    frames = list(viewer.frame_times)
    print(
        f"  full frames drawn (render on lavapipe included): median "
        f"{ms(statistics.median(frames))} over {len(frames)}"
    )
    viewer.close()


if __name__ == "__main__":
    main()


# -- the one-command run (python -m tests.benchmarks) ------------------------------------

#: The reference of the per-frame bookkeeping: one frame's time at 60 frames a second.
FRAME_BUDGET = 1 / 60


def collect(quick: bool = False) -> list[Figure]:
    """Time to first image (a fresh process per run) locally and over HTTP with 50 ms
    latency, beside the floor (a fresh pool loading the coarsest level), alternated;
    the per-frame tile bookkeeping panning and unchanged, beside a 60 fps frame."""
    if str(ROOT / "tests") not in sys.path:
        sys.path.insert(0, str(ROOT / "tests"))
    from support.httpserver import ZarrHTTPServer

    from tests.benchmarks.figures import Figure, quartiles

    repeats, frames = (1, 20) if quick else (5, 200)
    source = str(ensure_sample())
    path = pathlib.Path(source)
    figures = []
    with ZarrHTTPServer(path.parent, latency=0.05) as server:
        for where, src in (("local", source), ("HTTP 50 ms", f"{server.url}/{path.name}")):
            ours, floor = [], []
            for _ in range(repeats):  # alternated: load on the machine hits both alike
                ours.append(run_child("image", src, ROOT)["first_image"])
                floor.append(run_child("floor", src, ROOT)["first_image"])
            print(f"  first image, {where}: ours {ours}, floor {floor}", flush=True)
            per_run = [a / b for a, b in zip(ours, floor, strict=True)]
            figures.append(
                Figure(
                    "first image",
                    f"time to first image, {where}",
                    statistics.median(ours),
                    "s",
                    "floor: a fresh pool loads the coarsest level",
                    statistics.median(floor),
                    statistics.median(ours) / statistics.median(floor),
                    quartiles(per_run),
                    None,
                    False,
                    repeats,
                    f"fresh process per run, offscreen {W} x {H} on the built-in sample; "
                    "the goal is against the peers (bench_peers)",
                )
            )
    viewer = Viewer(source, None, size=(W, H), show_hud=False)
    try:
        pan, idle = bookkeeping(viewer, frames)
    finally:
        viewer.close()
    for what, times in (("panning", pan), ("unchanged view", idle)):
        figures.append(
            Figure(
                "per-frame bookkeeping",
                f"tile bookkeeping per frame, {what}",
                statistics.median(times) * 1000,
                "ms",
                "one frame at 60 fps",
                FRAME_BUDGET * 1000,
                statistics.median(times) / FRAME_BUDGET,
                quartiles([t / FRAME_BUDGET for t in times]),
                None,
                False,
                len(times),
                f"TileSet.update on the main thread, {W} x {H}, 256² chunks, 2 channels; "
                f"p90 {float(np.percentile(times, 90)) * 1000:.2f} ms",
            )
        )
    return figures
