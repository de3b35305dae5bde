"""Predicted motion: the predictor on scripted camera samples (no clock, no GPU), the
tiles a tile set prefetches for a prediction, and what a wrong one leaves behind
(counting, gated store); one viewer check that the frames feed the predictor."""

from __future__ import annotations

import math
import pathlib
import random
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import zarr
from support.images import noise_image, write_pyramid
from support.teststores import GatedStore
from test_tiling import pyramid
from zarr.storage import LocalStore

from chunkpool import ChunkPool, ChunkState
from chunkpool.kpi import LoadRecord
from viewer.prediction import (
    MAX_HORIZON,
    MAX_LEAD,
    MAX_STOP_GAP,
    MIN_HORIZON,
    MIN_REACH,
    REACH_LOADS,
    REACH_SAMPLES,
    RUN_LEAD,
    Motion,
    MotionPredictor,
    plan_path,
    reach,
)
from viewer.tileset import TileSet
from viewer.tiling import PREFETCH, View, is_visible_priority, view_level

FRAME = 1 / 60
WIDTH = 1000.0  # world width of the view in the predictor's scripts
SIZE = (256, 256)


def drive(
    position: Callable[[float], tuple[float, float, float]],
    until: float,
    *,
    step: float = FRAME,
    jitter: float = 0.0,
    seed: int = 0,
) -> Iterator[tuple[float, tuple[float, float, float], Motion | None]]:
    """Feed a predictor the camera ``position(t)`` = (x, y, width) once a frame (times
    jittered by up to ``jitter`` s), yielding (t, position, prediction) each frame."""
    rng = random.Random(seed)
    predictor = MotionPredictor()
    for i in range(round(until / step) + 1):
        t = i * step + rng.uniform(-jitter, jitter)
        pos = position(t)
        predictor.observe(t, *pos)
        yield t, pos, predictor.predict(t)


def last(frames: Iterator[Any]) -> Any:
    out = None
    for out in frames:  # noqa: B007
        pass
    return out


# -- the predictor ----------------------------------------------------------------------


def test_constant_velocity_is_followed_up_to_the_longest_horizon() -> None:
    """A steady pan (half a view per second), sampled at 60 Hz with 3 ms of jitter:
    the prediction carries on at that speed, RUN_LEAD times as long as the pan has
    lasted, up to the longest horizon."""
    young = last(drive(lambda t: (500.0 * t, 20.0, WIDTH), 0.2, jitter=0.003, seed=1))[2]
    assert young is not None and young.horizon == pytest.approx(RUN_LEAD * 0.2, abs=0.05)
    t, (x, _, _), motion = last(
        drive(lambda t: (500.0 * t, 20.0, WIDTH), 1.2, jitter=0.003, seed=1)
    )
    assert motion is not None
    assert motion.vx == pytest.approx(500.0, rel=0.1) and abs(motion.vy) < 25
    assert motion.horizon == pytest.approx(MAX_HORIZON, abs=0.15)
    ex, ey, ew = motion.at(t + 0.5)
    assert ex == pytest.approx(x + 250.0, abs=30) and ey == pytest.approx(20.0, abs=15)
    assert ew == pytest.approx(WIDTH)
    # a pointer at 30 Hz drawn at 60 Hz (every other frame shows no move): the same
    _, _, stepped = last(drive(lambda t: (500.0 * (t // (2 * FRAME)) * 2 * FRAME, 0, WIDTH), 0.5))
    assert stepped is not None and stepped.vx == pytest.approx(500.0, rel=0.15)


def test_a_fast_pan_is_followed_at_most_a_bounded_distance() -> None:
    """Ten views a second: the horizon shrinks so the lead stays within MAX_LEAD views."""
    t, (x, _, _), motion = last(drive(lambda t: (10 * WIDTH * t, 0.0, WIDTH), 0.4))
    assert motion is not None and motion.horizon < MIN_HORIZON
    end, _, _ = motion.at(t + 10.0)
    assert 0.75 * MAX_LEAD * WIDTH < end - x <= MAX_LEAD * WIDTH + 1e-6


def test_a_flick_that_stops_collapses_the_prediction() -> None:
    """A fast pan that stops dead: within a few frames of the stop nothing is predicted
    any more; a flick that runs out (ease-out) is never predicted to go much further
    than where it stops, and once it brakes, about there."""
    stop = 0.3
    frames = list(drive(lambda t: (3000.0 * min(t, stop), 0.0, WIDTH), 0.6))
    moving = [m for t, _, m in frames if 0.1 < t < stop]
    assert moving and all(m is not None for m in moving)
    after = [(t, m) for t, _, m in frames if t > stop]
    gone = next(t for t, m in after if m is None)
    assert gone - stop <= 0.1
    assert all(m is None for t, m in after if t >= gone)

    def ease_out(t: float) -> tuple[float, float, float]:
        s = min(t, 0.5)
        return 3000.0 * (s - s * s), 0.0, WIDTH  # v = 3000 (1 - 2t): stops at 0.5, x = 750

    ends = {}
    for t, _, m in drive(ease_out, 0.45):
        if m is not None:
            ends[t] = m.at(t + 10.0)[0]
    assert ends and all(e < 750.0 + 0.1 * WIDTH for e in ends.values()), ends
    assert all(abs(e - 750.0) < 0.1 * WIDTH for t, e in ends.items() if t > 0.25), ends


def bell(t: float) -> tuple[float, float, float]:
    """A hand's short pan from rest to rest: 0.75 view in 0.25 s, its speed a bell
    (smoothstep: fastest half-way, at 4.5 views a second)."""
    u = min(max(t / 0.25, 0.0), 1.0)
    return 0.75 * WIDTH * u * u * (3 - 2 * u), 0.0, WIDTH


@pytest.mark.parametrize("step", [1 / 30, 1 / 60, 1 / 120])
@pytest.mark.parametrize("seed", range(4))
def test_a_short_hand_pan_is_not_predicted_past_where_it_stops(step: float, seed: int) -> None:
    """A pan whose speed rose and falls again is expected to end as far past its
    fastest point as that was from its start: at 30 to 120 Hz with 3 ms of jitter,
    from two steps past its fastest point on, the prediction ends within a tenth of a
    view of the stop (following the speed reached half a view past it, at every
    pan's end); before, it is never ahead of the camera by more than RUN_LEAD times
    what the pan has come."""
    frames = list(drive(bell, 0.4, step=step, jitter=0.003 * (seed > 0), seed=seed))
    stop = 0.75 * WIDTH
    predicted = [(t, x, m.at(t + 10.0)[0]) for t, (x, _, _), m in frames if m is not None]
    assert predicted
    for _, x, end in predicted:
        assert end - x <= RUN_LEAD * x + 1e-6
    late = [end for t, _, end in predicted if t > 0.125 + 2 * step]
    assert late and all(end == pytest.approx(stop, abs=0.1 * WIDTH) for end in late), late


def test_a_pan_that_sped_up_and_cruises_on_is_followed() -> None:
    """A pan that speeds up (in 0.2 s) and then goes on at a view a second, its steps
    10% uneven (a pointer's events against frame times): once it has gone on past
    where a bell would have stopped, it is followed at that speed again, every frame."""
    rng = random.Random(3)
    predictor = MotionPredictor()
    x = 0.0
    late = []
    for i in range(1, 61):
        t = i * FRAME
        speed = WIDTH * min(t / 0.2, 1.0) * rng.uniform(0.9, 1.1)
        x += speed * FRAME
        predictor.observe(t, x, 0.0, WIDTH)
        if t > 0.6:
            late.append(predictor.predict(t))
    assert all(m is not None and m.vx == pytest.approx(WIDTH, rel=0.2) for m in late)
    assert all(m.horizon >= MIN_HORIZON for m in late)


def test_a_zig_zag_turn_drops_the_old_direction_at_once() -> None:
    """Back and forth (a triangle, one view a second, turning every 0.5 s): after each
    turn the prediction never reaches more than a tenth of a view past the turning
    point (the first sample past it ends it), and it stays gone until the new
    direction is steady; then it points the new way."""
    period = 1.0

    def zig_zag(t: float) -> tuple[float, float, float]:
        phase = t % period
        return WIDTH * (phase if phase < period / 2 else period - phase), 0.0, WIDTH

    turns = [0.5, 1.5]
    for t, _, m in drive(zig_zag, 2.0):
        for turn in turns:
            if turn + FRAME / 2 < t < turn + 0.15:  # a sample past it
                assert m is None
            if turn + 0.15 <= t < turn + 0.5:
                assert m is None or m.vx < 0
        if 1.05 <= t <= 1.1:  # the turn at 1.0 is at x = 0, going right again
            assert m is None or m.at(t + 10.0)[0] > -0.1 * WIDTH


def test_zoom_in_and_out_extrapolate_log_width() -> None:
    """Zooming in at one doubling a second predicts a narrower view at that rate;
    zooming out, a wider one; the centre moves with the cursor-anchored drift."""
    t, (x, _, w), zoom_in = last(drive(lambda t: (100.0 * t, 0.0, WIDTH * 2 ** (-t)), 0.8))
    assert zoom_in is not None and zoom_in.rate == pytest.approx(-math.log(2), rel=0.05)
    ex, _, ew = zoom_in.at(t + 0.5)
    assert ew == pytest.approx(w * 2**-0.5, rel=0.05) and ex == pytest.approx(x + 50, abs=10)
    t, (_, _, w), zoom_out = last(drive(lambda t: (0.0, 0.0, WIDTH * 2**t), 0.8))
    assert zoom_out is not None and zoom_out.at(t + 0.5)[2] == pytest.approx(w * 2**0.5, rel=0.05)


def test_idle_and_single_jumps_predict_nothing() -> None:
    """A still camera, a single jump (show_region), and a motion long over predict
    nothing."""
    assert all(m is None for _, _, m in drive(lambda t: (5.0, 5.0, WIDTH), 1.0))
    assert all(
        m is None for _, _, m in drive(lambda t: (0.0 if t < 0.5 else 3000.0, 0.0, WIDTH), 1.0)
    )
    predictor = MotionPredictor()
    predictor.observe(0.0, 0.0, 0.0, WIDTH)
    predictor.observe(FRAME, 3000.0, 0.0, WIDTH)
    assert predictor.still(FRAME)  # a jump is no motion: the ring comes at once
    predictor.observe(2 * FRAME, 6000.0, 0.0, WIDTH)
    predictor.observe(3 * FRAME, 6000.0, 0.0, WIDTH / 2)  # jumps in a row: no motion either
    assert predictor.still(3 * FRAME) and predictor.predict(3 * FRAME) is None
    for i in range(2, 20):
        predictor.observe(i * FRAME, 100.0 * i, 0.0, WIDTH)
    assert predictor.predict(19 * FRAME) is not None and not predictor.still(19 * FRAME)
    assert predictor.still(19 * FRAME + MAX_STOP_GAP)
    assert predictor.predict(19 * FRAME + MAX_STOP_GAP + 0.01) is None  # no frame since
    predictor.reset()
    assert predictor.predict(19 * FRAME) is None


def test_a_pan_is_not_still_from_its_first_move_nor_at_a_late_frame() -> None:
    """A pan from rest is not still from its first move on (too few moves to predict,
    but a ring then is mostly on the sides it does not go to), nor when one of its
    frames comes late (a move long enough to read as a jump); a jump from rest is."""
    predictor = MotionPredictor()
    predictor.observe(0.0, 0.0, 0.0, WIDTH)
    assert predictor.still(0.0)
    predictor.observe(1.0, 0.0, 0.0, WIDTH)  # a second still, then a pan begins
    predictor.observe(1.0 + FRAME, 20.0, 0.0, WIDTH)
    assert not predictor.still(1.0 + FRAME)
    predictor.observe(1.0 + 2 * FRAME, 40.0, 0.0, WIDTH)
    assert not predictor.still(1.0 + 2 * FRAME)
    for i in range(3, 10):
        predictor.observe(1.0 + i * FRAME, 20.0 * i, 0.0, WIDTH)
    late = 1.0 + 20 * FRAME  # ten frames late: 220 world units at once, a "jump"
    predictor.observe(late, 400.0, 0.0, WIDTH)
    assert not predictor.still(late)
    assert predictor.still(late + MAX_STOP_GAP)
    predictor.observe(late + 2.0, 5000.0, 0.0, WIDTH)  # a jump from rest
    assert predictor.still(late + 2.0)


def test_a_frame_without_a_move_keeps_the_path_where_it_was() -> None:
    """The camera seen where it was at the newest move (pointer events slower than
    frames, or it is stopping): the path stays where that move's was, rather than
    running ahead of the camera."""
    view = view_around(2048, 2048, 1024)
    motion = steady(512.0)
    assert motion.path(view, 0.05) == motion.path(view, 0.0)
    assert motion.path(view, MAX_HORIZON) == ()


# -- the tiles of a prediction -----------------------------------------------------------


def steady(
    vx: float, rate: float = 0.0, *, x: float = 2048.0, y: float = 2048.0, width: float = 1024.0
) -> Motion:
    """A steady motion from (x, y), ``width`` wide, seen at time 0."""
    return Motion(0.0, x, y, width, vx, 0.0, rate, 0.0, MAX_HORIZON)


def view_around(x: float, y: float, width: float, pixels: int = 512) -> View:
    return View(x - width / 2, y - width / 2, x + width / 2, y + width / 2, pixels, pixels)


def test_a_pan_prefetches_the_way_ahead_sooner_first() -> None:
    """Panning right: the tiles of the views ahead, at prefetch priority, those reached
    sooner first; none behind."""
    levels = pyramid()
    view = view_around(2048, 2048, 1024)
    target = view_level(levels, view)[0]
    path = steady(512.0).path(view, 0.0)
    assert path and path[-1][0] == pytest.approx(MAX_HORIZON)
    plan = plan_path(levels, view, target, path)
    assert plan and all(lv == target and p // 1e9 == PREFETCH for (lv, _, _), p in plan.items())
    for (_, iy, ix), p in plan.items():
        right = (target, iy, ix + 1)
        if right in plan:
            assert plan[right] >= p  # further right: reached later
    bounds = [levels[target].tile_bounds(iy, ix) for _, iy, ix in plan]
    assert min(b[3] for b in bounds) > path[0][1].x0  # nothing behind the views ahead
    assert max(b[3] for b in bounds) >= view.x1 + 512  # as far as the horizon
    assert min(b[0] for b in bounds) <= view.y0 and max(b[1] for b in bounds) >= view.y1


def test_zooming_in_prefetches_finer_and_zooming_out_coarser() -> None:
    """A zoom in asks for the finer levels of the narrower views ahead (drawn only once
    they are the target); a zoom out for the coarser ones, and the next coarser level's
    ring around the view, before the path gets there."""
    levels = pyramid()
    view = view_around(2048, 2048, 1024)  # 2 world units a screen pixel: level 1
    target = view_level(levels, view)[0]
    assert target == 1
    zoom_in = plan_path(levels, view, target, steady(0.0, -math.log(2)).path(view, 0.0))
    assert {lv for lv, _, _ in zoom_in} == {0}  # (level 1's are the visible ones)
    zoom_out = plan_path(levels, view, target, steady(0.0, math.log(2)).path(view, 0.0))
    assert {lv for lv, _, _ in zoom_out} == {1, 2}
    ring = levels[2].tile_range(view.y0, view.y1, view.x0, view.x1, margin=1)
    iy0, iy1, ix0, ix1 = ring
    assert all((2, iy, ix) in zoom_out for iy in range(iy0, iy1) for ix in range(ix0, ix1))
    # slow zoom out: the horizon does not reach level 2, its ring is asked for anyway
    slow = plan_path(levels, view, target, steady(0.0, 0.1).path(view, 0.0))
    assert (2, iy0, ix0) in slow and (2, iy1 - 1, ix1 - 1) in slow


def test_a_pan_whose_widths_differ_by_rounding_asks_for_no_coarser_tiles() -> None:
    """A pan's view widths differ from frame to frame by rounding alone: that is no
    zoom out, no coarser ring (asked for and dropped every other frame)."""
    levels = pyramid()
    view = view_around(2048, 2048, 1024)
    target = view_level(levels, view)[0]
    for rate in (1e-12, -1e-12):
        plan = plan_path(levels, view, target, steady(512.0, rate).path(view, 0.0))
        assert plan and {lv for lv, _, _ in plan} == {target}


def load(fetch_started: float, seconds: float, error: str | None = None) -> LoadRecord:
    """A delivered load record whose fetch took ``seconds`` (no clock)."""
    return LoadRecord(
        "img", 0, (0, 0), "loaded", 1, 1, fetch_started - 0.5, fetch_started,
        fetch_started + seconds, fetch_started + seconds, fetch_started + seconds, error,
    )  # fmt: skip


def test_the_reach_is_a_few_load_times_of_the_newest_loads() -> None:
    """Predicted tiles are asked for REACH_LOADS (median) load times ahead, over the newest
    loads delivered (not the failed, nor the cancelled), within [MIN_REACH,
    MAX_HORIZON]; the whole path before any load."""
    assert reach([]) == MAX_HORIZON
    slow_then_fast = [load(i, 0.4) for i in range(50)] + [
        load(50 + i, 0.06) for i in range(REACH_SAMPLES)
    ]
    assert reach(slow_then_fast) == pytest.approx(REACH_LOADS * 0.06)
    failed = [load(100 + i, 0.001, error="boom") for i in range(10)]
    cancelled = [load(200, 0.001)._replace(state="cancelled", delivered=None)]
    assert reach(slow_then_fast + failed + cancelled) == pytest.approx(REACH_LOADS * 0.06)
    assert reach([load(0, 0.001)] * 5) == MIN_REACH
    assert reach([load(0, 3.0)] * 5) == MAX_HORIZON


def test_a_path_costs_a_bounded_number_of_tiles() -> None:
    """However fast the motion, a path holds at most its views' budgets' worth."""
    levels = pyramid(1 << 20, 256, 12)
    view = view_around(1 << 19, 1 << 19, 1024)
    for motion in (steady(1e9), steady(0.0, -50.0), steady(0.0, 50.0), steady(1e6, 3.0)):
        path = motion.path(view, 0.0)
        plan = plan_path(levels, view, view_level(levels, view)[0], path)
        assert len(path) <= 10 and len(plan) <= (len(path) + 1) * 64


# -- a tile set following a prediction --------------------------------------------------


@pytest.fixture()
def gated(tmp_path: pathlib.Path) -> Iterator[tuple[TileSet, GatedStore, ChunkPool]]:
    """A 1024² image of 64² chunks (two levels) behind a counting, gated store, one IO
    thread, and a tile set on it."""
    p = write_pyramid(
        tmp_path / "p.ome.zarr", noise_image((1024, 1024), seed=4), chunks=(64, 64), n_levels=2
    )
    store = GatedStore(LocalStore(p.path))
    pool = ChunkPool.from_zarr_node(zarr.open_group(store, mode="r"), io_concurrency=1)[0]
    pool.enable_polled_load_handlers(lambda: None)
    tiles = TileSet(pool, [(0, True)])
    try:
        yield tiles, store, pool
    finally:
        store.rec.open_gate()
        tiles.close()
        pool.destroy()


VIEW = View(383.5, 383.5, 639.5, 639.5, 256, 256)  # level 0, tiles 6..9 in view


def level0(tiles: TileSet) -> dict[tuple[int, int], float]:
    return {(k.iy, k.ix): t.priority for k, t in tiles.channels[0].tiles.items() if k.level == 0}


def test_the_tile_set_prefetches_the_ring_when_still_and_the_path_when_moving(
    gated: tuple[TileSet, GatedStore, ChunkPool],
) -> None:
    tiles, _, _ = gated
    tiles.update(VIEW)
    still = level0(tiles)
    assert set(still) == {(iy, ix) for iy in range(5, 11) for ix in range(5, 11)}  # + ring
    path = steady(256.0, x=511.5, y=511.5, width=256.0).path(VIEW, 0.0)  # a view a second, right
    tiles.update(VIEW, path=path)
    moving = level0(tiles)
    visible = {k for k, p in moving.items() if is_visible_priority(p)}
    assert visible == {(iy, ix) for iy in range(6, 10) for ix in range(6, 10)}
    ahead = {k: p for k, p in moving.items() if k not in visible}
    assert {ix for _, ix in ahead} == {10, 11, 12, 13}  # the view a second ahead ends at 13
    assert all(iy in range(6, 10) for iy, _ in ahead)  # no ring above, below, behind
    assert ahead[(6, 10)] < ahead[(6, 12)] < ahead[(6, 13)]  # sooner first
    tiles.update(VIEW, still=False)  # moving, nothing predicted (it just turned): no ring
    assert set(level0(tiles)) == visible
    tiles.update(VIEW)  # still: the ring again
    assert set(level0(tiles)) == set(still)


def test_the_tile_set_asks_for_the_path_only_as_far_as_its_loads_take(
    gated: tuple[TileSet, GatedStore, ChunkPool],
) -> None:
    """Loads measured at 0.125 s: of a path a second long (a view a second), only the
    part due within REACH_LOADS (3) load times is asked for (the two columns just
    ahead); the rest comes at later frames. Loads measured at half a second: the
    whole path."""
    tiles, _, pool = gated
    path = steady(256.0, x=511.5, y=511.5, width=256.0).path(VIEW, 0.0)
    for i in range(8):
        pool.kpis.add(load(i, 0.125))
    tiles.update(VIEW, path=path)
    ahead = {ix for (_, ix), p in level0(tiles).items() if not is_visible_priority(p)}
    assert REACH_LOADS == 3.0
    assert ahead == {10, 11}  # the view 0.375 s ahead ends at x = 735.5
    for i in range(REACH_SAMPLES):
        pool.kpis.add(load(10 + i, 0.5))
    tiles.update(VIEW, path=path[:-1])  # (a new path: the plan is made again)
    tiles.update(VIEW, path=path)
    ahead = {ix for (_, ix), p in level0(tiles).items() if not is_visible_priority(p)}
    assert ahead == {10, 11, 12, 13}


def test_a_wrong_prediction_releases_its_chunks_and_they_are_never_read(
    gated: tuple[TileSet, GatedStore, ChunkPool],
) -> None:
    """The path goes right, the camera turns left: the tiles to the right leave the tile
    set, their chunks are let go by the pool (cancelled, not loaded later), and the
    store never reads them; the way left is read instead."""
    tiles, store, pool = gated
    store.rec.hold()
    right = steady(256.0, x=511.5, y=511.5, width=256.0).path(VIEW, 0.0)
    tiles.update(VIEW, path=right)
    store.rec.wait_started(1)  # the best visible tile, held at the gate
    wrong = {c for c in tiles._locations if c.level == 0 and c.index[1] >= 10}
    assert len(wrong) == 16
    locations = {c: tiles._locations[c] for c in wrong}
    left = steady(-256.0, x=511.5, y=511.5, width=256.0).path(VIEW, 0.0)
    tiles.update(VIEW, path=left)
    held = {tuple(loc.key) for loc in pool.iter_held(tiles.ref)}
    assert not held & {(c.level, c.index) for c in wrong}
    assert all(loc.state == ChunkState.CANCELLED for loc in locations.values())
    store.rec.open_gate()
    pool.wait_for_chunks_to_load(timeout=60)
    read = set(store.rec.finished)
    assert not read & {f"0/c/{iy}/{ix}" for _, (iy, ix) in wrong}
    assert {f"0/c/{iy}/{ix}" for iy in range(6, 10) for ix in (2, 3, 4, 5)} <= read


def test_a_right_prediction_is_on_screen_without_a_new_read(
    gated: tuple[TileSet, GatedStore, ChunkPool],
) -> None:
    """The path's tiles load ahead; when the view gets there its target tiles are done
    at once (no read, nothing pending)."""
    tiles, store, pool = gated
    right = steady(256.0, x=511.5, y=511.5, width=256.0).path(VIEW, 0.0)
    tiles.update(VIEW, path=right)
    pool.wait_for_chunks_to_load(timeout=60)
    pool.run_pending_handlers()
    reads = len(store.rec.finished)
    there = View(VIEW.x0 + 256, VIEW.y0, VIEW.x1 + 256, VIEW.y1, 256, 256)
    tiles.update(there, path=steady(256.0, x=767.5, y=511.5, width=256.0).path(there, 0.0))
    status = tiles.status()
    assert status.pending == 0 and status.loaded == 16
    pool.wait_for_chunks_to_load(timeout=60)
    assert not {f"0/c/{iy}/{ix}" for iy in range(6, 10) for ix in range(10, 14)} & set(
        store.rec.finished[reads:]
    )


def test_a_tile_left_behind_while_its_chunk_is_read_is_kept_until_it_loads(
    tmp_path: pathlib.Path,
) -> None:
    """The view moves on while one of its tiles is being read (a prediction cut
    short, a tile passed over): that tile stays held until its read ends, its
    pending neighbours are let go (cancelled, never read); loaded, it is dropped to
    the pool's cache, so coming back costs no second read (cancelled mid-read, the
    data was thrown away and read again)."""
    p = write_pyramid(  # one level: no coarser one held whole
        tmp_path / "p.ome.zarr", noise_image((1024, 1024), seed=4), chunks=(64, 64), n_levels=1
    )
    store = GatedStore(LocalStore(p.path))
    pool = ChunkPool.from_zarr_node(
        zarr.open_group(store, mode="r"), io_concurrency=1, cache_bytes=64 << 20
    )[0]
    pool.enable_polled_load_handlers(lambda: None)
    tiles = TileSet(pool, [(0, True)])
    far = View(VIEW.x0 + 384, VIEW.y0, VIEW.x1 + 384, VIEW.y1, 256, 256)
    try:
        store.rec.hold()
        tiles.update(VIEW, still=False)
        (first,) = store.rec.wait_started(1)
        reading = next(t for t in tiles.tiles() if first == "/".join(
            [str(t.chunk.level), "c", *map(str, t.chunk.index)]
        ))  # fmt: skip
        others = [tiles._locations[t.chunk] for t in tiles.tiles() if t is not reading]
        tiles.update(far, still=False)
        assert reading in tiles.tiles() and not reading.in_view and not reading.shown
        assert tiles._locations[reading.chunk].state == ChunkState.LOADING
        assert others and all(loc.state == ChunkState.CANCELLED for loc in others)
        store.rec.open_gate()
        pool.wait_for_chunks_to_load(timeout=60)
        pool.run_pending_handlers()
        tiles.update(far, still=False)
        assert reading.chunk not in tiles._locations  # loaded: let go, to the cache
        reads = list(store.rec.finished)
        assert first in reads
        tiles.update(VIEW, still=False)
        pool.wait_for_chunks_to_load(timeout=60)
        assert store.rec.finished.count(first) == 1
        assert len(store.rec.finished) > len(reads)  # (the others were read now)
    finally:
        store.rec.open_gate()
        tiles.close()
        pool.destroy()


# -- the viewer feeds it ----------------------------------------------------------------


@pytest.mark.render
def test_the_viewer_prefetches_where_the_camera_goes_and_drops_it_when_it_stops(
    tmp_path: pathlib.Path, make_viewer: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Frames that pan the camera right (on a stepped clock) make the layer hold tiles
    beyond the view on the right (more than the ring); a frame after the motion stopped
    holds the ring only, once the reads under way then have landed (those tiles stay
    held until then)."""
    import viewer.app

    now = [1000.0]
    monkeypatch.setattr(
        viewer.app,
        "time",
        types.SimpleNamespace(perf_counter=lambda: now[0], monotonic=time.monotonic),
    )
    p = write_pyramid(
        tmp_path / "p.ome.zarr", noise_image((1024, 1024), seed=5), chunks=(32, 32), n_levels=1
    )
    # link_budget=None: no pacing by the measured link (real time, slow on a loaded
    # machine), which would hold prefetch back behind the visible tiles
    v = make_viewer(str(p.path), colormap="gray", clim=(0, 255), link_budget=None)
    v.show_region(256, 256, 512, 512)
    for _ in range(20):  # 3 views a second: beyond the ring within MIN_REACH (local loads)
        v.pan(0.05, 0.0)
        v.refresh()
        now[0] += FRAME
    view = v.view()
    beyond = [t for t in v.layer.tiles.tiles() if t.bounds[2] >= view.x1 + 32]
    assert beyond, "nothing prefetched ahead of the pan"
    now[0] += MAX_STOP_GAP + 0.01
    v.refresh()
    v.layer.tiles.pool.wait_for_chunks_to_load(timeout=60)
    v.refresh()
    assert not [t for t in v.layer.tiles.tiles() if t.bounds[2] >= view.x1 + 32]
