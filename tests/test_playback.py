"""Playback: the pure stepping rules on a fake clock, and a viewer playing t in sharp
mode whose every frame equals the ground truth, the next slices prefetched."""

from __future__ import annotations

import pathlib
import threading
import time

import pytest
import zarr
from support.images import noise_image
from test_render import settle

from viewer import Viewer
from viewer.playback import MAX_DEPTH, SHARP_TIMEOUT, Playback, prefetch_depth

SIZE = (96, 64)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_smooth_keeps_time_and_sharp_waits_for_the_slice() -> None:
    clock = FakeClock()
    smooth = Playback("t", 3, fps=4, mode="smooth", clock=clock)
    assert smooth.next_index(0, settled=False) is None  # not yet a frame's time
    clock.now += 0.25
    assert smooth.next_index(0, settled=False) == 1  # on time, complete or not
    clock.now += 0.25
    assert smooth.next_index(2, settled=True) == 0  # wraps
    assert smooth.frames == 2 and smooth.complete_fraction == 0.5
    sharp = Playback("t", 3, fps=4, mode="sharp", clock=clock)
    clock.now += 1.0
    assert sharp.next_index(0, settled=False) is None  # waits for the slice...
    clock.now += SHARP_TIMEOUT
    assert sharp.next_index(0, settled=False) == 1  # ... up to the timeout
    assert sharp.ahead(1, 5) == [2, 0]  # never more than the other slices
    with pytest.raises(ValueError, match="fps"):
        Playback("t", 3, fps=0)


def test_the_prefetch_covers_the_load_time_of_a_slice() -> None:
    assert prefetch_depth(5, None) == 2
    assert prefetch_depth(5, 0.1) == 2  # a slice loads within a frame
    assert prefetch_depth(5, 0.9) == 6  # 4.5 frames to load: 5 ahead + 1
    assert prefetch_depth(60, 10.0) == MAX_DEPTH


@pytest.mark.render
def test_sharp_playback_shows_each_time_point_exactly_and_prefetches(
    tmp_path: pathlib.Path,
) -> None:
    frames = [noise_image((SIZE[1], SIZE[0]), seed=s) for s in range(5)]
    path = tmp_path / "t.zarr"
    array = zarr.create_array(
        path,
        shape=(5, SIZE[1], SIZE[0]),
        chunks=(1, 32, 32),
        dtype="uint8",
        dimension_names=["t", "y", "x"],
    )
    for t, frame in enumerate(frames):
        array[t] = frame
    clock = FakeClock()
    viewer = Viewer(str(path), None, size=SIZE, colormap="gray", clim=(0, 255), show_hud=False, t=0)
    try:
        viewer.show_region(0, 0, *SIZE)
        settle(viewer)
        playback = viewer.play("t", fps=10, mode="sharp", clock=clock)
        pause = threading.Event()
        seen = []
        for _ in range(6):
            deadline = time.monotonic() + 60
            # the slice and the ones ahead load: nothing pending
            while True:
                viewer.refresh()
                if viewer.settled() and viewer.pool.stats.chunks_pending == 0:
                    break
                assert time.monotonic() < deadline
                pause.wait(0.01)
            t = viewer.position["t"]
            assert (viewer.screenshot()[..., 0] == frames[t]).all(), f"t={t}"
            seen.append(t)
            clock.now += 0.1
            viewer.refresh()  # a frame's time has passed: the next slice...
            viewer.refresh()
            assert viewer.settled(), "... was prefetched: it is there at once"
        assert seen == [0, 1, 2, 3, 4, 0]
        assert playback.frames == 6 and playback.complete_fraction == 1.0
        viewer.stop()
        assert all(not layer.tiles.ahead for layer in viewer.layers)
    finally:
        viewer.close()
