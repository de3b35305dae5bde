"""Time to first image: zarrscope beside napari and neuroglancer, in the same run.

Not run by CI. The peers live in their own virtual environment (never the project's):

    python3 -m venv .peers-venv        # in the clone, beside .venv
    .peers-venv/bin/pip install "napari[pyqt5]" neuroglancer selenium zarr aiohttp
    apt-get install chromium chromium-driver        # neuroglancer, headless

    python tests/benchmarks/bench_peers.py [--repeats 3] [--peers-python PYTHON]

Same data for all (the built-in sample, OME-Zarr 16384² x 2 channels, 256² chunks, OME
windows), same 1920 x 1080 view of the whole image, each run in a fresh process, runs
alternated; locally and over HTTP with 50 ms latency per request (``ZarrHTTPServer``
plus CORS headers, which a browser needs). Time to first image is from opening (the
viewer created, imports done) to the first screenshot with any non-black pixel:

- zarrscope: ``Viewer(source)`` offscreen on lavapipe (``bench_viewer``'s child), and
  a second viewer in the same process (device and pipelines made: the analogue of
  neuroglancer's figure, taken after its page and WebGL have loaded); with ``--main DIR``
  (another checkout, e.g. of an older commit) that checkout's as well, as "zarrscope@main";
- floor: the pool alone opening the image and loading its coarsest level, in a fresh
  process (``bench_viewer``'s floor child);
- napari: ``napari.Viewer()`` in a window under Xvfb (Mesa GL; with ``show=False`` or
  Qt's offscreen platform it never draws data here), ``add_image`` of the levels as a
  multiscale image with the OME windows, ``screenshot(canvas_only=True)``; and when
  its window was made (``napari.Viewer()`` alone);
- neuroglancer: headless Chromium (selenium; ``docker=True``: no sandbox, as root),
  software WebGL, on a ``neuroglancer.Viewer``; after its page has loaded, the layer
  ``zarr://URL`` is set, zoomed to show the whole image, and screenshots polled until a
  quarter of the centre is lit (its cross-hair and scale bar show without data; its
  default window leaves this image dim). Neuroglancer reads only over HTTP, so its
  "local" run reads the local server without latency. Its page load is not counted.

A peer that is not installed is reported as such (one line), and the others measured.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
from typing import TYPE_CHECKING

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))

from support.httpserver import ZarrHTTPServer, _Handler  # noqa: E402

if TYPE_CHECKING:
    from tests.benchmarks.figures import Figure

W, H = 1920, 1080
XVFB = ["xvfb-run", "-a", "-s", f"-screen 0 {W}x{H}x24"]

NAPARI = r"""
import json, sys, time
import numpy as np
import napari, zarr
src, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
opened = time.perf_counter()
group = zarr.open_group(src, mode="r")
attrs = group.attrs.asdict()
ome = attrs.get("ome", attrs)
levels = [group[d["path"]] for d in ome["multiscales"][0]["datasets"]]
channels = ome.get("omero", {}).get("channels", [])
windows = [(c["window"]["start"], c["window"]["end"]) for c in channels]
viewer = napari.Viewer(show=True)
viewer.window._qt_window.resize(w, h)
created = time.perf_counter() - opened
viewer.add_image(levels, multiscale=True, channel_axis=0, contrast_limits=windows or None,
                 blending="additive")
frames = 0
while True:
    frames += 1
    napari.qt.get_qapp().processEvents()
    shot = viewer.screenshot(canvas_only=True, size=(h, w))
    if np.asarray(shot)[..., :3].any():
        break
seconds = time.perf_counter() - opened
print(json.dumps({"first_image": seconds, "frames": frames, "viewer_created": created}))
viewer.close()
"""

NEUROGLANCER = r"""
import io, json, sys, time
import numpy as np
import neuroglancer, neuroglancer.webdriver
from PIL import Image
src, w, h = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
viewer = neuroglancer.Viewer()
driver = neuroglancer.webdriver.Webdriver(viewer, headless=True, browser="chrome",
                                          window_size=(w, h), docker=True, print_logs=False)
driver.driver.get(viewer.get_viewer_url())  # the page loads (not counted)
deadline = time.monotonic() + 60
while not driver.driver.execute_script("return !!window.viewer") and time.monotonic() < deadline:
    time.sleep(0.05)
opened = time.perf_counter()
with viewer.txn() as s:
    s.layers["image"] = neuroglancer.ImageLayer(source="zarr://" + src)
    s.layout = "xy"
    s.cross_section_scale = 16384 / h  # the whole image, as the others show it
frames = 0
while time.monotonic() < deadline + 120:
    frames += 1
    png = driver.driver.get_screenshot_as_png()
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    # the cross-hair and the scale bar are drawn without data: a quarter of the
    # centre's pixels lit is the image
    ph, pw = pixels.shape[:2]
    if pixels[ph // 4 : 3 * ph // 4, pw // 4 : 3 * pw // 4].any(axis=-1).mean() > 0.25:
        break
print(json.dumps({"first_image": time.perf_counter() - opened, "frames": frames}))
driver.driver.quit()
"""


class _CorsHandler(_Handler):
    """The test server's handler, with the CORS headers a browser asks for."""

    def end_headers(self) -> None:
        self.send_header("Access-Control-Allow-Origin", "*")
        self.send_header("Access-Control-Allow-Headers", "*")
        self.send_header("Access-Control-Expose-Headers", "*")
        super().end_headers()

    def do_OPTIONS(self) -> None:
        self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()


def peer_missing(python: pathlib.Path, module: str) -> str | None:
    """Why a peer cannot run (one line), or None."""
    if not python.exists():
        return f"{python} does not exist (see this file's docstring to install the peers)"
    check = subprocess.run([str(python), "-c", f"import {module}"], capture_output=True)
    if check.returncode:
        return f"{module} is not installed in {python}"
    if module == "neuroglancer" and not (
        pathlib.Path("/usr/bin/chromium").exists()
        and pathlib.Path("/usr/bin/chromedriver").exists()
    ):
        return "chromium / chromium-driver are not installed"
    return None


def run(command: list[str], env: dict[str, str]) -> dict:
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    if out.returncode:
        tail = (out.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"error": tail}
    return json.loads(out.stdout.strip().splitlines()[-1])


#: The peers' interpreter unless told otherwise (``--peers-python``, or the
#: environment's ``ZARRSCOPE_PEERS_PYTHON`` for the one-command run).
PEERS_PYTHON = ROOT / ".peers-venv" / "bin" / "python"


def measure(
    python: pathlib.Path, repeats: int, main: pathlib.Path | None = None
) -> dict[str, dict[str, list[dict]]]:
    """Per place ("local", "http 50 ms") and viewer: each run's result (its
    ``first_image`` seconds, or its ``error`` line), runs alternated, beside the floor
    (the pool loading the coarsest level) and, with ``main`` (another checkout), that
    checkout's viewer ("zarrscope@main"); a peer that is not installed is left out,
    with a line saying why."""
    from sample_data import ensure_sample

    path = ensure_sample()
    peers = {"napari": NAPARI, "neuroglancer": NEUROGLANCER}
    missing = {name: peer_missing(python, name) for name in peers}
    for name, why in missing.items():
        if why:
            print(f"{name}: not measured: {why}")
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QT_QPA_PLATFORM")}
    # selenium's manager would look for a browser online: use Debian's, offline
    base |= {"SE_OFFLINE": "true", "SE_CHROMEDRIVER": "/usr/bin/chromedriver"}
    ours_env = {**os.environ, "PYTHONPATH": str(ROOT)}
    bench_viewer = str(ROOT / "tests" / "benchmarks" / "bench_viewer.py")
    ours = {"zarrscope": ours_env}
    if main is not None:
        ours["zarrscope@main"] = {**os.environ, "PYTHONPATH": str(main)}
    measured = {}
    with ZarrHTTPServer(path.parent) as server:
        server.RequestHandlerClass = _CorsHandler
        url = f"{server.url}/{path.name}"
        for where, latency in (("local", 0.0), ("http 50 ms", 0.05)):
            server.latency = latency
            runs: dict[str, list[dict]] = {name: [] for name in [*ours, "floor"]}
            runs |= {name: [] for name in peers if not missing[name]}
            for _ in range(repeats):
                local = str(path) if latency == 0 else url
                for name, env in ours.items():
                    child = [sys.executable, bench_viewer, "--child-image", local]
                    runs[name].append(run(child, env))
                runs["floor"].append(
                    run([sys.executable, bench_viewer, "--child-floor", local], ours_env)
                )
                for name in runs:
                    if name not in peers:
                        continue
                    src = url if name == "neuroglancer" else local
                    command = [str(python), "-c", peers[name], src, str(W), str(H)]
                    if name == "napari":
                        command = [*XVFB, *command]
                    runs[name].append(run(command, base))
            measured[where] = runs
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peers-python", type=pathlib.Path, default=PEERS_PYTHON)
    parser.add_argument(
        "--main", type=pathlib.Path, default=None, help="another checkout to compare with"
    )
    args = parser.parse_args()
    for where, runs in measure(args.peers_python, args.repeats, args.main).items():
        for name, results in runs.items():
            times = [r["first_image"] for r in results if "error" not in r]
            errors = [r["error"] for r in results if "error" in r]
            if times:
                print(
                    f"first image, {where}, {name}: median {statistics.median(times):.3f} s "
                    f"of {len(times)} ({', '.join(f'{t:.2f}' for t in times)})"
                )
            for key, what in (("again", "a second viewer"), ("viewer_created", "window")):
                extra = [r[key] for r in results if key in r]
                if extra:
                    print(f"  {name}: {what} {statistics.median(extra):.3f} s (median)")
            if errors:
                print(f"first image, {where}, {name}: {len(errors)} failed: {errors[0]}")


if __name__ == "__main__":
    main()


def collect(quick: bool = False) -> list[Figure]:
    """Our time to first image beside napari's and neuroglancer's, locally and over
    HTTP with 50 ms latency (ratio ours / peer's, per alternated run; goal <= 1.0).
    Nothing, with a line saying so, when the peers' interpreter is not there
    (``ZARRSCOPE_PEERS_PYTHON``, default ``.peers-venv/bin/python``)."""
    from tests.benchmarks.figures import Figure, quartiles

    python = pathlib.Path(os.environ.get("ZARRSCOPE_PEERS_PYTHON") or PEERS_PYTHON)
    if not python.exists():
        print(f"bench_peers: no peers' python at {python}: nothing measured")
        return []
    repeats = 1 if quick else 3
    figures = []
    for where, runs in measure(python, repeats).items():
        ours = [r.get("first_image") for r in runs["zarrscope"]]
        for name, results in runs.items():
            if name not in ("napari", "neuroglancer"):
                continue
            theirs = [r.get("first_image") for r in results]
            pairs = [(a, b) for a, b in zip(ours, theirs, strict=True) if a and b]
            errors = [r["error"] for r in results if "error" in r]
            if not pairs:
                print(f"bench_peers: {name}, {where}: no run succeeded: {errors[:1]}")
                continue
            mine = statistics.median(a for a, _ in pairs)
            peer = statistics.median(b for _, b in pairs)
            note = "fresh process per run, 1920 x 1080, the built-in sample"
            if name == "neuroglancer":
                note += "; its page load not counted; it reads the local case over HTTP"
            if errors:
                note += f"; {len(errors)} of its runs failed: {errors[0]}"
            figures.append(
                Figure(
                    "first image against the peers",
                    f"time to first image, {where}",
                    mine,
                    "s",
                    name,
                    peer,
                    mine / peer,
                    quartiles([a / b for a, b in pairs]),
                    1.0,
                    False,
                    len(pairs),
                    note,
                )
            )
    return figures
