"""Pictures of where the time went: ``zarrscope-report LOG``.

From a KPI log (``zarrscope --telemetry LOG`` or ``ChunkPool(kpi_log=...)``; see
:mod:`chunkpool.kpi`), :func:`waterfall` draws one jump the way a browser's network
panel draws a page load: a bar per chunk, from its request to its first frame on screen,
split into *queued* (requested, not yet fetching), *fetching*, *decoding*, *handing
over* (decoded, not yet delivered to its holders) and *waiting for a frame* (delivered,
not yet drawn), coloured by level (coarse levels are loaded first: they show at the
top). A *jump* is the time from one ``view`` event to the next; the report picks the
one with the most loads unless told which. :func:`ratio_chart` draws a benchmark run's
ratios against their same-run references (``benchmarks.json``) as a bar chart.

matplotlib is needed here only (``pip install zarrscope[report]``); it is imported when
a picture is drawn.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from chunkpool.kpi import read_kpi_lines

__all__ = ["Bar", "Jump", "jumps", "main", "ratio_chart", "waterfall"]

#: The steps of a load, in order: (name, start field, end field).
STEPS = (
    ("queued", "requested", "fetch_started"),
    ("fetching", "fetch_started", "fetched"),
    ("decoding", "fetched", "decoded"),
    ("handing over", "decoded", "delivered"),
    ("waiting for a frame", "delivered", "drawn"),
)
#: How light each step is drawn (1: the level's colour, 0: white); the last step,
#: waiting for a frame, is also hatched.
SHADES = (0.25, 1.0, 0.6, 0.4, 0.12)
HATCHED = "waiting for a frame"


@dataclass(frozen=True)
class Bar:
    """One chunk's load in a jump: its times (seconds from the jump) per step."""

    source: str
    level: int
    index: tuple[int, ...]
    state: str
    times: dict[str, float | None]  # field name -> seconds after the jump (None: never)
    bytes_fetched: int

    @property
    def end(self) -> float:
        return max(t for t in self.times.values() if t is not None)


@dataclass(frozen=True)
class Jump:
    """The loads requested between one ``view`` event and the next."""

    start: float  # seconds since the epoch
    view: dict[str, Any]
    bars: list[Bar]

    @property
    def duration(self) -> float:
        """Seconds from the jump to the last bar's end (0 without bars)."""
        return max((bar.end for bar in self.bars), default=0.0)


def jumps(lines: Sequence[dict[str, Any]]) -> list[Jump]:
    """Split a KPI log into jumps (lines before the first ``view`` event form one
    jump of their own, from the first request). Each load gets the time its chunk was
    first ``drawn`` after it was delivered, if the log says."""
    us = 1e-6
    drawn: dict[tuple[str, int, tuple[int, ...]], list[float]] = {}
    for line in lines:
        if line.get("event") == "drawn":
            key = (line["source"], line["level"], tuple(line["index"]))
            drawn.setdefault(key, []).append(line["time"] * us)
    views = [line for line in lines if line.get("event") == "view"]
    loads = sorted(
        (line for line in lines if line.get("event") == "load"), key=lambda x: x["requested"]
    )
    starts = [v["time"] * us for v in views]
    if loads and (not starts or loads[0]["requested"] * us < starts[0]):
        starts.insert(0, loads[0]["requested"] * us)
        views.insert(0, {"event": "view", "time": loads[0]["requested"]})
    result = []
    for k, (start, view) in enumerate(zip(starts, views, strict=True)):
        end = starts[k + 1] if k + 1 < len(starts) else float("inf")
        bars = []
        for load in loads:
            requested = load["requested"] * us
            if not start <= requested < end:
                continue
            times: dict[str, float | None] = {
                f: None if load.get(f) is None else load[f] * us - start
                for f in ("requested", "fetch_started", "fetched", "decoded", "delivered")
            }
            key = (load["source"], load["level"], tuple(load["index"]))
            delivered = load.get("delivered")
            first = [t for t in drawn.get(key, ()) if delivered is not None and t >= delivered * us]
            times["drawn"] = min(first) - start if first else None
            bars.append(
                Bar(
                    load["source"],
                    load["level"],
                    key[2],
                    load["state"],
                    times,
                    load.get("bytes_fetched", 0),
                )
            )
        result.append(Jump(start, view, bars))
    return result


def waterfall(jump: Jump, out: str | Path, title: str | None = None) -> Path:
    """Draw ``jump`` as a waterfall PNG at ``out``; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_rgb
    from matplotlib.patches import Patch

    bars = sorted(jump.bars, key=lambda b: (b.times["requested"], -b.level))
    levels = sorted({b.level for b in bars}, reverse=True)
    palette = plt.get_cmap("tab10")
    colour = {level: to_rgb(palette(i % 10)) for i, level in enumerate(levels)}
    height = max(2.5, min(0.12 * len(bars) + 1.5, 30))
    fig, ax = plt.subplots(figsize=(10, height), dpi=100)
    for row, bar in enumerate(bars):
        base = colour[bar.level]
        for (step, first, last), shade in zip(STEPS, SHADES, strict=True):
            t0, t1 = bar.times.get(first), bar.times.get(last)
            if t0 is None or t1 is None or t1 <= t0:
                continue
            hatched = step == HATCHED
            ax.barh(
                row,
                (t1 - t0) * 1e3,
                left=t0 * 1e3,
                height=0.8,
                color=tuple(1 - shade * (1 - c) for c in base),
                hatch="////" if hatched else None,
                edgecolor=base if hatched else "none",
                linewidth=0,
            )
        if bar.state != "loaded":
            ax.plot(bar.end * 1e3, row, "x", color="red" if bar.state == "failed" else "grey")
    ax.set_ylim(len(bars) - 0.5, -0.5)
    ax.set_yticks([])
    ax.set_ylabel(f"{len(bars)} chunks, in request order")
    ax.set_xlabel("milliseconds after the jump")
    ax.set_title(title or f"one jump: {len(bars)} loads, {jump.duration * 1e3:.0f} ms to the last")
    grey = (0.35, 0.35, 0.35)
    legend = [
        Patch(
            facecolor=tuple(1 - s * (1 - c) for c in grey),
            label=name,
            hatch="////" if name == HATCHED else None,
            edgecolor=grey,
            linewidth=0,
        )
        for (name, _, _), s in zip(STEPS, SHADES, strict=True)
    ]
    legend += [Patch(color=colour[level], label=f"level {level}") for level in levels]
    ax.legend(
        handles=legend,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.06 * 10 / height),
        fontsize="small",
        ncols=5,
        frameon=False,
    )
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path)
    plt.close(fig)
    return path


def ratio_chart(results: dict[str, Any], out: str | Path) -> Path:
    """Draw a benchmark run's ratios (``results["ratios"]``: name -> {"ratio",
    "goal", "higher_is_better"}) as horizontal bars with their goals; its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ratios = results["ratios"]
    names = list(ratios)
    # wide enough for the longest name beside a plot of at least about 5 inches
    width = max(9.0, 5.0 + 0.075 * max((len(n) for n in names), default=0))
    fig, ax = plt.subplots(figsize=(width, 0.35 * len(names) + 1.5), dpi=100)
    for row, name in enumerate(names):
        r = ratios[name]
        goal, value = r.get("goal"), r["ratio"]
        good = goal is None or (value >= goal if r.get("higher_is_better", True) else value <= goal)
        ax.barh(row, value, color="tab:green" if good else "tab:red")
        if goal is not None:
            ax.plot([goal, goal], [row - 0.4, row + 0.4], color="black", lw=1)
        ax.text(value, row, f" {value:.2f}", va="center", fontsize="small")
    ax.axvline(1.0, color="grey", lw=0.5, ls="--")
    values = [ratios[n]["ratio"] for n in names if ratios[n]["ratio"] > 0]
    if values and max(values) > 20 * min(values):  # on a linear scale most bars vanish
        ax.set_xscale("log")
    ax.set_yticks(range(len(names)), names, fontsize="small")
    ax.set_ylim(len(names) - 0.5, -0.5)
    ax.set_xlabel("ratio against the same-run reference\n(black line: the goal)")
    fig.tight_layout()
    path = Path(out)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="zarrscope-report",
        description="Draw where the time of one jump went, from a KPI log "
        "(zarrscope --telemetry LOG), as a waterfall PNG.",
    )
    parser.add_argument("log", type=Path, help="the KPI log (JSON lines)")
    parser.add_argument(
        "-o", "--out", type=Path, default=None, help="the PNG to write (default: LOG.waterfall.png)"
    )
    parser.add_argument(
        "--jump",
        type=int,
        default=None,
        help="which jump (0 = the first; default: the one with most loads)",
    )
    parser.add_argument(
        "--ratios",
        type=Path,
        default=None,
        help="also draw the ratios of a benchmarks.json (to OUT.ratios.png)",
    )
    args = parser.parse_args(argv)
    if not args.log.is_file():
        print(f"zarrscope-report: no such log: {args.log}", file=sys.stderr)
        return 2
    found = [j for j in jumps(read_kpi_lines(args.log)) if j.bars]
    if not found:
        print(f"zarrscope-report: {args.log} has no loads", file=sys.stderr)
        return 1
    if args.jump is None:
        jump = max(found, key=lambda j: len(j.bars))
    elif 0 <= args.jump < len(found):
        jump = found[args.jump]
    else:
        print(
            f"zarrscope-report: --jump {args.jump}: the log has {len(found)} jumps with loads",
            file=sys.stderr,
        )
        return 2
    out = args.out or args.log.with_suffix(".waterfall.png")
    print(waterfall(jump, out))
    if args.ratios is not None:
        print(ratio_chart(json.loads(args.ratios.read_text()), out.with_suffix(".ratios.png")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
