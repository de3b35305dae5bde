"""Random moves of a viewer, for the long sessions of the soak and budget tests and of
the session benchmark (tests/benchmarks/bench_session.py): one driver, so that what
"a random session" means is written once.

A move is one of :data:`KINDS`, drawn uniformly from the kinds a session allows:

- ``pan``: by up to 0.6 of the view along each axis;
- ``zoom``: by 0.5, 0.8, 1.25 or 2;
- ``z`` / ``t``: one step back or forward along that slider axis;
- ``channel``: show or hide one channel of the first layer (an image layer);
- ``layer``: show or hide another layer (the last one; a random one of them when
  there are several);
- ``cursor``: move the cursor to a random point of ``[0, extent)²``.

After a move that leaves the camera wider than ``max_width`` or narrower than
``min_width`` (world units), the view is fitted to the image again. The driver only
moves: refreshing, drawing and checking are the caller's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np

__all__ = ["KINDS", "RandomMoves"]

KINDS = ("pan", "zoom", "z", "t", "channel", "layer", "cursor")


class RandomMoves:
    """Moves ``viewer`` at random with ``rng``, one move of ``kinds`` per call."""

    def __init__(
        self,
        viewer: Any,
        rng: np.random.Generator,
        kinds: Sequence[str],
        *,
        extent: float,
        min_width: float = 20.0,
        max_width: float = 4096.0,
    ):
        unknown = set(kinds) - set(KINDS)
        if unknown or not kinds:
            raise ValueError(f"kinds must be some of {KINDS}, not {tuple(kinds)}")
        self.viewer = viewer
        self.rng = rng
        self.kinds = tuple(kinds)
        self.extent = extent
        self.min_width = min_width
        self.max_width = max_width
        #: How many moves of each kind were made.
        self.counts = dict.fromkeys(self.kinds, 0)

    def __call__(self) -> str:
        """Make one move; its kind."""
        viewer, rng = self.viewer, self.rng
        kind = self.kinds[int(rng.integers(len(self.kinds)))]
        if kind == "pan":
            viewer.pan(*rng.uniform(-0.6, 0.6, 2))
        elif kind == "zoom":
            viewer.zoom(float(rng.choice([0.5, 0.8, 1.25, 2.0])))
        elif kind in ("z", "t"):
            viewer.step_axis(kind, int(rng.choice([-1, 1])))
        elif kind == "channel":
            image = viewer.layers[0]
            display = image.displays[int(rng.integers(len(image.displays)))]
            image.set_display(replace(display, visible=not display.visible))
        elif kind == "layer":
            others = viewer.layers[1:]
            layer = others[int(rng.integers(len(others)))] if len(others) > 1 else others[0]
            layer.visible = not layer.visible
        else:
            viewer.cursor = tuple(rng.uniform(0, self.extent, 2))
        if viewer.camera.width > self.max_width or viewer.camera.width < self.min_width:
            viewer.fit()
        self.counts[kind] += 1
        return kind
