"""A viewer following a store while it is written (``live=``): appended time points
appear and the view at the newest one follows them; a chunk rewritten in place shows
its new data; the screenshot ends equal to the numpy ground truth of the final store."""

from __future__ import annotations

import json
import logging
import pathlib
import shutil
import threading
import time

import numpy as np
import pytest
import zarr
from support.images import noise_image
from test_render import settle

from chunkpool import Changes, refresh
from sample_data.acquire import Acquisition, run, time_point
from viewer import Viewer

pytestmark = pytest.mark.render

SIZE = (96, 64)
DEADLINE = 60.0


def wait_until(viewer: Viewer, condition, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    pause = threading.Event()
    while True:
        viewer.refresh()
        if condition():
            return
        assert time.monotonic() < deadline, f"{what}: not within {DEADLINE:g} s"
        pause.wait(0.02)


def test_a_live_viewer_follows_appended_time_points_and_rewrites(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "live.zarr"
    frames = [noise_image((SIZE[1], SIZE[0]), seed=s) for s in range(4)]
    array = zarr.create_array(
        path,
        shape=(2, SIZE[1], SIZE[0]),
        chunks=(1, 32, 32),
        dtype="uint8",
        dimension_names=["t", "y", "x"],
    )
    array[0], array[1] = frames[0], frames[1]
    viewer = Viewer(
        str(path), None, size=SIZE, colormap="gray", clim=(0, 255), show_hud=False, t=1, live=0.1
    )
    try:
        viewer.show_region(0, 0, *SIZE)
        assert (settle(viewer)[..., 0] == frames[1]).all()
        writer = zarr.open_array(path, mode="r+")
        for t in (2, 3):
            writer.resize((t + 1, SIZE[1], SIZE[0]))
            writer[t] = frames[t]
            wait_until(viewer, lambda t=t: viewer.position.get("t") == t, f"t={t} followed")
            assert viewer.dims()["t"] == t + 1
            assert (settle(viewer)[..., 0] == frames[t]).all(), f"t={t}"
        # rewrite one chunk of the shown time point in place
        new = frames[3].copy()
        new[:32, :32] = 255 - new[:32, :32]
        writer[3, :32, :32] = new[:32, :32]
        wait_until(
            viewer,
            lambda: (viewer.screenshot()[..., 0] == new).all(),
            "the rewritten chunk shown",
        )
        # away from the newest: it stays put
        viewer.set_index("t", 0)
        writer.resize((5, SIZE[1], SIZE[0]))
        writer[4] = frames[0]
        wait_until(viewer, lambda: viewer.dims()["t"] == 5, "the range grown")
        assert viewer.position["t"] == 0
        assert (settle(viewer)[..., 0] == frames[0]).all()
        assert any(line.startswith("live: newest") for line in viewer.hud_lines())
    finally:
        viewer.close()


def watch_threads() -> list[str]:
    """The names of the threads of pools' watches (timer and file-system watch)."""
    prefixes = ("chunkpool-watch", "chunkpool-files")
    return [t.name for t in threading.enumerate() if t.name.startswith(prefixes)]


def test_a_local_watch_wakes_on_a_write_long_before_its_interval(
    tmp_path: pathlib.Path, pools
) -> None:
    """inotify (watchfiles): a new time point is seen at once, not after the 60 s poll;
    the watch's threads end with destroy()."""
    path = tmp_path / "live.zarr"
    array = zarr.create_array(path, shape=(1, 32, 32), chunks=(1, 32, 32), dtype="uint8")
    pool = pools(zarr.open_array(path, mode="r"))
    seen: list[Changes] = []
    changed = threading.Event()
    pool.watch(60.0, on_change=lambda changes: (seen.append(changes), changed.set()))
    assert len(watch_threads()) == 2, watch_threads()  # the poll and the file-system watch
    array.resize((2, 32, 32))
    assert changed.wait(DEADLINE / 2), "the write was not seen before the poll"
    assert seen[0].grown == {0: ((1, 32, 32), (2, 32, 32))}
    pool.destroy()
    assert not watch_threads()


def test_a_watch_polls_without_watchfiles_or_a_local_store(
    tmp_path: pathlib.Path, pools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No file-system watch for a store in memory, nor without the library: the poll
    still sees changes."""
    memory = zarr.create_array(
        zarr.storage.MemoryStore(), shape=(1, 8), chunks=(1, 8), dtype="uint8"
    )
    monkeypatch.setattr(refresh, "watchfiles", None)
    local = zarr.create_array(tmp_path / "a.zarr", shape=(1, 8), chunks=(1, 8), dtype="uint8")
    for array in (memory, local):
        pool = pools(array)
        changed = threading.Event()
        pool.watch(0.05, on_change=lambda changes, changed=changed: changed.set())
        assert len(watch_threads()) == 1, watch_threads()
        array.resize((2, 8))
        assert changed.wait(DEADLINE), f"{array.store}: no change seen"
        pool.destroy()
    monkeypatch.undo()
    pool = pools(memory)
    pool.watch(0.05)
    assert len(watch_threads()) == 1, watch_threads()  # in memory: nothing to watch


def write_movie(path: pathlib.Path, frames: list) -> None:
    """A (t, y, x) store of ``frames`` at ``path``, made aside and moved in at once."""
    aside = path.with_name(path.name + ".new")
    array = zarr.create_array(
        aside,
        shape=(len(frames), SIZE[1], SIZE[0]),
        chunks=(1, 32, 32),
        dtype="uint8",
        dimension_names=["t", "y", "x"],
    )
    for t, frame in enumerate(frames):
        array[t] = frame
    aside.rename(path)


def test_a_live_viewer_survives_a_deleted_half_written_and_shrunk_store(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Each is one line (HUD and log, once), the view keeps what it showed, and it
    recovers when the store is valid again; a shrink reopens the image."""
    caplog.set_level(logging.INFO)
    path = tmp_path / "live.zarr"
    frames = [noise_image((SIZE[1], SIZE[0]), seed=s) for s in range(10, 16)]
    write_movie(path, frames[:3])
    viewer = Viewer(
        str(path), None, size=SIZE, colormap="gray", clim=(0, 255), show_hud=False, t=2, live=0.05
    )

    def problems() -> list[str]:
        return [line for line in viewer.hud_lines() if line.startswith("live: store")]

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    refreshed = threading.Semaphore(0)
    pool = viewer.pool
    original = pool.refresh

    def counting_refresh(**options):
        try:
            return original(**options)
        finally:
            refreshed.release()

    pool.refresh = counting_refresh

    def refreshes(n: int) -> None:  # wait for n more refreshes of the watch
        for _ in range(n):
            assert refreshed.acquire(timeout=DEADLINE)

    try:
        viewer.show_region(0, 0, *SIZE)
        assert (settle(viewer)[..., 0] == frames[2]).all()
        # the store deleted
        shutil.rmtree(path)
        wait_until(viewer, lambda: problems(), "the deletion shown")
        refreshes(5)
        viewer.refresh()
        (line,) = problems()
        assert "not a Zarr store" in line and str(path) in line, line
        (logged,) = warnings()
        assert "not a Zarr store" in logged and "Traceback" not in caplog.text
        assert (settle(viewer)[..., 0] == frames[2]).all(), "it keeps what it showed"
        # back, with new data of the same shape
        write_movie(path, frames[3:6])
        wait_until(
            viewer,
            lambda: not problems() and (viewer.screenshot()[..., 0] == frames[5]).all(),
            "the store back",
        )
        # metadata half written
        caplog.clear()
        document = (path / "zarr.json").read_bytes()
        (path / "zarr.json").write_bytes(document[: len(document) // 2])
        wait_until(viewer, lambda: problems(), "the half-written metadata shown")
        refreshes(5)
        viewer.refresh()
        (line,) = problems()
        assert "invalid Zarr metadata" in line, line
        assert len(warnings()) == 1, warnings()
        assert (settle(viewer)[..., 0] == frames[5]).all()
        (path / "zarr.json").write_bytes(document)
        wait_until(viewer, lambda: not problems(), "the metadata whole again")
        # shrunk: one time point left, with other data
        caplog.clear()
        shutil.rmtree(path)
        write_movie(path, frames[:1])
        wait_until(viewer, lambda: viewer.dims()["t"] == 1, "the shrunk store reopened")
        assert viewer.position["t"] == 0
        assert (settle(viewer)[..., 0] == frames[0]).all()
        new_pool = viewer.pool
        assert new_pool is not pool and pool.destroyed
        # it follows the reopened store
        writer = zarr.open_array(path, mode="r+")
        writer.resize((2, SIZE[1], SIZE[0]))
        writer[1] = frames[1]
        wait_until(viewer, lambda: viewer.position["t"] == 1, "t=1 followed after reopening")
        assert (settle(viewer)[..., 0] == frames[1]).all()
        shrinks = [w for w in warnings() if "opened again" in w]
        assert len(shrinks) == 1, warnings()
        assert "Traceback" not in caplog.text
    finally:
        viewer.close()


def test_each_point_a_writer_thread_appends_is_shown_then_the_final_store(
    tmp_path: pathlib.Path,
) -> None:
    """A writer thread (the acquisition simulator) appends time points while the
    viewer draws; the viewer starts at the newest; each one is shown as it lands, and at
    the end the screen is the final store read back by zarr, through the window (no
    stale pixel)."""
    path = tmp_path / "acquired.ome.zarr"
    count, clim = 6, (0.0, 4000.0)
    acquisition = Acquisition(path, size=(SIZE[1], SIZE[0]), channels=0, chunk=32, count=count)
    acquisition.rate = 1000.0
    assert acquisition.step() and acquisition.step()  # t=0, 1: the store exists

    def window(data: np.ndarray) -> np.ndarray:
        return np.clip((data.astype(np.float64) - clim[0]) / (clim[1] - clim[0]), 0, 1) * 255

    def shows(data: np.ndarray) -> bool:
        return bool(np.abs(viewer.screenshot()[..., 0] - window(data)).max() <= 1.0)

    viewer = Viewer(
        str(path), None, size=SIZE, colormap="gray", clim=clim, show_hud=False, live=0.05
    )
    seen = [threading.Event() for _ in range(count)]
    stop = threading.Event()
    writer = threading.Thread(
        target=run, args=(acquisition, stop, lambda acq: seen[acq.done - 1].wait(DEADLINE))
    )
    try:
        viewer.show_region(0, 0, *SIZE)
        settle(viewer)
        assert viewer.position["t"] == 1  # live: it starts at the newest
        assert shows(time_point(1, SIZE[1], SIZE[0], 0))
        writer.start()
        for t in range(2, count):
            wait_until(
                viewer,
                lambda t=t: viewer.position["t"] == t and shows(time_point(t, SIZE[1], SIZE[0], 0)),
                f"t={t} shown",
            )
            seen[t].set()
        writer.join(DEADLINE)
        assert not writer.is_alive() and acquisition.done == count
        final = zarr.open_array(path / "0", mode="r")
        assert final.shape == (count, SIZE[1], SIZE[0])
        settle(viewer)
        assert shows(final[count - 1])
    finally:
        stop.set()
        for event in seen:
            event.set()
        if writer.is_alive():
            writer.join(DEADLINE)
        viewer.close()


def test_a_writer_caught_between_two_levels_is_no_warning(
    tmp_path: pathlib.Path, pools, caplog: pytest.LogCaptureFixture
) -> None:
    """A refresh that reads one level's new metadata and the next one's old (a writer
    between two renames) is tried again, not reported; one that stays failed (two
    refreshes in a row) is."""
    path = tmp_path / "a.ome.zarr"
    acquisition = Acquisition(path, size=(64, 64), channels=0, chunk=32)
    assert acquisition.step() and acquisition.levels == 2
    pool = pools(zarr.open_group(path, mode="r"))
    changes: list[Changes] = []
    problems: list[str | None] = []
    watcher = refresh.Watcher(pool, 1.0, changes.append, problems.append)  # ticked here
    level1 = path / "1" / "zarr.json"
    old = level1.read_bytes()
    document = json.loads(old)
    document["shape"][0] = 2
    level1.write_text(json.dumps(document))  # level 1 written, level 0 not yet
    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        assert watcher.tick()
        assert acquisition.step()  # the rest of the step
        assert watcher.tick()
        assert not caplog.records and not problems
        assert changes[0].grown[0] == ((1, 64, 64), (2, 64, 64))
        level1.write_bytes(old)  # now it stays inconsistent
        for _ in range(4):
            assert watcher.tick()
    (record,) = caplog.records
    assert "refresh failed" in record.getMessage() and "level 1" in record.getMessage()
    assert problems == [record.getMessage().split("before: ", 1)[1]]
