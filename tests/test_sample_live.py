"""The built-in sample shown while it is being made (:func:`start_sample`): a pool that
refreshes during the generation sees valid metadata at every step, coarse levels
before fine ones, and in every chunk each pixel either final or still 0 (the fill
value), only coarse chunks changing after it has seen them; the viewer follows it
(HUD progress, windows) and ends on exactly the complete sample; an interrupted
generation is never taken as complete, and the next run completes it."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import test_window
import zarr
from test_window import CLEAN_EXIT, CRASH_MARKS, STOP_SCRIPT, Command

from chunkpool import ChunkPool, read_multiscales

generator = importlib.import_module("sample_data.make_sample")
display = test_window.display  # the module's Xvfb, shared

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 2048  # with 512 px tiles: 16 tiles; levels 0-1 written by them, 2-3 coarse
TILE = 512
LEVELS = 4
JOB_LEVELS = 2
GENEROUS = 60.0  # seconds: a deadline for waits, never a measure


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(generator, "_TILE", TILE)


@pytest.fixture
def one_shot(small_tiles: None, tmp_path: pathlib.Path) -> pathlib.Path:
    """The same sample made in one go (make_sample): the ground truth."""
    return generator.make_sample(tmp_path / "one-shot.ome.zarr", size=SIZE, workers=2)


class Stepper:
    """Holds the generation after each tile is written (its levels and the coarse
    chunks it is part of), until the test lets it go on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        #: The first tile waits for this (set by default: only a test that must look at
        #: the store before any tile is written clears it, then sets it).
        self.start = threading.Event()
        self.start.set()
        self.origins: list[tuple[int, int]] = []
        real = generator._make_tile

        def held(*args: object) -> object:
            assert self.start.wait(GENEROUS), "the test never let the first tile start"
            result = real(*args)
            self.origins.append(args[-1])  # type: ignore[arg-type]
            self.done.release()
            assert self.go.acquire(timeout=GENEROUS), "the test never let it go on"
            return result

        monkeypatch.setattr(generator, "_make_tile", held)

    def next_tile(self) -> None:
        assert self.done.acquire(timeout=GENEROUS), "no tile written"

    def release(self) -> None:
        self.go.release()


def files(root: pathlib.Path) -> dict[pathlib.Path, bytes]:
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def levels_of(path: pathlib.Path) -> list[np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return [group[str(level)][...] for level in range(LEVELS)]


def seen_levels(pool: ChunkPool, locs: list) -> list[np.ndarray]:
    """What the pool's held chunks hold, assembled into each level's array."""
    seen = [np.full((2, SIZE >> k, SIZE >> k), 1, np.uint16) for k in range(LEVELS)]
    for loc in locs:
        seen[loc.level][loc.slices] = loc.data
    return seen


def test_a_refreshing_pool_sees_final_or_fill_coarse_levels_first(
    one_shot: pathlib.Path, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, pools
) -> None:
    """The invariant, checked after each tile with a pool that holds every chunk of every
    level and refreshes: (1) the metadata is valid and unchanged in shape (no reopen),
    the marker says "writing", the tile's chunks were written coarsest level first;
    (2) every pixel is final or 0; (3) a chunk of the levels the tiles write (0-1) is
    all 0 or final; (4) where a level is final, every coarser level is final over it
    (coarse first), and the coarsest gets each tile as it is done; (5) what is final
    stays final. At the end the pool holds the one-shot sample's data and the files are
    the one-shot's, byte for byte."""
    final = levels_of(one_shot)
    assert all((level > 0).all() for level in final)  # 0 only ever means "not yet"
    stepper = Stepper(monkeypatch)
    stepper.start.clear()  # nothing written before the pool has seen the empty sample
    written: list[int] = []  # the level of each chunk write, in order
    real_write = generator._write_chunks

    def recorded(writer: generator._ChunkWriter, *args: object) -> None:
        written.append(writer.level)
        real_write(writer, *args)

    monkeypatch.setattr(generator, "_write_chunks", recorded)
    path = tmp_path / "live.ome.zarr"
    job = generator.start_sample(path, size=SIZE, workers=1)
    try:
        assert job.wait_ready(GENEROUS) and job.generating
        pool = pools(zarr.open_group(path, mode="r"))
        assert len(pool.multiscale_info.levels) == LEVELS
        keys = [(s.level, i) for s in pool.multiscale_info for i in s.iter_chunk_indices()]
        assert len(keys) <= 256  # each refresh revalidates every held chunk
        locs = pool.get_chunks(keys, "all")
        pool.wait_for_chunks_to_load(GENEROUS)
        assert all((level == 0).all() for level in seen_levels(pool, locs))
        stepper.start.set()
        before = [np.zeros(level.shape, bool) for level in final]
        for step in range(1, (SIZE // TILE) ** 2 + 1):
            stepper.next_tile()
            assert written == [3, 2, 1, 0], f"step {step}: not coarsest first"
            written.clear()
            assert generator._sample_state(path) == "writing"
            changes = pool.refresh()
            assert not changes.reopened and not changes.grown
            pool.wait_for_chunks_to_load(GENEROUS)
            read_multiscales(zarr.open_group(path, mode="r"), "again")  # valid
            seen = seen_levels(pool, locs)
            done = []
            for level, (got, want) in enumerate(zip(seen, final, strict=True)):
                assert ((got == want) | (got == 0)).all(), f"step {step}, level {level}"
                final_here = got == want
                done.append(final_here)
                if level < JOB_LEVELS:
                    for loc in locs:
                        if loc.level == level:
                            part = final_here[loc.slices]
                            assert part.all() or not part.any(), f"{loc.key} part-written"
                assert (final_here | ~before[level]).all(), f"step {step}: final, then not"
            for finer, coarser in itertools.pairwise(done):
                assert (coarser | ~finer[:, ::2, ::2]).all(), f"step {step}: fine first"
            assert done[-1].sum() == step * 2 * (TILE >> (LEVELS - 1)) ** 2  # tile by tile
            before = done
            if step == 1:  # centre first
                assert stepper.origins[0] in itertools.product((512, 1024), repeat=2)
            stepper.release()
        assert job.wait(GENEROUS) and job.error is None
        assert generator._sample_state(path) == "complete"
        while pool.refresh().changed:  # the last rewrites (and the metadata's windows)
            pool.wait_for_chunks_to_load(GENEROUS)
        for got, want in zip(seen_levels(pool, locs), final, strict=True):
            np.testing.assert_array_equal(got, want)
    finally:
        stepper.start.set()
        stepper.release()
        job.cancel(GENEROUS)
    assert files(path) == files(one_shot)
    assert job.windows() == [tuple(c["window"][k] for k in ("start", "end")) for c in omero(path)]


def omero(path: pathlib.Path) -> list[dict]:
    return json.loads((path / "zarr.json").read_text())["attributes"]["ome"]["omero"]["channels"]


def test_a_rewrite_is_stamped_later_than_the_last_even_if_the_clock_is_not(
    tmp_path: pathlib.Path,
) -> None:
    """Coarse chunks are rewritten tile after tile, and two tiles can finish within one
    tick of the coarse clock Linux stamps files with (simulated: the last write stamped
    ahead of the clock). A rewrite still gets a later mtime than the last, so a reader
    revalidating by (size, mtime) never keeps an older version."""
    generator._create_arrays(tmp_path / "s", 3, 512, {})
    (writer,) = [w for w in generator._chunk_writers(tmp_path / "s") if w.level == 1]
    chunk = tmp_path / "s" / "1" / "c" / "0" / "0" / "0"
    stamps: dict[pathlib.Path, int] = {}
    generator._write_chunks(writer, np.full((2, 256, 256), 1, np.uint16), 0, 0, stamps)
    assert stamps[chunk] == chunk.stat().st_mtime_ns
    ahead = stamps[chunk] + 5_000_000_000
    os.utime(chunk, ns=(ahead, ahead))
    stamps[chunk] = ahead
    generator._write_chunks(writer, np.full((2, 256, 256), 2, np.uint16), 0, 0, stamps)
    assert chunk.stat().st_mtime_ns > ahead
    assert stamps[chunk] == chunk.stat().st_mtime_ns
    assert (zarr.open_array(tmp_path / "s" / "1", mode="r")[...] == 2).all()


def test_cancelled_generation_is_not_complete_and_the_next_run_completes_it(
    one_shot: pathlib.Path, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    stepper = Stepper(monkeypatch)
    path = tmp_path / "sample.ome.zarr"
    before = set(threading.enumerate())
    job = generator.start_sample(path, size=SIZE, workers=2)
    try:
        stepper.next_tile()
        stepper.next_tile()
        assert generator._sample_state(path) == "writing"
    finally:
        # cancel while two tiles are held: they end, the others never start
        stopper = threading.Thread(target=job.cancel, args=(GENEROUS,))
        stopper.start()
        stepper.release()
        stepper.release()
        stopper.join(GENEROUS)
    assert job.done() and job.error is None
    assert set(threading.enumerate()) - before == set()  # its thread and workers ended
    assert generator._sample_state(path) != "complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one-shot.ome.zarr"]
    monkeypatch.undo()
    monkeypatch.setattr(generator, "_TILE", TILE)
    again = generator.start_sample(path, size=SIZE)  # the next run, as the viewer's
    assert again.generating and again.wait(GENEROUS) and again.error is None
    assert generator._sample_state(path) == "complete"
    assert files(path) == files(one_shot)


def test_killed_generation_is_made_again_by_the_next_run(
    one_shot: pathlib.Path, tmp_path: pathlib.Path
) -> None:  # (one_shot sets the tile size for this process too)
    """Killed outright (SIGKILL, a power cut) after a few tiles: nothing cleans up; the
    sample stays "writing", is not taken as complete, and the next run makes it again."""
    path = tmp_path / "sample.ome.zarr"
    script = (
        "import importlib, os, sys\n"
        "g = importlib.import_module('sample_data.make_sample')\n"
        f"g._TILE = {TILE}\n"
        "real, made = g._make_tile, []\n"
        "def dying(*args):\n"
        "    made.append(real(*args))\n"
        "    if len(made) == 3:\n"
        "        os._exit(3)\n"
        "    return made[-1]\n"
        "g._make_tile = dying\n"
        f"g.make_sample(sys.argv[1], size={SIZE}, workers=1)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    killed = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, timeout=120, check=False
    )
    assert killed.returncode == 3
    assert generator._sample_state(path) == "writing"
    level0 = [p for p in (path / "0").rglob("*") if p.is_file() and "zarr" not in p.name]
    assert len(level0) == 3 * 2 * (TILE // 256) ** 2  # three tiles' worth, at its path
    generator.make_sample(path, size=SIZE)  # the next run: made again, without overwrite
    assert generator._sample_state(path) == "complete"
    assert files(path) == files(one_shot)


# ------------------------------------------------------------------------ the viewer


@pytest.mark.render
def test_the_viewer_follows_the_sample_and_ends_on_the_complete_one(
    one_shot: pathlib.Path, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """The viewer opens the sample as soon as it is at its path (live), the HUD says it
    is being made with its progress, the windows follow the coarsest level written so
    far; at the end the HUD line goes, the windows are the sample's own and the picture
    is exactly a fresh viewer's of the complete sample."""
    from viewer import Viewer
    from viewer.__main__ import SampleFollower

    stepper = Stepper(monkeypatch)
    path = tmp_path / "sample.ome.zarr"
    job = generator.start_sample(path, size=SIZE, workers=1)
    viewers: list[Viewer] = []
    try:
        assert job.wait_ready(GENEROUS)
        viewer = Viewer(str(path), None, size=(128, 128), show_hud=False, live=0.05)
        viewers.append(viewer)
        assert [d.clim for d in viewer.layer.displays] == job.first_windows
        follower = SampleFollower(viewer, job)
        for step in range(1, 17):
            stepper.next_tile()  # tile `step` is written, step - 1 are counted done
            if step in (1, 8):
                assert follower.tick()
                line = f"generating the sample: {step - 1}/16 tiles"
                assert viewer.hud_lines()[-1] == line
                windows = job.windows()  # of the coarsest level written so far
                assert windows is not None and windows != job.first_windows
                assert [d.clim for d in viewer.layer.displays] == windows
            stepper.release()
        assert job.wait(GENEROUS)
        assert not follower.tick()  # done: no more ticks
        assert not any(line.startswith("generating") for line in viewer.hud_lines())
        windows = [(c["window"]["start"], c["window"]["end"]) for c in omero(path)]
        assert [d.clim for d in viewer.layer.displays] == windows
        fresh = Viewer(str(one_shot), None, size=(128, 128), show_hud=False)
        viewers.append(fresh)
        assert fresh.wait_settled(GENEROUS)
        expected = fresh.screenshot()
        deadline = time.monotonic() + GENEROUS
        pause = threading.Event()
        while not (viewer.wait_settled(GENEROUS) and (viewer.screenshot() == expected).all()):
            assert time.monotonic() < deadline, "the live viewer never showed the final sample"
            pause.wait(0.05)
    finally:
        for viewer in viewers:
            viewer.close()
        stepper.release()
        job.cancel(GENEROUS)


# Makes the command's sample small, and holds each tile, once written, until the
# generation is cancelled: the window is sure to close while the sample is being made.
HELD_SAMPLE = f"""
import functools, importlib
g = importlib.import_module("sample_data.make_sample")
g._TILE = {TILE}
g.start_sample = functools.partial(g.start_sample, size={SIZE})
real = g._make_tile
def held(scene, writers, pyramid, cancel, origin):
    result = real(scene, writers, pyramid, cancel, origin)
    cancel.wait(60)
    return result
g._make_tile = held
"""


@pytest.mark.render
def test_closing_the_window_stops_the_generation(
    display: str, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """``zarrscope`` with the sample missing: the window opens while the sample is being
    made (progress on stderr); SIGTERM closes it, main() returns 0, every thread it
    started has ended (the generation's included), and the half-made sample is gone."""
    monkeypatch.setenv("ZARRSCOPE_SAMPLE_DIR", str(tmp_path))
    argv = ["glfw", "SIGTERM", "--size", "64", "48", "--print-ready"]
    command = Command([sys.executable, "-c", HELD_SAMPLE + STOP_SCRIPT, *argv], display)
    try:
        command.wait_ready()
        command.proc.send_signal(signal.SIGTERM)
        code, stdout, stderr = command.finish()
    finally:
        command.kill()
    assert code == 0, stderr
    assert not any(mark in stderr for mark in CRASH_MARKS), stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report == CLEAN_EXIT
    assert "zarrscope: generating the sample image at" in stderr
    assert "sample written" not in stderr
    assert list(tmp_path.iterdir()) == []
