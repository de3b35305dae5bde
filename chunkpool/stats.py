"""Counters of what the pool did, read as an immutable snapshot (``pool.stats``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["PoolStats", "StatsRecorder"]


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of a pool's activity since it was created.

    ``hits`` are requests served by a chunk already held or cached, ``misses`` those
    that started a load. ``loads`` counts completed loads, ``failures`` failed ones,
    ``cancellations`` loads abandoned because their last ref was dropped.
    ``bytes_fetched`` is what was read from the store (encoded), ``bytes_loaded`` the
    decoded data produced. ``recycled_bytes`` is the free memory kept for reuse by
    reads and decodes. ``index_bytes`` is what the cached shard indexes take (part of
    ``memory_usage``). Under a memory budget: ``memory_budget`` is its bound (None
    without one), ``reserved_bytes`` what the loads admitted reserve (part of
    ``memory_usage``), ``over_budget`` the requests waiting for room, and
    ``budget_releases`` the held chunks released to make room. Latencies (request to
    data, seconds) are percentiles over the last few thousand loads (NaN before the
    first).
    """

    hits: int
    misses: int
    loads: int
    failures: int
    cancellations: int
    bytes_fetched: int
    bytes_loaded: int
    latency_p50: float
    latency_p90: float
    latency_p99: float
    chunks_held: int
    chunks_cached: int
    chunks_pending: int
    chunks_waiting: int
    chunks_fetching: int
    chunks_decoding: int
    memory_usage: int
    cache_bytes: int
    pending_bytes: int
    recycled_bytes: int
    index_bytes: int
    reserved_bytes: int
    over_budget: int
    budget_releases: int
    memory_budget: int | None


class StatsRecorder:
    """The mutable counters behind :class:`PoolStats`; updated under the pool's lock."""

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.loads = 0
        self.failures = 0
        self.cancellations = 0
        self.bytes_fetched = 0
        self.bytes_loaded = 0
        self.budget_releases = 0
