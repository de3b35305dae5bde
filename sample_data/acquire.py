"""Simulate an acquisition: an OME-Zarr 0.5 multiscale written while a viewer watches it.

Two modes, each at a set rate (``--rate``, steps per second):

- ``time``: a time series ``(t, c, y, x)`` (``(t, y, x)`` with ``--channels 0``) that
  grows by one time point per step: every level's chunks of the new point are written,
  then every level's metadata with the longer t axis.
- ``mosaic``: a fixed plane ``(c, y, x)`` filled one tile per step in a serpentine scan
  order (as a stage scans a slide); after each tile the chunks of the coarser levels
  over it are computed again from the level below and rewritten in place.

The content is exactly recomputable (:func:`time_point`, :func:`mosaic_plane`,
:func:`pyramid`, :func:`scan_order`): integer arithmetic, products and square roots
only (IEEE-exact, the same whichever numpy code path runs), so tests compare the store
with numpy ground truth. A time point shows a grid, a hand per channel turning around
the centre, a disc walking along a row and the time index in binary (bright squares at
the top left, least significant bit first); the mosaic plane shows rings around its
centre and a grid. Level ``L >= 1`` is the 2x2 block mean of level ``L - 1``, rounded
half up.

A reader never sees half a step: every file (chunk or metadata) is written aside and
renamed into place, data first and metadata last, so the store's metadata is valid
JSON describing chunks that are all there after every step (between the renames of
two levels' metadata, a reader may briefly see one level longer than the next). Ctrl-C
or SIGTERM stops after the step being written; a second one interrupts at once (files
still appear whole). An earlier acquisition at the output path is replaced; anything
else there is refused.

Run ``python -m sample_data.acquire --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

import numcodecs
import numpy as np
import zarr

__all__ = [
    "Acquisition",
    "main",
    "mosaic_plane",
    "pyramid",
    "run",
    "scan_order",
    "time_point",
]

Mode = Literal["time", "mosaic"]

PIXEL_SIZE_UM = 0.5
"""Level-0 pixel size along y and x, in micrometres."""
MARK = "zarrscope_acquire"
"""Group attribute naming the mode of a store this module wrote (so it may replace it)."""
_ZSTD_LEVEL = 1
_COLOURS = ("00FFFF", "FF00FF", "FFFF00", "00FF00")
_WINDOW = (0, 4000)  # the content spans about this range
_BITS = 12  # time index bits shown


# ----------------------------------------------------------------------- the content


def _noise(y: np.ndarray, x: np.ndarray, seed: int) -> np.ndarray:
    """Camera-like noise in [0, 64): an integer hash of the position and ``seed``."""
    h = (y * 73_856_093) ^ (x * 19_349_663) ^ (seed * 83_492_791)
    h = (h ^ (h >> 13)) * 1_274_126_177
    return (h >> 7) & 63


def time_point(t: int, height: int, width: int, channels: int) -> np.ndarray:
    """Level 0 of time point ``t``: ``(channels, height, width)`` uint16 (``(height,
    width)`` when ``channels`` is 0)."""
    y = np.arange(height, dtype=np.int64)[:, None]
    x = np.arange(width, dtype=np.int64)[None, :]
    base = 150 + (x + y) * 450 // (height + width) + _noise(y, x, t)
    grid = (y % 128 == 0) | (x % 128 == 0)
    base = np.where(grid, 1400, base)
    side = max(min(height, width) // 40, 2)
    bits = np.zeros((height, width), bool)
    for bit in range(_BITS):
        if t >> bit & 1:
            x0 = side + bit * 2 * side
            bits[side : 2 * side, x0 : x0 + side] = True
    dy = y - height / 2
    dx = x - width / 2
    reach = min(height, width) * 0.45
    planes = []
    for c in range(max(channels, 1)):
        angle = 2 * math.pi * (c + 1) * t / 60 + c * math.pi / 2
        cos, sin = math.cos(angle), math.sin(angle)
        along = dx * sin - dy * cos  # 0 rad points up, turning clockwise on screen
        across = np.abs(dx * cos + dy * sin)
        hand = (along >= 0) & (along <= reach) & (across <= max(side / 3, 1))
        cy = height * (c + 1) // (max(channels, 1) + 1)
        cx = (t * max(width // 48, 1) + c * width // 3) % width
        r = max(min(height, width) // 24, 2)
        disc = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        plane = np.where(hand, 4000, np.where(disc, 3000 - 500 * c, base))
        planes.append(np.where(bits, 3600, plane).astype(np.uint16))
    return np.stack(planes) if channels else planes[0]


def mosaic_plane(
    height: int,
    width: int,
    channels: int,
    y0: int = 0,
    x0: int = 0,
    rows: int | None = None,
    cols: int | None = None,
) -> np.ndarray:
    """Level 0 of the mosaic's plane, or its region ``[y0, y0 + rows) x [x0, x0 + cols)``:
    ``(channels, rows, cols)`` uint16 (``(rows, cols)`` when ``channels`` is 0)."""
    rows = height - y0 if rows is None else rows
    cols = width - x0 if cols is None else cols
    y = np.arange(y0, y0 + rows, dtype=np.int64)[:, None]
    x = np.arange(x0, x0 + cols, dtype=np.int64)[None, :]
    base = 200 + _noise(y, x, 7)
    grid = (y % 256 == 0) | (x % 256 == 0)
    radius = np.sqrt(((y - height // 2) ** 2 + (x - width // 2) ** 2).astype(np.float64))
    planes = []
    for c in range(max(channels, 1)):
        period = 48 + 32 * c
        ring = (radius.astype(np.int64) // period) % 2 == 0
        plane = np.where(ring, 2200 + 600 * c + (x + y) % 512, base)
        planes.append(np.where(grid, 3800, plane).astype(np.uint16))
    return np.stack(planes) if channels else planes[0]


def halve(image: np.ndarray) -> np.ndarray:
    """2x2 block mean over the last two axes (both even), rounded half up."""
    wide = image.astype(np.uint32)
    total = wide[..., 0::2, 0::2] + wide[..., 1::2, 0::2] + wide[..., 0::2, 1::2]
    total += wide[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(image.dtype)


def pyramid(image: np.ndarray, levels: int) -> list[np.ndarray]:
    """``image`` and its ``levels - 1`` halvings (the rule every level is written by)."""
    out = [image]
    for _ in range(levels - 1):
        out.append(halve(out[-1]))
    return out


def level_count(height: int, width: int, chunk: int) -> int:
    """Levels: halving while a level is larger than one chunk and both sides are even."""
    levels = 1
    while max(height, width) > chunk and height % 2 == 0 and width % 2 == 0:
        height, width = height // 2, width // 2
        levels += 1
    return levels


def scan_order(rows: int, cols: int) -> list[tuple[int, int]]:
    """Tile ``(row, column)`` indices in serpentine order: left to right, then right to
    left on the next row, and so on."""
    return [(r, c if r % 2 == 0 else cols - 1 - c) for r in range(rows) for c in range(cols)]


# ------------------------------------------------------------------------- the store


class Acquisition:
    """A store being written at ``path``, one :meth:`step` at a time.

    ``size`` is level 0's ``(height, width)``; ``channels`` 0 means no channel axis;
    ``chunk`` the spatial chunk side (chunks hold one time point and one channel);
    ``tile`` the mosaic's tile side (default: ``chunk``); ``count`` the steps to write
    (time points, or tiles; None: until stopped in time mode, every tile in mosaic
    mode). Creating it replaces an earlier acquisition at ``path`` (see :data:`MARK`);
    anything else there raises FileExistsError. The first step creates the store.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: Mode = "time",
        *,
        size: tuple[int, int] = (1024, 1024),
        channels: int = 2,
        chunk: int = 256,
        tile: int | None = None,
        count: int | None = None,
        rate: float = 1.0,
    ):
        if mode not in ("time", "mosaic"):
            raise ValueError(f"mode must be 'time' or 'mosaic', not {mode!r}")
        height, width = size
        if height < 1 or width < 1 or chunk < 1 or channels < 0:
            raise ValueError("size and chunk must be positive, channels at least 0")
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be a positive number of steps per second, not {rate}")
        self.path = pathlib.Path(path)
        self.mode: Mode = mode
        self.size = (height, width)
        self.channels = channels
        self.chunk = chunk
        self.tile = tile or chunk
        self.rate = rate
        self.levels = level_count(height, width, chunk)
        if mode == "mosaic":
            grid = (-(-height // self.tile), -(-width // self.tile))
            self.order = scan_order(*grid)
            self.count = len(self.order) if count is None else min(count, len(self.order))
        else:
            self.order = []
            self.count = count
        self.done = 0  #: steps written
        self._codec = numcodecs.Zstd(level=_ZSTD_LEVEL)
        _clear(self.path)

    # -- what is written

    def level_shape(self, level: int, time_points: int | None = None) -> tuple[int, ...]:
        """The shape of ``level`` (with ``time_points`` time points in time mode)."""
        height, width = self.size[0] >> level, self.size[1] >> level
        channels = (self.channels,) if self.channels else ()
        if self.mode == "time":
            return (time_points if time_points is not None else self.done, *channels, height, width)
        return (*channels, height, width)

    def axes(self) -> list[dict[str, str]]:
        """The OME axes."""
        axes = [{"name": "t", "type": "time", "unit": "second"}] if self.mode == "time" else []
        if self.channels:
            axes.append({"name": "c", "type": "channel"})
        axes += [
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ]
        return axes

    def step(self) -> bool:
        """Write the next time point or tile (data, then metadata); False when there
        is nothing left to write."""
        if self.count is not None and self.done >= self.count:
            return False
        if self.mode == "time":
            self._write_time_point(self.done)
        else:
            self._write_tile(*self.order[self.done])
        self.done += 1
        return True

    def _write_time_point(self, t: int) -> None:
        levels = pyramid(time_point(t, *self.size, self.channels), self.levels)
        for level, image in enumerate(levels):
            planes = image if self.channels else image[None]
            for c, plane in enumerate(planes):
                prefix = (t, c) if self.channels else (t,)
                self._write_chunks(level, prefix, plane, 0, 0)
        self._write_metadata(time_points=t + 1)

    def _write_tile(self, row: int, col: int) -> None:
        height, width = self.size
        y0, x0 = row * self.tile, col * self.tile
        y1, x1 = min(y0 + self.tile, height), min(x0 + self.tile, width)
        if self.done == 0:
            self._write_metadata()  # a fixed plane: all fill value until tiles land
        tile = mosaic_plane(height, width, self.channels, y0, x0, y1 - y0, x1 - x0)
        self._write_region(0, tile, y0, x0)
        c = self.chunk
        for level in range(1, self.levels):
            # the chunks of this level over the tile, from the level below as stored
            cy0, cx0 = (y0 >> level) // c * c, (x0 >> level) // c * c
            cy1 = min(_ceil(_ceil(y1, 1 << level), c) * c, height >> level)
            cx1 = min(_ceil(_ceil(x1, 1 << level), c) * c, width >> level)
            below = zarr.open_array(self.path / str(level - 1), mode="r")
            region = below[..., 2 * cy0 : 2 * cy1, 2 * cx0 : 2 * cx1]
            self._write_region(level, halve(region), cy0, cx0)

    def _write_region(self, level: int, image: np.ndarray, y0: int, x0: int) -> None:
        """Write ``image`` (channels first unless there are none) at ``y0, x0``: whole
        chunks, or the level's edge."""
        planes = image if self.channels else image[None]
        for c, plane in enumerate(planes):
            self._write_chunks(level, (c,) if self.channels else (), plane, y0, x0)

    def _write_chunks(
        self, level: int, prefix: tuple[int, ...], plane: np.ndarray, y0: int, x0: int
    ) -> None:
        """Encode and place the chunks of ``plane`` (a 2D region of a level starting at
        chunk boundaries ``y0, x0``); edge chunks are padded with the fill value."""
        c = self.chunk
        lead = len(prefix)
        for y in range(0, plane.shape[0], c):
            for x in range(0, plane.shape[1], c):
                block = np.zeros((c, c), "<u2")
                part = plane[y : y + c, x : x + c]
                block[: part.shape[0], : part.shape[1]] = part
                key = (*prefix, (y0 + y) // c, (x0 + x) // c)
                name = "/".join(["c", *map(str, key)])
                shape = (1,) * lead + (c, c)
                data = self._codec.encode(block.reshape(shape))
                _place(self.path / str(level) / name, data)

    def _write_metadata(self, time_points: int | None = None) -> None:
        """Every level's array metadata, then (the first time) the group's."""
        chunks = (1,) * (len(self.level_shape(0, 1)) - 2) + (self.chunk, self.chunk)
        names = [axis["name"] for axis in self.axes()]
        for level in range(self.levels):
            _place(
                self.path / str(level) / "zarr.json",
                _json(
                    {
                        "zarr_format": 3,
                        "node_type": "array",
                        "shape": list(self.level_shape(level, time_points)),
                        "data_type": "uint16",
                        "chunk_grid": {
                            "name": "regular",
                            "configuration": {"chunk_shape": list(chunks)},
                        },
                        "chunk_key_encoding": {
                            "name": "default",
                            "configuration": {"separator": "/"},
                        },
                        "fill_value": 0,
                        "codecs": [
                            {"name": "bytes", "configuration": {"endian": "little"}},
                            {
                                "name": "zstd",
                                "configuration": {"level": _ZSTD_LEVEL, "checksum": False},
                            },
                        ],
                        "attributes": {},
                        "dimension_names": names,
                    }
                ),
            )
        group = self.path / "zarr.json"
        if not group.exists():
            _place(group, _json(self._group_metadata()))

    def _group_metadata(self) -> dict[str, Any]:
        datasets = []
        lead = len(self.axes()) - 2
        for level in range(self.levels):
            factor = 2**level
            shift = 0.5 * (factor - 1) * PIXEL_SIZE_UM
            t_scale = [1.0 / self.rate] if self.mode == "time" else []
            ones = t_scale + [1.0] * (lead - len(t_scale))
            datasets.append(
                {
                    "path": str(level),
                    "coordinateTransformations": [
                        {
                            "type": "scale",
                            "scale": [*ones, factor * PIXEL_SIZE_UM, factor * PIXEL_SIZE_UM],
                        },
                        {"type": "translation", "translation": [0.0] * lead + [shift, shift]},
                    ],
                }
            )
        multiscale = {
            "name": f"zarrscope acquisition ({self.mode})",
            "axes": self.axes(),
            "datasets": datasets,
            "type": "mean",
            "metadata": {"method": "2x2 block mean of the previous level, rounded half up"},
        }
        ome: dict[str, Any] = {"version": "0.5", "multiscales": [multiscale]}
        if self.channels:
            ome["omero"] = {
                "channels": [
                    {
                        "label": f"channel {c}",
                        "color": _COLOURS[c % len(_COLOURS)],
                        "active": True,
                        "window": {
                            "start": _WINDOW[0],
                            "end": _WINDOW[1],
                            "min": 0,
                            "max": 65535,
                        },
                    }
                    for c in range(self.channels)
                ]
            }
        return {
            "zarr_format": 3,
            "node_type": "group",
            "attributes": {"ome": ome, MARK: self.mode},
        }


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _json(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


def _place(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` at ``path`` whole: aside, then renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.partial")
    aside.write_bytes(data)
    os.replace(aside, path)


def _clear(path: pathlib.Path) -> None:
    """Remove an earlier acquisition at ``path``; refuse anything else."""
    if not path.exists() and not path.is_symlink():
        return
    try:
        attributes = json.loads((path / "zarr.json").read_text())["attributes"]
        ours = MARK in attributes
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours or path.is_symlink():
        raise FileExistsError(f"{path} exists and is not an acquisition written by this tool")
    shutil.rmtree(path)


# ---------------------------------------------------------------------------- running


def run(
    acquisition: Acquisition,
    stop: threading.Event | None = None,
    on_step: Callable[[Acquisition], None] | None = None,
) -> int:
    """Write steps at ``acquisition.rate`` per second until done or ``stop`` is set
    (checked between steps and while waiting); the number of steps written. Falling
    behind the rate, it writes the next step at once (no burst to catch up)."""
    stop = stop or threading.Event()
    period = 1.0 / acquisition.rate
    due = time.monotonic()
    while not stop.is_set():
        if not acquisition.step():
            break
        if on_step is not None:
            on_step(acquisition)
        due = max(due + period, time.monotonic())
        stop.wait(due - time.monotonic())
    return acquisition.done


@contextmanager
def _stopping_on_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set ``stop``; a second one raises KeyboardInterrupt."""

    def handler(signum: int, frame: Any) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m sample_data.acquire OUT --rate HZ [--mode time|mosaic]``."""
    parser = argparse.ArgumentParser(
        prog="python -m sample_data.acquire",
        description=(
            "Simulate an acquisition into an OME-Zarr 0.5 multiscale at OUT: append time "
            "points (--mode time) or fill the tiles of a plane in scan order (--mode "
            "mosaic), rewriting the coarse levels over what was written, at --rate steps "
            "per second. Watch it with: zarrscope OUT --live. Ctrl-C or SIGTERM stops "
            "after the current step (the store stays valid). An earlier acquisition at "
            "OUT is replaced."
        ),
    )
    parser.add_argument("out", type=pathlib.Path, metavar="OUT", help="the store to write")
    parser.add_argument(
        "--rate", type=float, default=1.0, help="time points or tiles per second (default: 1)"
    )
    parser.add_argument("--mode", choices=("time", "mosaic"), default="time")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        metavar=("HEIGHT", "WIDTH"),
        help="level-0 size in pixels (default: 1024 1024 for time, 4096 4096 for mosaic)",
    )
    parser.add_argument(
        "--frames",
        "--count",
        dest="count",
        type=int,
        help="time points or tiles to write (default: time points until stopped, every tile)",
    )
    parser.add_argument("--chunk", type=int, default=256, help="chunk side (default: 256)")
    parser.add_argument("--tile", type=int, help="mosaic tile side (default: the chunk side)")
    parser.add_argument(
        "--channels", type=int, default=2, help="channels (default: 2; 0: no channel axis)"
    )
    parser.add_argument("--quiet", action="store_true", help="no line per step")
    args = parser.parse_args(argv)
    size = args.size or ((1024, 1024) if args.mode == "time" else (4096, 4096))
    if args.count is not None and args.count < 1:
        parser.error("--frames must be at least 1")
    try:
        acquisition = Acquisition(
            args.out,
            args.mode,
            size=tuple(size),
            channels=args.channels,
            chunk=args.chunk,
            tile=args.tile,
            count=args.count,
            rate=args.rate,
        )
    except (ValueError, FileExistsError) as exc:
        parser.exit(2, f"error: {exc}\n")

    def report(acq: Acquisition) -> None:
        if acq.mode == "time":
            print(f"acquire: t={acq.done - 1} written", file=sys.stderr, flush=True)
        else:
            row, col = acq.order[acq.done - 1]
            print(
                f"acquire: tile {acq.done}/{acq.count} (row {row}, column {col}) written",
                file=sys.stderr,
                flush=True,
            )

    stop = threading.Event()
    with _stopping_on_signals(stop):
        try:
            written = run(acquisition, stop, None if args.quiet else report)
        except KeyboardInterrupt:  # a second signal: files are whole, some may be aside
            written = acquisition.done
            for aside in args.out.rglob(f".*.{os.getpid()}.partial"):
                aside.unlink(missing_ok=True)
        except OSError as exc:
            parser.exit(1, f"error: {args.out}: {exc.strerror or exc}\n")
    unit = "time points" if args.mode == "time" else "tiles"
    print(f"acquire: {args.out}: {written} {unit} written", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
