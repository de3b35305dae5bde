"""Level choice, visible tiles, priorities and fallback, without a GPU."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viewer.tiling import (
    PREFETCH,
    VISIBLE,
    PlaneLevel,
    View,
    choose_level,
    eviction_order,
    plan_tiles,
    tiles_to_keep,
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


def test_zoom_in_prefetches_the_finer_level_under_the_cursor():
    levels = pyramid()
    view = view_of(0, 0, 4096, 4096, 1024, 1024, cursor=(3000.0, 1000.0))
    target = choose_level(levels, view)
    assert target == 2
    plan = plan_tiles(levels, view, target, zoom_in=True)
    finer = [k for k in plan if k[0] == 1]
    assert finer and all(plan[k] // 1e9 == PREFETCH for k in finer)
    for _, iy, ix in finer:  # all around the cursor
        y0, y1, x0, x1 = levels[1].tile_bounds(iy, ix)
        assert abs((x0 + x1) / 2 - 3000) < 2048 and abs((y0 + y1) / 2 - 1000) < 2048
    assert not [k for k in plan_tiles(levels, view, target) if k[0] == 1]


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
