"""Counters of what the pool did, read as an immutable snapshot (``pool.stats``), and
the estimate of the link to the store (:class:`LinkEstimate`) made from the loads."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np

__all__ = ["LinkEstimate", "LinkEstimator", "PoolStats", "StatsRecorder"]

#: The link is estimated over this many most recent loads.
LINK_WINDOW = 256
#: Loads seen before the link has an estimate.
LINK_MIN_LOADS = 8
#: Seconds between two fits of the link (when loads came meanwhile).
LINK_REFIT = 0.05


@dataclass(frozen=True)
class LinkEstimate:
    """What the link to a pool's store achieves, measured on the pool's own loads.

    Loads in flight together share the link, so a load's time from request to data is
    its latency plus the time the link takes to carry everything delivered meanwhile:
    its own bytes and those of the loads in flight with it. Over the recent loads,
    that gives ``throughput`` (bytes fetched per second, encoded, as they crossed the
    link: what a batch of concurrent loads achieves together, however many are in
    flight) and ``latency`` (seconds: what any request costs on top, however small).
    ``fetched_per_loaded`` is the bytes fetched per byte of decoded data (the
    compression; absent chunks count as decoded bytes never fetched), to turn a
    chunk's decoded size into what it costs to fetch. ``samples``: the loads fitted.
    """

    throughput: float
    latency: float
    fetched_per_loaded: float
    samples: int

    def seconds(self, nbytes: float) -> float:
        """How long fetching ``nbytes`` (encoded) together should take; 0 for nothing."""
        if nbytes <= 0:
            return 0.0
        return self.latency + nbytes / self.throughput


class LinkEstimator:
    """The recent loads (:meth:`record`, O(1) each) and their fit (:meth:`estimate`).

    A load ``j`` is taken to deliver its bytes evenly over its time from request to
    data, so a load ``i`` waited for its own bytes and, of every load whose time
    overlaps its own, the overlapping part: loads requested together that share the
    link all count for each other, loads one after another do not. The fit costs
    O(LINK_WINDOW²) (vectorised) and is made again at most every ``LINK_REFIT``
    seconds, when loads came meanwhile."""

    __slots__ = ("_dirty", "_fit", "_fitted_at", "_loads")

    def __init__(self) -> None:
        # (request, end, bytes) of the most recent loads
        self._loads: deque[tuple[float, float, int]] = deque(maxlen=LINK_WINDOW)
        self._fit: tuple[float, float] | None = None  # (throughput, latency)
        self._fitted_at = -math.inf  # perf_counter() of the fit
        self._dirty = False  # loads came since

    def record(self, start: float, end: float, nbytes: int) -> None:
        """A load requested at ``start`` finished at ``end`` with ``nbytes`` fetched."""
        self._loads.append((start, end, nbytes))
        self._dirty = True

    def estimate(self, fetched_per_loaded: float) -> LinkEstimate | None:
        """The fit over the recent loads; None before ``LINK_MIN_LOADS`` loads, and
        until they tell a bandwidth (not when there were no bytes, or every load
        delivered about as much in about as long: then latency and transfer cannot be
        told apart, and the last fit that could stands)."""
        loads = self._loads
        n = len(loads)
        if n < LINK_MIN_LOADS:
            return None
        now = time.perf_counter()
        if self._dirty and now - self._fitted_at >= LINK_REFIT:
            # loads that tell nothing new (all alike) leave the last fit standing
            self._fit = _fit_link(np.array(loads, dtype=float)) or self._fit
            self._fitted_at, self._dirty = now, False
        if self._fit is None:
            return None
        return LinkEstimate(self._fit[0], self._fit[1], fetched_per_loaded, n)


def _busiest_period(start: np.ndarray, end: np.ndarray, nbytes: np.ndarray) -> float:
    """The most bytes per second over any busy period of the loads (a maximal run of
    loads, by request, each requested before all those before it ended): what the
    link carried at least, latency included. O(n log n)."""
    order = np.argsort(start, kind="stable")
    s, e, b = start[order], end[order], nbytes[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]  # requested after everything before it had ended
    period = np.cumsum(new) - 1
    first = s[new]
    last = np.maximum.reduceat(e, np.flatnonzero(new))
    carried = np.bincount(period, weights=b)
    span = last - first
    ok = span > 0
    return float((carried[ok] / span[ok]).max()) if ok.any() else 0.0


def _fit_link(loads: np.ndarray) -> tuple[float, float] | None:
    """(throughput, latency) of loads given as rows (request, end, bytes); None if
    they tell no bandwidth.

    Throughput: the slope of ``seconds`` over ``delivered`` (least squares), where a
    load delivers its bytes evenly over its time and a load waited for every byte
    delivered while it was in flight. Latency: each load's time less the time the
    link took to carry the bytes of the loads that *ended* while it was in flight
    (itself included), at that throughput; the least of these. Those bytes are at
    most what the link carried meanwhile, so no load gives less than the latency, and
    the last load to end of any batch requested together gives it (everything it
    waited for has ended by then).

    The slope is a fit, and a few loads far from the rest (a cold start, slower than
    the link is now) or loads all alike (a paced pipeline) can pull it well below
    what the link carried: it is never taken below the fastest *busy period* (loads
    whose times overlap, one after another: its bytes over its span), which the link
    did carry, so a fit too slow (and the latency it then leaves, down to 0) cannot
    stand against what was seen."""
    start, end, nbytes = loads[:, 0], loads[:, 1], loads[:, 2]
    seconds = end - start
    during = np.minimum(end[:, None], end[None, :]) - np.maximum(start[:, None], start[None, :])
    share = np.clip(during, 0.0, None) / np.maximum(seconds, 1e-9)[None, :]
    delivered = (share * nbytes[None, :]).sum(axis=1)
    mean_b, mean_d = delivered.mean(), seconds.mean()
    var = ((delivered - mean_b) ** 2).mean()
    cov = ((delivered - mean_b) * (seconds - mean_d)).mean()
    if mean_b <= 0 or var <= (0.01 * mean_b) ** 2 or cov <= 0:
        return None
    throughput = max(float(var / cov), _busiest_period(start, end, nbytes))
    ended = (start[None, :] >= start[:, None]) & (end[None, :] <= end[:, None])
    waited = (ended * nbytes[None, :]).sum(axis=1)
    latency = max(0.0, float((seconds - waited / throughput).min()))
    return throughput, latency


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
    data, seconds) are percentiles over the loads kept in the pool's KPI ring
    (``pool.kpis``, :mod:`chunkpool.kpi`; NaN before the first). ``link`` is the
    estimate of what the link to the store achieves (:class:`LinkEstimate`: throughput,
    latency), None until a few loads have fetched bytes.
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
        self.link = LinkEstimator()

    def fetched(self, submitted: float, now: float, nbytes: int, ok: bool) -> None:
        """A load requested at ``submitted`` ended at ``now`` (perf_counter seconds),
        having fetched ``nbytes``; ``ok`` unless it failed (a failure says nothing of
        the link's speed)."""
        self.bytes_fetched += nbytes
        if ok:
            self.link.record(submitted, now, nbytes)

    def link_estimate(self) -> LinkEstimate | None:
        """The link's estimate now (:meth:`LinkEstimator.estimate`)."""
        loaded = self.bytes_loaded
        return self.link.estimate(self.bytes_fetched / loaded if loaded else 1.0)
