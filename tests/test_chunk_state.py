"""A chunk's state has one owner: the pool changes it, in one place, along the moves
of ``chunkpool.location.TRANSITIONS``; a load job's progress (queued, fetching,
decoding, done) is the scheduler's alone; ``ChunkLocation.state`` reads both."""

from __future__ import annotations

import ast
import pathlib

import pytest
import zarr
from conftest import make_array, ramp
from support.teststores import GatedStore

from chunkpool import ChunkLoadError, ChunkState
from chunkpool.location import TRANSITIONS

ROOT = pathlib.Path(__file__).resolve().parents[1] / "chunkpool"


def _assignments(attribute: str) -> list[tuple[str, str]]:
    """(module, enclosing function) of every assignment to ``<x>.<attribute>``."""
    found = []
    for path in sorted(ROOT.glob("*.py")):
        tree = ast.parse(path.read_text())
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                targets = (
                    node.targets
                    if isinstance(node, ast.Assign)
                    else [node.target]
                    if isinstance(node, ast.AnnAssign | ast.AugAssign)
                    else []
                )
                for target in targets:
                    if isinstance(target, ast.Attribute) and target.attr == attribute:
                        found.append((path.name, func.name))
    return sorted(set(found))


def test_the_chunk_state_is_written_in_one_place_and_job_progress_in_the_scheduler() -> None:
    assert _assignments("_state") == [("location.py", "__init__"), ("pool.py", "_move")]
    assert {module for module, _ in _assignments("state")} == {"scheduler.py"}


def test_every_move_is_one_of_the_transitions(pools, tmp_path) -> None:
    """Loaded then destroyed, failed then destroyed, cancelled (LOADING seen while
    its read is held at the gate): every state a chunk shows follows the table."""
    data = ramp((40, 40))
    make_array(tmp_path / "a.zarr", data, (20, 20))
    (tmp_path / "a.zarr" / "c" / "1" / "0").write_bytes(b"not a zstd frame")
    store = GatedStore(zarr.storage.LocalStore(tmp_path / "a.zarr"))
    pool = pools(zarr.open_array(store, mode="r"))
    store.rec.hold()
    good, bad, dropped = (pool.get_chunk(0, i) for i in [(0, 0), (1, 0), (1, 1)])
    store.rec.wait_started(3, timeout=60)
    assert {good.state, bad.state, dropped.state} == {ChunkState.LOADING}
    pool.drop_chunk(0, (1, 1))
    assert dropped.state is ChunkState.CANCELLED
    store.rec.open_gate()
    with pytest.raises(ChunkLoadError):
        pool.wait_for_chunks_to_load(timeout=60)
    assert (good.state, bad.state) == (ChunkState.LOADED, ChunkState.FAILED)
    pool.drop_chunk(0, (0, 0))
    pool.drop_chunk(0, (1, 0))
    assert (good.state, bad.state) == (ChunkState.DESTROYED, ChunkState.DESTROYED)
    seen = [
        (ChunkState.PENDING, ChunkState.LOADED),
        (ChunkState.LOADED, ChunkState.DESTROYED),
        (ChunkState.PENDING, ChunkState.FAILED),
        (ChunkState.FAILED, ChunkState.DESTROYED),
        (ChunkState.PENDING, ChunkState.CANCELLED),
    ]
    assert all(new in TRANSITIONS[old] for old, new in seen)
    assert sum(len(moves) for moves in TRANSITIONS.values()) == len(seen)  # all of them
