"""Viewer benchmarks: per-frame bookkeeping, time to first pixel, time to settled.

Runs offscreen on the built-in sample (16384² x 2 channels, 256² chunks; generated on
first use). Reports:

- CPU time of the per-frame tile bookkeeping (``TileSet.update``) at 1920 x 1080
  while panning (a new view every frame) and when nothing changes;
- time to first pixel after opening, and time to settled after a jump, each beside
  the pool's raw time to load the same chunks (a fresh pool, same process, page cache
  warm), which is the floor the viewer can reach.

    python tests/benchmarks/bench_viewer.py [--frames 200]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from chunkpool import ChunkPool
from sample_data import ensure_sample
from viewer import Viewer

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=200)
    args = parser.parse_args()
    source = str(ensure_sample())

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
    viewer.show_region(4000, 4000, 4000 + W, 4000 + H)
    viewer.wait_settled()
    pan, idle = [], []
    for frame in range(args.frames):
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
