"""Playback: stepping a slider axis (t, or z) at a frame rate, with the next slices
prefetched. Pure logic, no GPU, on an injected clock.

Two modes. *Smooth* keeps time: it moves on every ``1 / fps`` seconds, showing the best
level that has arrived (coarser tiles stand in). *Sharp* waits for each slice's visible
tiles at the target level before it moves on (at most ``SHARP_TIMEOUT`` seconds), so
every frame shown is exact and the frame rate is what the data allows.

While playing, the next ``depth`` slices of the view are prefetched at prefetch
priority, nearer slices first: ``depth`` covers the time a slice takes to load at the
frame rate (:func:`prefetch_depth`), from the last slice's measured load time.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["MAX_DEPTH", "SHARP_TIMEOUT", "Playback", "prefetch_depth"]

#: The most slices prefetched ahead.
MAX_DEPTH = 8
#: How long sharp mode waits for a slice before it moves on anyway (seconds).
SHARP_TIMEOUT = 2.0

Mode = Literal["smooth", "sharp"]


def prefetch_depth(fps: float, slice_seconds: float | None) -> int:
    """How many slices ahead to prefetch: enough that a slice has had the time it takes
    to load (``slice_seconds``, measured; None: not yet, assume one frame) before it is
    shown, plus one; between 1 and ``MAX_DEPTH``."""
    frames = 1.0 if slice_seconds is None else slice_seconds * fps
    return max(1, min(MAX_DEPTH, math.ceil(frames) + 1))


@dataclass
class Playback:
    """One playback: along ``axis`` (a name) of ``size`` slices, at ``fps``."""

    axis: str
    size: int
    fps: float = 5.0
    mode: Mode = "smooth"
    clock: Callable[[], float] = time.monotonic
    started_at: float = field(init=False)
    shown_at: float = field(init=False)  # when the current slice was first shown
    frames: int = 0  # slices shown
    complete: int = 0  # of them, complete at the target level when left

    def __post_init__(self) -> None:
        if not self.fps > 0:
            raise ValueError(f"fps must be positive, not {self.fps}")
        if self.mode not in ("smooth", "sharp"):
            raise ValueError(f"mode must be 'smooth' or 'sharp', not {self.mode!r}")
        self.started_at = self.shown_at = self.clock()

    def next_index(self, index: int, settled: bool) -> int | None:
        """The slice to show next (wrapping at the end), or None to stay: smooth mode
        moves once a frame's time has passed; sharp mode once the slice is ``settled``
        (or ``SHARP_TIMEOUT`` has passed) and a frame's time too."""
        now = self.clock()
        waited = now - self.shown_at
        if waited < 1.0 / self.fps - 1e-9:  # (a clock's rounding is not a frame early)
            return None
        if self.mode == "sharp" and not settled and waited < SHARP_TIMEOUT:
            return None
        self.frames += 1
        self.complete += settled
        self.shown_at = now
        return (index + 1) % self.size

    def ahead(self, index: int, depth: int) -> list[int]:
        """The next ``depth`` slices after ``index`` (wrapping), nearest first."""
        return [(index + j) % self.size for j in range(1, min(depth, self.size - 1) + 1)]

    @property
    def achieved_fps(self) -> float:
        elapsed = self.shown_at - self.started_at
        return self.frames / elapsed if elapsed > 0 else 0.0

    @property
    def complete_fraction(self) -> float:
        """Of the slices shown, the fraction complete at the target level when left."""
        return self.complete / self.frames if self.frames else 0.0
