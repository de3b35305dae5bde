"""The soak: a long random session over HTTP while the server faults 5% of requests.

Two layers (a two-channel z-stack and labels) are read from the loopback test server
(tests/support/httpserver.py), which answers about one request in twenty with a 500, a
503, a connection reset, a stall or a truncated body, chosen at random. The viewer is
moved at random (pans, zooms, z steps, channel and layer switches) for a fixed number
of moves. At every step the pools' counted memory stays within the shared memory
budget and the texture bytes within theirs, and no exception escapes; failed tiles are
tried again (the retry schedule is shortened so the session is not spent waiting).
When the faults stop, the view settles and equals the numpy ground truth, pixel for
pixel; after closing, the pools hold nothing, have no handler call queued, and every
thread the session started has ended. Bounded: the moves are counted, not timed, and
each wait has a deadline.
"""

from __future__ import annotations

import pathlib
import random
import threading
import time
from dataclasses import replace

import numpy as np
import pytest
from support.httpserver import ZarrHTTPServer
from support.images import noise_image, write_pyramid
from support.moves import RandomMoves
from test_render import settle

from chunkpool import ChunkPool, MemoryBudget, RetryPolicy
from viewer import TextureBudget, Viewer
from viewer.tiling import RetrySchedule

pytestmark = pytest.mark.render

SIZE = (160, 120)
MOVES = 400
FAULT_RATE = 0.05
FAULTS = ("500", "503", "reset", "stall", "truncated")
#: A stalled request is given up after a second and tried again, three tries in all.
RETRY = RetryPolicy(attempts=3, timeout=1.0, base_delay=0.02, max_delay=0.1)


def _faulty(rng: random.Random, share: float):
    """A fault predicate hitting about ``share`` of the requests at random (it runs
    under the server's lock, so one generator is safe)."""
    return lambda path: rng.random() < share


def _wait_for(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: {threading.enumerate()}"
        threading.Event().wait(0.02)


def session_threads() -> set[threading.Thread]:
    """The running threads but those that libraries start once per process on first
    use and keep: zarr's event loop and its executor, wgpu's device poller."""
    return {
        t
        for t in threading.enumerate()
        if not (t.name == "zarr_io" or t.name.startswith("asyncio_"))
        and type(t).__module__.split(".")[0] != "wgpu"
    }


def test_a_long_session_against_a_faulty_server_stays_bounded_and_ends_right(
    tmp_path: pathlib.Path,
) -> None:
    stack = noise_image((2, 3, 1024, 1024), seed=11)  # (c, z, y, x)
    write_pyramid(
        tmp_path / "img.ome.zarr",
        stack,
        chunks=(1, 1, 64, 64),
        n_levels=4,
        axes=["c", "z", "y", "x"],
    )
    ids = (noise_image((1024, 1024), seed=12) // 16).astype(np.uint32)
    write_pyramid(tmp_path / "labels.ome.zarr", ids, chunks=(64, 64), n_levels=2)
    rng = np.random.default_rng(5)
    memory = MemoryBudget(2 << 20)
    textures = TextureBudget(2 << 20)
    threads_before = session_threads()
    with ZarrHTTPServer(tmp_path) as server:
        pools = [
            ChunkPool.from_zarr_node(
                f"{server.url}/{name}", retry=RETRY, memory_budget=memory, cache_bytes=1 << 20
            )[0]
            for name in ("img.ome.zarr", "labels.ome.zarr")
        ]
        viewer = Viewer(
            pools[0],
            None,
            size=SIZE,
            colormap=["gray", "magenta"],
            clim=(0, 255),
            show_hud=False,
            texture_budget=textures,
        )
        faults = [
            server.add_fault(_faulty(random.Random(i), FAULT_RATE / 5), k)
            for i, k in enumerate(FAULTS)
        ]
        try:
            labels = viewer.add_labels(pools[1])
            for layer in viewer.layers:
                layer.tiles.retry = RetrySchedule(first=0.05, cap=0.2)
            retried = 0
            move_at_random = RandomMoves(
                viewer, rng, ("pan", "zoom", "z", "channel", "layer", "cursor"), extent=1024
            )
            for move in range(MOVES):
                move_at_random()
                viewer.refresh()
                if move % 50 == 0:
                    viewer.screenshot()
                if move % 10 == 0:  # let the loads catch up: each visible tile ends loaded or
                    # failed, and then a failed one is being tried again
                    assert viewer.wait_settled(60), (move, [x.status() for x in viewer.layers])
                    for layer in viewer.layers:
                        failed = layer.status().failed if layer.visible else 0
                        assert len(layer.tiles.retry) >= failed, (move, layer.name)
                        retried += failed
                used = sum(pool.memory_usage for pool in pools)
                assert used == memory.used <= memory.limit, (move, used)
                assert textures.scene_bytes + textures.spare_bytes <= textures.nbytes, move
            hit = {fault.kind: fault.hits for fault in faults}
            requests = len(server.requests)
            print(f"\n{MOVES} moves, {requests} requests, faults {hit}, failed tiles {retried}")
            assert sum(hit.values()) > 0.02 * requests, "the faults did not happen"
            # the faults stop (stalled requests are let go): the view ends right
            server.clear_faults()
            server.stall_release.set()
            image = viewer.layers[0]
            image.visible, labels.visible = True, False
            for display, shown in zip(image.displays, (True, False), strict=True):
                image.set_display(replace(display, visible=shown))
            viewer.set_index("z", 2)
            viewer.show_region(200, 100, 200 + SIZE[0], 100 + SIZE[1])
            shot = settle(viewer, timeout=90)
            assert image.status().failed == 0
            assert memory.used <= memory.limit
            window = stack[0, 2, 100 : 100 + SIZE[1], 200 : 200 + SIZE[0]]
            assert (shot == window[..., None]).all()
        finally:
            viewer.close()
        for pool in pools:
            stats = pool.stats
            assert (stats.chunks_held, stats.chunks_pending, pool.pending_handler_calls) == (
                0,
                0,
                0,
            )
            pool.destroy()
    _wait_for(lambda: session_threads() <= threads_before, "threads left after close")
