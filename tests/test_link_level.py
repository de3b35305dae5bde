"""A level chosen for the link: the pool's link estimate, the shaped test server, and
the viewer's choice of the first level to show (pure logic) and its settled picture.

The shaped server (``ZarrHTTPServer(bandwidth=..., latency=...)``) is one link shared by
every response in flight, as a network is; the pool measures what its loads achieve over
it (``pool.stats.link``); the tile set shows first the level whose missing visible bytes
arrive within a time budget, then refines, and settles on exactly the ideal level.
"""

from __future__ import annotations

import http.client
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import make_array
from support.httpserver import ZarrHTTPServer
from support.images import expected_view, noise_image, region_world, write_pyramid
from support.teststores import GatedStore
from test_tiling import pyramid
from zarr.storage import LocalStore

from chunkpool import ChunkManager, ChunkPool, LinkEstimate
from chunkpool.stats import LinkEstimator
from viewer.tileset import TileSet
from viewer.tiling import (
    LINK_BUDGET,
    LINK_MIN_IN_FLIGHT,
    TileKey,
    View,
    add_refinement,
    admit,
    choose_level,
    first_level,
    is_visible_priority,
    plan_tiles,
    refinement,
    tiles_in_view,
)

# -- the shaped server: one link for all ----------------------------------------------------


def test_bandwidth_is_one_link_shared_by_concurrent_responses(tmp_path: Path) -> None:
    """Four concurrent 100 kB responses through a 400 kB/s link take 1 s together (a
    per-connection limit would let each take 0.25 s), and share it: none is done
    before most of the total has crossed."""
    (tmp_path / "blob.bin").write_bytes(bytes(100_000))
    ends: list[float] = []
    with ZarrHTTPServer(tmp_path, bandwidth=400_000) as server:

        def get() -> None:
            conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
            conn.request("GET", "/blob.bin")
            assert len(conn.getresponse().read()) == 100_000
            ends.append(time.monotonic())
            conn.close()

        threads = [threading.Thread(target=get) for _ in range(4)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert server.wait_idle(10)
        assert server.bytes_sent == 400_000
    assert len(ends) == 4
    assert max(ends) - started >= 0.95  # 400 kB at 400 kB/s, never less
    assert min(ends) - started >= 0.7  # taking turns, not one after the other


def test_stop_cuts_paced_responses_short(tmp_path: Path) -> None:
    """A link busy for a minute (many slow responses queued on it) stops at once."""
    (tmp_path / "blob.bin").write_bytes(bytes(200_000))
    server = ZarrHTTPServer(tmp_path, bandwidth=20_000)
    server.start()
    conns = []
    for _ in range(6):
        conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
        conn.request("GET", "/blob.bin")
        conns.append(conn)
    deadline = time.monotonic() + 10
    while server.in_flight < 6 and time.monotonic() < deadline:
        threading.Event().wait(0.01)
    assert server.in_flight == 6
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 5  # not the minute the bodies would take
    assert server.in_flight == 0
    for conn in conns:
        conn.close()


def shared_link_ends(requests: list[tuple[float, int]], rate: float, latency: float) -> list[float]:
    """When each request ``(time, bytes)`` ends on a link of ``rate`` bytes/s shared
    evenly by the loads it carries, each starting ``latency`` after its request."""
    starts = sorted((t + latency, i) for i, (t, _) in enumerate(requests))
    remaining: dict[int, float] = {}
    ends = [0.0] * len(requests)
    now, k = 0.0, 0
    while k < len(starts) or remaining:
        if not remaining:
            now = max(now, starts[k][0])
        n = len(remaining)
        done = now + min(remaining.values()) * n / rate if n else float("inf")
        nxt = min(done, starts[k][0] if k < len(starts) else float("inf"))
        for i in remaining:
            remaining[i] -= (nxt - now) * rate / n
        now = nxt
        for i in [i for i, r in remaining.items() if r <= 1e-6]:
            ends[i] = now
            del remaining[i]
        while k < len(starts) and starts[k][0] <= now + 1e-12:
            remaining[starts[k][1]] = requests[starts[k][1]][1]
            k += 1
    return ends


# -- the link estimate ------------------------------------------------------------------------


def fair_share(est: LinkEstimator, t: float, n: int, nbytes: int, rate: float, lat: float) -> float:
    """Record ``n`` loads of ``nbytes`` requested together at ``t`` on a link of
    ``rate`` shared evenly (each gets rate / n: they all end together); their end."""
    end = t + lat + n * nbytes / rate
    for _ in range(n):
        est.record(t, end, nbytes)
    return end


def test_estimator_finds_latency_and_throughput() -> None:
    """Batches of 1 to 16 loads requested together on a 1 MB/s, 50 ms link shared by
    the loads in flight: both numbers come back, though no load took only the
    latency and each took longer the more shared the link."""
    est = LinkEstimator()
    t = 0.0
    for n in (1, 8, 3, 16, 2, 4):
        t = fair_share(est, t, n, 100_000, 1e6, 0.05) + 1.0  # idle between batches
    link = est.estimate(0.5)
    assert link is not None
    assert link.samples == 34
    assert link.throughput == pytest.approx(1e6, rel=0.01)
    assert link.latency == pytest.approx(0.05, rel=0.01)
    assert link.fetched_per_loaded == 0.5
    assert link.seconds(200_000) == pytest.approx(0.25, rel=0.01)
    assert link.seconds(0) == 0.0


def test_estimator_counts_loads_in_flight_together_not_one_after_another() -> None:
    """A pipeline of single loads, each requested as the one before ends, on a
    2 MB/s, 100 ms link: the link is not shared, and the fit says so."""
    est = LinkEstimator()
    t = 0.0
    for i in range(40):
        nbytes = 50_000 * (1 + i % 4)
        t = fair_share(est, t, 1, nbytes, 2e6, 0.1)
    link = est.estimate(1.0)
    assert link is not None
    assert link.throughput == pytest.approx(2e6, rel=0.01)
    assert link.latency == pytest.approx(0.1, rel=0.01)


def test_a_cold_start_and_a_paced_pipeline_do_not_pull_the_estimate_down() -> None:
    """64 loads at once through a slow start (1 MB/s), then a paced pipeline of loads
    all alike (one every 50 ms) on a 2 MB/s, 100 ms link shared by the loads in
    flight: the fit's slope alone says under 1 MB/s and no latency (pacing on that
    would leave the link idle half the time); the busy periods say what it carried."""
    est = LinkEstimator()
    cold = [(0.0, 100_000)] * 64
    for (start, nbytes), end in zip(cold, shared_link_ends(cold, 1e6, 0.1), strict=True):
        est.record(start, end, nbytes)
    paced = [(10.0 + 0.05 * i, 110_000) for i in range(150)]
    for (start, nbytes), end in zip(paced, shared_link_ends(paced, 2e6, 0.1), strict=True):
        est.record(start, end, nbytes)
    link = est.estimate(1.0)
    assert link is not None
    assert link.throughput == pytest.approx(2e6, rel=0.05)
    assert link.latency == pytest.approx(0.1, rel=0.1)


def test_no_estimate_before_loads_tell_the_bandwidth() -> None:
    est = LinkEstimator()
    assert est.estimate(1.0) is None
    for i in range(20):
        est.record(i, i + 0.1, 100)  # all alike: latency or transfer, no telling
    assert est.estimate(1.0) is None


@pytest.fixture
def noise_array(tmp_path: Path) -> Path:
    """64 incompressible chunks of 32 kB (uint8 noise, no compression)."""
    data = np.random.default_rng(0).integers(0, 256, (8 * 128, 8 * 256), dtype=np.uint8)
    make_array(tmp_path / "noise.zarr", data, (128, 256), compressors=None)
    return tmp_path


def test_pool_measures_the_shaped_link(noise_array: Path) -> None:
    """Over a 2 MB/s, 100 ms link, batches of 1 to 16 concurrent loads: the pool's
    estimate is the link's, within a factor."""
    with ZarrHTTPServer(noise_array) as server:
        (pool,) = ChunkPool.from_zarr_node(f"{server.url}/noise.zarr")
        try:
            assert pool.stats.link is None  # nothing loaded yet
            server.latency, server.bandwidth = 0.1, 2e6
            indices = list(pool.multiscale_info.levels[0].iter_chunk_indices())
            for n in (1, 16, 4, 12, 2):
                batch, indices = indices[:n], indices[n:]
                for index in batch:
                    pool.get_chunk(0, index)
                pool.wait_for_chunks_to_load(timeout=60)
            link = pool.stats.link
            assert isinstance(link, LinkEstimate)
            assert link == pool.link_estimate
            assert 2e6 / 1.5 <= link.throughput <= 2e6 * 1.5
            assert 0.05 <= link.latency <= 0.4
            assert link.fetched_per_loaded == pytest.approx(1.0)  # no compression
        finally:
            pool.destroy()


def test_loaded_among_counts_held_and_cached(noise_array: Path) -> None:
    node = zarr.open_array(noise_array / "noise.zarr", mode="r")
    (pool,) = ChunkPool.from_zarr_node(node, cache_size=8)
    try:
        pool.get_chunk(0, (0, 0), ref="a")
        pool.get_chunk(0, (0, 1), ref="a")
        pool.wait_for_chunks_to_load()
        pool.drop_chunk(0, (0, 1), ref="a")  # cached now
        keys = [(0, (0, 0)), (0, (0, 1)), (0, (0, 2))]
        assert pool.loaded_among(keys) == {(0, (0, 0)), (0, (0, 1))}
    finally:
        pool.destroy()


# -- the level shown first (pure logic) -------------------------------------------------------

TILE = 100_000  # bytes of one tile on the wire


#: A 1920 x 1080 view at 1:1 (ideal level 0: 8 x 5 tiles of 256²).
LEVELS = pyramid(8192, 256, 6)
VIEW = View(1023.5, 1023.5, 1023.5 + 1920, 1023.5 + 1080, 1920, 1080)
IDEAL = choose_level(LEVELS, VIEW)
BYTES = [TILE] * len(LEVELS)


def nothing(key: TileKey) -> bool:
    return False


def test_fast_link_shows_the_ideal_level_at_once() -> None:
    fast = LinkEstimate(1e9, 0.001, 1.0, 100)  # 40 tiles: 4 ms
    assert IDEAL == 0
    assert first_level(LEVELS, VIEW, IDEAL, fast, BYTES, nothing) == IDEAL
    assert refinement(IDEAL, IDEAL) == ()


def test_no_estimate_behaves_as_before() -> None:
    assert first_level(LEVELS, VIEW, IDEAL, None, BYTES, nothing) == IDEAL


def test_slow_link_shows_a_coarser_level_first_within_the_budget() -> None:
    """At 2 MB/s with 100 ms latency, 250 ms carry 3 tiles: level 4 is the finest whose
    tiles in view arrive in time (level 3 has 2 x 2 here); then level 1, then 0."""
    slow = LinkEstimate(2e6, 0.1, 1.0, 100)
    first = first_level(LEVELS, VIEW, IDEAL, slow, BYTES, nothing)
    for level in range(IDEAL, first):  # every finer level would be late
        assert slow.seconds(tiles_in_view(LEVELS[level], VIEW) * TILE) > 0.25
    assert slow.seconds(tiles_in_view(LEVELS[first], VIEW) * TILE) <= 0.25
    assert tiles_in_view(LEVELS[3], VIEW) == 4
    assert first == 4
    assert refinement(first, IDEAL) == (4, 1)
    # a budget of 1 s buys level 1 at once: no step between it and the ideal
    assert first_level(LEVELS, VIEW, IDEAL, slow, BYTES, nothing, budget=1.0) == 1
    assert refinement(1, IDEAL) == (1,)


def test_cached_tiles_are_free() -> None:
    """With the ideal level's tiles in view all loaded or cached, even a slow link
    shows it at once; with all but two, those two decide."""
    slow = LinkEstimate(2e6, 0.1, 1.0, 100)
    iy0, iy1, ix0, ix1 = LEVELS[0].tile_range(VIEW.y0, VIEW.y1, VIEW.x0, VIEW.x1)
    ideal_tiles = [(0, iy, ix) for iy in range(iy0, iy1) for ix in range(ix0, ix1)]
    assert first_level(LEVELS, VIEW, IDEAL, slow, BYTES, set(ideal_tiles).__contains__) == 0
    almost = set(ideal_tiles[2:])
    assert first_level(LEVELS, VIEW, IDEAL, slow, BYTES, almost.__contains__) == 0  # 200 ms
    fewer = set(ideal_tiles[4:])
    assert first_level(LEVELS, VIEW, IDEAL, slow, BYTES, fewer.__contains__) > 0  # 300 ms


def test_refinement_tiles_come_before_the_ideal_ones() -> None:
    plan = plan_tiles(LEVELS, VIEW, IDEAL)
    add_refinement(plan, LEVELS, VIEW, (3, 1))
    by_priority = sorted(plan, key=plan.get)
    levels_in_order = [key[0] for key in by_priority if is_visible_priority(plan[key])]
    # coarsest (the fallback), then 3, then 1, then the ideal level 0
    assert levels_in_order == sorted(levels_in_order, reverse=True)
    assert {3, 1, 0} <= set(levels_in_order)


def test_admit_paces_new_tiles_in_priority_order() -> None:
    """The link is kept busy a little ahead (1.5 latencies + 50 ms), in priority order:
    no less urgent tile overtakes one that waits; held tiles stay, free ones go."""
    link = LinkEstimate(1e6, 0.1, 1.0, 100)
    plan = {(0, 0, i): float(i) for i in range(10)}
    held = {(0, 0, 9)}
    free = {(0, 0, 8)}

    def cost(key: TileKey) -> float:
        return 0.0 if key in free else 50_000.0  # 50 ms each

    # 4 loads in flight already (the least the link keeps busy), 50 ms of bytes
    part, busy, wake = admit(plan, held.__contains__, cost, link, 10.0, 10.0, (4, 50_000.0))
    # tile 0 ends at 10.15 (a latency, then 50 ms), tile 1 at 10.2: 0.2 s ahead, full
    assert sorted(part) == [(0, 0, 0), (0, 0, 1), (0, 0, 8), (0, 0, 9)]
    assert busy == pytest.approx(10.2)
    assert wake == pytest.approx(10.0)  # as soon as the link has carried anything
    # later, as the link drains, the next ones in order
    part, busy, wake = admit(plan, set(part).__contains__, cost, link, 10.1, busy, (6, 150_000.0))
    assert (0, 0, 2) in part and (0, 0, 3) in part and (0, 0, 4) not in part
    assert busy == pytest.approx(10.3)
    # a fast link takes everything at once
    fast = LinkEstimate(1e12, 0.0, 1.0, 100)
    assert admit(plan, held.__contains__, cost, fast, 0.0, 0.0, (0, 0.0))[0] == plan


def test_admit_counts_what_is_in_flight_not_only_the_projection() -> None:
    """An estimate too slow projects the link busy for long after its loads arrived:
    what is really in flight bounds the projection (nothing: the link is free now),
    and however slow the estimate, ``LINK_MIN_IN_FLIGHT`` loads are kept in flight."""
    slow = LinkEstimate(1_000.0, 0.0, 1.0, 100)  # 1 kB/s: a 10 kB tile "takes" 10 s
    plan = {(0, 0, i): float(i) for i in range(10)}

    def cost(key: TileKey) -> float:
        return 10_000.0

    # projected busy for an hour, but nothing is in flight: as if idle
    part, busy, _ = admit(plan, nothing, cost, slow, 100.0, 3700.0, (0, 0.0))
    assert len(part) == LINK_MIN_IN_FLIGHT  # the floor: the estimate says 1 is too many
    assert busy == pytest.approx(100.0 + LINK_MIN_IN_FLIGHT * 10.0)
    # one of those 4 still in flight (its 10 kB): 3 more, whatever the projection said
    held = set(list(part)[:1])
    part, _, wake = admit(plan, held.__contains__, cost, slow, 101.0, 3700.0, (1, 10_000.0))
    assert sorted(part) == [(0, 0, i) for i in range(LINK_MIN_IN_FLIGHT)]
    assert wake is not None


def shared_link_run(
    plan: dict[TileKey, float],
    nbytes: float,
    rate: float,
    latency: float,
    estimate: LinkEstimate,
    react: float = 0.02,
    dt: float = 0.001,
) -> tuple[dict[TileKey, float], float]:
    """Simulate the viewer pacing ``plan`` (every tile ``nbytes``) with :func:`admit`
    over a link of ``rate`` bytes/s shared evenly by the loads it carries, each
    starting ``latency`` after its request; the viewer sees an arrival ``react`` s
    late (its next frame) and comes back at the wake time ``admit`` asks for. Returns
    when each tile arrived, and the fraction of the time from the first request to the
    last arrival the link carried nothing (a simulated clock, in ``dt`` steps)."""
    requested: dict[TileKey, float] = {}
    remaining: dict[TileKey, float] = {}
    arrived: dict[TileKey, float] = {}
    busy_until, wake, due, t, idle = 0.0, None, 0.0, 0.0, 0.0
    while len(arrived) < len(plan):
        if (due is not None and t >= due) or (wake is not None and t >= wake):
            in_flight = [k for k in requested if k not in arrived]
            part, busy_until, wake = admit(
                plan,
                requested.__contains__,
                lambda key: nbytes,
                estimate,
                t,
                busy_until,
                (len(in_flight), len(in_flight) * nbytes),
            )
            for key in part:
                requested.setdefault(key, t)
            due = None
        active = [k for k, r in requested.items() if k not in arrived and t >= r + latency]
        if not active:
            idle += dt
        for key in active:
            left = remaining.setdefault(key, nbytes) - rate * dt / len(active)
            remaining[key] = left
            if left <= 0:
                arrived[key] = t + dt
                due = t + dt + react if due is None else due
        t += dt
        assert t < 600, "the link never carried the plan"
    return arrived, idle / t


#: 24 tiles of the level above the ideal, then 77 of the ideal (110 kB each) on a
#: 2 MB/s, 100 ms link: 55 ms a tile.
STAGED = {(1, i, 0): float(i) for i in range(24)} | {(0, i, 0): 100.0 + i for i in range(77)}
UNIT = 110e3 / 2e6


@pytest.mark.parametrize(
    "estimate",
    [
        LinkEstimate(2e6, 0.1, 1.0, 100),  # right
        LinkEstimate(0.5e6, 0.0, 1.0, 100),  # 4x too slow, no latency (seen on paced loads)
    ],
    ids=["right", "too-slow"],
)
def test_pacing_keeps_a_shared_link_busy_across_stages(estimate: LinkEstimate) -> None:
    """Over a simulated shared link, the tiles of the level above the ideal arrive
    first, and the ideal level's are asked for while the last of them still arrive:
    the link hardly idles, so the screen is covered about when those bytes could
    cross, and the ideal level about when all of them could. With an estimate 4x too
    slow, the loads kept in flight still keep the link mostly busy."""
    arrived, idle = shared_link_run(STAGED, 110e3, 2e6, 0.1, estimate)
    covered = max(t for k, t in arrived.items() if k[0] == 1)
    ideal = max(arrived.values())
    if estimate.throughput == 2e6:
        assert covered <= 0.1 + 24 * UNIT * 1.1 + 0.05
        assert ideal <= (0.1 + 101 * UNIT) * 1.05
        assert idle <= 0.05
    else:
        assert ideal <= (0.1 + 101 * UNIT) * 1.6
        assert idle <= 0.45


def test_a_tile_set_paces_on_its_loads_in_flight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a link estimated far slower than it is (1 kB/s: a 4 kB tile "takes" 4 s),
    a tile set keeps ``LINK_MIN_IN_FLIGHT`` loads in flight, and asks for the next tile
    as soon as one arrives: what it holds back, it holds back for loads really in
    flight, never for a projection of the estimate (which would hold the prefetch
    behind the visible tiles for seconds after they arrived)."""
    p = write_pyramid(
        tmp_path / "p.ome.zarr", noise_image((512, 512), seed=3), chunks=(64, 64), n_levels=1
    )
    store = GatedStore(LocalStore(p.path))
    store.rec.hold()
    slow = LinkEstimate(1_000.0, 0.0, 1.0, 100)
    monkeypatch.setattr(ChunkPool, "link_estimate", property(lambda self: slow))
    pool = ChunkPool.from_zarr_node(zarr.open_group(store, mode="r"), io_concurrency=8)[0]
    pool.enable_polled_load_handlers(lambda: None)
    tiles = TileSet(pool, [(0, True)])
    try:
        view = View(127.5, 127.5, 383.5, 383.5, 256, 256)  # 4 x 4 tiles of 64 in view
        tiles.update(view)
        first = list(tiles.tiles())
        assert len(first) == LINK_MIN_IN_FLIGHT
        store.rec.wait_started(LINK_MIN_IN_FLIGHT)
        store.rec.release(1)  # one read goes through: which one, the threads decide
        deadline = time.monotonic() + 30
        while not store.rec.finished and time.monotonic() < deadline:
            threading.Event().wait(0.002)
        key = store.rec.finished[0]  # e.g. "0/c/2/3"
        probe = ChunkManager(pool)
        probe.get_chunk(0, tuple(int(i) for i in key.split("/")[2:])).wait(30)
        probe.drop_all()
        pool.run_pending_handlers()
        assert sum(t.plane is not None for t in tiles.tiles()) == 1
        tiles.update(view)
        assert len(list(tiles.tiles())) == LINK_MIN_IN_FLIGHT + 1
    finally:
        store.rec.open_gate()
        tiles.close()
        pool.destroy()


# -- the settled picture ----------------------------------------------------------------------

SIZE = (240, 160)


def test_settled_picture_is_the_ideal_level_exactly(
    tmp_path: Path, make_viewer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a link estimated slow, a jump shows a coarser level first; once settled the
    picture is exactly the ideal level's (numpy ground truth), the same as with the
    level chosen without the link."""
    pyramid_ = write_pyramid(
        tmp_path / "noise.ome.zarr", noise_image((2048, 2048)), chunks=(64, 64), n_levels=5
    )
    slow = LinkEstimate(400_000, 0.05, 1.0, 100)  # 4 kB tiles: 250 ms carry 50 of them
    monkeypatch.setattr(ChunkPool, "link_estimate", property(lambda self: slow))
    region = (1000, 600, 1000 + SIZE[0], 600 + SIZE[1])  # 1:1: level 0, 5 x 4 tiles
    shots = {}
    for budget in (0.0005, None):
        viewer = make_viewer(str(pyramid_.path), colormap="gray", clim=(0, 255), link_budget=budget)
        assert viewer.wait_settled(30)
        viewer.show_region(*region)
        viewer.refresh()
        tiles = viewer.layer.tiles
        if budget is not None:  # 0.5 ms buys no fetch: a level already loaded first
            assert tiles.first_level > tiles.target_level == 0
        else:
            assert tiles.first_level == tiles.target_level == 0
        assert viewer.wait_settled(30)
        shots[budget] = viewer.screenshot()[..., 0].astype(np.int64)
        assert viewer.layer.tiles.first_level == 0
    expected = expected_view(pyramid_, 0, region_world(pyramid_, region), SIZE)
    assert (np.abs(expected - shots[None][None]) == 0).any(axis=0).all()
    np.testing.assert_array_equal(shots[0.0005], shots[None])


# -- the knob: zarrscope --link-budget ---------------------------------------------------


@pytest.mark.parametrize("value", ["0", "-1", "soon", "nan", "inf", ""])
def test_cli_link_budget_refuses_bad_values_in_one_line(
    value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from viewer.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["img.zarr", "--link-budget", value, "--screenshot", "out.png"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == "zarrscope: error: --link-budget needs a positive number of seconds, or 'off'"
    assert "Traceback" not in "\n".join(err)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [([], LINK_BUDGET), (["--link-budget", "off"], None), (["--link-budget", "1.5"], 1.5)],
    ids=["default", "off", "seconds"],
)
def test_cli_link_budget_reaches_the_viewer(
    argv: list[str],
    expected: float | None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """``--link-budget SECONDS`` / ``off`` / nothing is the viewer's ``link_budget``."""
    import viewer.app
    from viewer.__main__ import main

    seen: dict[str, Any] = {}

    class Recorder:
        def __init__(self, *args: Any, **options: Any):
            seen.update(options)
            raise ValueError("recorded")

    monkeypatch.setattr(viewer.app, "Viewer", Recorder)
    out = str(tmp_path / "out.png")
    assert main([str(tmp_path / "img.zarr"), *argv, "--screenshot", out]) == 2
    assert capsys.readouterr().err.strip().endswith("zarrscope: error: recorded")
    assert seen["link_budget"] == expected
