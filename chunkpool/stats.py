"""Counters of what the pool did, read as an immutable snapshot (``pool.stats``)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["PoolStats", "StatsRecorder"]

#: Number of most recent load latencies the percentiles are computed over.
LATENCY_WINDOW = 2048


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
        self.latencies: deque[float] = deque(maxlen=LATENCY_WINDOW)

    def latency_percentiles(self) -> tuple[float, float, float]:
        if not self.latencies:
            return (float("nan"),) * 3
        p50, p90, p99 = np.percentile(np.fromiter(self.latencies, float), [50, 90, 99])
        return float(p50), float(p90), float(p99)
