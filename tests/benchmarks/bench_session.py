"""Session benchmark: peak RSS, pool memory and texture bytes over a long random session,
against their budgets.

A (t=3, c=3, z=4, 1024², 128² chunks, 4 levels; t=2, z=2 with ``--quick``) uint16 OME-
Zarr (smooth ramps: zstd makes it small on disk) and a (1024², 128² chunks, 2 levels)
uint32 labels image are written to a temporary folder by a child process (this script,
so that writing them leaves nothing in this process's memory). One offscreen viewer (400
x 300) shows both under one pool memory budget (``--memory``, MiB: the image's and the
labels' pools together) and one texture budget (``--textures``, MiB), both far below
what the session touches (about 75 MiB of level-0 chunks), and is moved ``--moves``
times at random with the soak test's driver (:class:`support.moves.RandomMoves`: pans,
zooms, z and t steps, channel and layer switches). After each move the view is refreshed
until settled and drawn.

Reported: the peak texture bytes (the viewer's texture budget's count of textures in
scenes and spares, after each frame, and its ``peak_bytes``, which also sees the
moment within a frame before the budget is enforced) against the texture budget; the
peak pool memory (``MemoryBudget.used``: every chunk held or cached, with its
overhead, and the reservations of loads in flight) against the memory budget; and
the peak resident set size (sampled every 5 ms by a thread) grown over the baseline,
against the sum of the two budgets. The baseline is the RSS just before the session's
viewer opens, after a warm-up viewer (another, 256² image) has drawn a frame and
closed, so the GPU device, its first pipelines and the imports are in it; the growth
also holds what no budget counts (decoding buffers, Python objects, the allocator's
free lists, lavapipe's own copies of textures).

    python tests/benchmarks/bench_session.py [--moves 1000] [--memory 12] [--textures 12]
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]
for _path in (TESTS, TESTS.parent):  # support.*, and tests.benchmarks.* run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support.images import noise_image, write_pyramid  # noqa: E402
from support.moves import RandomMoves  # noqa: E402

from chunkpool import MemoryBudget  # noqa: E402
from tests.benchmarks.figures import Figure  # noqa: E402
from viewer import TextureBudget, Viewer  # noqa: E402

SHAPE = (3, 3, 4, 1024, 1024)  # (t, c, z, y, x)
QUICK_SHAPE = (2, 3, 2, 1024, 1024)  # for quick runs: a third of the chunks to write
CHUNK = 128
CANVAS = (400, 300)
#: The pool budget (MiB): far below what the session touches, yet room for the most a
#: view of CANVAS can need at once (up to 8 x 6 tiles of each of three channels and of
#: the labels, about 7.7 MiB, and the coarser tiles standing in), else it never settles.
MEMORY_MIB = 16.0
#: The texture budget (MiB): below what the textures of the tiles held take unbounded
#: (about 8.8 MiB over the 1000 moves), so that hidden textures are evicted, and above
#: what the visible ones alone need at most (about 5.3 MiB): a view whose visible tiles
#: need more goes over it (the budget never makes holes).
TEXTURES_MIB = 6.0
KINDS = ("pan", "zoom", "z", "t", "channel", "layer", "cursor")
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def write_images(root: str, shape: tuple[int, ...]) -> None:
    """(In a child process.) The image of ``shape``, its labels and the warm-up image,
    under ``root``."""
    t, c, z, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    data = np.empty(shape, np.uint16)
    for it in range(t):
        for ic in range(c):
            for iz in range(z):
                data[it, ic, iz] = (yy * (ic + 1) + xx * (iz + 2) + 97 * it) % 4096
    write_pyramid(
        pathlib.Path(root) / "img.ome.zarr",
        data,
        chunks=(1, 1, 1, CHUNK, CHUNK),
        n_levels=4,
        axes=["t", "c", "z", "y", "x"],
    )
    ids = ((yy // 48) * 64 + xx // 48).astype(np.uint32)
    write_pyramid(pathlib.Path(root) / "labels.ome.zarr", ids, chunks=(CHUNK, CHUNK), n_levels=2)
    write_pyramid(
        pathlib.Path(root) / "warm.ome.zarr", noise_image((256, 256)), chunks=(64, 64), n_levels=1
    )


def rss() -> int:
    """This process's resident set size, bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRss:
    """Samples the RSS every 5 ms on a thread of its own until stopped; the peak."""

    def __init__(self) -> None:
        self.peak = rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        self.peak = max(self.peak, rss())
        return self.peak


def session(root: pathlib.Path, moves: int, memory_mib: float, textures_mib: float) -> dict:
    """Run the session; its peaks, the budgets and a few counts."""
    warm = Viewer(str(root / "warm.ome.zarr"), None, size=CANVAS, show_hud=False)
    assert warm.wait_settled(120)
    warm.screenshot()
    warm.close()
    memory = MemoryBudget(int(memory_mib * MIB))
    textures = TextureBudget(int(textures_mib * MIB))
    baseline = rss()
    sampler = PeakRss()
    viewer = Viewer(
        str(root / "img.ome.zarr"),
        None,
        size=CANVAS,
        show_hud=False,
        clim=(0, 4095),
        memory_budget=memory,
        texture_budget=textures,
    )
    try:
        viewer.add_labels(str(root / "labels.ome.zarr"))
        move_at_random = RandomMoves(
            viewer, np.random.default_rng(3), KINDS, extent=float(SHAPE[-1])
        )
        peak_memory = peak_textures = 0
        unsettled = over = evictable = 0
        started = time.perf_counter()
        for _ in range(moves):
            move_at_random()
            unsettled += not viewer.wait_settled(60)
            viewer.screenshot()
            peak_memory = max(peak_memory, memory.used)
            used = textures.scene_bytes + textures.spare_bytes
            peak_textures = max(peak_textures, used)
            if used > textures.nbytes:  # allowed only when nothing hidden is left to evict
                over += 1
                evictable += sum(1 for layer in viewer.layers for _ in layer.eviction_candidates())
        seconds = time.perf_counter() - started
        releases = sum(layer.pool.stats.budget_releases for layer in viewer.layers)
        loads = sum(layer.pool.stats.loads for layer in viewer.layers)
    finally:
        viewer.close()
    peak_rss = sampler.stop()
    return {
        "moves": moves,
        "seconds": seconds,
        "memory_budget": memory.limit,
        "texture_budget": textures.nbytes,
        "peak_memory": peak_memory,
        "peak_textures": peak_textures,
        "texture_peak_bytes": textures.peak_bytes,
        "baseline_rss": baseline,
        "peak_rss": peak_rss,
        "releases": releases,
        "loads": loads,
        "unsettled": unsettled,
        "over": over,
        "evictable": evictable,
        "counts": move_at_random.counts,
    }


def measure(moves: int, memory_mib: float, textures_mib: float, shape: tuple[int, ...]) -> dict:
    """Write the images, run the session on them."""
    with tempfile.TemporaryDirectory() as tmp:
        shape_arg = ",".join(map(str, shape))
        subprocess.run(
            [sys.executable, __file__, "--write-images", tmp, "--shape", shape_arg],
            check=True,
            timeout=600,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        return session(pathlib.Path(tmp), moves, memory_mib, textures_mib)


def figures(r: dict) -> list[Figure]:
    """The three figures of one session."""
    n = r["moves"]
    common = (
        f"{n} random moves ({r['seconds']:.0f} s, {r['loads']} loads, "
        f"{r['unsettled']} not settled within 60 s)"
    )
    budgets = r["memory_budget"] + r["texture_budget"]
    return [
        Figure(
            section="session",
            name="peak texture bytes / texture budget",
            value=r["peak_textures"] / MIB,
            unit="MiB",
            reference="texture budget",
            reference_value=r["texture_budget"] / MIB,
            ratio=r["peak_textures"] / r["texture_budget"],
            goal=1.0,
            higher_is_better=False,
            note=f"{common}; after each frame; within a frame, before the budget is "
            f"enforced, {r['texture_peak_bytes'] / MIB:.2f} MiB; frames over the budget "
            f"{r['over']} (the visible textures alone: hidden ones left to evict then "
            f"{r['evictable']})",
        ),
        Figure(
            section="session",
            name="peak pool memory / pool budget",
            value=r["peak_memory"] / MIB,
            unit="MiB",
            reference="memory budget (image and labels pools)",
            reference_value=r["memory_budget"] / MIB,
            ratio=r["peak_memory"] / r["memory_budget"],
            goal=1.0,
            higher_is_better=False,
            note=f"{common}; {r['releases']} chunks released by the budget",
        ),
        Figure(
            section="session",
            name="peak RSS growth / sum of the budgets",
            value=(r["peak_rss"] - r["baseline_rss"]) / MIB,
            unit="MiB",
            reference="memory budget + texture budget",
            reference_value=budgets / MIB,
            ratio=(r["peak_rss"] - r["baseline_rss"]) / budgets,
            higher_is_better=False,
            note=f"{common}; growth over the RSS just before the viewer opened "
            f"({r['baseline_rss'] / MIB:.0f} MiB, after a warm-up viewer drew and closed), "
            "sampled every 5 ms; it includes what no budget counts",
        ),
    ]


def collect(quick: bool = False) -> list[Figure]:
    """The session's figures (``quick``: 100 moves instead of 1000, fewer slices)."""
    if quick:
        return figures(measure(100, MEMORY_MIB, TEXTURES_MIB, QUICK_SHAPE))
    return figures(measure(1000, MEMORY_MIB, TEXTURES_MIB, SHAPE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--moves", type=int, default=1000)
    parser.add_argument("--memory", type=float, default=MEMORY_MIB, help="MiB")
    parser.add_argument("--textures", type=float, default=TEXTURES_MIB, help="MiB")
    parser.add_argument("--quick", action="store_true", help="fewer slices (t=2, z=2)")
    parser.add_argument("--write-images", help=argparse.SUPPRESS)  # the child's part
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write_images:
        write_images(args.write_images, tuple(int(n) for n in args.shape.split(",")))
        return
    r = measure(args.moves, args.memory, args.textures, QUICK_SHAPE if args.quick else SHAPE)
    print(
        f"{r['moves']} moves in {r['seconds']:.1f} s ({r['counts']}); {r['loads']} loads, "
        f"{r['releases']} released by the budget, {r['unsettled']} moves not settled in 60 s"
    )
    for f in figures(r):
        print(
            f"{f.name:40} {f.value:8.2f} {f.unit} / {f.reference_value:6.2f} {f.unit} "
            f"= {f.ratio:.3f} (goal {'<= ' + str(f.goal) if f.goal else 'none'})"
        )


if __name__ == "__main__":
    main()
