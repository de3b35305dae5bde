"""Random get / drop / priority / wait / destroy sequences from two threads at once,
checked against a plain model of refs, priorities, cache, memory and handler calls.

The budgeted machines add a memory budget of a few chunks: ``memory_usage`` is sampled
while the threads run and must never exceed it, and once loads are over, every
request still waiting must be blocked by the rules (no room, nothing cached, nothing
held less urgently); registrations the budget released count as drops.

Each step runs two op lists concurrently, one per thread, with disjoint refs (as two
views of one pool would): the refs each thread holds are then exactly predictable,
while the pool sees every interleaving of the two. Handlers are counted per
(ref, location) and checked against what the model says must have happened.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

import numpy as np
import zarr
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from chunkpool import ENTRY_OVERHEAD, ChunkPool, ChunkState, read_multiscales

GRID = 3
CACHE = 2
KEYS = [(i, j) for i in range(GRID) for j in range(GRID)]
DEAD = (ChunkState.CANCELLED, ChunkState.DESTROYED)

op = st.one_of(
    st.tuples(
        st.just("get"),
        st.sampled_from(KEYS),
        st.integers(0, 2),
        st.one_of(st.none(), st.integers(-5, 5)),
    ),
    st.tuples(st.just("drop"), st.sampled_from(KEYS), st.integers(0, 2), st.none()),
)
ops = st.lists(op, max_size=12)


def make_array() -> zarr.Array:
    data = np.arange(1, 1 + (GRID * 8) ** 2, dtype="uint16").reshape(GRID * 8, GRID * 8)
    arr = zarr.create_array(
        zarr.storage.MemoryStore(), shape=data.shape, chunks=(8, 8), dtype="uint16"
    )
    arr[:] = data
    return arr


class _Loop:
    """An asyncio loop in a thread, standing in for an application's event loop."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="app-loop")
        self.thread.start()

    def flush(self) -> None:
        """Wait until every callback queued so far has run."""
        done = threading.Event()
        self.loop.call_soon_threadsafe(done.set)
        assert done.wait(60), "the application loop did not run its callbacks"

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


#: What one loaded chunk (or one admitted load) counts: 8 x 8 uint16 and its entry.
CHARGE = 8 * 8 * 2 + ENTRY_OVERHEAD


class PoolMachine(RuleBasedStateMachine):
    async_handlers = False
    budget: int | None = None  # memory_budget=, in bytes

    def __init__(self) -> None:
        super().__init__()
        (self.info,) = read_multiscales(make_array(), "stateful")
        self.app = _Loop() if self.async_handlers else None
        self.lock = threading.Lock()
        self.events: Counter = Counter()  # (kind, ref, id(loc))
        self.log: list[tuple[str, str, int]] = []  # the same, in the order they ran
        self.registrations: Counter = Counter()  # (ref, id(loc))
        self.drops: Counter = Counter()  # (ref, id(loc))
        self.registered_refs: dict[int, set[str]] = {}  # id(loc) -> refs that ever held it
        self.seen: dict[int, object] = {}  # keeps every location alive, so ids stay unique
        self.new_pool()

    def new_pool(self) -> None:
        self.pool = ChunkPool(self.info, cache_size=CACHE, memory_budget=self.budget)
        if self.app is not None:
            self.pool.enable_async_load_handlers(self.app.loop.call_soon_threadsafe)
        self.held: dict[tuple[str, tuple[int, int]], tuple[object, float]] = {}

    def handlers(self, ref: str) -> dict:
        def record(kind):
            def handler(loc):
                with self.lock:
                    self.events[(kind, ref, id(loc))] += 1
                    self.log.append((kind, ref, id(loc)))

            return handler

        return {
            "load_handler": record("load"),
            "drop_handler": record("drop"),
            "destroy_handler": record("destroy"),
        }

    def run_ops(self, prefix: str, op_list, held: dict, start: threading.Barrier) -> None:
        """One thread's ops; ``held`` is its own (ref, key) -> (loc, priority) model."""
        start.wait()
        for kind, key, ref_n, priority in op_list:
            ref = f"{prefix}{ref_n}"
            if kind == "get":
                loc = self.pool.get_chunk(0, key, ref, priority=priority, **self.handlers(ref))
                previous = held.get((ref, key))
                if previous is not None and previous[0] is not loc and self.budget:
                    # the budget released that registration (its drop handler ran)
                    assert ref not in previous[0].refs
                    with self.lock:
                        self.drops[(ref, id(previous[0]))] += 1
                    previous = None
                if previous is None:
                    with self.lock:
                        self.registrations[(ref, id(loc))] += 1
                        self.registered_refs.setdefault(id(loc), set()).add(ref)
                        self.seen[id(loc)] = loc
                    held[(ref, key)] = (loc, 0.0 if priority is None else priority)
                else:
                    assert previous[0] is loc, "a held chunk changed location"
                    held[(ref, key)] = (loc, previous[1] if priority is None else priority)
            else:
                self.pool.drop_chunk(0, key, ref)
                previous = held.pop((ref, key), None)
                if previous is not None:
                    with self.lock:
                        self.drops[(ref, id(previous[0]))] += 1

    def flush(self) -> None:
        """Let the application loop run every handler call the pool has queued: the
        pool hands a batch to the loop just after its state changed (after the lock),
        so a call can still be on its way when a wait for the loads returns."""
        if self.app is None:
            return
        deadline = time.monotonic() + 60
        self.app.flush()
        while self.pool.pending_handler_calls:
            assert time.monotonic() < deadline, "queued handler calls never ran"
            self.app.flush()

    @rule(ops_a=ops, ops_b=ops)
    def two_threads(self, ops_a, ops_b) -> None:
        start = threading.Barrier(2)
        mine = [{k: v for k, v in self.held.items() if k[0].startswith(p)} for p in "AB"]
        threads = [
            threading.Thread(target=self.run_ops, args=(p, o, h, start))
            for p, o, h in zip("AB", (ops_a, ops_b), mine, strict=True)
        ]
        stop = threading.Event()
        sampled: list[int] = []

        def sample() -> None:  # the bound holds at every moment, not only between steps
            while not stop.wait(0.0002):  # (a pause that leaves the GIL to the others)
                sampled.append(self.pool.memory_usage)

        sampler = threading.Thread(target=sample) if self.budget else None
        if sampler is not None:
            sampler.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        self.held = {**mine[0], **mine[1]}
        if sampler is not None:
            self.pool.wait_for_chunks_to_load(30)  # (then no load ends to make room)
            stop.set()
            sampler.join(30)
            assert max(sampled, default=0) <= self.budget
            self.reconcile_released()

    def reconcile_released(self) -> None:
        """Registrations the budget released: their drop handler ran, the model lets
        them go."""
        for (ref, key), (loc, _) in list(self.held.items()):
            if ref not in loc.refs:
                assert loc.state is ChunkState.DESTROYED
                self.drops[(ref, id(loc))] += 1
                del self.held[(ref, key)]

    @rule(prefix=st.sampled_from("AB"))
    def drop_everything_of_one_thread(self, prefix: str) -> None:
        mine = [(ref, key) for ref, key in self.held if ref.startswith(prefix)]
        self.two_threads([("drop", key, int(ref[1:]), None) for ref, key in mine], [])

    @rule()
    def wait_all(self) -> None:
        self.pool.wait_for_chunks_to_load()
        self.flush()
        for (ref, _key), (loc, _) in self.held.items():
            if self.budget and loc.over_budget:
                assert loc.state is ChunkState.PENDING
                continue
            assert loc.state is ChunkState.LOADED
            # every registration still held has had its load handler run
            assert self.events[("load", ref, id(loc))] >= (
                self.registrations[(ref, id(loc))] - self.drops[(ref, id(loc))]
            )

    @rule()
    def destroy(self) -> None:
        for ref, _key in self.held:
            loc = self.held[(ref, _key)][0]
            self.drops[(ref, id(loc))] += 1  # destroy drops every ref still held
        self.pool.destroy()
        self.flush()
        assert self.pool.memory_usage == 0 and list(self.pool.iter_chunks()) == []
        for loc in self.seen.values():
            assert loc.state in DEAD
        self.check_handlers()
        self.new_pool()

    @invariant()
    def refs_priorities_memory_and_cache(self) -> None:
        expected: dict[tuple[int, int], dict[str, float]] = {}
        for (ref, key), (_, priority) in self.held.items():
            expected.setdefault(key, {})[ref] = priority
        for (_ref, key), (loc, _) in self.held.items():
            assert loc.refs == set(expected[key])
            assert loc.priority == min(expected[key].values())
        assert self.pool.stats.chunks_held == len(expected)
        chunks, stats = self.snapshot()
        cached = [loc for loc in chunks if not loc.refs]
        assert len(cached) <= CACHE
        assert not {loc.key[1] for loc in cached} & set(expected)
        assert stats.memory_usage == stats.reserved_bytes + sum(
            loc.nbytes + ENTRY_OVERHEAD for loc in chunks
        )
        if self.budget:
            assert stats.memory_usage <= self.budget
            self.check_waiting(stats)

    def snapshot(self):
        """The loaded chunks and the stats, seen together: loads still in flight end
        in the background, so read again until none ended in between (at most one
        more read per load in flight)."""
        while True:
            before = self.pool.stats
            chunks = list(self.pool.iter_chunks())
            stats = self.pool.stats
            if (before.loads, before.memory_usage) == (stats.loads, stats.memory_usage):
                return chunks, stats

    def check_waiting(self, stats) -> None:
        """Once loads are over, a request waits only if the rules leave it no room:
        too little free, nothing cached to evict, nothing held less urgently."""
        locs = {id(loc): loc for loc, _ in self.held.values()}.values()
        waiting = [loc for loc in locs if loc.over_budget]
        assert stats.over_budget == len(waiting)
        if not waiting:
            return
        assert self.budget - stats.memory_usage < CHARGE
        assert stats.chunks_cached == 0
        most_urgent = min(loc.priority for loc in waiting)
        assert all(loc.priority <= most_urgent for loc in locs if not loc.over_budget)

    @invariant()
    def handler_counts(self) -> None:
        self.flush()
        self.check_handlers()

    def check_handlers(self) -> None:
        with self.lock:
            events = Counter(self.events)
            log = list(self.log)
        for (ref, lid), n in self.registrations.items():
            assert events[("load", ref, lid)] <= n
            if self.async_handlers:  # a drop again while the first is queued adds nothing
                assert events[("drop", ref, lid)] <= self.drops[(ref, lid)]
            else:
                assert events[("drop", ref, lid)] == self.drops[(ref, lid)]
        # queued calls are coalesced: a chunk that died before anything about it was
        # delivered is told nothing (chunkpool/dispatch.py's rules)
        heard = {lid for _, _, lid in log} if self.async_handlers else set(self.seen)
        for lid, refs in self.registered_refs.items():
            dead = self.seen[lid].state in DEAD
            for ref in refs:
                expected = 1 if dead and lid in heard else 0
                assert events[("destroy", ref, lid)] == expected, (ref, lid)
        if self.async_handlers:
            self.check_delivery_order(log)

    def check_delivery_order(self, log: list[tuple[str, str, int]]) -> None:
        """What each ref was told of each chunk ends where the model is: nothing after a
        destroy, and a ref that does not hold a chunk last heard of it a drop."""
        held = {(ref, id(loc)) for (ref, _key), (loc, _) in self.held.items()}
        last: dict[tuple[str, int], str] = {}
        for kind, ref, lid in log:
            assert last.get((ref, lid)) != "destroy", (kind, ref, lid)
            last[(ref, lid)] = kind
        for pair, kind in last.items():
            if pair not in held:
                assert kind != "load", pair

    def teardown(self) -> None:
        self.pool.destroy()
        if self.app is not None:
            self.app.close()


class AsyncPoolMachine(PoolMachine):
    async_handlers = True


class BudgetPoolMachine(PoolMachine):
    budget = 4 * CHARGE  # 4 of the 9 chunks


class AsyncBudgetPoolMachine(BudgetPoolMachine):
    async_handlers = True


SETTINGS = settings(
    max_examples=100,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestPoolSyncHandlers = PoolMachine.TestCase
TestPoolSyncHandlers.settings = SETTINGS
TestPoolAsyncHandlers = AsyncPoolMachine.TestCase
TestPoolAsyncHandlers.settings = SETTINGS
BUDGET_SETTINGS = settings(SETTINGS, max_examples=60)
TestPoolBudgetSyncHandlers = BudgetPoolMachine.TestCase
TestPoolBudgetSyncHandlers.settings = BUDGET_SETTINGS
TestPoolBudgetAsyncHandlers = AsyncBudgetPoolMachine.TestCase
TestPoolBudgetAsyncHandlers.settings = BUDGET_SETTINGS
