"""Playback benchmark: t played at 5 fps (``--fps``) over HTTP with 50 ms latency.

A (t=50, 2048², 256² chunks) uint16 image is served from another process by the test
HTTP server with 50 ms added latency; an offscreen viewer (1024 x 1024, the whole image:
level 1, 16 tiles a slice) plays t. Reported: in smooth mode, the fraction of slices
complete at the target level when left, with the prefetch of slices ahead and without it
(the reference, same run); in sharp mode, the achieved frame rate, with and without
prefetch, against the target; and the over-fetch (as in bench_motion.py): of the loads
that finished during the playback (the viewer's pool's per-chunk records), those whose
chunk no frame showed afterwards (``Tile.shown`` at a refresh after the load was
delivered; the playback goes on for ``GRACE_FRAMES`` more frames, so that what was
prefetched by the end gets its turn to be shown). The viewer is refreshed every 10 ms
(no rendering: lavapipe's frame time is not the point here). Each setting plays
``--repeats`` times, the settings in turn (medians over the repeats).

    python tests/benchmarks/bench_playback.py [--seconds 10] [--fps 5] [--repeats 2]
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
from dataclasses import dataclass
from typing import Any

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]
for _path in (TESTS, TESTS.parent):  # support.*, and tests.benchmarks.* run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support.httpserver import ZarrHTTPServer  # noqa: E402
from support.images import write_pyramid  # noqa: E402

from chunkpool.kpi import KpiLog  # noqa: E402
from tests.benchmarks.figures import Figure  # noqa: E402
from viewer import Viewer  # noqa: E402
from viewer.playback import MAX_DEPTH  # noqa: E402

T, SIDE, CHUNK = 50, 2048, 256
#: Frames played on after the measured time, so that the slices prefetched by its end
#: have been shown (the loads finished after the end are not counted).
GRACE_FRAMES = MAX_DEPTH + 2


def write_image(root: pathlib.Path, slices: int = T) -> pathlib.Path:
    """An OME-Zarr (t, y, x) pyramid of two levels: level 1 is what the fitted view shows."""
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    data = np.stack([((yy + xx * (t + 1)) % 4096).astype(np.uint16) for t in range(slices)])
    return write_pyramid(
        root / "t.ome.zarr", data, chunks=(1, CHUNK, CHUNK), n_levels=2, axes=["t", "y", "x"]
    ).path


def serve(root: str, conn: Any) -> None:
    with ZarrHTTPServer(root, latency=0.05) as server:
        conn.send(server.url)
        conn.recv()  # until told to stop


@dataclass
class Played:
    """One playback: its frames, and the loads that finished while it played."""

    frames: int
    complete_fraction: float
    achieved_fps: float
    loads: int
    unseen: int  # of them, chunks no frame showed after the load finished

    @property
    def over_fetch(self) -> float:
        return self.unseen / self.loads if self.loads else 0.0


def play(url: str, mode: str, fps: float, seconds: float, prefetch: bool) -> Played:
    log = KpiLog(capacity=1 << 16)  # every load of the playback
    viewer = Viewer(url, None, size=(1024, 1024), show_hud=False, clim=(0, 4095), t=0, kpi_log=log)
    try:
        viewer.fit()
        assert viewer.wait_settled(120)
        started = time.perf_counter()
        playback = viewer.play("t", fps=fps, mode=mode, prefetch=prefetch)
        last_shown: dict[tuple[int, tuple[int, ...]], float] = {}
        pause = threading.Event()
        end = started + seconds
        measured: tuple[int, float, float] | None = None  # the playback's, up to the end
        while (now := time.perf_counter()) < end + GRACE_FRAMES / fps:
            if now >= end and measured is None:
                measured = (playback.frames, playback.complete_fraction, playback.achieved_fps)
            viewer.refresh()
            shown = time.perf_counter()
            for tile in viewer.layer.tiles.tiles():
                if tile.shown:
                    last_shown[(tile.chunk.level, tuple(tile.chunk.index))] = shown
            pause.wait(0.01)
        finished = [
            r
            for r in log.records()
            if r.state == "loaded" and r.delivered is not None and started <= r.delivered <= end
        ]
        unseen = sum(
            1 for r in finished if last_shown.get((r.level, tuple(r.index)), -1.0) < r.delivered
        )
        assert measured is not None
        return Played(*measured, len(finished), unseen)
    finally:
        viewer.close()
        log.close()


SETTINGS = [(mode, prefetch) for mode in ("smooth", "sharp") for prefetch in (True, False)]


def measure(
    fps: float, seconds: float, repeats: int, slices: int = T
) -> dict[tuple[str, bool], list[Played]]:
    """Every setting (mode, prefetch) played ``repeats`` times, in turn, on an image of
    ``slices`` time points."""
    with tempfile.TemporaryDirectory() as tmp:
        source = write_image(pathlib.Path(tmp), slices)
        ours, theirs = multiprocessing.Pipe()
        server = multiprocessing.Process(target=serve, args=(tmp, theirs), daemon=True)
        server.start()
        url = ours.recv() + "/" + source.name
        runs: dict[tuple[str, bool], list[Played]] = {s: [] for s in SETTINGS}
        try:
            for r in range(repeats):
                for mode, prefetch in SETTINGS if r % 2 == 0 else SETTINGS[::-1]:
                    runs[mode, prefetch].append(play(url, mode, fps, seconds, prefetch))
        finally:
            ours.send("stop")
            server.join(10)
        return runs


def figures(
    runs: dict[tuple[str, bool], list[Played]], fps: float, seconds: float, slices: int = T
) -> list[Figure]:
    """Smooth mode's frames at the target level with prefetch against without; sharp
    mode's frame rate against the target; the over-fetch of both with prefetch."""

    def med(setting: tuple[str, bool], what: str) -> float:
        return statistics.median(getattr(p, what) for p in runs[setting])

    n = len(runs["smooth", True])
    setup = f"t={slices} {SIDE}² uint16, 256² chunks, HTTP 50 ms, {fps:g} fps, {seconds:g} s a play"
    with_ = med(("smooth", True), "complete_fraction")
    without = med(("smooth", False), "complete_fraction")
    sharp = med(("sharp", True), "achieved_fps")
    out = [
        Figure(
            section="playback",
            name="smooth: frames complete at the target level, prefetch / none",
            value=with_,
            unit="fraction",
            reference="the same without the prefetch of slices ahead, same run",
            reference_value=without,
            ratio=with_ / without if without > 0 else None,
            repeats=n,
            note=setup + ("" if without > 0 else "; none complete without prefetch: no ratio"),
        ),
        Figure(
            section="playback",
            name="sharp: achieved fps / target fps",
            value=sharp,
            unit="fps",
            reference="target fps",
            reference_value=fps,
            ratio=sharp / fps,
            repeats=n,
            note=f"{setup}; with prefetch; without it "
            f"{med(('sharp', False), 'achieved_fps'):.2f} fps",
        ),
    ]
    for mode in ("smooth", "sharp"):
        unseen, loads = med((mode, True), "unseen"), med((mode, True), "loads")
        out.append(
            Figure(
                section="over-fetch",
                name=f"over-fetch during playback, {mode}",
                value=unseen,
                unit="loads",
                reference="all loads finished during the playback",
                reference_value=loads,
                ratio=med((mode, True), "over_fetch"),
                goal=0.10,
                higher_is_better=False,
                repeats=n,
                note=f"{setup}; with prefetch; a load is over-fetched when no frame after it "
                "finished showed its chunk",
            )
        )
    return out


def collect(quick: bool = False) -> list[Figure]:
    """The playback figures (``quick``: one 2 s play of each setting on 20 slices, which
    it does not go round, instead of two of 10 s on 50)."""
    fps, seconds, repeats, slices = (5.0, 2.0, 1, 20) if quick else (5.0, 10.0, 2, T)
    return figures(measure(fps, seconds, repeats, slices), fps, seconds, slices)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--fps", type=float, default=5.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    runs = measure(args.fps, args.seconds, args.repeats)
    for (mode, prefetch), plays in runs.items():
        for p in plays:
            print(
                f"{mode:6} prefetch {'on ' if prefetch else 'off'}: {p.frames} slices, "
                f"{p.complete_fraction * 100:5.1f}% complete at the target level, "
                f"{p.achieved_fps:.2f} fps; {p.loads} loads, over-fetch {p.over_fetch * 100:4.1f}%"
            )
    for f in figures(runs, args.fps, args.seconds):
        ratio = "none" if f.ratio is None else f"{f.ratio:.3f}"
        print(f"{f.name}: {f.value:.3f} {f.unit} vs {f.reference_value:.3f} -> ratio {ratio}")


if __name__ == "__main__":
    main()
