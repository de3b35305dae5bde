"""Time-to-sharp benchmark: 20 scripted jumps and zooms, local and over HTTP, against
the lower bound the pool's throughput sets.

On the built-in sample (16384² x 2 channels, uint16, 256² chunks, 7 levels, zstd;
generated on first use), offscreen viewers at 1920 x 1080 with their default
settings, reading the sample from disk ("local") or from the test HTTP server with
50 ms latency per request (``ZarrHTTPServer``, run in a child process), make the same
``--jumps`` jumps, the two modes interleaved (the same jump by each in turn, the order
reversed every other jump, so the machine's noise hits them alike). The jumps go to
fresh places at zooms of 0.7 to 3 level-0 pixels per screen pixel and one in twenty at
4 to 4.6 (ideal levels 0, 1 and 2), all from one seed: no jump's tiles, with the ring
of its ideal level around them, touch those of another jump of the same viewer (the
views are packed on shelves over the image, then taken in a random order). Twenty
such places do not fit on one image, so each mode has a viewer per ten jumps
(``PER_VIEWER``), taking turns. A jump is timed from ``show_region`` until the view is
sharp: ``viewer.refresh()`` then ``viewer.settled()`` every 10 ms (every visible tile
of the ideal level loaded); then the prefetch is let finish (nothing pending in the
pool) before the next jump, so that no jump starts on another's loads.

The lower bound of a jump: the bytes of its ideal level's chunks in view (both
channels, as fetched) over the pool's throughput measured in the same run: right
after each jump, a fresh pool on the same source (disk, or the same server) loads
that jump's chunks at once; the throughput of a mode is the bytes those pools fetched
over the seconds they took, summed over its jumps (so the load on the machine weighs
on it as on the jumps). Reported per mode: the median time to sharp and the median
bound, their ratio (1 would be a viewer that spends nothing beyond moving the visible
bytes at the pool's throughput: higher is worse), and the quartiles of the per-jump
ratios. Every jump's chunks are checked to have been fresh (not loaded before by its
viewer: its per-chunk load records).

    python tests/benchmarks/bench_sharp.py [--jumps 20]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import pathlib
import statistics
import sys
import threading
import time
from typing import Any

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]
for _path in (TESTS, TESTS.parent):  # support.*, and tests.benchmarks.* run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support.httpserver import ZarrHTTPServer  # noqa: E402

from chunkpool import ChunkPool  # noqa: E402
from chunkpool.kpi import KpiLog  # noqa: E402
from sample_data import ensure_sample  # noqa: E402
from tests.benchmarks.figures import Figure, quartiles  # noqa: E402
from viewer import Viewer  # noqa: E402

W, H = 1920, 1080
SIDE = 16384  # the sample's level-0 side
CHUNK = 256
#: Generous bounds on a wait (seconds): a jump to sharp, the prefetch after it.
DEADLINE = 300.0
#: Jumps per viewer: more fresh places than this do not fit on the sample, so a run of
#: more jumps takes turns between several viewers (of each mode).
PER_VIEWER = 10
Key = tuple[int, tuple[int, ...]]


def regions(n: int, seed: int = 5) -> list[tuple[int, tuple[float, float, float, float]]]:
    """``n`` jumps: each a viewer (of ``ceil(n / PER_VIEWER)``, in turn) and the view it
    goes to (x0, y0, x1, y1, level-0 pixels), at varied zooms; the views of one viewer
    are at least two tiles of their ideal level apart beyond the view's own tiles (its
    ring: one tile), in a random order."""
    rng = np.random.default_rng(seed)
    zooms = []
    for i in range(n):
        lo, hi = (2.0, 2.2) if i % 20 == 18 else (1.0, 1.6) if i % 8 in (3, 4) else (-0.5, 1.0)
        zooms.append(float(2 ** rng.uniform(lo, hi)))
    groups = math.ceil(n / PER_VIEWER)
    views = [pack([z for i, z in enumerate(zooms) if i % groups == g], rng) for g in range(groups)]
    for group in views:
        rng.shuffle(group)
    return [(j % groups, views[j % groups][j // groups]) for j in range(n)]


def pack(zooms: list[float], rng: np.random.Generator) -> list[tuple[float, float, float, float]]:
    """Views at ``zooms`` placed on shelves over the sample, tallest first, each in a
    box of three more ideal-level tiles (a tile of its own straddling the edge, the
    ring's tile, a tile apart), every row and its boxes shifted at random in the room
    left."""
    boxes = []
    for i, z in enumerate(zooms):
        tile = CHUNK * 2 ** math.floor(max(0.0, math.log2(z)))
        boxes.append((W * z + 3 * tile, H * z + 3 * tile, i))
    boxes.sort(key=lambda b: -b[1])
    rows: list[list[tuple[float, float, int]]] = [[]]
    for box in boxes:
        if sum(w for w, _, _ in rows[-1]) + box[0] > SIDE:
            rows.append([])
        rows[-1].append(box)
    spare = SIDE - sum(row[0][1] for row in rows)  # the first box is a row's tallest
    if spare < 0:
        raise ValueError(f"{len(zooms)} views do not fit on the sample")
    out: list[tuple[float, float, float, float]] = [(0.0, 0.0, 0.0, 0.0)] * len(zooms)
    y = 0.0
    for row in rows:
        y += float(rng.uniform(0, spare / len(rows)))
        x = float(rng.uniform(0, SIDE - sum(w for w, _, _ in row)))
        for w, _, i in row:
            out[i] = (x, y, x + W * zooms[i], y + H * zooms[i])
            x += w
        y += row[0][1]
    return out


def serve(root: str, conn: Any) -> None:
    with ZarrHTTPServer(root, latency=0.05) as server:
        conn.send(server.url)
        conn.recv()  # until told to stop


def drain(viewer: Viewer) -> None:
    """Refresh until the pool has nothing left to load (the prefetch ring)."""
    pause = threading.Event()
    deadline = time.monotonic() + DEADLINE
    while viewer.pool.stats.chunks_pending:
        assert time.monotonic() < deadline, "the prefetch did not finish"
        viewer.refresh()
        pause.wait(0.02)


def visible_ideal(viewer: Viewer) -> set[Key]:
    """The chunks of the ideal level's tiles in view, of the shown channels."""
    tiles = viewer.layer.tiles
    return {
        (t.chunk.level, tuple(t.chunk.index))
        for ch in tiles.channels
        if ch.visible
        for t in ch.tiles.values()
        if t.in_view and t.key.level == tiles.target_level
    }


def jump(viewer: Viewer, region: tuple[float, float, float, float]) -> tuple[float, set[Key]]:
    """Seconds from the jump to sharp; the ideal level's chunks in view."""
    pause = threading.Event()
    viewer.show_region(*region)
    started = time.monotonic()
    while True:
        viewer.refresh()
        if viewer.settled():
            break
        assert time.monotonic() - started < DEADLINE, ("not sharp", viewer.layer.status())
        pause.wait(0.01)
    seconds = time.monotonic() - started
    keys = visible_ideal(viewer)
    drain(viewer)
    return seconds, keys


def raw_load(source: str, keys: set[Key]) -> tuple[float, int]:
    """A fresh pool on ``source`` (opened first, not timed) loads ``keys`` at once:
    the seconds it took and the bytes it fetched."""
    (pool,) = ChunkPool.from_zarr_node(source)
    try:
        started = time.perf_counter()
        for level, index in keys:
            pool.get_chunk(level, index)
        pool.wait_for_chunks_to_load(timeout=DEADLINE)
        seconds = time.perf_counter() - started
        stats = pool.stats
        assert stats.loads == len(keys), "the fresh pool did not load every chunk"
        return seconds, stats.bytes_fetched
    finally:
        pool.destroy()


def measure(n: int) -> dict:
    """Jump both viewers through ``n`` regions; per mode the times to sharp, the bounds,
    the ideal levels, the throughput and how many chunks a jump found loaded before."""
    source = ensure_sample()
    ours, theirs = multiprocessing.Pipe()
    server = multiprocessing.Process(target=serve, args=(str(source.parent), theirs), daemon=True)
    server.start()
    sources = {"local": str(source), "http 50 ms": f"{ours.recv()}/{source.name}"}
    jumps = regions(n)
    groups = 1 + max(g for g, _ in jumps)
    viewers: dict[str, list[Viewer]] = {m: [] for m in sources}
    logs: dict[Viewer, KpiLog] = {}  # every load of a viewer: was a jump's chunk fresh?
    try:
        for mode, src in sources.items():
            for _ in range(groups):
                log = KpiLog(capacity=1 << 20)
                viewer = Viewer(src, None, size=(W, H), show_hud=False, kpi_log=log)
                viewers[mode].append(viewer)
                logs[viewer] = log
                assert viewer.wait_settled(DEADLINE)
        for viewer in logs:
            drain(viewer)
        runs: dict[str, list[tuple[float, float, int, int]]] = {m: [] for m in sources}
        reused = dict.fromkeys(sources, 0)
        for j, (group, region) in enumerate(jumps):
            for mode in list(sources) if j % 2 == 0 else list(sources)[::-1]:
                viewer = viewers[mode][group]
                before = {
                    (r.level, tuple(r.index)) for r in logs[viewer].records() if r.state == "loaded"
                }
                seconds, keys = jump(viewer, region)
                reused[mode] += len(keys & before)
                raw, nbytes = raw_load(sources[mode], keys)
                runs[mode].append((seconds, raw, nbytes, viewer.layer.tiles.target_level))
        out = {}
        for mode, rs in runs.items():
            speed = sum(r[2] for r in rs) / sum(r[1] for r in rs)
            out[mode] = {
                "seconds": [r[0] for r in rs],
                "bounds": [r[2] / speed for r in rs],
                "bytes": [r[2] for r in rs],
                "levels": [r[3] for r in rs],
                "throughput": speed,
                "reused": reused[mode],
            }
        return out
    finally:
        for viewer, log in logs.items():
            viewer.close()
            log.close()
        ours.send("stop")
        server.join(10)


def figures(r: dict) -> list[Figure]:
    """Per mode: the median time to sharp against the median lower bound."""
    out = []
    for mode, m in r.items():
        seconds, bounds = m["seconds"], m["bounds"]
        levels = {lv: m["levels"].count(lv) for lv in sorted(set(m["levels"]))}
        out.append(
            Figure(
                section="time to sharp",
                name=f"time to sharp after a jump, {mode}",
                value=statistics.median(seconds),
                unit="s",
                reference="lower bound: visible bytes of the ideal level / pool throughput",
                reference_value=statistics.median(bounds),
                ratio=statistics.median(seconds) / statistics.median(bounds),
                spread=quartiles([s / b for s, b in zip(seconds, bounds, strict=True)]),
                higher_is_better=False,
                repeats=len(seconds),
                note=f"{len(seconds)} jumps at {W}x{H} (ideal levels {levels}), "
                f"{statistics.median(m['bytes']) / 1e6:.1f} MB visible (median); fresh "
                f"pools' throughput on the same chunks {m['throughput'] / 1e6:.1f} MB/s; "
                f"chunks a jump found already loaded: {m['reused']}",
            )
        )
    return out


def collect(quick: bool = False) -> list[Figure]:
    """The time-to-sharp figures (``quick``: 4 jumps instead of 20)."""
    return figures(measure(4 if quick else 20))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jumps", type=int, default=20)
    args = parser.parse_args()
    r = measure(args.jumps)
    for mode, m in r.items():
        print(f"{mode}: throughput {m['throughput'] / 1e6:.1f} MB/s; chunks reused {m['reused']}")
        for j, (s, b, level, nbytes) in enumerate(
            zip(m["seconds"], m["bounds"], m["levels"], m["bytes"], strict=True)
        ):
            print(
                f"  jump {j:2} level {level}: sharp {s:6.3f} s, bound {b:6.3f} s "
                f"({nbytes / 1e6:5.1f} MB) -> {s / b:5.1f}x"
            )
    for f in figures(r):
        q1, q3 = f.spread or (float("nan"), float("nan"))
        print(
            f"{f.name}: median {f.value:.3f} s, bound {f.reference_value:.3f} s, "
            f"ratio {f.ratio:.2f} (per jump {q1:.2f}..{q3:.2f})"
        )


if __name__ == "__main__":
    main()
