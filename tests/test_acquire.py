"""The acquisition simulator (``python -m sample_data.acquire``): what it writes equals its
numpy ground truth at every step, read back with zarr-python and opened by chunkpool; it
stops cleanly on SIGTERM; it never replaces what it did not write."""

from __future__ import annotations

import json
import pathlib
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

from chunkpool import read_multiscales
from sample_data.acquire import (
    MARK,
    Acquisition,
    mosaic_plane,
    pyramid,
    run,
    scan_order,
    time_point,
)

REPO = pathlib.Path(__file__).resolve().parents[1]
DEADLINE = 120.0


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "sample_data.acquire", *args]


def stored_levels(path: pathlib.Path) -> list[np.ndarray]:
    """Every level as zarr-python reads it, finest first (checking the OME metadata)."""
    group = zarr.open_group(path, mode="r")
    (image,) = read_multiscales(group, str(path))
    return [zarr.open_array(path / level.path, mode="r")[...] for level in image.levels]


def expected_time_series(count: int, height: int, width: int, channels: int, levels: int):
    points = [pyramid(time_point(t, height, width, channels), levels) for t in range(count)]
    return [np.stack([p[level] for p in points]) for level in range(levels)]


def test_time_mode_command_writes_an_exact_ome_zarr(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "live.ome.zarr"
    args = ["--rate", "1000", "--frames", "3", "--size", "96", "128", "--chunk", "32"]
    done = subprocess.run(
        command(str(out), *args), cwd=REPO, capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == f"acquire: {out}: 3 time points written"
    got = stored_levels(out)
    assert [level.shape for level in got] == [(3, 2, 96 >> n, 128 >> n) for n in range(3)]
    truths = expected_time_series(3, 96, 128, 2, 3)
    for level, (stored, truth) in enumerate(zip(got, truths, strict=True)):
        assert np.array_equal(stored, truth), f"level {level}"
    # content: each time point and channel differs from the others
    assert len({got[0][t, c].tobytes() for t in range(3) for c in range(2)}) == 6
    assert not list(out.rglob("*.partial"))
    attributes = json.loads((out / "zarr.json").read_text())["attributes"]
    assert attributes["ome"]["version"] == "0.5" and attributes[MARK] == "time"
    # run again: an earlier acquisition is replaced
    again = subprocess.run(
        command(str(out), *args[:3], "1", *args[4:], "--quiet", "--channels", "0"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert again.returncode == 0, again.stderr
    (level0, *_) = stored_levels(out)
    assert np.array_equal(level0, time_point(0, 96, 128, 0)[None])


def test_mosaic_mode_matches_the_ground_truth_after_every_tile(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "mosaic.ome.zarr"
    height, width, tile = 96, 160, 32
    acquisition = Acquisition(out, "mosaic", size=(height, width), channels=1, chunk=16, tile=tile)
    assert acquisition.levels == 5 and acquisition.count == 15
    plane = mosaic_plane(height, width, 1)
    mask = np.zeros((height, width), bool)
    order = scan_order(height // tile, width // tile)
    assert order[:6] == [(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 4)]
    for row, col in order:
        assert acquisition.step()
        mask[row * tile : (row + 1) * tile, col * tile : (col + 1) * tile] = True
        truth = pyramid(np.where(mask, plane, 0), acquisition.levels)
        for level, (stored, want) in enumerate(zip(stored_levels(out), truth, strict=True)):
            assert np.array_equal(stored, want), f"tile {row, col}, level {level}"
    assert not acquisition.step()
    # a region of the plane is the plane's region
    assert np.array_equal(mosaic_plane(height, width, 1, 32, 64, 16, 48), plane[:, 32:48, 64:112])


def test_sigterm_stops_after_a_whole_time_point(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "live.ome.zarr"
    args = ["--rate", "20", "--size", "64", "64", "--chunk", "32", "--channels", "1"]
    proc = subprocess.Popen(command(str(out), *args), cwd=REPO, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    third = threading.Event()

    def read() -> None:
        for line in proc.stderr:
            lines.append(line)
            if line.startswith("acquire: t=2 "):
                third.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert third.wait(DEADLINE), "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(DEADLINE)
    written = int(lines[-1].split(": ")[-1].split()[0])
    assert written >= 3
    got = stored_levels(out)
    truths = expected_time_series(written, 64, 64, 1, 2)
    for level, (stored, truth) in enumerate(zip(got, truths, strict=True)):
        assert np.array_equal(stored, truth), f"level {level}"
    assert not list(out.rglob("*.partial"))


def test_run_stops_when_asked_between_steps(tmp_path: pathlib.Path) -> None:
    acquisition = Acquisition(tmp_path / "a.zarr", size=(32, 32), chunk=16, rate=1000.0)
    stop = threading.Event()
    assert run(acquisition, stop, lambda acq: acq.done == 4 and stop.set()) == 4
    assert stored_levels(tmp_path / "a.zarr")[0].shape == (4, 2, 32, 32)


@pytest.mark.parametrize("existing", ["data", "zarr"])
def test_refuses_to_replace_what_it_did_not_write(tmp_path: pathlib.Path, existing: str) -> None:
    out = tmp_path / "precious"
    if existing == "zarr":
        zarr.create_array(out, shape=(4, 4), dtype="uint8")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("keep me")
    before = sorted(p.name for p in out.rglob("*"))
    done = subprocess.run(
        command(str(out), "--frames", "1"),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=DEADLINE,
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {out} exists and is not an acquisition written by this tool"
    ]
    assert sorted(p.name for p in out.rglob("*")) == before
