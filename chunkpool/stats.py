"""Counters of what the pool did, read as an immutable snapshot (``pool.stats``), and
the estimate of the link to the store (:class:`LinkEstimate`) made from the loads."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["LinkEstimate", "LinkEstimator", "PoolStats", "StatsRecorder"]

#: Number of most recent load latencies the percentiles are computed over.
LATENCY_WINDOW = 2048
#: Each busy period of the link weighs this much less at every newer one (the estimate
#: follows a change of the network within about ten periods).
LINK_DECAY = 0.9
#: Busy periods seen before the link has an estimate.
LINK_MIN_PERIODS = 2


@dataclass(frozen=True)
class LinkEstimate:
    """What the link to a pool's store achieves, measured on the pool's own loads.

    A *busy period* is a stretch of time during which at least one load was in
    progress (from its request to its data): the loads of a viewer's jump, requested
    together, make one. Over the recent periods, their duration is fitted as
    ``latency + bytes / throughput`` (least squares, newer periods weighing more), so
    ``throughput`` (bytes fetched per second, encoded, as they crossed the link) is what
    a batch of concurrent loads achieves together, and ``latency`` (seconds) what any
    batch costs on top, however small. ``fetched_per_loaded`` is the bytes fetched per
    byte of decoded data (the compression, absent chunks counting as decoded bytes
    never fetched), to turn a chunk's decoded size into what it costs to fetch.
    """

    throughput: float
    latency: float
    fetched_per_loaded: float
    periods: int

    def seconds(self, nbytes: float) -> float:
        """How long fetching ``nbytes`` (encoded) together should take; 0 for nothing."""
        if nbytes <= 0:
            return 0.0
        return self.latency + nbytes / self.throughput


class LinkEstimator:
    """Busy periods of the loads (:meth:`record`, O(1) each) and the fit of their
    durations (:meth:`estimate`). Loads are recorded as they finish, so in order of
    their end; a load requested before the current period began merges it with the
    one before (loads requested together and finished apart stay one period)."""

    __slots__ = ("_last", "_open", "_periods", "_sums")

    def __init__(self) -> None:
        # decayed sums over closed periods: weight, bytes, seconds, bytes², bytes x seconds
        self._sums = [0.0, 0.0, 0.0, 0.0, 0.0]
        self._periods = 0
        self._open: list[float] | None = None  # [start, end, bytes] of the current period
        self._last: list[float] | None = None  # the period before it, not yet added

    def record(self, start: float, end: float, nbytes: int) -> None:
        """A load requested at ``start`` finished at ``end`` with ``nbytes`` fetched."""
        current = self._open
        if current is not None and start <= current[1]:
            current[1] = max(current[1], end)
            current[2] += nbytes
            if start < current[0]:
                last = self._last
                if last is not None and start <= last[1]:  # one period after all
                    current[0] = min(start, last[0])
                    current[2] += last[2]
                    self._last = None
                else:
                    current[0] = start
            return
        if self._last is not None:
            self._add(self._last)
        self._last = current
        self._open = [start, end, float(nbytes)]

    def _add(self, period: list[float]) -> None:
        start, end, nbytes = period
        sums = self._sums
        for i in range(5):
            sums[i] *= LINK_DECAY
        seconds = end - start
        sums[0] += 1.0
        sums[1] += nbytes
        sums[2] += seconds
        sums[3] += nbytes * nbytes
        sums[4] += nbytes * seconds
        self._periods += 1

    def estimate(self, fetched_per_loaded: float) -> LinkEstimate | None:
        """The fit over the closed periods and the current one; None before
        ``LINK_MIN_PERIODS`` periods or before any byte was fetched."""
        w, x, y, xx, xy = self._sums
        periods = self._periods
        for period in (self._last, self._open):
            if period is not None:
                seconds = period[1] - period[0]
                w, x, y = w + 1.0, x + period[2], y + seconds
                xx, xy = xx + period[2] ** 2, xy + period[2] * seconds
                periods += 1
        if periods < LINK_MIN_PERIODS or x <= 0 or y <= 0:
            return None
        mean_x, mean_y = x / w, y / w
        var = xx / w - mean_x * mean_x
        cov = xy / w - mean_x * mean_y
        if var > (0.05 * mean_x) ** 2 and cov > 0:
            slope = cov / var  # seconds per byte
            latency = mean_y - slope * mean_x
            if latency < 0:  # through the origin instead
                slope, latency = xy / xx, 0.0
        else:  # periods of one size (or noise): what they took, per byte
            slope, latency = y / x, 0.0
        return LinkEstimate(1.0 / slope, latency, fetched_per_loaded, periods)


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
    first). ``link`` is the estimate of what the link to the store achieves
    (:class:`LinkEstimate`: throughput, latency), None until a few loads have fetched
    bytes.
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
    link: LinkEstimate | None = None


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
        self.link = LinkEstimator()

    def fetched(self, submitted: float, now: float, nbytes: int, ok: bool) -> None:
        """A load requested at ``submitted`` ended at ``now`` (perf_counter seconds),
        having fetched ``nbytes``; ``ok`` unless it failed (a failure says nothing of
        the link's speed)."""
        self.latencies.append(now - submitted)
        self.bytes_fetched += nbytes
        if ok:
            self.link.record(submitted, now, nbytes)

    def link_estimate(self) -> LinkEstimate | None:
        """The link's estimate now (:meth:`LinkEstimator.estimate`)."""
        loaded = self.bytes_loaded
        return self.link.estimate(self.bytes_fetched / loaded if loaded else 1.0)

    def latency_percentiles(self) -> tuple[float, float, float]:
        if not self.latencies:
            return (float("nan"),) * 3
        p50, p90, p99 = np.percentile(np.fromiter(self.latencies, float), [50, 90, 99])
        return float(p50), float(p90), float(p99)
