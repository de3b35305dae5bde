"""Predicted motion: where the camera will be in a moment, from where it has been.

Pure arithmetic on camera samples, no GPU, no clock of its own (times are passed in).
The viewer feeds a :class:`MotionPredictor` the camera at every frame
(:meth:`~MotionPredictor.observe`: time, centre, width); :meth:`~MotionPredictor.predict`
extrapolates the last ``WINDOW`` seconds of *moves* (frames where the camera changed)
into a :class:`Motion`, or None when nothing can be said; :meth:`Motion.path` turns it
into the views expected over the next ``horizon`` seconds, and :func:`plan_path` into
tiles to prefetch, each at a priority that grows with its expected arrival time.

**The estimate.** Positions are in *view units* (centre in widths of the newest view,
width as its natural log), so pan and zoom are measured alike. The velocity is a
least-squares slope, over the newest ``RECENT`` seconds of moves (at least three) and
over the rest of the window separately (a slope, not a difference of two samples:
frame times jitter):

- the camera has not moved for ``STOP_INTERVALS`` times its usual interval between
  moves (at least ``MIN_STOP_GAP``, at most ``MAX_STOP_GAP``: a wheel turned notch by
  notch still counts as moving) - it stopped: **no prediction**;
- the newest move goes against the estimated velocity, or the two slopes point more
  than ``acos(MIN_COS)`` apart - it turned (a zig-zag): **no prediction**, from the
  first sample past the turn until the window holds one direction again;
- the newest slope is slower - it is braking (a flick running out): the motion is
  extrapolated with that deceleration and **ends where it would stop**, so an abrupt
  stop leaves almost nothing ahead;
- otherwise the newest velocity is extrapolated as it is.

A move of more than ``JUMP`` view units from one frame to the next (``show_region``,
a key's step, a zoom by 2) is a jump, not motion: the history starts again there.

**The horizon** is between ``MIN_HORIZON`` and ``MAX_HORIZON`` seconds, longer the more
the two slopes agree (direction and speed), and cut so that the view travels at most
``MAX_LEAD`` view sizes and zooms at most ``MAX_ZOOM_LEAD`` (in log width) ahead: a fast
flick is followed about as far as a slow drag, so what a wrong guess costs stays
bounded. The centre moves with the velocity, the width changes geometrically with the
zoom rate (a steady wheel or pinch is a constant rate of log width).

**Where the run ends.** The current run of moves one way (since a rest, a turn or a
jump) is followed for at most ``RUN_LEAD`` times as long as it has lasted, and as far
as it has come (a motion just begun is not followed far), and a run that *sped up* from rest
to its fastest point (a hand's short pan, whose speed is a bell; not a fling, which
starts at full speed, nor a steady drag) is expected to end as far past that point as
the point was from its start, once it has slowed since: the path stops there, not where
the speed would carry it (measured, 50 rapid pans of 0.75 view in 0.25 s each: 40% of
the reads had been for tiles past the pans' ends). The fastest point is placed between
frames by a parabola through the newest three step speeds. A run that goes on past
where its bell would have ended at more than ``FALL`` times its fastest speed was no
bell: it is followed again as any other; slower, it is stopping: nothing ahead.

A prediction that turns out wrong is simply not made again at the next frame: the tile
set drops the tiles it asked for (their loads are cancelled by the pool; one already
being read stays until it lands, in the cache, see :mod:`viewer.tileset`).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from chunkpool.kpi import LoadRecord

from .tiling import (
    PlaneLevel,
    TileKey,
    View,
    predicted_priority,
    tile_budget,
    tile_count,
    view_level,
)

__all__ = [
    "MAX_HORIZON",
    "MAX_LEAD",
    "MAX_ZOOM_LEAD",
    "MIN_HORIZON",
    "MIN_REACH",
    "WINDOW",
    "Motion",
    "MotionPredictor",
    "plan_path",
    "reach",
]

#: Seconds of camera history the estimate uses, and of it the newest part (the velocity).
WINDOW, RECENT = 0.3, 0.06
#: The shortest and longest horizon of a prediction (seconds ahead).
MIN_HORIZON, MAX_HORIZON = 0.3, 1.0
#: The farthest a prediction reaches: view sizes of pan, and log width of zoom (2 levels).
MAX_LEAD = 1.0
MAX_ZOOM_LEAD = math.log(4.0)
#: Slower than this (view units per second) is still.
MIN_SPEED = 0.05
#: The older and newer halves of the window must agree this well in direction (cosine).
MIN_COS = 0.7
#: No move for this many usual intervals between moves (bounded below and above) = stopped.
STOP_INTERVALS = 2.0
MIN_STOP_GAP, MAX_STOP_GAP = 0.05, 0.3
#: A run of moves "sped up" to its fastest point when its mean speed until there was
#: below ROSE times that point's (a smoothstep bell: 2/3; a drag that sped up in a tenth
#: of its time: 0.95), and is stopping once slower than FALL times its fastest.
ROSE, FALL = 0.85, 0.8
#: A run is followed for at most this many times as long as it has lasted, and as far
#: as it has come. Measured (bench_motion, 50 rapid pans, one run each): 1: 85.6% of frames
#: complete at the target level (prediction off: 89.5%), over-fetch 1.4%; 1.5: 86.9%,
#: 4.5%; 2: 87.8%, 7.3%.
RUN_LEAD = 2.0
#: A move between two frames larger than this (view units) is a jump, not motion.
JUMP = 0.5
#: Seconds between the views of a predicted path, and the most views in one.
PATH_STEP = 0.1
MAX_PATH_VIEWS = 10
#: Predicted tiles are asked for this many load times before they are due (at least
#: MIN_REACH seconds before), the load time measured over the newest REACH_SAMPLES loads.
#: Measured (bench_motion, 50 ms reads): at 2 or 2.5 a constant pan had 83% of its frames
#: complete against 97-98% with prediction off (the column ahead came a frame late); at 3,
#: 97%, for rapid pans' over-fetch 37% instead of 26%. (With the runs' ends predicted and
#: RUN_LEAD 1, 4 did not help rapid pans: 85.4% complete against 85.6%, over-fetch 3.0%
#: against 1.4%.)
REACH_LOADS = 3.0
MIN_REACH = 0.1
REACH_SAMPLES = 32


class _Sample(NamedTuple):
    t: float
    x: float
    y: float
    log_width: float


@dataclass(frozen=True)
class Motion:
    """The camera's expected motion from time ``t`` (its newest move), where it was at
    ``(x, y)`` with ``width``: a velocity (world units per second), a zoom ``rate``
    (d ln(width) / dt), a ``braking`` (1/s: the motion slows so as to stop after
    ``1 / braking`` seconds; 0: steady), followed for ``horizon`` seconds."""

    t: float
    x: float
    y: float
    width: float
    vx: float
    vy: float
    rate: float
    braking: float
    horizon: float

    def _progress(self, dt: float) -> float:
        """Seconds of initial velocity travelled ``dt`` seconds after ``t``."""
        dt = min(max(dt, 0.0), self.horizon)
        return dt - 0.5 * self.braking * dt * dt

    def at(self, when: float) -> tuple[float, float, float]:
        """The camera's expected centre and width, (x, y, width), at time ``when``."""
        s = self._progress(when - self.t)
        return self.x + self.vx * s, self.y + self.vy * s, self.width * math.exp(self.rate * s)

    def path(self, view: View, now: float) -> tuple[tuple[float, View], ...]:
        """The views expected over the horizon, as (seconds ahead, view), soonest first;
        ``view`` is the current one (its canvas and aspect are kept); empty once ``now``
        is past the horizon.

        Seconds ahead count from the newest move ``t``, not from ``now``: a frame that
        shows no move (pointer events come slower than frames, or the camera is
        stopping) has the camera where that move left it, so the path stays where it
        was, rather than running ahead of the camera frame after frame until the
        predictor calls it stopped."""
        end = self.horizon
        if now - self.t >= end or not view.x1 > view.x0:
            return ()
        x, y, width = self.at(self.t + end)
        lead = math.hypot(x - self.x, y - self.y) / self.width
        zoom = abs(math.log(width / self.width))
        n = math.ceil(max(end / PATH_STEP, 2 * lead, 2 * zoom / math.log(2)))
        n = max(1, min(MAX_PATH_VIEWS, n))
        aspect = (view.y1 - view.y0) / (view.x1 - view.x0)
        out = []
        for k in range(1, n + 1):
            ahead = end * k / n
            cx, cy, w = self.at(self.t + ahead)
            h = w * aspect
            future = View(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2, view.width, view.height)
            out.append((ahead, future))
        return tuple(out)


def _slope(points: Sequence[_Sample], scale: float) -> tuple[float, float, float, float]:
    """Least-squares velocity of ``points`` in view units (x and y over ``scale``, log
    width), and their mean time: (vx, vy, vlog, mean t)."""
    n = len(points)
    mt = sum(p.t for p in points) / n
    mx = sum(p.x for p in points) / n
    my = sum(p.y for p in points) / n
    mw = sum(p.log_width for p in points) / n
    var = sum((p.t - mt) ** 2 for p in points)
    if var <= 0:
        return 0.0, 0.0, 0.0, mt
    sx = sum((p.t - mt) * (p.x - mx) for p in points) / var / scale
    sy = sum((p.t - mt) * (p.y - my) for p in points) / var / scale
    sw = sum((p.t - mt) * (p.log_width - mw) for p in points) / var
    return sx, sy, sw, mt


@dataclass
class _Run:
    """The current run of moves one way: when it began, how far it has come (path
    length, view units), its fastest point so far (speed, view units per second; how
    far it had come there), whether it sped up to it (see :meth:`left`), and its
    newest three steps (speed, how far it had come and when, at the step's middle)."""

    start: float
    length: float = 0.0
    began: float | None = None  # when it began to move: see step()
    peak: float = 0.0
    at_peak: float = 0.0
    rose: bool = False
    falling: bool = False  # every step since the fastest point slower than the one before
    steps: list[tuple[float, float, float]] = field(default_factory=list)

    def step(self, size: float, t0: float, t1: float) -> None:
        """A move of ``size`` view units from time ``t0`` to ``t1``."""
        speed = size / (t1 - t0) if t1 > t0 else 0.0
        mid, when = self.length + size / 2, (t0 + t1) / 2
        steps = self.steps
        if len(steps) == 1 and speed > 0:
            # the first step covers a start somewhere between two frames: it began as
            # much before the first step's end as that step's size takes at this speed
            _, half, middle = steps[0]
            first_end = 2 * middle - self.start
            self.began = max(self.start, first_end - 2 * half / speed)
        if speed > self.peak:
            self._fastest(speed, mid, when)
        elif steps:
            self.falling = self.falling and speed < steps[-1][0]
        self.length += size
        steps.append((speed, mid, when))
        del steps[:-3]
        if len(steps) == 3:
            # the fastest point between steps: the top of the parabola through the
            # newest three speeds, once it is behind the camera (at a frame a step, the
            # peak of a short move falls anywhere within a step, or between two)
            (s0, m0, w0), (s1, m1, w1), (s2, m2, w2) = steps
            curve = s0 - 2 * s1 + s2
            if curve < 0:
                shift = 0.5 * (s0 - s2) / curve  # in steps from the middle one
                top = s1 - (s2 - s0) ** 2 / (8 * curve)
                if -1.0 <= shift <= 1.5 and top >= self.peak:
                    m, w = (m2 - m1, w2 - w1) if shift > 0 else (m1 - m0, w1 - w0)
                    self._fastest(top, m1 + shift * m, w1 + shift * w)

    def _fastest(self, speed: float, at: float, when: float) -> None:
        self.peak, self.at_peak, self.falling = speed, at, True
        began = self.began
        self.rose = began is not None and when > began and at / (when - began) < ROSE * speed

    def left(self) -> float:
        """How much further (view units) it is expected to go.

        A run that *sped up* to its fastest point (its mean speed until there below
        ``ROSE`` times that point's: a hand's move from rest, not a fling, a steady drag
        or a plateau's noisy top) and has slowed since (each step slower than the one
        before, or below ``FALL`` times its fastest: one uneven step of a steady drag
        is not enough) is taken to end as far past that point as it was from the start
        (a bell-shaped speed profile, as a hand's moves have); past there, nothing is
        left if it is slower than ``FALL`` times its fastest (it is stopping), else the
        bell was wrong (it goes on). Any other run goes no further than ``RUN_LEAD``
        times as far as it has come."""
        if self.rose and self.steps and self.steps[-1][0] < self.peak:
            stopping = self.steps[-1][0] < FALL * self.peak
            end = 2 * self.at_peak
            if self.length < end and (self.falling or stopping):
                return end - self.length
            if self.length >= end and stopping:
                return 0.0
        return RUN_LEAD * self.length


class MotionPredictor:
    """Camera samples in, expected motion out (see the module's docstring). Memory: the
    moves of the last ``WINDOW`` seconds."""

    def __init__(self) -> None:
        self._moves: list[_Sample] = []
        self._seen = -math.inf  # when the camera was last seen where the newest move left it
        self._run = _Run(-math.inf)  # the current run of moves one way
        self._step = (0.0, 0.0, 0.0)  # the newest move, in view units
        self._moved = -math.inf  # when the camera last moved, a jump not counted

    def observe(self, t: float, x: float, y: float, width: float) -> None:
        """The camera showed centre (x, y), ``width`` wide, at time ``t`` (seconds)."""
        if not (width > 0 and math.isfinite(width) and math.isfinite(x) and math.isfinite(y)):
            self.reset()  # no view to follow
            return
        sample = _Sample(t, x, y, math.log(width))
        moves = self._moves
        if moves and moves[-1][1:] == sample[1:]:
            self._seen = t
            return
        if not moves:
            self._run = _Run(t)
        elif t - moves[-1].t > _stop_gap(moves):
            # it had stopped: this motion starts from where it rested, when last seen there
            moves[:] = [moves[-1]._replace(t=max(moves[-1].t, self._seen))]
            self._run = _Run(moves[0].t)
            self._step = (0.0, 0.0, 0.0)
        if moves:
            last = moves[-1]
            step = ((x - last.x) / width, (y - last.y) / width, sample.log_width - last.log_width)
            size = math.sqrt(sum(a * a for a in step))
            if size > JUMP:
                # a jump (show_region, fit, a key), not motion: the history starts here
                moves.clear()
                self._run = _Run(t)
                step = (0.0, 0.0, 0.0)
            else:
                self._moved = t
                if sum(a * b for a, b in zip(step, self._step, strict=True)) < 0:
                    self._run = _Run(last.t)  # it turned: a new run
                self._run.step(size, last.t, t)
            self._step = step
        moves.append(sample)
        self._seen = t
        first = 0
        while first + 1 < len(moves) and moves[first + 1].t < t - WINDOW:
            first += 1  # keep one move before the window: where the window's motion began
        del moves[:first]

    def reset(self) -> None:
        """Forget the history (the view jumped: a new image, a restored state)."""
        self._moves.clear()
        self._seen = self._moved = -math.inf
        self._run = _Run(-math.inf)
        self._step = (0.0, 0.0, 0.0)

    def still(self, now: float) -> bool:
        """Whether the camera is not in motion: it has not moved for ``MAX_STOP_GAP``
        seconds, a jump (``show_region``, a key press) not counted as a move. So a
        jump from rest is still at once (the ring comes with it), but a motion just
        begun (a move or two since a rest, too few to predict) is not, nor is a
        motion whose frame came late (a move too long to be one: a jump): a ring then
        would be asked for at every start of a pan, mostly on the sides it does not go
        to."""
        return now - self._moved >= MAX_STOP_GAP

    def predict(self, now: float) -> Motion | None:
        """The motion expected from ``now`` on, or None: too few moves, stopped, turned,
        or too slow to matter."""
        moves = self._moves
        if len(moves) < 3:
            return None
        if now - moves[-1].t > _stop_gap(moves):
            return None
        newest = moves[-1]
        scale = math.exp(newest.log_width)
        split = min(len(moves) - 3, _first_at(moves, newest.t - RECENT))
        new = _slope(moves[split:], scale)
        speed_new = math.sqrt(new[0] ** 2 + new[1] ** 2 + new[2] ** 2)
        if speed_new < MIN_SPEED:
            return None
        if sum(a * b for a, b in zip(self._step, new[:3], strict=True)) < 0:
            return None  # the newest move went back: a turn has begun
        old = _slope(moves[: split + 1], scale) if split >= 1 else (0.0, 0.0, 0.0, newest.t)
        speed_old = math.sqrt(old[0] ** 2 + old[1] ** 2 + old[2] ** 2)
        agreement = braking = 0.0
        velocity = new[:3]
        if speed_old >= MIN_SPEED:  # (else starting from rest: no history to agree with)
            cos = sum(a * b for a, b in zip(old[:3], new[:3], strict=True)) / (
                speed_old * speed_new
            )
            if cos < MIN_COS:
                return None
            steady = min(speed_old, speed_new) / max(speed_old, speed_new)
            agreement = (cos - MIN_COS) / (1.0 - MIN_COS) * steady
            if speed_new < speed_old and new[3] > old[3]:
                deceleration = (speed_old - speed_new) / (new[3] - old[3])
                # the newest slope is the speed at its mean time, before the newest
                # move: braking, the camera is slower by now (it stops sooner, nearer)
                speed_now = speed_new - deceleration * (newest.t - new[3])
                if speed_now < MIN_SPEED:
                    return None  # stopping
                f = speed_now / speed_new
                velocity = (velocity[0] * f, velocity[1] * f, velocity[2] * f)
                braking = deceleration / speed_now
        horizon = MIN_HORIZON + (MAX_HORIZON - MIN_HORIZON) * agreement
        horizon = min(horizon, RUN_LEAD * (newest.t - self._run.start))  # a run just begun
        if braking > 0:
            horizon = min(horizon, 1.0 / braking)
        vx, vy, rate = velocity
        pan = math.hypot(vx, vy)
        if pan > 0:
            horizon = min(horizon, _time_to_travel(MAX_LEAD / pan, braking))
        if rate != 0:
            horizon = min(horizon, _time_to_travel(MAX_ZOOM_LEAD / abs(rate), braking))
        horizon = min(horizon, _time_to_travel(self._run.left() / math.hypot(pan, rate), braking))
        return Motion(
            t=newest.t,
            x=newest.x,
            y=newest.y,
            width=scale,
            vx=vx * scale,
            vy=vy * scale,
            rate=rate,
            braking=braking,
            horizon=horizon,
        )


def _stop_gap(moves: Sequence[_Sample]) -> float:
    """How long without a move means stopped: ``STOP_INTERVALS`` usual (median)
    intervals between ``moves``, within [MIN_STOP_GAP, MAX_STOP_GAP]."""
    if len(moves) < 2:
        return MAX_STOP_GAP
    gaps = sorted(b.t - a.t for a, b in itertools.pairwise(moves))
    return min(MAX_STOP_GAP, max(MIN_STOP_GAP, STOP_INTERVALS * gaps[len(gaps) // 2]))


def _first_at(moves: Sequence[_Sample], t: float) -> int:
    """The index of the first move at or after ``t`` (len(moves) if none)."""
    for i, move in enumerate(moves):
        if move.t >= t:
            return i
    return len(moves)


def _time_to_travel(seconds: float, braking: float) -> float:
    """How long a motion braking at ``braking`` takes to cover what it would cover in
    ``seconds`` at its initial speed (inf if it stops first)."""
    if braking <= 0:
        return seconds
    disc = 1.0 - 2.0 * braking * seconds
    return math.inf if disc < 0 else 2.0 * seconds / (1.0 + math.sqrt(disc))


def reach(records: Sequence[LoadRecord]) -> float:
    """How far ahead (seconds) the tiles of a predicted path are asked for now:
    ``REACH_LOADS`` times the median time a load of the newest ``REACH_SAMPLES``
    delivered ones took from the start of its fetch to its delivery (``records``: a
    pool's :attr:`~chunkpool.ChunkPool.kpis`, oldest first), at least ``MIN_REACH``;
    ``MAX_HORIZON`` (the whole path) before any load was delivered.

    Why: a tile due later than that can still be asked for at a later frame and arrive
    in time, and by then the motion is known better - a pan that stopped or turned
    meanwhile has cost nothing, where a tile asked for early would have been read for
    nothing (a load that has started is not undone by cancelling it). The time waited
    in the queue is left out: predicted tiles wait behind the visible ones whatever
    their reach, and counting the wait would make a busy link reach further, asking
    for yet more."""
    times: list[float] = []
    for r in reversed(records):
        if r.delivered is not None and r.fetch_started is not None and r.error is None:
            times.append(r.delivered - r.fetch_started)
            if len(times) == REACH_SAMPLES:
                break
    if not times:
        return MAX_HORIZON
    times.sort()
    return min(MAX_HORIZON, max(MIN_REACH, REACH_LOADS * times[len(times) // 2]))


def plan_path(
    levels: Sequence[PlaneLevel],
    view: View,
    target: int,
    path: Sequence[tuple[float, View]],
    bias: float = 1.0,
    within: float = math.inf,
) -> dict[TileKey, float]:
    """The tiles to prefetch for a predicted ``path`` (from :meth:`Motion.path`) of the
    current ``view`` shown at ``target``, as far as the path goes ``within`` seconds
    (:func:`reach`; the path's view at that time interpolated): every view's tiles at
    its own level, each tile at the priority of the soonest view it is in
    (:func:`~viewer.tiling.predicted_priority`); while the path zooms out, also the
    next coarser level's ring around the current view, due when the path reaches that
    level (else at its end). A view whose level has more tiles in view than its budget
    adds nothing, so this costs at most ``len(path) + 2`` budgets, whatever the image."""
    path = _path_within(view, path, within)
    plan: dict[TileKey, float] = {}
    coarser_due: float | None = None
    for ahead, future in path:
        level, overflow = view_level(levels, future, bias)
        if overflow:
            continue
        if level > target and coarser_due is None:
            coarser_due = ahead
        _add_block(plan, levels[level], future, 0, predicted_priority(ahead))
    if _zooms_out(view, path) and target + 1 < len(levels):
        due = coarser_due if coarser_due is not None else path[-1][0]
        _add_block(plan, levels[target + 1], view, 1, predicted_priority(due))
    return plan


def _zooms_out(view: View, path: Sequence[tuple[float, View]]) -> bool:
    """Whether ``path`` zooms out from ``view``, at least as fast as the slowest motion
    predicted (``MIN_SPEED``): a pan's widths differ from frame to frame by rounding
    alone, which must not ask for a coarser ring every other frame."""
    if not path or not view.x1 > view.x0:
        return False
    ahead, end = path[-1]
    return end.x1 - end.x0 > (view.x1 - view.x0) * math.exp(MIN_SPEED * ahead)


def _path_within(
    view: View, path: Sequence[tuple[float, View]], seconds: float
) -> Sequence[tuple[float, View]]:
    """The views of ``path`` due within ``seconds``, and the view due at ``seconds``
    (linear between its neighbours, ``view`` being the one due now) if the path goes
    further."""
    kept = [(ahead, v) for ahead, v in path if ahead <= seconds]
    if len(kept) == len(path) or seconds <= 0:
        return kept
    a0, v0 = kept[-1] if kept else (0.0, view)
    a1, v1 = path[len(kept)]
    f = (seconds - a0) / (a1 - a0)
    kept.append(
        (
            seconds,
            View(
                v0.x0 + (v1.x0 - v0.x0) * f,
                v0.y0 + (v1.y0 - v0.y0) * f,
                v0.x1 + (v1.x1 - v0.x1) * f,
                v0.y1 + (v1.y1 - v0.y1) * f,
                view.width,
                view.height,
            ),
        )
    )
    return kept


def _add_block(
    plan: dict[TileKey, float], level: PlaneLevel, view: View, margin: int, priority: float
) -> None:
    """Add ``level``'s tiles in ``view`` (grown by ``margin`` tiles) at ``priority``,
    unless a tile has a better one already or the block exceeds the level's budget."""
    tiles = level.tile_range(view.y0, view.y1, view.x0, view.x1, margin=margin)
    if not 0 < tile_count(tiles) <= tile_budget(level, view):
        return  # (empty: rows without a column are not gone through)
    iy0, iy1, ix0, ix1 = tiles
    for iy in range(iy0, iy1):
        for ix in range(ix0, ix1):
            key = (level.level, iy, ix)
            if plan.get(key, math.inf) > priority:
                plan[key] = priority
