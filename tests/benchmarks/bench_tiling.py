"""Tiling benchmark: the cost of drawing a screen as N tiles instead of one texture.

One 1920 x 1080 uint8 noise image is written three times, one level each, with 256²
chunks (8 x 5 = 40 tiles fill the screen), 128² chunks (15 x 9 = 135 tiles) and one
1080 x 1920 chunk (one texture: the reference). Three offscreen viewers (1920 x 1080,
the viewer's own layers, materials and render path, on lavapipe) show their image at
1:1, settled. Then a frame (``viewer.screenshot()``: the frame's refresh, the render
pass and the read-back of the picture) is timed by each in turn, alternated
(``--repeats`` rounds, the order reversed every other round, after a few frames of
warm-up), so the machine's noise hits them alike; the tiled viewers' median over the
one texture's median is the cost of tiling itself (and per round, for the spread).
The refresh alone (handlers, tile bookkeeping, scene sync; nothing changes) is timed
too, apart, to say how much of a frame it is. Every picture is checked, pixel for
pixel, against the one texture's first: tiled, the screen must be the same (no seam,
no gap, no texel off); and the pixels that differ from the image itself are counted.

    python tests/benchmarks/bench_tiling.py [--repeats 40]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np

TESTS = pathlib.Path(__file__).resolve().parents[1]
for _path in (TESTS, TESTS.parent):  # support.*, and tests.benchmarks.* run as a script
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

from support.images import noise_image, write_pyramid  # noqa: E402

from tests.benchmarks.figures import Figure, quartiles  # noqa: E402
from viewer import Viewer  # noqa: E402

W, H = 1920, 1080
#: Name -> chunk shape; "one" is the reference, one texture of the whole screen.
LAYOUTS = {"256²": (256, 256), "128²": (128, 128), "one": (H, W)}


def open_viewers(root: pathlib.Path, image: np.ndarray) -> dict[str, Viewer]:
    """A settled viewer at 1:1 per layout, each showing ``image`` chunked its way."""
    viewers: dict[str, Viewer] = {}
    try:
        for name, chunks in LAYOUTS.items():
            path = write_pyramid(root / f"{chunks[0]}.ome.zarr", image, chunks=chunks, n_levels=1)
            viewer = Viewer(str(path.path), None, size=(W, H), show_hud=False, clim=(0, 255))
            viewers[name] = viewer
            viewer.show_region(0, 0, W, H)
            assert viewer.wait_settled(120), (name, viewer.layer.status())
    except BaseException:
        for viewer in viewers.values():
            viewer.close()
        raise
    return viewers


def measure(repeats: int, warmup: int = 3) -> dict:
    """Frame and refresh seconds per layout (lists, one per round), tiles drawn,
    whether every picture equals the one texture's first, and the most pixels of a
    picture that differ from the image."""
    image = noise_image((H, W), seed=21)
    with tempfile.TemporaryDirectory() as tmp:
        viewers = open_viewers(pathlib.Path(tmp), image)
        try:
            frames: dict[str, list[float]] = {name: [] for name in viewers}
            refreshes: dict[str, list[float]] = {name: [] for name in viewers}
            exact = dict.fromkeys(viewers, True)
            off_image = dict.fromkeys(viewers, 0)
            reference = viewers["one"].screenshot()
            for round_ in range(warmup + repeats):
                order = list(viewers) if round_ % 2 == 0 else list(viewers)[::-1]
                for name in order:
                    viewer = viewers[name]
                    t0 = time.perf_counter()
                    shot = viewer.screenshot()
                    t1 = time.perf_counter()
                    viewer.refresh()
                    t2 = time.perf_counter()
                    exact[name] &= bool((shot == reference).all())
                    off = int((shot != image[..., None]).any(axis=-1).sum())
                    off_image[name] = max(off_image[name], off)
                    if round_ >= warmup:
                        frames[name].append(t1 - t0)
                        refreshes[name].append(t2 - t1)
            tiles = {name: v.layer.status().loaded for name, v in viewers.items()}
        finally:
            for viewer in viewers.values():
                viewer.close()
    return {
        "frames": frames,
        "refreshes": refreshes,
        "tiles": tiles,
        "exact": exact,
        "off_image": off_image,
    }


def figures(r: dict) -> list[Figure]:
    """Per tiled layout: its frame time against the one texture's, same run."""
    one = r["frames"]["one"]
    out = []
    for name in ("256²", "128²"):
        tiled = r["frames"][name]
        ratios = [a / b for a, b in zip(tiled, one, strict=True)]
        refresh = statistics.median(r["refreshes"][name])
        same = r["exact"][name] and r["exact"]["one"]
        out.append(
            Figure(
                section="tiling",
                name=f"frame with {r['tiles'][name]} tiles of {name} / one texture",
                value=statistics.median(tiled) * 1e3,
                unit="ms",
                reference=f"one {W}x{H} texture ({r['tiles']['one']} tile), same run",
                reference_value=statistics.median(one) * 1e3,
                ratio=statistics.median(tiled) / statistics.median(one),
                spread=quartiles(ratios),
                higher_is_better=False,
                repeats=len(tiled),
                note=f"{W}x{H} offscreen on lavapipe, draw + read-back, alternated; "
                f"of it the refresh {refresh * 1e3:.2f} ms; pictures "
                + (
                    "pixel-identical to the one texture's (no seams)"
                    if same
                    else "NOT identical to the one texture's: seams or misplaced texels"
                )
                + f"; pixels off the image: {r['off_image'][name]} tiled, "
                f"{r['off_image']['one']} one texture",
            )
        )
    return out


def collect(quick: bool = False) -> list[Figure]:
    """The tiling figures (``quick``: 5 rounds instead of 40)."""
    return figures(measure(5 if quick else 40))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    r = measure(args.repeats)
    for name in LAYOUTS:
        f, s = r["frames"][name], r["refreshes"][name]
        print(
            f"{name:5} {r['tiles'][name]:4} tiles: frame median "
            f"{statistics.median(f) * 1e3:7.2f} ms (p90 {float(np.percentile(f, 90)) * 1e3:7.2f}),"
            f" refresh alone {statistics.median(s) * 1e3:5.2f} ms; same as one texture: "
            f"{r['exact'][name]}, pixels off the image {r['off_image'][name]}"
        )
    for fig in figures(r):
        q1, q3 = fig.spread or (float("nan"), float("nan"))
        print(f"{fig.name}: ratio {fig.ratio:.3f} (per round quartiles {q1:.3f}..{q3:.3f})")


if __name__ == "__main__":
    main()
