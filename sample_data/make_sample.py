"""Generate zarrscope's built-in sample: a synthetic two-channel fluorescence tissue scan.

The image is written as a multiscale OME-Zarr, 0.5 (Zarr v3) or 0.4 (Zarr v2), with
axes ``c, y, x``, ``uint16`` data, ``(1, 256, 256)`` chunks on every level and 0.5 µm
pixels at level 0. It is meant to exercise a pan/zoom viewer, so it has structure at
every scale: a handful of tissue pieces with epithelial and stromal regions, glands,
vessels and lymphoid aggregates (visible fully zoomed out), some 80,000 cells with
nuclei (channel 0) and membranes, fibres and vesicles (channel 1), camera noise at
single-pixel scale, and burnt-in text, a coordinate grid and a scale bar so that a
flipped, rotated or shifted render is obvious.

Everything is a deterministic function of the level-0 pixel position (fixed seeds,
periodic texture tables, per-cell attributes drawn once), so the image is made tile by
tile, in a thread per CPU, without seams, and the same for any number of threads.
Level ``L >= 1`` is the 2x2 block mean of level ``L - 1``, rounded half up, so tests can
recompute every level exactly; each level's OME translation puts its pixel centres
where that averaging puts them. Each tile is rendered once, centre first, and written
at every level as it is done (see :func:`make_sample`), so that a viewer can show the
sample while it is being made (:func:`start_sample`); with a progress bar on a terminal.

Run ``python -m sample_data.make_sample --help`` for the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import os
import pathlib
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import TextIO

import numcodecs
import numpy as np
import zarr
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm
from zarr.codecs import ZstdCodec
from zarr.core.metadata import ArrayV2Metadata, ArrayV3Metadata

try:
    import fcntl
except ImportError:  # not POSIX: concurrent writers of one sample are not serialised
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "SampleJob",
    "default_sample_path",
    "ensure_sample",
    "main",
    "make_sample",
    "start_sample",
]

PIXEL_SIZE_UM = 0.5
"""Level-0 pixel size along y and x, in micrometres."""
CHUNK = 256
"""Spatial chunk side on every level (chunks are ``(1, CHUNK, CHUNK)``)."""
CHANNELS = (("Nuclei", "00FFFF"), ("Membrane", "FF00FF"))
"""(label, RRGGBB colour) of each channel, in array order."""

_MAX_SIZE = 65536  # 16 GiB at level 0; also keeps map nodes at most a block apart
_TILE = 2048  # level-0 side of one tile job, which writes its 2048, 1024, 512, 256 px levels
_BLOCK = 512  # side of the blocks a tile is computed in, small enough to stay in CPU cache
_CELL = 32  # side of the jittered grid cell that holds one cell's centre (16 µm)
_GRID = 256  # the layout maps have _GRID + 1 nodes across the image ...
_PAD = 2  # ... plus _PAD on each side for cubic interpolation
_SEED = 20_240_905
_OUTLINE = 0.8 * _CELL  # a cell ends this far from its centre where it has no neighbour
_OFFSET = 100.0  # camera offset (ADU)
_OVERLAY_LEVEL = 4500.0  # intensity of burnt-in text and marks at full opacity


# --------------------------------------------------------------------------- public API


def default_sample_path() -> pathlib.Path:
    """Where the viewer keeps its sample.

    ``$ZARRSCOPE_SAMPLE_DIR/sample.ome.zarr`` if that variable is set, else
    ``$XDG_CACHE_HOME/zarrscope/sample.ome.zarr`` (``~/.cache/zarrscope/...`` by default):
    the sample is regenerable, so it belongs in a cache, not among the user's data.
    """
    override = os.environ.get("ZARRSCOPE_SAMPLE_DIR")
    if override:
        return pathlib.Path(override).expanduser() / "sample.ome.zarr"
    cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache).expanduser() / "zarrscope" / "sample.ome.zarr"


def ensure_sample(path: str | os.PathLike[str] | None = None) -> pathlib.Path:
    """Return the sample's path (default: :func:`default_sample_path`), generating the
    sample there first, with progress on stderr, unless a finished one is there.

    A sample whose generation was interrupted (it says it is still being written, and
    no process is writing it) is generated again. Anything else at the path (a sample
    from a version without the marker, or the user's own data) is returned as it is.
    """
    target = pathlib.Path(path) if path is not None else default_sample_path()
    if _sample_state(target) in (_COMPLETE, _OTHER):
        return target
    with contextlib.suppress(FileExistsError):  # another process made it meanwhile
        make_sample(target, progress=sys.stderr)
    return target


def make_sample(
    path: str | os.PathLike[str],
    *,
    zarr_format: int = 3,
    size: int = 16384,
    overwrite: bool = False,
    workers: int | None = None,
    progress: TextIO | None = None,
) -> pathlib.Path:
    """Write the sample image to ``path`` and return ``path`` as a :class:`pathlib.Path`.

    ``zarr_format`` 3 writes OME-Zarr 0.5, 2 writes OME-Zarr 0.4. ``size`` is the
    level-0 side in pixels, a power of two from 256 to 65536; levels halve it down to
    256 (7 levels for the default 16384). ``workers`` threads render and write tiles
    (default: one per CPU); the output is the same, byte for byte, for any number.
    ``progress``: a stream to report on, a progress bar if it is a terminal, else one
    line at the start and one at the end (default: silent).

    The sample can be opened while it is written: it appears at ``path`` at once, with
    every level's array (no chunks yet: all fill value 0), OME metadata whose contrast
    windows are estimated from a few samples, and the group attribute
    ``zarrscope_sample: "writing"``. Level-0 tiles are then rendered centre first, and
    each one, once done, is written at every level, coarsest first: the chunks of the
    coarse levels it is part of are rewritten with every tile they cover that is done
    (the rest of them still 0), then the tile's own chunks, each once. So a reader sees,
    in every chunk, each pixel either final or 0; a region at a finer level only where
    the coarser levels above it are final; and only chunks of the coarse levels change
    after it has seen them. Last, the final OME metadata (the windows from the coarsest
    level) is written, and the attribute becomes ``"complete"``. An interrupted run
    (an error, KeyboardInterrupt) removes what it wrote; a sample left ``"writing"`` by
    a killed one is replaced without ``overwrite``.
    Raises :class:`FileExistsError` if something else is at ``path`` and ``overwrite``
    is false.
    """
    _check_arguments(zarr_format, size, workers)
    _Generation(pathlib.Path(path), zarr_format, size, workers, progress, overwrite).run()
    return pathlib.Path(path)


def start_sample(
    path: str | os.PathLike[str] | None = None,
    *,
    size: int = 16384,
    workers: int | None = None,
    progress: TextIO | None = None,
) -> SampleJob:
    """Start making the sample (Zarr v3) at ``path`` (default: :func:`default_sample_path`)
    in a background thread, as :func:`ensure_sample` would in the foreground, and return
    its :class:`SampleJob` at once: wait for :meth:`SampleJob.wait_ready` before opening
    the sample, follow it while it is written (it fills in as :func:`make_sample` says),
    and :meth:`SampleJob.cancel` it if it is no longer wanted. A finished sample (or
    anything else unmarked) at ``path`` is left alone: the job is then done at once.
    """
    _check_arguments(3, size, workers)
    target = pathlib.Path(path) if path is not None else default_sample_path()
    generation = _Generation(target, 3, size, workers, progress, overwrite=False)
    job = SampleJob(generation)
    if _sample_state(target) in (_COMPLETE, _OTHER):
        job._finished.set()
        generation.ready.set()
    else:
        job._thread.start()
    return job


class SampleJob:
    """The sample being made in a background thread (:func:`start_sample`).

    Its methods may be called from any thread. ``path``: where the sample is made.
    """

    def __init__(self, generation: _Generation) -> None:
        self._generation = generation
        self.path = generation.target
        #: Why it failed (None while it runs, when it succeeded or was cancelled).
        self.error: BaseException | None = None
        self._finished = threading.Event()
        self._thread = threading.Thread(target=self._run, name="zarrscope-sample", daemon=True)

    def _run(self) -> None:
        try:
            self._generation.run()
        except (FileExistsError, _Cancelled):  # made by another process meanwhile; cancelled
            pass
        except BaseException as exc:  # reported to whoever waits for the job
            self.error = exc
        finally:
            self._finished.set()
            self._generation.ready.set()

    @property
    def progress(self) -> tuple[int, int]:
        """``(tiles done, tiles in all)``; ``(0, 0)`` before the tiles are counted."""
        return self._generation.tiles_done, self._generation.tiles_total

    @property
    def generating(self) -> bool:
        """Whether this job writes the sample (false if it was there already)."""
        return self._thread.ident is not None

    @property
    def first_windows(self) -> list[tuple[float, float]]:
        """Each channel's contrast window (start, end) in the OME metadata of the sample
        while it is written (the final ones come from its coarsest level: :meth:`windows`)."""
        return list(_FIRST_WINDOWS[0])

    def windows(self) -> list[tuple[float, float]] | None:
        """Each channel's contrast window (start, end) from the coarsest level's pixels
        written so far: once the sample is complete, those of its OME metadata. None
        before the first tile is done."""
        pyramid = self._generation.pyramid
        return None if pyramid is None else pyramid.windows()

    def wait_ready(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s until the sample can be opened (it is at its path,
        being written or complete) or the job ended; whether that happened. Raises the
        job's error if it failed."""
        ready = self._generation.ready.wait(timeout)
        if self.error is not None:
            raise self.error
        return ready

    def done(self) -> bool:
        """Whether the job has ended (the sample complete, or the job failed or was
        cancelled)."""
        return self._finished.is_set()

    def wait(self, timeout: float) -> bool:
        """Wait at most ``timeout`` s for the job to end; whether it has."""
        return self._finished.wait(timeout)

    def cancel(self, timeout: float = 10.0) -> bool:
        """Stop making the sample: the running tiles stop after their current block and
        what was written is removed (the next run starts again). Waits at most
        ``timeout`` s for the thread and its workers to end; whether they have."""
        self._generation.cancel.set()
        if self._thread.ident is None:
            return True
        self._thread.join(timeout)
        return not self._thread.is_alive()


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m sample_data.make_sample [PATH] [--format 2|3] ...``."""
    parser = argparse.ArgumentParser(
        prog="python -m sample_data.make_sample",
        description="Write zarrscope's synthetic two-channel tissue sample as OME-Zarr.",
    )
    parser.add_argument(
        "path",
        nargs="?",
        type=pathlib.Path,
        help=f"where to write it (default: {default_sample_path()})",
    )
    parser.add_argument(
        "--format",
        type=int,
        choices=(2, 3),
        default=3,
        help="Zarr format: 3 writes OME-Zarr 0.5, 2 writes OME-Zarr 0.4 (default: 3)",
    )
    parser.add_argument(
        "--size",
        type=int,
        default=16384,
        help="level-0 side in pixels, a power of two from 256 to 65536 (default: 16384)",
    )
    parser.add_argument(
        "--workers", type=int, help="threads that render and write (default: one per CPU)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing sample")
    args = parser.parse_args(argv)
    path = args.path if args.path is not None else default_sample_path()
    start = time.perf_counter()
    try:
        make_sample(
            path,
            zarr_format=args.format,
            size=args.size,
            overwrite=args.overwrite,
            workers=args.workers,
            progress=sys.stderr,
        )
    except FileExistsError as exc:
        parser.exit(2, f"error: {exc} (--overwrite replaces it)\n")
    except ValueError as exc:
        parser.exit(2, f"error: {exc}\n")
    seconds = time.perf_counter() - start
    print(f"wrote {path} ({args.size}² px, Zarr v{args.format}) in {seconds:.1f} s")
    return 0


def _check_arguments(zarr_format: int, size: int, workers: int | None) -> None:
    """Raise ValueError for arguments :func:`make_sample` does not take."""
    if zarr_format not in (2, 3):
        raise ValueError(f"zarr_format must be 2 or 3, not {zarr_format!r}")
    if not CHUNK <= size <= _MAX_SIZE or size & (size - 1):
        raise ValueError(f"size must be a power of two from {CHUNK} to {_MAX_SIZE}, not {size!r}")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be at least 1, not {workers!r}")


# ------------------------------------------------------------------- writing the store

_STATE_KEY = "zarrscope_sample"
"""Group attribute saying whether the sample is still being written."""
_WRITING, _COMPLETE = "writing", "complete"
_MISSING, _OTHER = "missing", "other"  # nothing at the path; not a sample we mark
# zstd level 1, named in the arrays' metadata: 0.48 ms a chunk against 1.17 ms at the
# default level 3, for chunks 5% larger (measured on this sample's level 0).
_ZSTD_LEVEL = 1
# The OME metadata of a sample still being written: windows from the camera offset to
# the overlay's level (the range the image is drawn in), the dtype's range as extremes.
_FIRST_WINDOWS = ([(_OFFSET, _OVERLAY_LEVEL)] * len(CHANNELS),)
_FIRST_EXTREMES = ([0] * len(CHANNELS), [65535] * len(CHANNELS))


def _sample_state(path: pathlib.Path) -> str:
    """What is at ``path``: ``"missing"``, ``"writing"`` (being written, or killed while
    it was), ``"complete"``, or ``"other"`` (no marker: an older sample, other data)."""
    if not path.exists():
        return _MISSING
    try:
        state = zarr.open_group(path, mode="r").attrs.get(_STATE_KEY)
    except (OSError, ValueError):  # not a Zarr group, or unreadable metadata
        return _OTHER
    return state if state in (_WRITING, _COMPLETE) else _OTHER


def _remove(path: pathlib.Path) -> None:
    """Delete a file or directory tree if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def _exclusive_lock(target: pathlib.Path, cancel: threading.Event) -> Iterator[None]:
    """Hold an exclusive lock on ``target``'s parent directory, so that two processes
    (e.g. two viewers started at once) never write the same sample together, and a
    sample marked as being written while the lock is free is known to be abandoned.
    Waits for another holder (a sample being made: a bounded job), until ``cancel`` is
    set (then raises :class:`_Cancelled`).

    Locking the directory itself leaves no lock file behind; the kernel releases the
    lock of a process that dies.
    """
    if fcntl is None:
        yield
        return
    fd = os.open(target.parent, os.O_RDONLY)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if cancel.wait(0.1):
                    raise _Cancelled from None
        yield
    finally:
        os.close(fd)  # releases the lock


class _Progress:
    """Reports the generation on a stream: a tqdm bar of tiles done (with the levels
    being made and an estimate of the time left) on a terminal; one line at the start
    and one at the end elsewhere (a log, a pipe), so logs are not flooded; nothing
    without a stream."""

    def __init__(self, stream: TextIO | None, target: pathlib.Path) -> None:
        self._stream = stream
        self._bar: tqdm | None = None
        self._total = 0
        self._start = time.perf_counter()
        self._done = False
        if stream is not None and not stream.isatty():
            print(f"zarrscope: generating the sample image at {target} ...", file=stream)

    def begin(self, total: int) -> None:
        """Count ``total`` tiles from now on."""
        self._total = total

    def stage(self, levels: tuple[int, int]) -> None:
        """Say which levels (coarsest, finest) the tiles counted next make."""
        if self._stream is None or not self._stream.isatty():
            return
        coarse, fine = levels
        name = f"levels {coarse}-{fine}" if coarse != fine else f"level {fine}"
        if self._bar is None:
            self._bar = _Bar(
                total=self._total,
                desc=name,
                file=self._stream,
                unit="tile",
                dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tiles "
                "[{elapsed}<{remaining}]",
            )
        else:
            self._bar.set_description_str(name)  # refreshes: each stage is shown

    def advance(self) -> None:
        """Count one tile done."""
        if self._bar is not None:
            self._bar.update()

    def finish(self) -> None:
        """The sample is complete: say so, and in how long."""
        self._done = True

    def close(self) -> None:
        """Stop the bar; print the closing line if the sample was finished."""
        if self._bar is not None:
            self._bar.close()
        if self._stream is not None and self._done:
            seconds = time.perf_counter() - self._start
            print(f"zarrscope: sample written in {seconds:.1f} s", file=self._stream)


class _Bar(tqdm):
    """tqdm without its monitor thread (updates come from the generating thread)."""

    monitor_interval = 0


def _level_count(size: int) -> int:
    """Levels from ``size`` (a power of two >= CHUNK) down to CHUNK, halving each time."""
    return (size // CHUNK).bit_length()


def _create_arrays(root: pathlib.Path, zarr_format: int, size: int, attributes: dict) -> None:
    """A new group at ``root`` with ``attributes`` and every level's array (metadata
    only, no chunks yet)."""
    levels = _level_count(size)
    group = zarr.open_group(root, mode="w-", zarr_format=zarr_format, attributes=attributes)
    if zarr_format == 3:
        extra: dict[str, object] = {
            "dimension_names": ("c", "y", "x"),
            "compressors": ZstdCodec(level=_ZSTD_LEVEL),
        }
    else:  # OME-Zarr 0.4 wants "/"-separated chunk keys
        extra = {
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
            "compressors": numcodecs.Zstd(level=_ZSTD_LEVEL),
        }
    for level in range(levels):
        group.create_array(
            str(level),
            shape=(len(CHANNELS), size >> level, size >> level),
            chunks=(1, CHUNK, CHUNK),
            dtype="<u2",
            fill_value=0,
            **extra,
        )


@dataclass
class _ChunkWriter:
    """Writes chunks of one level straight to their files, encoded as the array's
    metadata says (little-endian ``uint16``, zstd at ``_ZSTD_LEVEL``, no checksum).

    zarr's own write path runs every chunk through its one event-loop thread and does
    not get faster with more writer threads (measured: 3.7 s for 2048 chunks with one
    thread, 3.5 s with two); this one runs in the tile threads, and zstd and file
    writes release the GIL. Each file appears whole (written aside, then renamed), so
    a viewer reading the sample meanwhile never sees half a chunk.
    """

    level: int
    directory: pathlib.Path
    metadata: ArrayV2Metadata | ArrayV3Metadata
    codec: numcodecs.Zstd


def _chunk_writers(root: pathlib.Path) -> list[_ChunkWriter]:
    """A writer for each level of the sample at ``root``, finest first."""
    group = zarr.open_group(root, mode="r")
    codec = numcodecs.Zstd(level=_ZSTD_LEVEL)
    return [
        _ChunkWriter(level, root / str(level), group[str(level)].metadata, codec)
        for level in range(len(list(group.array_keys())))
    ]


def _write_chunks(
    writer: _ChunkWriter,
    image: np.ndarray,
    y0: int,
    x0: int,
    stamps: dict[pathlib.Path, int] | None = None,
) -> None:
    """Write ``image`` (channels, y, x; whole chunks) at pixel ``y0, x0`` of the level.

    ``stamps`` (for chunks written more than once): each file's last ``mtime_ns``, kept
    increasing, so that a reader that revalidates by size and mtime sees every rewrite
    even within the filesystem's timestamp granularity.
    """
    made: set[pathlib.Path] = set()
    for channel, plane in enumerate(image):
        for y in range(0, plane.shape[0], CHUNK):
            for x in range(0, plane.shape[1], CHUNK):
                coords = (channel, (y0 + y) // CHUNK, (x0 + x) // CHUNK)
                path = writer.directory / writer.metadata.encode_chunk_key(coords)
                if path.parent not in made:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    made.add(path.parent)
                chunk = np.ascontiguousarray(plane[y : y + CHUNK, x : x + CHUNK], "<u2")
                aside = path.with_name(path.name + ".partial")
                aside.write_bytes(writer.codec.encode(chunk))
                if stamps is not None:
                    mtime = aside.stat().st_mtime_ns
                    if path in stamps and mtime <= stamps[path]:
                        mtime = stamps[path] + 1
                        os.utime(aside, ns=(mtime, mtime))
                    stamps[path] = mtime
                os.replace(aside, path)


class _Cancelled(Exception):
    """The generation was cancelled (:meth:`SampleJob.cancel`)."""


class _Generation:
    """One making of the sample (:func:`make_sample`, :func:`start_sample`): its
    parameters, its progress and the events that tell its state to other threads."""

    def __init__(
        self,
        target: pathlib.Path,
        zarr_format: int,
        size: int,
        workers: int | None,
        progress: TextIO | None,
        overwrite: bool,
    ) -> None:
        self.target = target
        self.zarr_format = zarr_format
        self.size = size
        self.workers = workers
        self.progress = progress
        self.overwrite = overwrite
        self.cancel = threading.Event()  # stop: raise _Cancelled at the next check
        self.ready = threading.Event()  # the sample is at its path (or this ended)
        self.tiles_done = 0
        self.tiles_total = 0
        self.pyramid: _Pyramid | None = None  # once the sample is at its path

    def run(self) -> None:
        """Make the sample (see :func:`make_sample`) in the calling thread."""
        target = self.target
        target.parent.mkdir(parents=True, exist_ok=True)
        with _exclusive_lock(target, self.cancel):
            # Under the lock a "writing" sample is nobody's: its writer held the lock.
            if _sample_state(target) in (_COMPLETE, _OTHER) and not self.overwrite:
                raise FileExistsError(f"{target} already exists")
            report = _Progress(self.progress, target)
            tmp = target.with_name(target.name + ".tmp")
            _remove(tmp)  # left by a run interrupted while making it
            _remove(target.with_name(target.name + ".staging"))  # an older version's
            placed = False
            try:
                scene = _build_scene(self.size)
                self._check()
                levels = _level_count(self.size)
                first = _ome_attributes(
                    self.zarr_format, self.size, levels, *_FIRST_WINDOWS, *_FIRST_EXTREMES
                )
                attributes = {_STATE_KEY: _WRITING, **first}
                _create_arrays(tmp, self.zarr_format, self.size, attributes)
                _remove(target)  # the remains of a killed run, or what overwrite replaces
                tmp.rename(target)  # the sample appears whole, marked as being written
                placed = True
                self.ready.set()
                self._write(scene, report)
            except BaseException:
                self.cancel.set()  # a worker still running stops at its next block
                _remove(tmp)
                if placed:
                    _remove(target)
                raise
            finally:
                report.close()

    def _check(self) -> None:
        if self.cancel.is_set():
            raise _Cancelled

    def _write(self, scene: _Scene, report: _Progress) -> None:
        """Render the tiles and write them at every level, then the final OME metadata
        and the marker (see :func:`make_sample`).

        Tile jobs make the levels at which their tile is still a whole number of chunks
        (its own chunks, written once) and give their coarsest to a :class:`_Pyramid`,
        which keeps the coarser levels in memory and rewrites the chunks there that the
        tile is part of. Measured on the default sample (2 cores, load 2-3): see the
        README's first-run figures.
        """
        size, root = self.size, self.target
        levels = _level_count(size)
        writers = _chunk_writers(root)
        tile = min(_TILE, size)
        job_levels = _level_count(tile)
        pyramid = self.pyramid = _Pyramid(writers[job_levels:], size, levels)
        origins = _tile_order(size, tile)
        self.tiles_total = len(origins)
        report.begin(len(origins))
        report.stage((levels - 1, 0))
        make = functools.partial(_make_tile, scene, writers[:job_levels], pyramid, self.cancel)
        # Threads suffice (numpy, zstd and file writes release the GIL for the heavy work)
        # and, unlike worker processes, work from any caller: no importable __main__, no fork.
        pool = ThreadPoolExecutor(self.workers or min(len(origins), _cpu_count()))
        lows, highs = [], []
        try:
            for future in as_completed([pool.submit(make, origin) for origin in origins]):
                low, high = future.result()
                lows.append(low)
                highs.append(high)
                self.tiles_done += 1
                report.advance()
        except BaseException:
            self.cancel.set()  # the running tiles stop after their current block
            raise
        finally:
            pool.shutdown(cancel_futures=True)
        windows = pyramid.windows()
        assert windows is not None, "no tile"
        low = np.min(lows, axis=0).tolist()
        high = np.max(highs, axis=0).tolist()
        final = _ome_attributes(self.zarr_format, size, levels, windows, low, high)
        # one atomic write of the group's metadata (zarr writes aside, then renames)
        zarr.open_group(root, mode="r+").attrs.update({**final, _STATE_KEY: _COMPLETE})
        report.finish()


class _Pyramid:
    """The levels coarser than the tile jobs' (``writers``: from level ``first`` on),
    in memory, written as tiles come in: each tile's part of them is the 2x2 block mean
    of its coarsest job level, and each chunk it falls in is rewritten at once, coarsest
    level first, with every tile done so far (0, the fill value, elsewhere). Keeps the
    coarsest level (level ``levels - 1``) and which of its pixels are done, whichever
    writes it, for the contrast windows.

    A chunk is rewritten once per tile it covers, at most: per tile, one chunk per level
    and channel (well under 1% of the tile's work), and a reader that refreshes every
    so often sees at most one change per chunk per refresh.
    """

    def __init__(self, writers: list[_ChunkWriter], size: int, levels: int) -> None:
        self._writers = writers
        self._levels = {
            level: np.zeros((len(CHANNELS), size >> level, size >> level), np.uint16)
            for level in {*(w.level for w in writers), levels - 1}
        }
        self._coarsest = levels - 1
        self._done = np.zeros((size >> self._coarsest,) * 2, bool)
        self._lock = threading.Lock()
        self._stamps: dict[pathlib.Path, int] = {}

    def add(self, origin: tuple[int, int], level: int, block: np.ndarray) -> None:
        """Take the tile at level-0 ``origin`` at its coarsest job ``level`` and write
        what it changes."""
        y0, x0 = origin
        parts = [(level, block)]
        for writer in self._writers:
            block = _halve(block)
            parts.append((writer.level, block))
        with self._lock:
            for at, part in parts:
                if at in self._levels:
                    y, x, side = y0 >> at, x0 >> at, part.shape[-1]
                    self._levels[at][:, y : y + side, x : x + side] = part
                    if at == self._coarsest:
                        self._done[y : y + side, x : x + side] = True
            for writer in reversed(self._writers):
                y = (y0 >> writer.level) // CHUNK * CHUNK
                x = (x0 >> writer.level) // CHUNK * CHUNK
                chunk = self._levels[writer.level][:, y : y + CHUNK, x : x + CHUNK]
                _write_chunks(writer, chunk, y, x, self._stamps)

    def windows(self) -> list[tuple[float, float]] | None:
        """The contrast windows (:func:`_windows`) of the coarsest level's pixels done so
        far: the final ones once every tile is added; None before any is."""
        with self._lock:
            if not self._done.any():
                return None
            return _windows(self._levels[self._coarsest][:, self._done])


def _tile_order(size: int, tile: int) -> list[tuple[int, int]]:
    """Level-0 origins of the tiles, nearest the image's centre first (where the tissue
    is, and where a view of the whole image is looked at first)."""
    centre = (size - tile) / 2
    origins = [(y, x) for y in range(0, size, tile) for x in range(0, size, tile)]
    return sorted(origins, key=lambda o: ((o[0] - centre) ** 2 + (o[1] - centre) ** 2, o))


def _windows(pixels: np.ndarray) -> list[tuple[float, float]]:
    """Each channel's contrast window: the 0.5-99.5 percentiles of ``pixels`` (channels
    first), rounded, made at least 1 wide."""
    windows = []
    for channel in pixels:
        start, end = np.percentile(channel, [0.5, 99.5])
        start, end = float(round(start)), float(round(end))
        windows.append((start, max(end, start + 1)))
    return windows


def _cpu_count() -> int:
    """CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _halve(image: np.ndarray) -> np.ndarray:
    """2x2 block mean over the last two axes, rounded half up: the pyramid's rule."""
    wide = image.astype(np.uint32)
    total = wide[..., 0::2, 0::2] + wide[..., 1::2, 0::2] + wide[..., 0::2, 1::2]
    total += wide[..., 1::2, 1::2]
    return ((total + 2) // 4).astype(image.dtype)


def _ome_attributes(
    zarr_format: int,
    size: int,
    levels: int,
    windows: list[tuple[float, float]],
    lows: list[int],
    highs: list[int],
) -> dict[str, object]:
    """OME-Zarr group attributes: 0.5 under ``ome`` for Zarr v3, 0.4 at top level for v2.

    ``windows``: each channel's contrast window (start, end), in the complete sample
    the 0.5-99.5 percentiles of the coarsest level (:func:`_windows`); ``lows`` and
    ``highs`` (min/max) are level 0's extremes.
    """
    datasets = []
    for level in range(levels):
        factor = 2**level
        shift = 0.5 * (factor - 1) * PIXEL_SIZE_UM  # centre of a factor x factor block
        datasets.append(
            {
                "path": str(level),
                "coordinateTransformations": [
                    {
                        "type": "scale",
                        "scale": [1.0, factor * PIXEL_SIZE_UM, factor * PIXEL_SIZE_UM],
                    },
                    {"type": "translation", "translation": [0.0, shift, shift]},
                ],
            }
        )
    multiscale: dict[str, object] = {
        "name": "zarrscope sample",
        "axes": [
            {"name": "c", "type": "channel"},
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"},
        ],
        "datasets": datasets,
        "type": "mean",
        "metadata": {
            "description": f"synthetic {size}x{size} px fluorescence tissue scan",
            "method": "2x2 block mean of the previous level, rounded half up",
        },
    }
    channels = []
    for index, (label, color) in enumerate(CHANNELS):
        start, end = windows[index]
        channels.append(
            {
                "label": label,
                "color": color,
                "active": True,
                "coefficient": 1.0,
                "family": "linear",
                "inverted": False,
                "window": {
                    "start": start,
                    "end": end,
                    "min": float(lows[index]),
                    "max": float(highs[index]),
                },
            }
        )
    omero = {
        "name": "zarrscope sample",
        "channels": channels,
        "rdefs": {"model": "color", "defaultZ": 0, "defaultT": 0},
    }
    if zarr_format == 3:
        return {"ome": {"version": "0.5", "multiscales": [multiscale], "omero": omero}}
    return {"multiscales": [{"version": "0.4", **multiscale}], "omero": omero}


# ------------------------------------------------------------------------- tile jobs


def _render_tile(
    scene: _Scene, origin: tuple[int, int], cancel: threading.Event | None = None
) -> np.ndarray:
    """The level-0 tile at ``origin`` (y, x), both channels, rendered block by block;
    raises :class:`_Cancelled` between two blocks once ``cancel`` is set."""
    y0, x0 = origin
    side = min(_TILE, scene.size)
    block = min(_BLOCK, side)
    tile = np.empty((len(CHANNELS), side, side), np.uint16)
    for y in range(0, side, block):
        for x in range(0, side, block):
            if cancel is not None and cancel.is_set():
                raise _Cancelled
            tile[:, y : y + block, x : x + block] = _render_block(scene, y0 + y, x0 + x, block)
    return tile


def _make_tile(
    scene: _Scene,
    writers: list[_ChunkWriter],
    pyramid: _Pyramid,
    cancel: threading.Event,
    origin: tuple[int, int],
) -> tuple[list[int], list[int]]:
    """Render the tile at ``origin``; give its coarsest level (``writers``: levels 0,
    1, ...) to ``pyramid``, which writes the coarser levels, then write its own levels,
    coarsest first; return each channel's level-0 min and max."""
    y0, x0 = origin
    image = _render_tile(scene, origin, cancel)
    low = image.min(axis=(1, 2)).tolist()
    high = image.max(axis=(1, 2)).tolist()
    images = [image]
    for _ in writers[1:]:
        images.append(_halve(images[-1]))
    pyramid.add(origin, writers[-1].level, images[-1])
    for writer, part in zip(reversed(writers), reversed(images), strict=True):
        _write_chunks(writer, part, y0 >> writer.level, x0 >> writer.level)
    return low, high


# ------------------------------------------------------------------------------ scene


@dataclass
class _Cells:
    """Per-cell parameters on the jittered grid, padded by one absent cell all round.

    ``jy, jx``: centre within its grid cell (px; far away for absent cells).
    ``peak, ky, kx``: the nucleus is ``sqrt(peak - ky*dy² - kx*dx²)`` where positive,
    i.e. an ellipsoid cap of height ``sqrt(peak)`` (zero for cells without nucleus).
    """

    jy: np.ndarray
    jx: np.ndarray
    peak: np.ndarray
    ky: np.ndarray
    kx: np.ndarray


@dataclass
class _Overlay:
    """Burnt-in text and lines in level-0 pixels, with their bounding boxes."""

    texts: list[tuple[str, int, int, int, str, float]]  # text, x, y, font px, anchor, value
    lines: list[tuple[int, int, int, int, int, float]]  # x0, y0, x1, y1, width, value
    boxes: np.ndarray  # (items, 4) x0, y0, x1, y1 of texts then lines


@dataclass
class _Scene:
    """Everything the image is a function of, built once per image from the seed."""

    size: int
    maps: np.ndarray  # (len(_PIXEL_MAPS), nodes, nodes)
    cells: _Cells
    textures: dict[str, np.ndarray]  # periodic tables, padded by _BLOCK for windowing
    overlay: _Overlay


def _build_scene(size: int) -> _Scene:
    """Lay out tissue, cells, textures and overlay for a ``size``² image."""
    rng = np.random.default_rng(_SEED)
    layout = _layout_maps(rng)
    cells = _make_cells(rng, size, layout)
    maps = np.stack([layout[name] for name in _PIXEL_MAPS]).astype(np.float32)
    fibre_a = _periodic_noise(rng, 1024, 3.0, 12.0, angle=0.35)
    fibre_b = _periodic_noise(rng, 1024, 3.0, 12.0, angle=-0.9)
    # Periodic tables of each texture term, scaled and offset once here rather than per
    # pixel (all non-negative, so the shot-noise variance below needs no clamp).
    textures = {
        "chromatin": 0.82 + 0.14 * _periodic_noise(rng, 512, 1.0, 1.0),
        "rough": 1.2e6 * np.maximum(_periodic_noise(rng, 512, 3.0, 3.0) + 1.0, 0),
        "nuclear_haze": 110 + 30 * np.tanh(_periodic_noise(rng, 512, 3.0, 3.0)),
        "cytoplasm": 160 + 70 * np.tanh(_periodic_noise(rng, 512, 3.0, 3.0)),
        "membrane": 1900 + 700 * np.tanh(_periodic_noise(rng, 512, 1.0, 1.0)),
        "vesicles": 9000 * np.maximum(_periodic_noise(rng, 512, 0.8, 0.8) - 2.9, 0),
        "fibre_a": fibre_a,
        "fibre_b_minus_a": fibre_b - fibre_a,
        "fibre_tone": 2800 + 700 * np.tanh(_periodic_noise(rng, 512, 3.0, 3.0)),
        "shot": rng.standard_normal((1024, 1024), dtype=np.float32),
    }
    padded = {
        name: np.pad(t.astype(np.float32), ((0, _BLOCK), (0, _BLOCK)), mode="wrap")
        for name, t in textures.items()
    }
    return _Scene(size, maps, cells, padded, _make_overlay(size))


def _node_coords() -> np.ndarray:
    """Normalised image coordinate (0 = first pixel edge, 1 = last) of each map node."""
    return np.arange(-_PAD, _GRID + _PAD + 1) / _GRID


def _smooth_field(rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Unit-variance Gaussian-filtered noise on the map nodes; ``sigma`` in nodes."""
    nodes = _GRID + 2 * _PAD + 1
    wrap = math.ceil(4 * sigma)  # cropped off, so opposite edges are independent
    field = _periodic_noise(rng, nodes + wrap, sigma, sigma)[:nodes, :nodes]
    return (field - field.mean()) / field.std()


def _periodic_noise(
    rng: np.random.Generator, n: int, sigma_y: float, sigma_x: float, angle: float = 0.0
) -> np.ndarray:
    """Unit-variance periodic ``n``² noise, Gaussian-smoothed with std ``sigma_y`` across
    and ``sigma_x`` along direction ``angle`` (radians from the x axis)."""
    fy = np.fft.fftfreq(n)[:, None]
    fx = np.fft.rfftfreq(n)[None, :]
    along = fx * math.cos(angle) + fy * math.sin(angle)
    across = fy * math.cos(angle) - fx * math.sin(angle)
    gain = np.exp(-2 * math.pi**2 * ((across * sigma_y) ** 2 + (along * sigma_x) ** 2))
    field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((n, n))) * gain, s=(n, n))
    return ((field - field.mean()) / field.std()).astype(np.float32)


def _blur(field: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur (std ``sigma`` samples, periodic edges) of a 2-D map."""
    fy = np.fft.fftfreq(field.shape[0])[:, None]
    fx = np.fft.rfftfreq(field.shape[1])[None, :]
    gain = np.exp(-2 * math.pi**2 * sigma**2 * (fy * fy + fx * fx))
    return np.fft.irfft2(np.fft.rfft2(field) * gain, s=field.shape)


# Tissue pieces: centre (y, x), radii (y, x), rotation (rad), style, boundary harmonics
# (order, relative amplitude, phase); lengths in units of the image side. A "lobular"
# piece is lobules of epithelium (glandular, solid or lymphoid) between fibrous septa
# that carry vessels; an "organoid" is a ring of epithelium round a lumen; "fibrous" is
# stroma with meandering vessels.
_PIECES = (
    ((0.56, 0.40), (0.30, 0.24), 0.45, "lobular", ((2, 0.10, 0.3), (3, 0.09, 1.1), (5, 0.04, 2))),
    ((0.31, 0.79), (0.13, 0.10), -0.5, "lobular", ((2, 0.08, 1.7), (3, 0.07, 0.2))),
    ((0.73, 0.84), (0.085, 0.075), 0.0, "organoid", ((3, 0.05, 0.5), (4, 0.04, 1.3))),
    ((0.91, 0.44), (0.04, 0.17), 0.12, "fibrous", ((2, 0.05, 0.1), (4, 0.06, 2.2))),
    ((0.17, 0.91), (0.035, 0.03), 0.3, "organoid", ((3, 0.06, 0.4),)),
    ((0.50, 0.93), (0.03, 0.035), 0.0, "organoid", ((2, 0.07, 1.0),)),
    ((0.24, 0.07), (0.04, 0.035), 1.0, "organoid", ((3, 0.05, 2.0),)),
    ((0.87, 0.11), (0.045, 0.04), 0.0, "organoid", ((2, 0.06, 0.7),)),
)
_LOBULE = 1 / 15  # spacing of lobule centres (image sides)
_SEPTUM = 0.01  # width of the septa between lobules, as a difference of distances
_PIXEL_MAPS = ("membrane", "fibre", "fibre_dir")  # layout maps used per pixel


def _layout_maps(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Large-scale layout on the map nodes.

    Fields sampled per cell: ``inside`` (> 0 in tissue), ``hole`` (> 0 in a lumen:
    gland, vessel or organoid centre, where there are no cells), ``epi`` (1 in
    epithelium, 0 in stroma), ``lymph`` (1 in lymphoid lobules), ``stain`` (brightness).
    Fields used per pixel: see ``_PIXEL_MAPS``.
    """
    u = _node_coords()
    yy, xx = np.meshgrid(u, u, indexing="ij")
    wobble = _smooth_field(rng, 6.0)
    inside = np.full(yy.shape, -1.0)
    style = np.full(yy.shape, "", dtype=object)
    hole = np.full(yy.shape, -1.0)
    for (cy, cx), (ry, rx), rot, kind, harmonics in _PIECES:
        dy, dx = yy - cy, xx - cx
        py = (dy * math.cos(rot) - dx * math.sin(rot)) / ry
        px = (dy * math.sin(rot) + dx * math.cos(rot)) / rx
        rho = np.hypot(py, px)
        phi = np.arctan2(py, px)
        edge = 1 + sum(a * np.cos(k * phi + p) for k, a, p in harmonics) + 0.05 * wobble
        depth = edge - rho
        mine = depth > inside
        inside = np.where(mine, depth, inside)
        style = np.where(mine, kind, style)
        if kind == "organoid":
            hole = np.maximum(hole, (0.42 * edge - rho) * 5)
    lobular, fibrous = style == "lobular", style == "fibrous"

    warp = 0.3 * _LOBULE  # bend the septa
    gap, lobule = _lobules(
        rng, yy + warp * _smooth_field(rng, 7.0), xx + warp * _smooth_field(rng, 7.0)
    )
    count = int(lobule.max()) + 1  # draw a kind and a brightness for every lobule id
    kind = rng.choice(3, size=count, p=(0.5, 0.35, 0.15))[lobule]  # glandular/solid/lymphoid
    brightness = np.exp(0.22 * rng.standard_normal(count))[lobule]
    septum = np.where(lobular, np.clip(1.5 - gap / _SEPTUM, 0, 1), 0.0)
    epi = np.where(lobular, 1 - septum, (style == "organoid").astype(float))
    lymph = (lobular & (kind == 2) & (septum < 0.5)).astype(float)
    glands = np.where(lobular & (kind == 0), _smooth_field(rng, 1.3) - 1.1 - 3 * septum, -1)
    vessels = np.where(lobular & (_smooth_field(rng, 6.0) > 0.5), 1 - gap / 0.002, -1)
    meanders = np.where(fibrous, 1 - np.abs(_smooth_field(rng, 7.0)) / 0.09, -1)
    hole = np.maximum.reduce([hole, glands, vessels, meanders])
    lumen = (hole > 0) & (inside > 0)
    lining = np.clip(_blur(lumen.astype(float), 1.0) * 3, 0, 1) * ~lumen
    stain = (1 + 0.2 * _smooth_field(rng, 12.0)) * np.where(lobular, brightness, 1.0)
    fibre = np.where(fibrous, 0.8 + 0.2 * _smooth_field(rng, 4.0), septum)
    return {
        "inside": inside,
        "hole": hole,
        "epi": epi,
        "lymph": lymph,
        "stain": stain,
        "membrane": (0.3 + 0.7 * epi) * (1 - 0.6 * lymph + 1.5 * lining) * stain,
        "fibre": np.clip(fibre, 0, 1),
        "fibre_dir": np.clip(_smooth_field(rng, 8.0) + 0.5, 0, 1),
    }


def _lobules(
    rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Voronoi tiling of the points ``yy, xx`` by lobule centres, one jittered centre per
    cell of a grid of side _LOBULE: per point, the difference between the second and
    first nearest centre's distance (0 on a border) and the nearest centre's index."""
    margin = 3  # grid cells beyond the image on each side, for the warped points
    n = math.ceil(1 / _LOBULE) + 2 * margin
    jitter = rng.random((2, n, n))
    gy = np.floor(yy / _LOBULE).astype(np.intp) + margin
    gx = np.floor(xx / _LOBULE).astype(np.intp) + margin
    first = np.full(yy.shape, np.inf)
    second = np.full(yy.shape, np.inf)
    nearest = np.zeros(yy.shape, np.intp)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            cy, cx = gy + oy, gx + ox
            centre_y = (cy - margin + jitter[0, cy, cx]) * _LOBULE
            centre_x = (cx - margin + jitter[1, cy, cx]) * _LOBULE
            d = np.hypot(yy - centre_y, xx - centre_x)
            second = np.minimum(second, np.maximum(first, d))
            nearest = np.where(d < first, cy * n + cx, nearest)
            first = np.minimum(first, d)
    return second - first, nearest


def _sample_nodes(field: np.ndarray, y: np.ndarray, x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear value of a node map at level-0 pixel positions ``y, x``."""
    ty = y * (_GRID / size) + _PAD
    tx = x * (_GRID / size) + _PAD
    iy = np.floor(ty).astype(np.intp)
    ix = np.floor(tx).astype(np.intp)
    fy, fx = ty - iy, tx - ix
    top = field[iy, ix] * (1 - fx) + field[iy, ix + 1] * fx
    bottom = field[iy + 1, ix] * (1 - fx) + field[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _make_cells(rng: np.random.Generator, size: int, layout: dict[str, np.ndarray]) -> _Cells:
    """Place one cell centre per grid cell and draw its nucleus from the layout there."""
    n = size // _CELL
    shape = (n, n)
    jy = rng.random(shape) * _CELL
    jx = rng.random(shape) * _CELL
    y = jy + (np.arange(n) * _CELL)[:, None]
    x = jx + (np.arange(n) * _CELL)[None, :]

    def at(name: str) -> np.ndarray:
        return _sample_nodes(layout[name], y, x, size)

    epi, lymph = at("epi"), at("lymph")
    present = (at("inside") + 0.006 * rng.standard_normal(shape) > 0) & (at("hole") <= 0)
    nucleus = present & (rng.random(shape) < 0.5 + 0.45 * epi + 0.05 * lymph)
    radius = (5.5 + 2.5 * epi + 1.0 * lymph) * np.exp(0.13 * rng.standard_normal(shape))
    height = 1900 * at("stain") * (1 + 0.5 * lymph) * np.exp(0.35 * rng.standard_normal(shape))
    mitotic = rng.random(shape) < 0.004
    radius = np.where(mitotic, 0.7 * radius, radius)
    height = np.where(mitotic, 3.0 * height, height)
    aspect = np.exp((0.15 + 0.25 * (1 - epi)) * rng.standard_normal(shape))
    peak = np.where(nucleus, height**2, 0.0)
    far = np.where(present, 0.0, 1e4)  # absent cells never win the distance comparisons

    def padded(a: np.ndarray, fill: float) -> np.ndarray:
        return np.pad(a, 1, constant_values=fill).astype(np.float32)

    return _Cells(
        jy=padded(jy + far, 1e4),
        jx=padded(jx + far, 1e4),
        peak=padded(peak, 0.0),
        ky=padded(peak / (radius * aspect) ** 2, 0.0),
        kx=padded(peak / (radius / aspect) ** 2, 0.0),
    )


_FONT_LOCK = threading.Lock()


@functools.cache
def _font(pixels: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``pixels`` size."""
    return ImageFont.load_default(size=pixels)


def _make_overlay(size: int) -> _Overlay:
    """Title, scale bar, and a labelled cross every 1024 px (level-0 coordinates)."""
    texts: list[tuple[str, int, int, int, str, float]] = [
        ("zarrscope sample", size // 32, size // 40, max(8, size // 18), "la", 1.0),
        (
            f"{size} x {size} px, 0.5 um/px, nuclei (cyan) and membranes (magenta)",
            size // 32,
            size // 40 + size // 13,
            max(6, size // 64),
            "la",
            0.8,
        ),
    ]
    lines: list[tuple[int, int, int, int, int, float]] = []
    nice = (10, 20, 50, 100, 200, 500, 1000, 2000)
    bar_um = max(b for b in nice if b / PIXEL_SIZE_UM <= size / 6)
    bar = int(bar_um / PIXEL_SIZE_UM)
    right, bottom = size - size // 32, size - size // 32
    thick = max(2, size // 256)
    lines.append((right - bar, bottom, right, bottom, thick, 1.0))
    label = f"{bar_um // 1000} mm" if bar_um >= 1000 else f"{bar_um} um"
    texts.append((label, right - bar // 2, bottom - 2 * thick, max(6, size // 48), "md", 1.0))
    step = 1024
    for gy in range(step, size, step):
        for gx in range(step, size, step):
            lines.append((gx - 6, gy, gx + 6, gy, 1, 0.6))
            lines.append((gx, gy - 6, gx, gy + 6, 1, 0.6))
            texts.append((f"y{gy} x{gx}", gx + 5, gy + 4, 14, "la", 0.6))
    boxes = [_text_box(text, x, y, px, anchor) for text, x, y, px, anchor, _ in texts] + [
        (min(x0, x1) - w, min(y0, y1) - w, max(x0, x1) + w + 1, max(y0, y1) + w + 1)
        for x0, y0, x1, y1, w, _ in lines
    ]
    return _Overlay(texts, lines, np.array(boxes, dtype=np.int64).reshape(-1, 4))


def _text_box(text: str, x: int, y: int, pixels: int, anchor: str) -> tuple[int, int, int, int]:
    """Level-0 bounding box (x0, y0, x1, y1) of a text item, with a pixel of margin."""
    with _FONT_LOCK:
        left, top, right, bottom = _font(pixels).getbbox(text, anchor=anchor)
    return (x + int(left) - 1, y + int(top) - 1, x + int(right) + 1, y + int(bottom) + 1)


# ------------------------------------------------------------------------ rendering


def _render_block(scene: _Scene, y0: int, x0: int, side: int) -> np.ndarray:
    """Level-0 pixels ``[y0, y0+side) x [x0, x0+side)`` of both channels, uint16.

    Written with in-place operations: this is where the generator spends its time.
    """
    dist1, dist2, cap = _voronoi(scene.cells, y0, x0, side)
    d1 = np.sqrt(dist1, out=dist1)
    # Membranes: where the two nearest centres are equally far, or at a cell's free edge.
    gap = np.minimum(np.sqrt(dist2, out=dist2), _OUTLINE, out=dist2)
    gap -= d1
    gap *= gap
    gap *= -1 / 2.2
    membrane = np.exp(gap, out=gap)
    # Pixel lies in a cell: within _OUTLINE of its nearest centre (soft edge).
    cellular = np.clip(d1 * -0.5 + (0.5 * _OUTLINE + 0.5), 0, 1, out=d1)
    membrane_gain, fibre_gain, fibre_dir = _upsample(scene, y0, x0, side)

    def texture(name: str, dy: int = 0, dx: int = 0) -> np.ndarray:
        table = scene.textures[name]
        period = table.shape[0] - _BLOCK
        ty, tx = (y0 + dy) % period, (x0 + dx) % period
        return table[ty : ty + side, tx : tx + side]

    out = np.empty((len(CHANNELS), side, side), np.float32)
    # Nuclei: ellipsoid caps, edges roughened, chromatin texture, over a faint haze.
    nuclei = np.subtract(cap, texture("rough"), out=cap)
    np.sqrt(np.maximum(nuclei, 0, out=nuclei), out=nuclei)
    nuclei *= texture("chromatin")
    np.multiply(cellular, texture("nuclear_haze"), out=out[0])
    out[0] += nuclei
    # Membranes and cytoplasm (scaled by region), collagen fibres, vesicles.
    fibres = np.multiply(fibre_dir, texture("fibre_b_minus_a"), out=fibre_dir)
    fibres += texture("fibre_a")  # the two fibre directions, blended by region
    fibres *= fibres
    fibres *= -40
    np.exp(fibres, out=fibres)  # bright where the blend crosses zero: thin wavy lines
    fibres *= fibre_gain
    fibres *= cellular
    fibres *= texture("fibre_tone")
    membrane *= texture("membrane")
    membrane += np.multiply(cellular, texture("cytoplasm"), out=fibre_gain)
    membrane *= membrane_gain
    membrane += fibres
    membrane += np.multiply(cellular, texture("vesicles"), out=fibre_gain)
    out[1] = membrane
    # Camera: offset (+0.5 so that truncation rounds), shot noise ~ signal, read noise.
    out += _OFFSET + 0.5
    for index, shift in enumerate((0, 419)):
        sigma = np.multiply(out[index], 0.6, out=cap)
        sigma += 12
        np.sqrt(sigma, out=sigma)
        sigma *= texture("shot", shift, 2 * shift)
        out[index] += sigma
    overlay = _render_overlay(scene.overlay, y0, x0, side)
    if overlay is not None:
        np.maximum(out, overlay * _OVERLAY_LEVEL, out=out)
    return np.clip(out, 0, 65535, out=out).astype(np.uint16)


def _voronoi(cells: _Cells, y0: int, x0: int, side: int) -> tuple[np.ndarray, ...]:
    """Squared distances to the nearest and second-nearest cell centre, and the nuclear
    cap value (max over cells), for a block aligned to the cell grid.

    Work happens in a (cell row, row in cell, cell column, column in cell) layout where
    each term is a sum of a y part and an x part, so every candidate (the 3x3 cells
    around a pixel's own) costs one broadcast add and a few min/max passes.
    """
    n = side // _CELL
    gy, gx = y0 // _CELL + 1, x0 // _CELL + 1  # +1: the cell arrays are padded
    within = np.arange(_CELL, dtype=np.float32)
    shape = (n, _CELL, n, _CELL)
    first = np.full(shape, np.inf, np.float32)
    second = np.full(shape, np.inf, np.float32)
    cap = np.zeros(shape, np.float32)
    term = np.empty(shape, np.float32)
    scratch = np.empty(shape, np.float32)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            sel = (slice(gy + oy, gy + oy + n), slice(gx + ox, gx + ox + n))
            dy = within[None, :, None] - (cells.jy[sel] + oy * _CELL)[:, None, :]
            dx = within[None, None, :] - (cells.jx[sel] + ox * _CELL)[:, :, None]
            dy2, dx2 = dy * dy, dx * dx
            np.add(dy2[..., None], dx2[:, None], out=term)
            np.maximum(first, term, out=scratch)
            np.minimum(second, scratch, out=second)
            np.minimum(first, term, out=first)
            half = 0.5 * cells.peak[sel]
            cap_y = half[:, None, :] - cells.ky[sel][:, None, :] * dy2
            cap_x = half[:, :, None] - cells.kx[sel][:, :, None] * dx2
            np.add(cap_y[..., None], cap_x[:, None], out=term)
            np.maximum(cap, term, out=cap)
    return first.reshape(side, side), second.reshape(side, side), cap.reshape(side, side)


def _catmull_rom(f: np.ndarray) -> np.ndarray:
    """Catmull-Rom weights (4, n) of the nodes before, at, after and two after a point
    at fraction ``f`` (n,) of the way between two nodes."""
    f2, f3 = f * f, f * f * f
    return np.stack(
        [
            -0.5 * f3 + f2 - 0.5 * f,
            1.5 * f3 - 2.5 * f2 + 1,
            -1.5 * f3 + 2 * f2 + 0.5 * f,
            0.5 * f3 - 0.5 * f2,
        ]
    ).astype(np.float32)


def _upsample(scene: _Scene, y0: int, x0: int, side: int) -> np.ndarray:
    """The scene's per-pixel layout maps, cubic-interpolated from the map nodes to the
    block's pixels: (maps, side, side).

    Nodes are ``step`` pixels apart and blocks start on a node, so a pixel's four nodes
    follow from its segment and its weights from its offset in the segment. Both passes
    are then small einsums; a BLAS matrix product would be no faster and its idle
    threads would compete with the other tile jobs.
    """
    step = scene.size // _GRID
    weights = _catmull_rom((np.arange(step) + 0.5) / step)  # (4, step)
    segments = side // step
    gy, gx = y0 // step + _PAD - 1, x0 // step + _PAD - 1
    nodes = scene.maps[:, gy : gy + segments + 3, gx : gx + segments + 3]
    along_y = sliding_window_view(nodes, 4, axis=1)  # (maps, segments, nodes, 4)
    rows = np.einsum("kgjm,mo->kgoj", along_y, weights).reshape(len(nodes), side, -1)
    along_x = sliding_window_view(rows, 4, axis=2)  # (maps, side, segments, 4)
    maps = np.einsum("kysm,mo->kyso", along_x, weights).reshape(len(nodes), side, side)
    return np.maximum(maps, 0, out=maps)  # the maps are >= 0; cubic overshoot is not


def _render_overlay(overlay: _Overlay, y0: int, x0: int, side: int) -> np.ndarray | None:
    """Opacity (0-1) of the overlay in the block, or None where it has nothing."""
    boxes = overlay.boxes
    hits = np.flatnonzero(
        (boxes[:, 0] < x0 + side)
        & (boxes[:, 2] > x0)
        & (boxes[:, 1] < y0 + side)
        & (boxes[:, 3] > y0)
    )
    if not hits.size:
        return None
    canvas = Image.new("L", (side, side))
    draw = ImageDraw.Draw(canvas)
    n_texts = len(overlay.texts)
    with _FONT_LOCK:  # a FreeType face is not safe to use from two threads at once
        for hit in hits.tolist():
            if hit < n_texts:
                text, x, y, pixels, anchor, value = overlay.texts[hit]
                fill = round(255 * value)
                draw.text((x - x0, y - y0), text, fill=fill, font=_font(pixels), anchor=anchor)
            else:
                lx0, ly0, lx1, ly1, width, value = overlay.lines[hit - n_texts]
                fill = round(255 * value)
                draw.line((lx0 - x0, ly0 - y0, lx1 - x0, ly1 - y0), fill=fill, width=width)
    return np.asarray(canvas, dtype=np.float32) * (1 / 255)


if __name__ == "__main__":
    sys.exit(main())
