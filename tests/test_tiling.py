"""Level choice, visible tiles, priorities and fallback, without a GPU."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viewer import tiling
from viewer.prediction import MAX_HORIZON, Motion, plan_path
from viewer.tiling import (
    MAX_DENSITY,
    MAX_TILES,
    ORIGIN_SLACK,
    PREFETCH,
    RESIDENT_TILES,
    VISIBLE,
    PlaneLevel,
    RetrySchedule,
    TooManyTilesError,
    View,
    choose_level,
    eviction_order,
    follow_origin,
    plan_tiles,
    tile_budget,
    tile_count,
    tiles_in_view,
    tiles_to_keep,
    view_level,
    visible_tiles,
)


def pyramid(size: int = 4096, chunk: int = 256, n: int = 5) -> list[PlaneLevel]:
    """Block-mean pyramid: level L pixel j centre at 2**L * j + (2**L - 1) / 2."""
    return [
        PlaneLevel(
            level=lv,
            shape=(size >> lv, size >> lv),
            chunk=(chunk, chunk),
            scale=(2.0**lv, 2.0**lv),
            offset=((2**lv - 1) / 2, (2**lv - 1) / 2),
        )
        for lv in range(n)
    ]


def view_of(x0, y0, x1, y1, width, height, cursor=None) -> View:
    return View(x0 - 0.5, y0 - 0.5, x1 - 0.5, y1 - 0.5, width, height, cursor)


def test_level_choice_is_the_coarsest_not_larger_than_a_screen_pixel():
    levels = pyramid()
    assert choose_level(levels, view_of(0, 0, 1000, 1000, 1000, 1000)) == 0  # 1:1
    assert choose_level(levels, view_of(0, 0, 2000, 2000, 1000, 1000)) == 1  # exactly 2x
    assert choose_level(levels, view_of(0, 0, 1999, 1999, 1000, 1000)) == 0  # just under 2x
    assert choose_level(levels, view_of(0, 0, 3999, 3999, 1000, 1000)) == 1
    assert choose_level(levels, view_of(0, 0, 100, 100, 1000, 1000)) == 0  # zoomed in
    assert choose_level(levels, view_of(0, 0, 10**6, 10**6, 100, 100)) == 4  # coarsest
    # bias: 2 prefers one level coarser, 0.5 one level sharper
    assert choose_level(levels, view_of(0, 0, 2000, 2000, 1000, 1000), bias=2) == 2
    assert choose_level(levels, view_of(0, 0, 2000, 2000, 1000, 1000), bias=0.5) == 0


def test_tile_range_and_bounds():
    level = pyramid()[0]
    # exactly the first 2 x 3 tiles: edges on tile boundaries do not pull neighbours in
    assert level.tile_range(-0.5, 511.5, -0.5, 767.5) == (0, 2, 0, 3)
    assert level.tile_range(-0.5, 511.5, -0.5, 767.5, margin=1) == (0, 3, 0, 4)
    assert level.tile_range(-100, -50, 0, 10) == (0, 0, 0, 1)  # above the image: empty
    assert level.tile_bounds(1, 2) == (255.5, 511.5, 511.5, 767.5)
    coarse = pyramid()[2]  # scale 4, offset 1.5: pixel 0 covers world [-0.5, 3.5]
    assert coarse.tile_bounds(0, 0) == (-0.5, 1023.5, -0.5, 1023.5)


def test_edge_tiles_are_cropped():
    level = PlaneLevel(0, (1000, 700), (256, 256), (1.0, 1.0), (0.0, 0.0))
    assert level.grid == (4, 3)
    assert level.tile_bounds(3, 2) == (767.5, 999.5, 511.5, 699.5)


@given(
    x0=st.floats(-500, 5000),
    y0=st.floats(-500, 5000),
    w=st.floats(1, 3000),
    h=st.floats(1, 3000),
    lv=st.integers(0, 4),
)
def test_visible_tiles_are_exactly_those_intersecting_the_view(x0, y0, w, h, lv):
    level = pyramid()[lv]
    view = View(x0, y0, x0 + w, y0 + h, 100, 100)
    tiles = set(visible_tiles(level, view))
    gy, gx = level.grid
    for iy in range(gy):
        for ix in range(gx):
            ty0, ty1, tx0, tx1 = level.tile_bounds(iy, ix)
            overlaps = ty0 < view.y1 and ty1 > view.y0 and tx0 < view.x1 and tx1 > view.x0
            assert ((lv, iy, ix) in tiles) == overlaps


def test_plan_orders_visible_coarse_first_then_by_distance_then_prefetch():
    levels = pyramid()
    view = view_of(1024, 1024, 2048, 1536, 1024, 512, cursor=(1100.0, 1100.0))
    target = choose_level(levels, view)
    assert target == 0
    plan = plan_tiles(levels, view, target)
    tier = {k: int(p // 1e9) for k, p in plan.items()}
    visible = set(visible_tiles(levels[0], view))
    assert {k for k, t in tier.items() if t == VISIBLE and k[0] == 0} == visible
    coarsest = [k for k in plan if k[0] == 4]
    assert coarsest == [(4, 0, 0)]  # 256² level-4 image: one tile, resident
    assert plan[(4, 0, 0)] < min(plan[k] for k in visible)  # coarser first
    # nearer the cursor first
    order = sorted(visible, key=plan.get)
    assert order[0] == (0, 4, 4)  # the tile under the cursor
    ring = {k for k, t in tier.items() if t == PREFETCH and k[0] == 0}
    assert ring and not ring & visible
    assert max(plan[k] for k in visible) < min(plan[k] for k in ring)
    # without a cursor the focus is the view centre
    centred = plan_tiles(levels, view_of(1024, 1024, 2048, 1536, 1024, 512), 0)
    assert min(visible, key=centred.get) in {(0, 4, 5), (0, 4, 6), (0, 5, 5), (0, 5, 6)}


def test_big_coarsest_level_is_not_all_resident():
    levels = [PlaneLevel(0, (100_000, 100_000), (256, 256), (1.0, 1.0), (0.0, 0.0))]
    plan = plan_tiles(levels, view_of(0, 0, 1920, 1080, 1920, 1080), 0)
    assert 40 < len(plan) < 120


def test_old_tiles_stay_until_their_replacements_are_done():
    levels = pyramid()
    view = view_of(0, 0, 512, 512, 512, 512)  # target level 0: tiles (0, 0..1, 0..1)
    shown = {(1, 0, 0), (1, 3, 3), (4, 0, 0)}  # (1, 0, 0) covers all 4; (1, 3, 3) is off view
    keep = tiles_to_keep(shown, levels, view, 0, done=set())
    assert keep == {(1, 0, 0), (4, 0, 0)}
    done = {(0, 0, 0), (0, 0, 1), (0, 1, 0)}
    assert (1, 0, 0) in tiles_to_keep(shown, levels, view, 0, done)
    done.add((0, 1, 1))
    assert tiles_to_keep(shown, levels, view, 0, done) == set()


def test_eviction_order_least_recently_shown_then_farthest():
    levels = pyramid()
    view = view_of(0, 0, 512, 512, 512, 512)
    tiles = [(0, 0, 0), (0, 10, 10), (0, 5, 5), (0, 1, 1)]
    last_shown = {(0, 0, 0): 5, (0, 10, 10): 5, (0, 5, 5): 5, (0, 1, 1): 2}
    assert eviction_order(tiles, levels, view, last_shown) == [
        (0, 1, 1),
        (0, 10, 10),
        (0, 5, 5),
        (0, 0, 0),
    ]


@pytest.mark.parametrize("bias", [0.5, 1.0, 1.5])
def test_level_pixels_never_exceed_bias_screen_pixels(bias):
    levels = pyramid()
    for zoom in [0.3, 0.9, 1.0, 1.7, 2.0, 3.3, 8.0, 17.0]:
        view = view_of(0, 0, 1000 * zoom, 1000 * zoom, 1000, 1000)
        lv = choose_level(levels, view, bias)
        assert lv == 0 or levels[lv].pixel_size <= view.pixel_size * bias * (1 + 1e-9)
        if lv + 1 < len(levels):  # and the next coarser one would be too coarse
            assert levels[lv + 1].pixel_size > view.pixel_size * bias * (1 + 1e-9)


# -- huge images: the cost of planning is the screen's, not the image's -----------------

HUGE = 1 << 40


def huge_pyramid(coarsest: int = HUGE, n: int = 1, chunk: int = 256) -> list[PlaneLevel]:
    """Block-mean levels, finest first, the coarsest ``coarsest`` pixels wide."""
    return [
        PlaneLevel(
            level=lv,
            shape=(coarsest << (n - 1 - lv),) * 2,
            chunk=(chunk, chunk),
            scale=(2.0**lv,) * 2,
            offset=((2**lv - 1) / 2,) * 2,
        )
        for lv in range(n)
    ]


class CountingTiles:
    """Counts the tiles ``plan_tiles`` iterates over (every block it adds)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.iterated = 0
        original = tiling._add_tiles

        def counting(plan, level, tiles, *args):
            self.iterated += tile_count(tiles)
            original(plan, level, tiles, *args)

        monkeypatch.setattr(tiling, "_add_tiles", counting)


def plan_bound(levels: list[PlaneLevel], view: View) -> int:
    """What a plan may cost: the resident coarsest level, and per planned block
    (coarsest visible, target visible, its ring) one budget, the ring's
    edges included."""
    budget = max(tile_budget(level, view) for level in levels)
    return RESIDENT_TILES + 5 * budget + 8 * int(budget**0.5) + 16


def fit_view(levels: list[PlaneLevel], width: int = 1024, height: int = 768) -> View:
    """The whole of level 0 in a canvas of ``width`` x ``height``, square pixels."""
    y0, _, x0, _ = levels[0].tile_bounds(0, 0)
    gy, gx = levels[0].grid
    _, y1, _, x1 = levels[0].tile_bounds(gy - 1, gx - 1)
    per_px = max((x1 - x0) / width, (y1 - y0) / height)
    return View(x0, y0, x0 + width * per_px, y0 + height * per_px, width, height)


@pytest.mark.parametrize(
    ("coarsest", "n"), [pytest.param(HUGE, 1, id="2^40"), pytest.param(1 << 30, 11, id="2^30")]
)
def test_planning_a_huge_image_seen_whole_iterates_a_bounded_number_of_tiles(
    monkeypatch: pytest.MonkeyPatch, coarsest: int, n: int
):
    """A 2^40-pixel-wide image without a pyramid, or a pyramid whose coarsest level is
    2^30 wide, fitted to the canvas: about 2^64 (resp. 2^44) tiles of the coarsest level
    are in view. Nothing is planned (nothing would be visible: a tile is far below a
    screen pixel); the view overflows and says how many tiles are in view."""
    levels = huge_pyramid(coarsest, n)
    view = fit_view(levels)
    level, overflow = view_level(levels, view)
    assert level == n - 1
    grid = (coarsest + 255) // 256
    assert overflow == tiles_in_view(levels[-1], view) >= grid * grid * 3 // 4
    counter = CountingTiles(monkeypatch)
    plan = plan_tiles(levels, view, level)
    assert plan == {} and counter.iterated == 0
    assert tiles_to_keep([(0, 0, 0), (level, 5, 5)], levels, view, level, done=set()) == set()


@settings(max_examples=200, deadline=None)
@given(
    coarsest_log2=st.integers(8, 40),
    n=st.integers(1, 11),
    zoom_log2=st.floats(-12, 44),
    cx=st.floats(-0.5, 1.5),
    cy=st.floats(-0.5, 1.5),
    width=st.integers(1, 1600),
    height=st.integers(1, 1200),
    chunk=st.sampled_from([64, 256, 1024]),
    bias=st.sampled_from([0.25, 0.5, 1.0, 2.0]),
    pan=st.floats(-1e12, 1e12),
    rate=st.floats(-20, 20),
)
def test_planning_costs_the_tiles_on_screen_whatever_the_image(
    coarsest_log2, n, zoom_log2, cx, cy, width, height, chunk, bias, pan, rate
):
    """Any image (a coarsest level up to 2^40 wide, up to 11 levels), any view:
    the tiles iterated, and so planned, stay within a few tile budgets, which depend on
    the canvas and chunk size only. The level shown fits its budget unless the view
    overflows, and every planned tile exists."""
    levels = huge_pyramid(1 << coarsest_log2, n, chunk)
    size0 = levels[0].shape[1]
    px = 2.0**zoom_log2  # level-0 pixels per screen pixel
    x, y = cx * size0, cy * size0
    view = View(
        x - width * px / 2,
        y - height * px / 2,
        x + width * px / 2,
        y + height * px / 2,
        width,
        height,
    )
    level, overflow = view_level(levels, view, bias)
    if overflow:
        assert level == n - 1 and overflow == tiles_in_view(levels[-1], view)
        assert overflow > tile_budget(levels[-1], view)
    else:
        assert tiles_in_view(levels[level], view) <= tile_budget(levels[level], view)
        assert level >= choose_level(levels, view, bias)
    with pytest.MonkeyPatch.context() as mp:
        counter = CountingTiles(mp)
        plan = plan_tiles(levels, view, level)
    assert len(plan) <= counter.iterated <= plan_bound(levels, view)
    # and so does a predicted motion's prefetch, whatever its pan speed and zoom rate
    motion = Motion(0.0, x, y, view.x1 - view.x0, pan, -pan, rate, 0.0, MAX_HORIZON)
    path = motion.path(view, 0.0)
    ahead = plan_path(levels, view, level, path, bias)
    assert len(ahead) <= (len(path) + 1) * max(tile_budget(lv, view) for lv in levels)
    for lv, iy, ix in ahead:
        gy, gx = levels[lv].grid
        assert 0 <= iy < gy and 0 <= ix < gx
    for lv, iy, ix in plan:
        gy, gx = levels[lv].grid
        assert 0 <= iy < gy and 0 <= ix < gx


def test_the_budget_binds_only_beyond_the_pyramid():
    """With a bias of 1/2 or more, a pyramid halving per level shows the level of
    :func:`choose_level` at every zoom down to its coarsest level; zoomed out further,
    its coarsest level shows until there are more tiles in view than the budget, then
    the view overflows. A tiny bias falls back to the finest level that fits."""
    levels = pyramid(size=1 << 20, chunk=256, n=8)  # coarsest: 8192² (32² tiles)
    for bias in (0.5, 1.0, 2.0):
        for zoom_log2 in range(0, 8):
            view = view_of(0, 0, 1024 << zoom_log2, 768 << zoom_log2, 1024, 768)
            assert view_level(levels, view, bias) == (choose_level(levels, view, bias), 0)
    # past the coarsest level (scale 128): 4 texels per screen pixel still fit...
    dense = view_of(0, 0, 1024 * 512, 768 * 512, 1024, 768)
    assert view_level(levels, dense) == (7, 0)
    # ... 8 do not: the view overflows, whatever the level asked for
    too_dense = view_of(0, 0, 1024 * 1024, 768 * 1024, 1024, 768)
    assert view_level(levels, too_dense) == (7, tiles_in_view(levels[7], too_dense))
    assert tiles_in_view(levels[7], too_dense) > tile_budget(levels[7], too_dense)
    # bias 1/16 asks for level 0 at 1:1... at 1/8 zoom that is 64 texels per pixel
    sharp = view_of(0, 0, 1024 * 8, 768 * 8, 1024, 768)
    assert choose_level(levels, sharp, bias=1 / 16) == 0
    level, overflow = view_level(levels, sharp, bias=1 / 16)
    assert overflow == 0 and level == 1  # 4 texels per screen pixel
    assert tiles_in_view(levels[0], sharp) > tile_budget(levels[0], sharp)


def test_tile_budget_is_the_screens():
    """The budget depends on the canvas and the chunks, not on the image: MAX_DENSITY
    texels per screen pixel plus edge tiles, within [RESIDENT_TILES, MAX_TILES]."""
    small, huge = pyramid()[0], huge_pyramid()[0]
    view = View(0, 0, 1000, 1000, 1920, 1080)
    assert tile_budget(small, view) == tile_budget(huge, view)
    assert tile_budget(small, view) == (1080 * MAX_DENSITY // 256 + 3) * (
        1920 * MAX_DENSITY // 256 + 2
    )
    assert tile_budget(small, View(0, 0, 1, 1, 1, 1)) == RESIDENT_TILES
    tiny_chunks = PlaneLevel(0, (HUGE, HUGE), (1, 1), (1.0, 1.0), (0.0, 0.0))
    assert tile_budget(tiny_chunks, view) == MAX_TILES


def test_keeping_tiles_costs_what_is_held_not_what_they_cover():
    """A coarse tile standing in for a fine level within budget: ``tiles_to_keep`` looks
    up at most as many tiles as are done (a range larger than ``done`` cannot be all
    done), not the millions of fine tiles the coarse one covers."""
    levels = huge_pyramid(1 << 16, n=12)  # level 0: 2^27 wide, 2^38 tiles under (11, 0, 0)

    class CountingDone(set):
        lookups = 0

        def __contains__(self, key):
            CountingDone.lookups += 1
            return super().__contains__(key)

    view = View(1000.5, 1000.5, 1000.5 + 1024, 1000.5 + 768, 1024, 768)  # level 0 at 1:1
    target, overflow = view_level(levels, view)
    assert (target, overflow) == (0, 0)
    done = CountingDone({(0, 4, 4), (0, 4, 5), (0, 5, 4)})
    keep = tiles_to_keep([(11, 0, 0), (5, 0, 0)], levels, view, target, done)
    assert keep == {(11, 0, 0), (5, 0, 0)}
    assert CountingDone.lookups <= 2 * len(done)
    # all done: they go, after one look-up per done tile each
    in_view = set(visible_tiles(levels[0], view))
    done = CountingDone(in_view)
    CountingDone.lookups = 0
    assert tiles_to_keep([(11, 0, 0), (5, 0, 0)], levels, view, target, done) == set()
    assert CountingDone.lookups <= 2 * len(in_view)


def test_visible_tiles_refuses_to_enumerate_a_huge_view():
    levels = huge_pyramid()
    view = fit_view(levels)
    with pytest.raises(TooManyTilesError, match="level 0 in view"):
        visible_tiles(levels[0], view)
    assert visible_tiles(levels[0], View(-0.5, -0.5, 511.5, 255.5, 512, 256)) == [
        (0, 0, 0),
        (0, 0, 1),
    ]


def test_views_far_outside_or_infinite_are_empty_and_cheap():
    level = huge_pyramid()[0]
    assert tile_count(level.tile_range(-1e300, -1e299, 0, 10)) == 0
    assert tile_count(level.tile_range(float("nan"), 1.0, 0, 10)) == 0
    grid = level.grid[0]
    assert level.tile_range(-math.inf, math.inf, 0, 10) == (0, grid, 0, 1)


# -- retries of failed tiles -------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_retry_backoff_doubles_up_to_its_cap_on_an_injected_clock():
    clock = FakeClock()
    retry: RetrySchedule[str] = RetrySchedule(first=1.0, factor=2.0, cap=30.0, clock=clock)
    assert retry.next_due() is None and retry.due() == []
    delays = []
    for _ in range(8):
        delays.append(retry.failed("a"))
        assert retry.due() == []  # not yet
        clock.now += delays[-1] - 1e-6
        assert retry.due() == []
        clock.now += 1e-6
        assert retry.due() == ["a"]
        assert retry.due() == []  # handed out once, until it fails again
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    assert retry.failures("a") == 8 and len(retry) == 1
    retry.forget("a")  # it loaded: the next failure starts again from 1 s
    assert retry.failed("a") == 1 and retry.failures("a") == 1


def test_retry_schedule_orders_keys_and_forgets():
    clock = FakeClock()
    retry: RetrySchedule[str] = RetrySchedule(first=1.0, clock=clock)
    retry.failed("a")
    clock.now += 0.5
    retry.failed("b")
    retry.failed("b")  # b's second failure: 2 s from now
    assert retry.next_due() == pytest.approx(0.5)
    clock.now += 0.5
    assert retry.due() == ["a"]
    assert retry.next_due() == pytest.approx(1.5)  # 2 s after its failure at +0.5 s
    retry.forget("b")  # let go of: never handed out
    clock.now += 10
    assert retry.due() == [] and retry.next_due() is None and len(retry) == 1
    with pytest.raises(ValueError):
        RetrySchedule(first=0)


def test_retry_schedule_stays_bounded_through_many_failures_and_forgets():
    """Tiles failing and let go of many times (a user panning over a broken region):
    the schedule holds O(keys tracked), not one entry per failure ever."""
    clock = FakeClock()
    retry: RetrySchedule[int] = RetrySchedule(clock=clock)
    for i in range(10_000):
        retry.failed(i % 7)
        if i % 3:
            retry.forget(i % 7)
    assert len(retry) <= 7
    assert len(retry._heap) <= 2 * 7 + 17  # stale entries are dropped as they pile up


def test_render_origin_follows_the_view_far_out():
    """The origin stays while the view is within ORIGIN_SLACK view sizes of it, and
    moves to the view's centre otherwise: what is on screen stays near the origin,
    where float32 is exact enough (here 2^39 pixels out, 1:1)."""
    origin = (0.0, 0.0)
    whole = View(-0.5, -0.5, HUGE - 0.5, HUGE - 0.5, 1024, 1024)
    assert follow_origin(origin, whole) == origin  # the view is as large as its distance
    far = View(2.0**39, 2.0**39, 2.0**39 + 1024, 2.0**39 + 768, 1024, 768)
    moved = follow_origin(origin, far)
    assert moved == (2.0**39 + 512, 2.0**39 + 384)
    panned = View(far.x0 + 5000, far.y0, far.x1 + 5000, far.y1, 1024, 768)
    assert follow_origin(moved, panned) == moved  # 5000 < 16 x 1024: it stays
    gone = View(far.x0 + 20000, far.y0, far.x1 + 20000, far.y1, 1024, 768)
    new = follow_origin(moved, gone)
    assert new != moved
    assert max(abs(new[0] - (gone.x0 + gone.x1) / 2), abs(new[1] - (gone.y0 + gone.y1) / 2)) <= (
        ORIGIN_SLACK * 1024
    )


def test_a_view_too_narrow_for_float64_plans_without_dividing_by_zero() -> None:
    """Zoomed in so far, 2^40 out, that the view's edges are the same float64: its pixel
    size is 0; planning still works (every tile equally near)."""
    levels = huge_pyramid(1 << 40, 3, 256)
    x = float(1 << 40)
    view = View(x, x, x, x, 640, 480)
    assert view.pixel_size == 0
    level, overflow = view_level(levels, view)
    plan = plan_tiles(levels, view, level)
    assert overflow == 0 and plan and all(p >= 0 for p in plan.values())
