"""Link benchmark: jumps over a 2 MB/s, 100 ms link, level chosen for the link vs not.

An 8192² uint16 OME-Zarr (256² chunks, 6 levels, zstd; smooth ramps plus 8 bits of
noise, so a chunk is ~120 kB on the wire) is served from another process by the test
HTTP server shaped to one 2 MB/s link with 100 ms latency (``--bandwidth``,
``--latency``). Two offscreen viewers (1920 x 1080), one with ``link_budget`` at its
default (adaptive: the first level shown is the one whose missing visible bytes arrive
within 250 ms, then the level above the ideal one, then the ideal one) and one with
``link_budget=None`` (the ideal level first, every tile requested at once: the
behaviour before), make the same ``--jumps`` scripted jumps to fresh places at zooms
of 1 to 2 level-0 pixels per screen pixel, interleaved (the same jump by each in turn,
so the machine's noise hits them alike). Each jump waits, refreshing every 10 ms,
until the view is settled at the ideal level, then until the pool has nothing left to
load (the prefetch ring), so that no jump starts on another's loads.

Reported per mode: the median time from the jump to a screen fully covered at most one
level above the ideal one (every ideal-level tile in view drawn, or drawn beneath a
loaded tile of the level above it), and to the ideal level (settled); and the ratios
between the modes (covered: off / on, the goal is >= 3; ideal: on / off, the goal is
<= 1.1).

    python tests/benchmarks/bench_link.py [--jumps 10]

:func:`collect` gives the two figures (``tests.benchmarks.figures.Figure``) for the
one-command run.
"""

from __future__ import annotations

import argparse
import multiprocessing
import pathlib
import statistics
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
from viewer.tileset import TileSet  # noqa: E402
from viewer.tiling import LINK_BUDGET, View  # noqa: E402

try:  # from the repository root (the one-command run), else beside this file
    from tests.benchmarks.figures import Figure, quartiles
except ImportError:
    sys.path.insert(0, str(TESTS / "benchmarks"))
    from figures import Figure, quartiles

SIDE, CHUNK, LEVELS = 8192, 256, 6
W, H = 1920, 1080


def write_image(root: pathlib.Path) -> pathlib.Path:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    rng = np.random.default_rng(0)
    data = ((yy * 3 + xx * 5) % 4096 + rng.integers(0, 256, (SIDE, SIDE))).astype(np.uint16)
    del yy, xx
    return write_pyramid(
        root / "img.ome.zarr", data, chunks=(CHUNK, CHUNK), n_levels=LEVELS, axes=["y", "x"]
    ).path


def serve(root: str, latency: float, bandwidth: float, conn: Any) -> None:
    with ZarrHTTPServer(root, latency=latency, bandwidth=bandwidth) as server:
        conn.send(server.url)
        conn.recv()  # until told to stop


def covered(tiles: TileSet, view: View, max_level: int) -> bool:
    """Whether every target tile in view is drawn, or its centre lies in a drawn tile
    of a level from the target's to ``max_level``."""
    target = tiles.target_level
    shown = {(t.key.level, t.key.iy, t.key.ix) for t in tiles.tiles() if t.shown}
    goal = tiles.levels[target]
    iy0, iy1, ix0, ix1 = goal.tile_range(view.y0, view.y1, view.x0, view.x1)
    for iy in range(iy0, iy1):
        for ix in range(ix0, ix1):
            if (target, iy, ix) in shown:
                continue
            y0, y1, x0, x1 = goal.tile_bounds(iy, ix)
            cy = (max(y0, view.y0) + min(y1, view.y1)) / 2
            cx = (max(x0, view.x0) + min(x1, view.x1)) / 2
            for level in range(target + 1, max_level + 1):
                g = tiles.levels[level]
                jy = int(((cy - g.offset[0]) / g.scale[0] + 0.5) // g.chunk[0])
                jx = int(((cx - g.offset[1]) / g.scale[1] + 0.5) // g.chunk[1])
                if (level, jy, jx) in shown:
                    break
            else:
                return False
    return True


def regions(n: int) -> list[tuple[float, float, float, float]]:
    """``n`` views (x0, y0, x1, y1 in level-0 pixels) at zooms of 1 to 1.5 level-0
    pixels per screen pixel (the ideal level is 0), each in its own cell of a 2 x 5
    grid over the image (fresh places: no tile of the ideal level shared), in a
    random order (the same every run); past 10, the cells come round again."""
    rng = np.random.default_rng(1)
    cells = [(cx, cy) for cx in range(2) for cy in range(5)]
    out = []
    for i in range(n):
        if i % len(cells) == 0:
            rng.shuffle(cells)
        cx, cy = cells[i % len(cells)]
        zoom = float(rng.uniform(1.0, 1.5))
        w, h = W * zoom, H * zoom
        x0 = cx * SIDE / 2 + float(rng.uniform(0, SIDE / 2 - w))
        y0 = cy * SIDE / 5 + float(rng.uniform(0, max(0.0, SIDE / 5 - h)))
        out.append((x0, y0, x0 + w, y0 + h))
    return out


def jump(
    viewer: Viewer, region: tuple[float, float, float, float]
) -> tuple[float, float, int, float]:
    """Seconds from the jump to covered at <= ideal + 1, to settled; the ideal level;
    the bytes fetched until settled."""
    pause = threading.Event()
    fetched = viewer.pool.stats.bytes_fetched
    viewer.show_region(*region)
    started = time.monotonic()
    covered_at = None
    tiles = viewer.layer.tiles
    while True:
        viewer.refresh()
        view = viewer.view()
        if covered_at is None and covered(tiles, view, tiles.target_level + 1):
            covered_at = time.monotonic() - started
        if viewer.settled():
            break
        pause.wait(0.01)
    settled = time.monotonic() - started
    fetched = viewer.pool.stats.bytes_fetched - fetched
    while viewer.pool.stats.chunks_pending:  # the ring: let it finish
        viewer.refresh()
        pause.wait(0.02)
    assert covered_at is not None
    return covered_at, settled, tiles.target_level, fetched


Jump = tuple[float, float, int, float]


def run(
    jumps: int, bandwidth: float = 2e6, latency: float = 0.1, *, echo: bool = True
) -> dict[str, list[Jump]]:
    """``jumps`` interleaved jumps by an adaptive viewer (``"on"``) and one with
    ``link_budget=None`` (``"off"``) over the shaped link: per mode, per jump, what
    :func:`jump` returns. ``echo``: print a line per jump and the link estimates."""
    with tempfile.TemporaryDirectory() as tmp:
        source = write_image(pathlib.Path(tmp))
        ours, theirs = multiprocessing.Pipe()
        server = multiprocessing.Process(
            target=serve, args=(tmp, latency, bandwidth, theirs), daemon=True
        )
        server.start()
        url = ours.recv() + "/" + source.name
        viewers = {}
        try:
            for mode, budget in (("on", LINK_BUDGET), ("off", None)):
                viewer = Viewer(
                    url, None, size=(W, H), show_hud=False, clim=(0, 4400), link_budget=budget
                )
                assert viewer.wait_settled(300)
                viewers[mode] = viewer
            for viewer in viewers.values():  # nothing left loading before the first jump
                while viewer.pool.stats.chunks_pending:
                    viewer.refresh()
                    threading.Event().wait(0.02)
            results: dict[str, list[Jump]] = {m: [] for m in viewers}
            for j, region in enumerate(regions(jumps)):
                order = list(viewers) if j % 2 == 0 else list(viewers)[::-1]
                for mode in order:
                    results[mode].append(jump(viewers[mode], region))
                if echo:
                    line = "  ".join(
                        f"{m}: covered {results[m][-1][0]:5.2f} s, ideal {results[m][-1][1]:5.2f} s"
                        f" ({results[m][-1][3] / 1e6:4.1f} MB)"
                        for m in viewers
                    )
                    zoom = (region[2] - region[0]) / W
                    print(
                        f"jump {j:2} (zoom {zoom:.2f}, ideal level {results['on'][-1][2]}): {line}"
                    )
            for mode, viewer in viewers.items():
                link = viewer.pool.stats.link
                assert link is not None
                if echo:
                    print(
                        f"{mode:>3}: link estimate {link.throughput / 1e6:.2f} MB/s, "
                        f"{link.latency * 1000:.0f} ms"
                    )
            return results
        finally:
            for viewer in viewers.values():
                viewer.close()
            ours.send("stop")
            server.join(10)


def figures(results: dict[str, list[Jump]]) -> list[Figure]:
    """The two figures of issue 10 §4 from :func:`run`'s results: how much sooner the
    screen is covered at <= ideal + 1 (today / adaptive, goal >= 3), and the time to the
    ideal level (adaptive / today, goal <= 1.10), each median beside today's."""
    on, off = results["on"], results["off"]
    n = len(on)
    cov = [b[0] / a[0] for a, b in zip(on, off, strict=True)]
    ideal = [a[1] / b[1] for a, b in zip(on, off, strict=True)]
    cov_on, cov_off = statistics.median(r[0] for r in on), statistics.median(r[0] for r in off)
    ideal_on, ideal_off = statistics.median(r[1] for r in on), statistics.median(r[1] for r in off)
    link = "jumps over a 2 MB/s, 100 ms link, 1920x1080"
    return [
        Figure(
            section="level for the link",
            name="screen covered at <= ideal+1 level, adaptive",
            value=cov_on,
            unit="s",
            reference="link_budget=None (today)",
            reference_value=cov_off,
            ratio=cov_off / cov_on,
            spread=quartiles(cov),
            goal=3.0,
            repeats=n,
            note=f"ratio: today / adaptive (how much sooner); {link}",
        ),
        Figure(
            section="level for the link",
            name="ideal level reached, adaptive",
            value=ideal_on,
            unit="s",
            reference="link_budget=None (today)",
            reference_value=ideal_off,
            ratio=ideal_on / ideal_off,
            spread=quartiles(ideal),
            goal=1.10,
            higher_is_better=False,
            repeats=n,
            note=f"ratio: adaptive / today; {link}",
        ),
    ]


def collect(quick: bool = False) -> list[Figure]:
    """The figures of one run (``quick``: 2 jumps instead of 10, the same code path)."""
    return figures(run(2 if quick else 10, echo=False))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jumps", type=int, default=10)
    parser.add_argument("--bandwidth", type=float, default=2e6, help="bytes/s")
    parser.add_argument("--latency", type=float, default=0.1, help="seconds")
    args = parser.parse_args()
    results = run(args.jumps, args.bandwidth, args.latency)
    covered, ideal = figures(results)
    print(
        f"median covered at <= ideal+1: on {covered.value:.2f} s, off "
        f"{covered.reference_value:.2f} s -> {covered.ratio:.2f}x sooner"
        f" (quartiles over jumps {covered.spread[0]:.2f}..{covered.spread[1]:.2f}; goal >= 3)"
    )
    print(
        f"median to the ideal level:    on {ideal.value:.2f} s, off "
        f"{ideal.reference_value:.2f} s -> on/off {ideal.ratio:.3f}"
        f" (quartiles over jumps {ideal.spread[0]:.2f}..{ideal.spread[1]:.2f}; goal <= 1.10)"
    )


if __name__ == "__main__":
    main()
