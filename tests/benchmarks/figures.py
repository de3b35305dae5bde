"""One measured figure of a benchmark, as the one-command run publishes it.

Every benchmark module that the run covers (``python -m tests.benchmarks``) has a
``collect(quick: bool = False) -> list[Figure]``: it measures, in one run, each figure
beside its same-run reference and returns them; the runner writes them all into
``BENCHMARKS.md`` (a table per section) and ``benchmarks.json`` (whose ``"ratios"`` are
what :func:`viewer.report.ratio_chart` draws). ``quick`` means fewer repeats and
smaller data: the same code path, for a smoke test, not for publishing.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["Figure", "quartiles"]


@dataclass(frozen=True)
class Figure:
    """A median over repeats, beside what it is compared with in the same run.

    ``ratio`` is ``value / reference_value`` unless the figure says otherwise in
    ``note`` (e.g. a speed-up, reference over value); ``higher_is_better`` says which
    way the ratio should go, and ``goal`` is the ratio the issues ask for (None when
    the figure is published for information). ``spread`` is the quartiles of the
    ratio over paired repeats (or of the value when there is no reference).
    """

    section: str
    name: str
    value: float
    unit: str
    reference: str | None = None
    reference_value: float | None = None
    ratio: float | None = None
    spread: tuple[float, float] | None = None
    goal: float | None = None
    higher_is_better: bool = True
    repeats: int = 1
    note: str = ""

    @property
    def met(self) -> bool | None:
        """Whether the ratio reaches its goal; None when there is no goal."""
        if self.goal is None or self.ratio is None:
            return None
        return self.ratio >= self.goal if self.higher_is_better else self.ratio <= self.goal

    def to_json(self) -> dict[str, Any]:
        """A plain dict (the ``met`` verdict included) for ``benchmarks.json``."""
        return {**asdict(self), "met": self.met}


def quartiles(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles (both the value itself for fewer than two)."""
    if len(values) < 2:
        return (values[0], values[0]) if values else (float("nan"), float("nan"))
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3
