"""Predicted-motion benchmark: scripted pans, prediction on against off, in one run.

A 4096² uint8 OME-Zarr (128² chunks, 4 levels) is read through a counting store
(``support.teststores.GatedStore``) that can add a fixed latency to every chunk read
(``--latency``, default 50 ms; 0 for the plain local store). An offscreen viewer
(1024 x 768, level 0 at 1:1, about 63 tiles in view) is driven at a fixed frame
cadence (``--fps``, default 30): each frame the script sets the camera for that
frame's time and the viewer runs ``refresh()`` - handlers, tile planning with the
motion predictor, texture uploads - but not the render pass (lavapipe's frame time is
not the point here). Scripts:

- ``constant``: a pan right at 1.5 views/s for 1.8 s;
- ``flick``: three flicks (5 views/s easing out to a stop in 0.5 s), 0.5 s still after each;
- ``zigzag``: back and forth, 2.4 views/s, turning every 0.5 s, six legs;
- ``rapid``: 50 rapid pans (random directions, 0.75 view in 0.25 s, 0.1 s still between).

Reported per script, prediction on and off (``viewer.motion = None``): the fraction of
frames with every visible tile at the target level (``viewer.settled()`` after the
frame), the chunk reads finished (and how many distinct chunks), and the over-fetch:
reads finished whose chunk no frame showed afterwards, over all reads finished during
the script (the ring around a still view included).

    python tests/benchmarks/bench_motion.py [--latency 0.05] [--fps 30]
"""

from __future__ import annotations

import argparse
import math
import pathlib
import random
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

TESTS = pathlib.Path(__file__).resolve().parents[1]
for _dir in (TESTS, TESTS.parent):  # support.*, and tests.benchmarks.* as the runner has it
    if str(_dir) not in sys.path:
        sys.path.insert(0, str(_dir))

import statistics  # noqa: E402

import zarr  # noqa: E402
from support.images import noise_image, write_pyramid  # noqa: E402
from support.teststores import GatedStore  # noqa: E402
from zarr.storage import LocalStore  # noqa: E402

from chunkpool import ChunkPool  # noqa: E402
from tests.benchmarks.figures import Figure, quartiles  # noqa: E402
from viewer import Viewer  # noqa: E402

SIDE, CHUNK, LEVELS = 4096, 128, 4
CANVAS = (1024, 768)
W = float(CANVAS[0])  # a view's width in world units (level-0 pixels at 1:1)
Script = Callable[[float], tuple[float, float]]  # time -> view centre (x, y)


@dataclass
class Result:
    frames: int
    complete: int
    reads: int
    distinct: int
    unseen: int

    @property
    def complete_fraction(self) -> float:
        return self.complete / self.frames if self.frames else 0.0

    @property
    def over_fetch(self) -> float:
        return self.unseen / self.reads if self.reads else 0.0


def constant() -> tuple[Script, float]:
    return (lambda t: (800.0 + 1.5 * W * min(t, 1.8), 2048.0)), 2.2


def flick() -> tuple[Script, float]:
    moves = [(1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]  # right, down, left
    speed, run, rest = 5 * W, 0.5, 0.5
    reach = speed * run / 2

    def at(t: float) -> tuple[float, float]:
        x, y = 1000.0, 1000.0
        for i, (dx, dy) in enumerate(moves):
            s = min(max(t - i * (run + rest), 0.0), run) / run
            d = reach * (2 * s - s * s)  # eases out to a stop
            x, y = x + dx * d, y + dy * d
        return x, y

    return at, len(moves) * (run + rest)


def zigzag() -> tuple[Script, float]:
    leg, speed = 0.5, 2.4 * W

    def at(t: float) -> tuple[float, float]:
        t = min(t, 6 * leg)
        phase = t % (2 * leg)
        d = speed * (phase if phase < leg else 2 * leg - phase)
        return 1000.0 + d, 2048.0

    return at, 6 * leg + 0.3


def rapid(n: int = 50, seed: int = 7) -> tuple[Script, float]:
    rng = random.Random(seed)
    run, rest, length = 0.25, 0.1, 0.75 * W
    lo, hi = W, SIDE - W
    points = [(2048.0, 2048.0)]
    for _ in range(n):
        x, y = points[-1]
        while True:
            a = rng.uniform(0, 2 * math.pi)
            nx, ny = x + length * math.cos(a), y + length * math.sin(a)
            if lo <= nx <= hi and lo <= ny <= hi:
                break
        points.append((nx, ny))

    def at(t: float) -> tuple[float, float]:
        i = min(int(t // (run + rest)), n - 1)
        s = min(max(t - i * (run + rest), 0.0), run) / run
        s = s * s * (3 - 2 * s)  # smooth start and stop
        (x0, y0), (x1, y1) = points[i], points[i + 1]
        return x0 + (x1 - x0) * s, y0 + (y1 - y0) * s

    return at, n * (run + rest) + 0.3


SCRIPTS = {"constant": constant, "flick": flick, "zigzag": zigzag, "rapid": rapid}


def key_of(level: int, index: tuple[int, ...]) -> str:
    return f"{level}/c/" + "/".join(map(str, index))


def run(
    path: pathlib.Path, script: Script, seconds: float, fps: float, latency: float, predict: bool
) -> Result:
    store = GatedStore(LocalStore(path))
    pool = ChunkPool.from_zarr_node(zarr.open_group(store, mode="r"), cache_bytes=512 << 20)[0]
    viewer = Viewer(pool, None, size=CANVAS, show_hud=False, clim=(0, 255))
    try:
        if not predict:
            viewer.motion = None
        x, y = script(0.0)
        viewer.show_world(x - W / 2, y - CANVAS[1] / 2, x + W / 2, y + CANVAS[1] / 2)
        assert viewer.wait_settled(120)
        rec = store.rec
        rec.delay = latency
        with rec.lock:
            start = len(rec.finished)
        shown_after: dict[str, int] = {}  # chunk key -> reads finished before its last frame shown
        frames = complete = 0
        pause = threading.Event()
        t0 = time.perf_counter()
        k = 0
        while True:
            now = time.perf_counter() - t0
            if now > seconds:
                break
            x, y = script(now)
            viewer.camera.show_world(x - W / 2, y - CANVAS[1] / 2, x + W / 2, y + CANVAS[1] / 2)
            viewer.refresh()
            frames += 1
            complete += viewer.settled()
            with rec.lock:
                done = len(rec.finished)
            for tile in viewer.layer.tiles.tiles():
                if tile.shown:
                    shown_after[key_of(*tile.chunk)] = done
            k = max(k + 1, math.floor(now * fps) + 1)  # the next frame slot (late: skip)
            pause.wait(max(0.0, k / fps - (time.perf_counter() - t0)))
        with rec.lock:
            reads = rec.finished[start:]
        unseen = sum(1 for i, key in enumerate(reads) if shown_after.get(key, -1) <= start + i)
        return Result(frames, complete, len(reads), len(set(reads)), unseen)
    finally:
        viewer.close()
        pool.destroy()


def _image(tmp: str) -> pathlib.Path:
    return write_pyramid(
        pathlib.Path(tmp) / "m.ome.zarr",
        noise_image((SIDE, SIDE), seed=11),
        chunks=(CHUNK, CHUNK),
        n_levels=LEVELS,
    ).path


def collect(quick: bool = False) -> list[Figure]:
    """Every script, prediction on and off alternated (3 repeats, 1 when ``quick``,
    with 10 rapid pans instead of 50), 50 ms a read at 30 fps: per script the
    fraction of frames complete at the target level, on over off (goal >= 1), and
    the over-fetch with prediction on beside prediction off's (goal <= 10% for the
    rapid pans, the issue's; the others are published for information)."""
    repeats = 1 if quick else 3
    scripts = dict(SCRIPTS, rapid=lambda: rapid(10 if quick else 50))
    figures: list[Figure] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = _image(tmp)
        for name, make in scripts.items():
            script, seconds = make()
            on: list[Result] = []
            off: list[Result] = []
            for i in range(repeats):
                for predict in (True, False) if i % 2 == 0 else (False, True):
                    result = run(path, script, seconds, 30.0, 0.05, predict)
                    (on if predict else off).append(result)
            ratios = [
                a.complete_fraction / b.complete_fraction if b.complete_fraction else math.inf
                for a, b in zip(on, off, strict=True)
            ]
            figures.append(
                Figure(
                    section="Predicted motion",
                    name=f"{name}: frames complete at the target level",
                    value=statistics.median(r.complete_fraction for r in on),
                    unit="fraction",
                    reference="prediction off",
                    reference_value=statistics.median(r.complete_fraction for r in off),
                    ratio=statistics.median(ratios),
                    spread=quartiles(ratios),
                    goal=1.0,
                    repeats=repeats,
                    note="ratio: median over paired repeats of on / off",
                )
            )
            fetch_on = [r.over_fetch for r in on]
            figures.append(
                Figure(
                    section="Predicted motion",
                    name=f"{name}: over-fetch, prediction on",
                    value=statistics.median(fetch_on),
                    unit="fraction",
                    reference="prediction off",
                    reference_value=statistics.median(r.over_fetch for r in off),
                    ratio=statistics.median(fetch_on),
                    spread=quartiles(fetch_on),
                    goal=0.10 if name == "rapid" else None,
                    higher_is_better=False,
                    repeats=repeats,
                    note="ratio is the fraction itself (reads finished for chunks no later "
                    "frame showed, over all reads finished), not over the reference; "
                    "lower is better",
                )
            )
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--latency", type=float, default=0.05, help="seconds per chunk read")
    parser.add_argument("--fps", type=float, default=30.0)
    parser.add_argument("--scripts", default=",".join(SCRIPTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = _image(tmp)
        print(
            f"latency {args.latency * 1e3:.0f} ms a read, {args.fps:g} fps, {CANVAS[0]}x{CANVAS[1]}"
        )
        for name in args.scripts.split(","):
            script, seconds = SCRIPTS[name]()
            for predict in (True, False):
                r = run(path, script, seconds, args.fps, args.latency, predict)
                print(
                    f"{name:8} prediction {'on ' if predict else 'off'}: {r.frames:4} frames, "
                    f"{r.complete_fraction * 100:5.1f}% complete at the target level; "
                    f"{r.reads:5} reads ({r.distinct} chunks), "
                    f"over-fetch {r.over_fetch * 100:5.1f}%"
                )


if __name__ == "__main__":
    main()
