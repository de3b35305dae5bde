"""First image sooner (issue 10 §1): contrast windows that never block the first frame,
and the GPU start-up warm-ups of :mod:`viewer.startup`.

The window logic is pure (no GPU): :func:`window_change` against a dense numeric
evaluation, :class:`AutoWindow`'s stages. The rendering test holds every chunk read at
a gate, and checks by counting reads (no timing) that the first frame is drawn before
any chunk arrived, that data shows from the first chunks on while the rest still loads,
and that the settled picture is the one an explicit window gives.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zarr
from hypothesis import given
from hypothesis import strategies as st
from support.images import noise_image, write_pyramid
from test_render import gated, settle  # noqa: F401 (the gated fixture)

from viewer import Viewer
from viewer.display import (
    WINDOW_JUMP_TOLERANCE,
    AutoWindow,
    percentile_window,
    provisional_window,
    window_change,
)
from viewer.startup import short_switch_interval

ROOT = pathlib.Path(__file__).resolve().parent.parent


def fresh_process(script: str, *args: str, cache: pathlib.Path | None = None) -> Any:
    """Run ``script`` in a fresh Python (this checkout on its path; ``cache``: its
    ``XDG_CACHE_HOME``) and return the JSON of its last line of output."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if cache is not None:
        env["XDG_CACHE_HOME"] = str(cache)
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- pure: how far a window change moves any pixel --------------------------------------


def dense_change(old: tuple[float, float], new: tuple[float, float]) -> float:
    """The oracle: the largest shade change over many values across both windows."""
    lo = min(old[0], new[0]) - 1
    hi = max(old[1], new[1]) + 1
    values = np.concatenate([np.linspace(lo, hi, 20001), np.array([*old, *new])])

    def shade(window: tuple[float, float]) -> np.ndarray:
        return np.clip((values - window[0]) / (window[1] - window[0]), 0, 1)

    return float(np.abs(shade(old) - shade(new)).max())


windows = st.tuples(
    st.floats(-1e4, 1e4, allow_nan=False), st.floats(1e-2, 1e4, allow_nan=False)
).map(lambda p: (p[0], p[0] + p[1]))


@given(windows, windows)
def test_window_change_is_the_largest_shade_change(
    old: tuple[float, float], new: tuple[float, float]
) -> None:
    assert window_change(old, new) == pytest.approx(dense_change(old, new), abs=1e-9)


def test_barely_moving_means_two_display_steps() -> None:
    window = (100.0, 1100.0)  # 1000 wide: 2/255 of it is ~7.8
    assert window_change(window, window) == 0
    assert window_change(window, (105.0, 1105.0)) <= WINDOW_JUMP_TOLERANCE
    assert window_change(window, (100.0, 1107.0)) <= WINDOW_JUMP_TOLERANCE
    assert window_change(window, (110.0, 1100.0)) > WINDOW_JUMP_TOLERANCE
    assert window_change(window, (100.0, 1000.0)) > WINDOW_JUMP_TOLERANCE
    assert window_change(window, (5000.0, 6000.0)) == 1.0  # every pixel flips


def test_provisional_windows() -> None:
    assert provisional_window(np.dtype(np.uint8)) == (0, 255)
    assert provisional_window(np.dtype(np.int16)) == (-32768, 32767)
    assert provisional_window(np.dtype(np.float32)) == (0, 1)
    assert provisional_window(np.dtype(np.bool_)) == (0, 1)


# -- pure: the stages of a window from the data ---------------------------------------


def ramp(lo: float, hi: float) -> np.ndarray:
    return np.linspace(lo, hi, 4096).reshape(64, 64)


def test_the_first_planes_set_the_window_and_a_complete_sample_refines_it_once() -> None:
    auto = AutoWindow()
    start = provisional_window(np.dtype(np.uint16))
    assert auto.update(start, [], complete=False) is None  # nothing loaded yet
    first = auto.update(start, [ramp(0, 1000)], complete=False)
    assert first == percentile_window(ramp(0, 1000)) and auto.stage == "first"
    assert auto.update(first, [ramp(0, 1000), ramp(0, 1200)], complete=False) is None
    planes = [ramp(0, 1000), ramp(2000, 4000)]
    refined = auto.update(first, planes, complete=True)
    assert refined == percentile_window(np.concatenate([p.ravel() for p in planes]))
    assert auto.final
    assert auto.update(refined, [ramp(0, 10)], complete=True) is None  # once only


def test_a_refinement_that_barely_moves_keeps_the_window() -> None:
    auto = AutoWindow()
    first = auto.update((0, 65535), [ramp(0, 1000)], complete=False)
    assert first is not None
    # the full sample's window moves each end by ~0.2% of the width: kept
    later = auto.update(first, [ramp(0, 1000), ramp(1, 1002)], complete=True)
    assert later is None and auto.final
    assert window_change(first, percentile_window(np.r_[ramp(0, 1000), ramp(1, 1002)])) > 0


def test_a_sample_complete_at_once_is_one_change() -> None:
    auto = AutoWindow()
    assert auto.update((0, 255), [ramp(10, 20)], complete=True) == percentile_window(ramp(10, 20))
    assert auto.final


# -- rendering: the first frame waits for nothing --------------------------------------


def quadrant_image() -> np.ndarray:
    """512² uint16: noise whose level rises by quadrant, so the first coarse chunk's
    window differs from the whole level's."""
    noise = noise_image((512, 512), seed=7).astype(np.uint16)
    gain = np.ones((512, 512), np.uint16)
    gain[:256, 256:], gain[256:, :256], gain[256:, 256:] = 4, 16, 64
    return noise * gain


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` (a signal the test cannot wait on directly) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)


@pytest.mark.render
def test_first_frame_before_any_chunk_then_windows_from_the_data(
    tmp_path: pathlib.Path,
    gated: Callable[..., zarr.Group],  # noqa: F811 (the fixture imported above)
) -> None:
    """No OME window: the viewer opens and draws its first frame while every chunk
    read is held (before, it waited for a contrast sample); data shows from the first
    chunks on, while the rest still loads; the settled picture equals a viewer given
    the final window explicitly, and that window is the coarse level's (refined once
    from the first chunks' unless it barely moved)."""
    pyramid = write_pyramid(tmp_path / "q.ome.zarr", quadrant_image(), chunks=(64, 64), n_levels=3)
    group = gated(pyramid)
    rec = group.store.rec
    rec.hold()
    size = (160, 160)  # the whole 512² image: level 2 (128², 2 x 2 chunks) is the target
    viewer = Viewer(group, None, size=size, colormap="gray", show_hud=False)
    reference = None
    try:
        first = viewer.screenshot()
        assert rec.finished == [], "a chunk was read before the first frame"
        assert not first.any(), "the first frame shows nothing yet: black"
        assert viewer.layer.displays[0].clim == provisional_window(np.dtype(np.uint16))

        shown = None
        while shown is None:  # let reads through one at a time until data shows
            done = len(rec.finished)
            rec.release(1)
            wait_for(lambda done=done: len(rec.finished) > done, "a released read")
            image = viewer.screenshot()
            if image.any():
                shown = image
        assert len(rec.finished) < 4, "all of the coarse level was needed to draw"
        assert not viewer.settled()
        early = viewer.layer.displays[0].clim
        assert early != provisional_window(np.dtype(np.uint16))

        rec.open_gate()
        got = settle(viewer)
        full = percentile_window(pyramid.levels[-1])
        expected = full if window_change(early, full) > WINDOW_JUMP_TOLERANCE else early
        assert viewer.layer.displays[0].clim == expected
        reference = Viewer(
            str(pyramid.path), None, size=size, colormap="gray", clim=expected, show_hud=False
        )
        assert (settle(reference) == got).all()
        assert got.any()
    finally:
        viewer.close()
        if reference is not None:
            reference.close()


@pytest.mark.render
def test_user_window_is_kept_while_data_arrives(
    tmp_path: pathlib.Path,
    gated: Callable[..., zarr.Group],  # noqa: F811 (the fixture imported above)
) -> None:
    """A window set before the data arrives is never replaced by the estimate."""
    pyramid = write_pyramid(tmp_path / "q.ome.zarr", quadrant_image(), chunks=(64, 64), n_levels=3)
    group = gated(pyramid)
    group.store.rec.hold()
    viewer = Viewer(group, None, size=(160, 160), colormap="gray", show_hud=False)
    try:
        viewer.screenshot()
        d = viewer.layer.displays[0]
        viewer.layer.set_display(d.with_clim(10, 20))
        group.store.rec.open_gate()
        settle(viewer)
        assert viewer.layer.displays[0].clim == (10, 20)
    finally:
        viewer.close()


@pytest.mark.render
def test_the_view_asks_for_its_own_level_after_a_frame_drew_the_coarsest(
    tmp_path: pathlib.Path,
    gated: Callable[..., zarr.Group],  # noqa: F811 (the fixture imported above)
) -> None:
    """Opened in a viewer, an image's coarsest level is asked for first and alone: the
    view's own level is asked for by the frame after the one that drew the coarsest
    (its reads, decoding and uploads would compete with that frame), and a frame that
    finds nothing to draw yet asks for nothing more. The coarse frame is exactly the
    coarsest level's picture; the settled one, the view's own level's. Counted by
    reads held at a gate, no timing."""
    pyramid = write_pyramid(tmp_path / "q.ome.zarr", quadrant_image(), chunks=(64, 64), n_levels=3)
    group = gated(pyramid)
    rec = group.store.rec
    rec.hold()
    size = (512, 512)  # 1:1, level 0 (8 x 8 chunks) is the view's; level 2 has 2 x 2
    options: dict[str, Any] = {"colormap": "gray", "clim": (0, 20000), "show_hud": False}
    viewer = Viewer(group, None, size=size, **options)
    coarse = reference = None

    def levels_read() -> set[str]:
        with rec.lock:
            return {key.split("/")[0] for key in rec.started}

    try:
        rec.wait_started(4)  # the coarsest level's 4 chunks, asked for by the constructor
        assert not viewer.screenshot().any(), "nothing has arrived: black"
        assert levels_read() == {"2"}, "a frame with nothing to draw asked for more"
        assert viewer.layer.target_level == 0 and not viewer.settled()
        rec.release(4)
        # a read that finished is not yet a load published: wait for the pool (else the
        # next frame finds nothing to draw yet, as a live window's would, and waits on)
        pool = viewer.layer.pool
        wait_for(lambda: pool.stats.loads == 4, "the coarsest level's loads")
        assert levels_read() == {"2"}
        shown = viewer.screenshot()  # draws the coarsest level...
        assert levels_read() == {"2"}, "the coarse frame competed with level 0's reads"
        viewer.screenshot()  # ...and the next frame asks for level 0
        rec.wait_started(5)
        assert levels_read() == {"0", "2"}
        rec.open_gate()
        got = settle(viewer)
        assert viewer.layer.target_level == 0
        coarse = Viewer(str(pyramid.path), None, size=size, bias=1e6, **options)
        assert coarse.layer.target_level == 2
        assert (settle(coarse) == shown).all(), "the coarse frame is the coarsest level's"
        reference = Viewer(str(pyramid.path), None, size=size, **options)
        assert (settle(reference) == got).all()
        assert not (got == shown).all()
    finally:
        for made in (viewer, coarse, reference):
            if made is not None:
                made.close()


# -- the GPU start-up warm-ups (in a fresh process: nothing parsed or compiled yet) ---


def test_the_short_switch_interval_is_shared_and_restored_by_the_last_block() -> None:
    """The GPU start-up thread's shorter GIL switch interval: blocks in several threads
    share it, and the interval from before comes back when the last one ends."""
    before = sys.getswitchinterval()
    entered, leave, left = threading.Event(), threading.Event(), threading.Event()

    def other() -> None:
        with short_switch_interval(0.001):
            entered.set()
            leave.wait(10)
        left.set()

    thread = threading.Thread(target=other)
    thread.start()
    try:
        assert entered.wait(10)
        assert sys.getswitchinterval() == pytest.approx(0.001)
        with short_switch_interval(0.001):
            leave.set()
            assert left.wait(10)
            assert sys.getswitchinterval() == pytest.approx(0.001)  # still one block in
        assert sys.getswitchinterval() == before
    finally:
        leave.set()
        thread.join(10)
        sys.setswitchinterval(before)


_PROBE = r"""
import json, numpy as np
from wgpu.backends.wgpu_native._ffi import ffi
from viewer.startup import warm_wgpu_types, wgpu_type_strings
import pygfx as gfx
from rendercanvas.offscreen import RenderCanvas
warmed = warm_wgpu_types()
after_warm = dict(ffi._parsed_types)
# the warmed types are the ones cffi itself makes: parse some again its own way
same = []
for text in ["WGPUTextureDescriptor *", "char []", "WGPUColor *"]:
    cached, _ = ffi._parsed_types.pop(text)
    same.append(ffi.typeof(text) is cached)
canvas = RenderCanvas(size=(64, 64), pixel_ratio=1)
renderer = gfx.WgpuRenderer(canvas)
scene = gfx.Scene()
scene.add(gfx.Background.from_color("#000"))
data = np.zeros((8, 8), np.uint16)
image = gfx.Image(gfx.Geometry(grid=gfx.Texture(data, dim=2)), gfx.ImageBasicMaterial(clim=(0, 1)))
scene.add(image)
canvas.request_draw(lambda: renderer.render(scene, gfx.OrthographicCamera(64, 64)))
canvas.draw()
print(json.dumps({
    "warmed": warmed, "known": len(wgpu_type_strings()), "same": same,
    "parsed_later": sorted(set(ffi._parsed_types) - set(after_warm)),
}))
"""


@pytest.mark.render
def test_wgpu_types_are_parsed_in_one_pass_before_the_device() -> None:
    """After the warm-up, making the device and drawing a frame with an image parses
    no C type string of wgpu's (each cost ~45 ms of Python), and the warmed types are
    those cffi makes itself."""
    result: dict[str, Any] = fresh_process(_PROBE)
    assert result["warmed"] >= 60 and result["warmed"] <= result["known"]
    assert all(result["same"])
    assert result["parsed_later"] == []


_PARSES = r"""
import hashlib, json, sys
import pycparser
parses = []
parse = pycparser.CParser.parse
def counting(self, *args, **kwargs):
    parses.append(1)
    return parse(self, *args, **kwargs)
pycparser.CParser.parse = counting
from viewer.startup import cached_c_parses, warm_wgpu_types
parses.clear()  # the viewer's own cdef (libzstd), parsed as it was imported
if sys.argv[1] == "cached":
    with cached_c_parses():
        warm_wgpu_types()
else:
    warm_wgpu_types()
from wgpu.backends.wgpu_native._ffi import ffi
# what cffi made of wgpu's header: every declaration's C type, with its fields or
# values (struct, union, enum), as cffi's own model of it
def describe(value):
    if isinstance(value, tuple):
        return tuple(describe(v) for v in value)
    if hasattr(value, "c_name_with_marker"):
        out = [type(value).__name__, value.c_name_with_marker]
        for attr in ("fldnames", "fldbitsize", "enumerators", "enumvalues"):
            out.append(getattr(value, attr, None))
        out.append([t.c_name_with_marker for t in getattr(value, "fldtypes", None) or ()])
        return tuple(map(str, out))
    return repr(value)
described = [(name, describe(decl)) for name, decl in sorted(ffi._parser._declarations.items())]
warmed = sorted(  # (cffi keeps them in a module's namespace: skip its __name__ & co.)
    (text, parsed[0].cname) for text, parsed in ffi._parsed_types.items() if type(parsed) is tuple
)
digest = hashlib.sha256(repr((described, warmed)).encode()).hexdigest()
print(json.dumps({"parses": len(parses), "digest": digest, "declared": len(described)}))
"""


@pytest.mark.render
def test_a_new_process_loads_wgpus_parsed_header(tmp_path: pathlib.Path) -> None:
    """cffi parses wgpu's C header with pycparser in each process (~0.2 s of Python,
    holding the GIL while the first requests travel): the first process keeps the
    syntax trees in the user's cache, the next one parses nothing, and what cffi makes
    of them (types, sizes, struct fields, the warmed types) is what it makes without
    the cache."""

    def run(mode: str) -> dict[str, Any]:
        return fresh_process(_PARSES, mode, cache=tmp_path)

    plain = run("plain")
    assert plain["parses"] >= 3 and plain["declared"] > 400, plain  # header, callbacks, warm-up
    first = run("cached")
    assert first["parses"] == plain["parses"] and first["digest"] == plain["digest"]
    assert len(list((tmp_path / "zarrscope" / "cparse").glob("*.pickle"))) == first["parses"]
    again = run("cached")
    assert again["parses"] == 0 and again["digest"] == plain["digest"], again


_PIPELINES = r"""
import json, pathlib, sys, tempfile
import numpy as np
sys.path.insert(0, "tests")
from support.images import noise_image, write_pyramid
from wgpu.backends.wgpu_native import GPUDevice
from viewer import Viewer
made = []
create = GPUDevice.create_render_pipeline
def counting(self, *args, **kwargs):
    made.append(1)
    return create(self, *args, **kwargs)
GPUDevice.create_render_pipeline = counting
tmp = pathlib.Path(tempfile.mkdtemp())
def pyramid(name, data, **options):
    chunks = (64,) * data.ndim
    return str(write_pyramid(tmp / name, data, chunks=chunks, n_levels=2, **options).path)
gray = pyramid("g.ome.zarr", noise_image((256, 256)))
labels = pyramid("l.ome.zarr", noise_image((256, 256)).astype(np.uint32))
rgb = pyramid("c.ome.zarr", noise_image((3, 256, 256)), axes=("c", "y", "x"))
viewer = Viewer(gray, None, size=(128, 128), colormap="gray", show_hud=False)
viewer.add_image(rgb)
viewer.add_labels(labels)
assert viewer.layers[1].rgb
before = len(made)
assert viewer.wait_settled()
shot = viewer.screenshot()
assert shot.any()
print(json.dumps({"before": before, "first_frame": len(made) - before}))
viewer.close()
"""


@pytest.mark.render
def test_the_frame_that_shows_data_compiles_no_pipeline() -> None:
    """In a fresh process (pygfx caches pipelines per process): a gray image, an RGB
    image and labels; every render pipeline (tiles of each material, background, the
    copy to the canvas) exists before the first frame, none is made by it."""
    result = fresh_process(_PIPELINES)
    assert result["first_frame"] == 0 and result["before"] >= 5, result


_TEMPLATES = r"""
import json, pathlib, sys, tempfile
import jinja2
sys.path.insert(0, "tests")
from support.images import noise_image, write_pyramid
from viewer import Viewer
compiled = []
compile_ = jinja2.Environment.compile
def counting(self, source, name=None, *args, **kwargs):
    compiled.append(name)
    return compile_(self, source, name, *args, **kwargs)
jinja2.Environment.compile = counting
tmp = pathlib.Path(tempfile.mkdtemp())
path = write_pyramid(tmp / "g.ome.zarr", noise_image((256, 256)), chunks=(64, 64), n_levels=2).path
viewer = Viewer(str(path), None, size=(128, 128), colormap="gray", show_hud=False)
assert viewer.wait_settled()
assert viewer.screenshot().any()
viewer.close()
print(json.dumps({"templates": [n for n in compiled if n], "strings": compiled.count(None)}))
"""


@pytest.mark.render
def test_a_new_process_loads_the_shader_templates_compiled(tmp_path: pathlib.Path) -> None:
    """pygfx compiles its WGSL templates with jinja2 (Python, holding the GIL) each time
    a process builds its pipelines: the first process keeps them compiled in the user's
    cache, and the next one, drawing the same, compiles none of them."""

    def run() -> dict[str, Any]:
        return fresh_process(_TEMPLATES, cache=tmp_path)

    first = run()
    assert first["templates"], first  # pygfx's snippets were compiled, and kept
    assert list((tmp_path / "zarrscope" / "shaders").glob("*/*.cache"))
    again = run()
    assert again["templates"] == [], again
    assert again["strings"] == first["strings"]  # the same pipelines were built
