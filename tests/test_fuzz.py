"""Fuzz: malformed metadata and chunk bytes end in a typed error or in zarr-python's data.

Issue 7, section 6. A seeded generator (the same cases on every run) copies one of a
few small valid stores (Zarr v2 and v3, every codec path, sharded, OME-Zarr 0.4 and 0.5
pyramids), damages it with one or two mutations (chunk bytes, array metadata, OME
attributes), then opens it and loads every chunk through a :class:`ChunkPool`. Each case
must end, within a generous time limit, in one of:

- a typed error: :class:`SourceError` when opening, a :class:`ChunkLoadError` whose
  every failure is a :class:`ChunkPoolError` when loading, all messages one line;
- the data zarr-python reads from the same store, chunk for chunk.

Never a hang, an untyped exception, or data where zarr-python reads other data (or
none). Some damage is wrong whatever zarr-python says (issue 7, 1d: a non-positive or
non-finite scale, levels whose scale does not grow, the channel count changing between
levels, a chunk size of 0): those cases must fail to open.

The tally (cases, typed errors, correct, wrong, hangs) is printed and written to
``tests/_artifacts/fuzz_tally.json``.
"""

from __future__ import annotations

import json
import logging
import math
import pathlib
import random
import shutil
import threading
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numcodecs
import numpy as np
import pytest
import zarr
import zarr.codecs.numcodecs as zcn
from conftest import ramp
from support.corrupt import chunk_file, numcodecs_compressor, replace_inner_chunk
from support.images import noise_image, write_pyramid
from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

from chunkpool import ChunkLoadError, ChunkPool, ChunkPoolError, SourceError

pytestmark = pytest.mark.filterwarnings(
    "ignore:Numcodecs codecs are not in the Zarr", "ignore::RuntimeWarning"
)

SEED = 20240607
CASES = 240
#: Seconds one case may take (open, load every chunk, compare) before it is a hang.
CASE_DEADLINE = 60.0
#: Chunks loaded per level at most (a huge declared shape has too many to visit).
MAX_CHUNKS = 24
ARTIFACTS = pathlib.Path(__file__).parent / "_artifacts"

# -- the valid stores every case starts from ---------------------------------------------


@dataclass
class Base:
    """A valid store: where it is, its arrays (paths in the store), and what it is."""

    name: str
    path: pathlib.Path
    arrays: list[str]
    zarr_format: int
    ome: bool = False
    sharded: bool = False


def _plain(root: pathlib.Path, name: str, dtype: str, **kwargs: Any) -> Base:
    data = ramp((20, 24), dtype) if dtype != "float32" else ramp((20, 24)).astype(dtype) / 7
    path = root / f"{name}.zarr"
    arr = zarr.create_array(path, shape=data.shape, dtype=data.dtype, chunks=(8, 8), **kwargs)
    arr[...] = data
    arr[:8, :8] = arr.fill_value  # one chunk of fill: not stored
    fmt = kwargs.get("zarr_format", 3)
    return Base(name, path, [""], fmt, sharded="shards" in kwargs)


def _pyramid(root: pathlib.Path, name: str, zarr_format: int, channels: int) -> Base:
    path = root / f"{name}.zarr"
    shape, axes = ((channels, 24, 32), ["c", "y", "x"]) if channels else ((24, 32), None)
    n_levels = 2 if channels else 3
    write_pyramid(
        path,
        noise_image(shape, seed=3),
        chunks=(1, 8, 8)[-len(shape) :],
        n_levels=n_levels,
        zarr_format=zarr_format,
        axes=axes,
    )
    return Base(name, path, [str(n) for n in range(n_levels)], zarr_format, ome=True)


def _bases(root: pathlib.Path) -> list[Base]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Numcodecs codecs are not in the Zarr")
        return [
            _plain(root, "v3-zstd", "uint16", compressors=[ZstdCodec()]),
            _plain(root, "v3-blosc", "int16", compressors=[BloscCodec()]),
            _plain(root, "v3-gzip", "uint8", compressors=[GzipCodec()]),
            _plain(root, "v3-lz4", "float32", compressors=[zcn.LZ4()]),
            _plain(root, "v3-raw", "uint16", compressors=None),
            _plain(root, "v3-sharded", "uint16", shards=(16, 16), compressors=[ZstdCodec()]),
            _plain(
                root,
                "v3-sharded-start",
                "int16",
                compressors=[BloscCodec()],
                shards={"shape": (16, 16), "index_location": "start"},
            ),
            _plain(root, "v2-zstd", "uint16", zarr_format=2, compressors=numcodecs.Zstd()),
            _plain(root, "v2-blosc", "float32", zarr_format=2, compressors=numcodecs.Blosc()),
            _plain(root, "v2-lz4", "int16", zarr_format=2, compressors=numcodecs.LZ4()),
            _plain(root, "v2-zlib", "uint16", zarr_format=2, compressors=numcodecs.Zlib()),
            _plain(root, "v2-gzip", "uint8", zarr_format=2, compressors=numcodecs.GZip()),
            _plain(root, "v2-raw-F", "uint16", zarr_format=2, compressors=None, order="F"),
            _plain(
                root,
                "v2-delta",
                "uint16",
                zarr_format=2,
                filters=[numcodecs.Delta("<u2")],
                compressors=numcodecs.Zstd(),
            ),
            _pyramid(root, "ome-0.5", 3, channels=2),
            _pyramid(root, "ome-0.4", 2, channels=3),
            _pyramid(root, "ome-0.5-yx", 3, channels=0),
            _pyramid(root, "ome-0.4-yx", 2, channels=0),
        ]


# -- mutations ---------------------------------------------------------------------------


@dataclass
class Case:
    """One damaged copy of a base store, and what was done to it."""

    base: Base
    path: pathlib.Path
    rng: random.Random
    done: list[str] = field(default_factory=list)
    #: Damage that must fail to open whatever zarr-python reads (issue 7, 1d).
    must_fail_open: bool = False

    def array_meta(self, array: str) -> tuple[pathlib.Path, dict[str, Any]]:
        name = "zarr.json" if self.base.zarr_format == 3 else ".zarray"
        file = self.path / array / name if array else self.path / name
        return file, json.loads(file.read_text())

    def group_attrs(self) -> tuple[pathlib.Path, dict[str, Any]]:
        """The OME attributes' file and the attributes (v3: inside zarr.json)."""
        if self.base.zarr_format == 3:
            file = self.path / "zarr.json"
            meta = json.loads(file.read_text())
            return file, meta
        file = self.path / ".zattrs"
        return file, json.loads(file.read_text())

    def multiscale(self, doc: dict[str, Any]) -> dict[str, Any]:
        if self.base.zarr_format == 3:
            return doc["attributes"]["ome"]["multiscales"][0]
        return doc["multiscales"][0]


def _chunk_files(case: Case) -> list[pathlib.Path]:
    names = {"zarr.json", ".zarray", ".zattrs", ".zgroup"}
    files = sorted(p for p in case.path.rglob("*") if p.is_file() and p.name not in names)
    return files


def _pick_chunk(case: Case) -> pathlib.Path | None:
    files = _chunk_files(case)
    return case.rng.choice(files) if files else None


def _open(case: Case, array: str) -> zarr.Array:
    return zarr.open_array(case.path / array if array else case.path, mode="r")


def m_chunk_bytes(case: Case) -> str:
    """Damage one chunk (or shard) file's bytes."""
    rng = case.rng
    file = _pick_chunk(case)
    if file is None:
        return "chunk-none"
    blob = bytearray(file.read_bytes())
    how = rng.choice(["truncate", "extend", "bitflip", "zero", "empty", "garbage", "delete"])
    if how == "truncate" and blob:
        blob = blob[: rng.randrange(len(blob))]
    elif how == "extend":
        blob += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif how == "bitflip" and blob:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(blob))
            blob[i] ^= 1 << rng.randrange(8)
    elif how == "zero":
        blob = bytearray(len(blob))
    elif how == "empty":
        blob = bytearray()
    elif how == "garbage":
        blob = bytearray(rng.randrange(256) for _ in range(rng.randint(1, 600)))
    elif how == "delete":
        file.unlink()
        return "chunk-delete"
    file.write_bytes(bytes(blob))
    return f"chunk-{how}"


def m_wrong_frame(case: Case) -> str:
    """Replace one chunk by a valid frame of the array's codec, of the wrong size."""
    rng = case.rng
    array = rng.choice(case.base.arrays)
    arr = _open(case, array)
    compressor = numcodecs_compressor(arr)
    item = arr.dtype.itemsize
    chunk_items = math.prod(arr.chunks)
    n = rng.choice([chunk_items - 1, chunk_items // 2, chunk_items + 1, chunk_items * 2, 1])
    payload = bytes(rng.randrange(256) for _ in range(n * item))
    blob = payload if compressor is None else bytes(compressor.encode(payload))
    index = tuple(rng.randrange(g) for g in _grid(arr.shape, arr.chunks))
    if case.base.sharded:
        per = tuple(s // c for s, c in zip(arr.shards, arr.chunks, strict=True))
        shard = tuple(i // p for i, p in zip(index, per, strict=True))
        if not chunk_file(arr, shard).exists():
            return "frame-wrong-size-none"
        replace_inner_chunk(arr, shard, tuple(i % p for i, p in zip(index, per, strict=True)), blob)
    else:
        chunk_file(arr, index).parent.mkdir(parents=True, exist_ok=True)
        chunk_file(arr, index).write_bytes(blob)
    return "frame-wrong-size"


def _grid(shape: tuple[int, ...], chunks: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(math.ceil(s / c) for s, c in zip(shape, chunks, strict=True))


_HUGE = [0, -1, 1 << 40, 1 << 63, 1 << 64, 3, 1000, "7", None, 2.5]


def m_array_meta(case: Case) -> str:
    """Change one field of one array's zarr.json / .zarray."""
    rng = case.rng
    array = rng.choice(case.base.arrays)
    file, meta = case.array_meta(array)
    v3 = case.base.zarr_format == 3
    fields = ["shape", "chunks", "dtype", "fill_value", "codecs", "json"]
    fields += ["dimension_names"] if v3 else ["order"]
    if case.base.sharded:
        fields += ["sharding"] * 2
    what = rng.choice(fields)
    ndim = len(meta["shape"])
    if what == "shape":
        dim = rng.randrange(ndim)
        value = rng.choice([*_HUGE, meta["shape"][dim] * 2, meta["shape"][dim] - 5])
        if rng.random() < 0.2:
            meta["shape"] = meta["shape"][:-1]
        else:
            meta["shape"][dim] = value
    elif what == "chunks":
        dim = rng.randrange(ndim)
        value = rng.choice([*_HUGE, 1024, 64])
        chunks = meta["chunk_grid"]["configuration"]["chunk_shape"] if v3 else meta["chunks"]
        chunks[dim] = value
        if value == 0:
            case.must_fail_open = True
    elif what == "dtype":
        choices = ["uint8", "int16", "uint16", "float32", "float64", "int64", "bool", "nope"]
        if v3:
            meta["data_type"] = rng.choice(choices)
        else:
            meta["dtype"] = rng.choice(["|u1", "<i2", ">u2", "<f4", "<f8", "<i8", "|b1", "<x9"])
    elif what == "fill_value":
        meta["fill_value"] = rng.choice(["NaN", "abc", 1 << 70, -1, None, 3.5, [1, 2]])
    elif what == "codecs":
        what = _mutate_codecs(rng, meta, v3, case.base.sharded)
    elif what == "json":
        text = json.dumps(meta)
        choice = rng.choice(["cut", "list", "format", "node"])
        if choice == "cut":
            file.write_text(text[: rng.randrange(len(text))])
            return "meta-json-cut"
        if choice == "list":
            file.write_text("[]")
            return "meta-json-list"
        if choice == "format":
            meta["zarr_format"] = rng.choice([1, 4, "3", None])
        elif v3:
            meta["node_type"] = rng.choice(["group", "nope"])
        what = f"json-{choice}"
    elif what == "dimension_names":
        names = rng.choice([["y"], ["x", "x"], [1, 2], "yx", ["x", "y"], None])
        meta["dimension_names"] = names
    elif what == "order":
        meta["order"] = rng.choice(["F", "C", "X", None])
    elif what == "sharding":
        (codec,) = meta["codecs"]
        config = codec["configuration"]
        choice = rng.choice(["inner", "location", "index", "nested"])
        if choice == "inner":
            config["chunk_shape"][rng.randrange(ndim)] = rng.choice([0, 3, 5, 32, 1 << 40])
        elif choice == "location":
            config["index_location"] = rng.choice(["start", "middle"])
        elif choice == "index":
            config["index_codecs"] = rng.choice([[{"name": "bytes"}], [], [{"name": "nope"}]])
        else:
            config["codecs"] = [dict(codec)]
        what = f"sharding-{choice}"
    file.write_text(json.dumps(meta))
    return f"meta-{what}"


def _mutate_codecs(rng: random.Random, meta: dict[str, Any], v3: bool, sharded: bool) -> str:
    if v3:
        codecs = meta["codecs"]
        if sharded:
            codecs = codecs[0]["configuration"]["codecs"]
        choice = rng.choice(["unknown", "drop", "swap", "endian", "transpose", "empty"])
        if choice == "unknown":
            codecs.append({"name": "nope"})
        elif choice == "drop":
            del codecs[1:]
        elif choice == "swap":
            codecs[1:] = [
                rng.choice(
                    [
                        {"name": "gzip", "configuration": {"level": 1}},
                        {"name": "zstd", "configuration": {"level": 0}},
                        {"name": "blosc"},
                    ]
                )
            ]
        elif choice == "endian":
            codecs[0] = {"name": "bytes", "configuration": {"endian": "big"}}
        elif choice == "transpose":
            codecs.insert(0, {"name": "transpose", "configuration": {"order": [1, 0]}})
        else:
            codecs.clear()
        return f"codecs-{choice}"
    choice = rng.choice(["unknown", "null", "swap", "delta", "level"])
    if choice == "unknown":
        meta["compressor"] = {"id": "nope"}
    elif choice == "null":
        meta["compressor"] = None
    elif choice == "swap":
        meta["compressor"] = rng.choice(
            [{"id": "zlib", "level": 1}, {"id": "gzip", "level": 1}, {"id": "lz4"}, {"id": "zstd"}]
        )
    elif choice == "delta":
        meta["filters"] = [{"id": "delta", "dtype": "<u2"}]
    else:
        meta["compressor"] = {**(meta["compressor"] or {"id": "zstd"}), "level": 99}
    return f"compressor-{choice}"


_BAD_SCALES: list[Any] = [0, -1.0, "NaN", "Infinity", 1e-320, 1e308, "two", None]


def m_ome(case: Case) -> str:
    """Change the OME multiscales attributes: axes, scales, translations, datasets."""
    rng = case.rng
    file, doc = case.group_attrs()
    ms = case.multiscale(doc)
    what = rng.choice(["axes", "scale", "translation", "datasets", "same-scale", "channels"])
    if what == "axes":
        axes = ms["axes"]
        choice = rng.choice(["drop", "dup", "swap", "type", "names", "string"])
        if choice == "drop":
            axes.pop(rng.randrange(len(axes)))
        elif choice == "dup":
            axes[-1]["name"] = axes[-2]["name"]
        elif choice == "swap":
            axes[-1]["name"], axes[-2]["name"] = axes[-2]["name"], axes[-1]["name"]
        elif choice == "type":
            axes[rng.randrange(len(axes))]["type"] = rng.choice(["nope", "time", 3])
        elif choice == "names":
            axes[rng.randrange(len(axes))]["name"] = rng.choice([3, None, ""])
        else:
            ms["axes"] = "cyx"
        what = f"axes-{choice}"
    elif what in ("scale", "translation"):
        ds = ms["datasets"][rng.randrange(len(ms["datasets"]))]
        transforms = ds["coordinateTransformations"]
        kind = "scale" if what == "scale" else "translation"
        tf = next((t for t in transforms if t["type"] == kind), None)
        if tf is None:
            tf = {"type": kind, kind: [0.0] * len(ms["axes"])}
            transforms.append(tf)
        value = rng.choice(_BAD_SCALES)
        if rng.random() < 0.2:
            tf[kind] = tf[kind][:-1]
        else:
            tf[kind][rng.randrange(len(tf[kind]))] = value
            if kind == "scale" and value in (0, -1.0, "NaN", "Infinity"):
                case.must_fail_open = True
    elif what == "datasets":
        choice = rng.choice(["empty", "nopath", "missing", "reverse", "group", "dup"])
        datasets = ms["datasets"]
        if choice == "empty":
            datasets.clear()
        elif choice == "nopath":
            del datasets[-1]["path"]
        elif choice == "missing":
            datasets[-1]["path"] = "nope"
        elif choice == "reverse":
            paths = [d["path"] for d in datasets]
            for d, p in zip(datasets, reversed(paths), strict=True):
                d["path"] = p
            case.must_fail_open = True  # level 1 (coarser data) now has the finer scale
        elif choice == "group":
            datasets[-1]["path"] = ""
        else:
            datasets.append(dict(datasets[-1]))
            case.must_fail_open = True  # a level with the previous level's scale
        what = f"datasets-{choice}"
    elif what == "same-scale":
        first, last = ms["datasets"][0], ms["datasets"][-1]
        last["coordinateTransformations"] = json.loads(
            json.dumps(first["coordinateTransformations"])
        )
        case.must_fail_open = True
    else:  # the channel count changes between levels
        level_file, level_meta = case.array_meta(case.base.arrays[-1])
        if level_meta["shape"][0] > 3:  # no channel axis: the level grows instead
            level_meta["shape"] = [n * 4 for n in level_meta["shape"]]
        else:
            level_meta["shape"][0] += 1
        level_file.write_text(json.dumps(level_meta))
        case.must_fail_open = True
        return "ome-channels-or-growth"
    file.write_text(json.dumps(doc))
    return f"ome-{what}"


MUTATIONS: list[Callable[[Case], str]] = [m_chunk_bytes, m_wrong_frame, m_array_meta]

# -- running a case ----------------------------------------------------------------------


@dataclass
class Outcome:
    kind: str  # typed-open, typed-load, correct, wrong, untyped, hang, contract
    detail: str = ""


def _one_line(err: BaseException) -> bool:
    return "\n" not in str(err) and "Traceback" not in str(err)


def _sample(grid: tuple[int, ...]) -> list[tuple[int, ...]]:
    """Every chunk index of a grid, or (too many) its first and last ones."""
    n = math.prod(grid)
    if n <= MAX_CHUNKS:
        return [tuple(int(i) for i in idx) for idx in np.ndindex(*grid)]
    picks = {*range(MAX_CHUNKS // 2), *range(n - MAX_CHUNKS // 2, n)}
    out = []
    for flat in sorted(picks):
        idx = []
        for g in reversed(grid):
            idx.append(flat % g)
            flat //= g
        out.append(tuple(reversed(idx)))
    return out


def _zarr_read(arr: zarr.Array, region: tuple[slice, ...]) -> np.ndarray | BaseException:
    try:
        return np.asarray(arr[region])
    except Exception as err:
        return err


def run_case(case: Case) -> Outcome:
    """Open ``case``'s store with chunkpool, load every chunk, compare with zarr-python."""
    try:
        pools = ChunkPool.from_zarr_node(str(case.path), io_concurrency=2, cpu_workers=1)
    except SourceError as err:
        if not _one_line(err):
            return Outcome("untyped", f"multi-line SourceError: {err!r}")
        return Outcome("typed-open", str(err))
    except Exception as err:
        return Outcome("untyped", f"opening: {type(err).__name__}: {err}")
    if case.must_fail_open:
        for pool in pools:
            pool.destroy()
        return Outcome("contract", "opened although the metadata cannot be right")
    try:
        failed = 0
        for pool in pools:
            for level, scale in enumerate(pool.multiscale_info.levels):
                indices = _sample(scale.chunk_grid_shape)
                locs = [pool.get_chunk(level, idx, ref="fuzz") for idx in indices]
                try:
                    pool.wait_for_chunks_to_load(timeout=CASE_DEADLINE)
                except ChunkLoadError as err:
                    for key, error in err.failures.items():
                        if not isinstance(error, ChunkPoolError) or not _one_line(error):
                            return Outcome(
                                "untyped", f"chunk {key}: {type(error).__name__}: {error}"
                            )
                    failed += len(err.failures)
                for loc in locs:
                    if loc.error is not None:
                        continue
                    expected = _zarr_read(scale.array, scale.chunk_slices(loc.index))
                    if isinstance(expected, BaseException):
                        return Outcome(
                            "wrong", f"chunk {loc.index}: data where zarr raises {expected!r}"
                        )
                    if not _same(loc.data, expected):
                        return Outcome("wrong", f"level {level} chunk {loc.index} differs")
                for idx in indices:
                    pool.drop_chunk(level, idx, ref="fuzz")
        return Outcome("typed-load", f"{failed} chunks failed") if failed else Outcome("correct")
    except ChunkPoolError as err:
        return Outcome("untyped", f"loading: unexpected {type(err).__name__}: {err}")
    except Exception as err:
        return Outcome("untyped", f"loading: {type(err).__name__}: {err}")
    finally:
        for pool in pools:
            pool.destroy()


def _same(got: np.ndarray, expected: np.ndarray) -> bool:
    if got.shape != expected.shape or got.dtype != expected.dtype.newbyteorder("="):
        return False
    return bool(np.array_equal(got, expected, equal_nan=got.dtype.kind in "fc"))


def run_with_deadline(case: Case) -> Outcome:
    """:func:`run_case` in a thread; a case still running at the deadline is a hang."""
    result: list[Outcome] = []
    done = threading.Event()

    def target() -> None:
        try:
            result.append(run_case(case))
        except BaseException as err:  # the harness itself must not hide anything
            result.append(Outcome("untyped", f"harness: {type(err).__name__}: {err}"))
        finally:
            done.set()

    threading.Thread(target=target, name="fuzz-case", daemon=True).start()
    if not done.wait(CASE_DEADLINE):
        return Outcome("hang", f"still running after {CASE_DEADLINE:g} s")
    return result[0]


def make_case(bases: list[Base], root: pathlib.Path, number: int) -> Case:
    """Case ``number``: a copy of a base store with one or two mutations."""
    rng = random.Random(SEED * 1000 + number)
    base = bases[number % len(bases)]
    path = root / f"case{number:04d}"
    shutil.copytree(base.path, path)
    case = Case(base, path, rng)
    kinds = [*MUTATIONS, *([m_ome] * 4 if base.ome else [])]
    for _ in range(rng.choice([1, 1, 2])):
        mutate = rng.choice(kinds)
        try:
            case.done.append(mutate(case))
        except Exception as err:
            # an earlier mutation left nothing this one can change (or read): say so
            case.done.append(f"{mutate.__name__}-skipped({type(err).__name__})")
    return case


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> list[Base]:
    return _bases(tmp_path_factory.mktemp("fuzz-bases"))


def test_fuzz_typed_error_or_zarr_data(
    bases: list[Base], tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Every damaged store ends in a typed error or in zarr-python's data (tally kept)."""
    caplog.set_level(logging.ERROR, logger="chunkpool")  # a warning per failed chunk
    tally: Counter[str] = Counter()
    by_kind: dict[str, Counter[str]] = {}
    bad: dict[str, str] = {}  # first bad example per (outcome, mutation kind)
    for number in range(CASES):
        case = make_case(bases, tmp_path, number)
        outcome = run_with_deadline(case)
        tally[outcome.kind] += 1
        for kind in case.done:
            by_kind.setdefault(kind, Counter())[outcome.kind] += 1
        if outcome.kind in ("wrong", "untyped", "hang", "contract"):
            key = f"{outcome.kind}: {'+'.join(case.done)}"
            bad.setdefault(key, f"case {number} ({case.base.name}): {outcome.detail}")
        if outcome.kind != "hang":
            shutil.rmtree(case.path, ignore_errors=True)
    summary = {
        "cases": CASES,
        "typed_errors": tally["typed-open"] + tally["typed-load"],
        "typed_open": tally["typed-open"],
        "typed_load": tally["typed-load"],
        "correct": tally["correct"],
        "wrong": tally["wrong"],
        "hangs": tally["hang"],
        "untyped": tally["untyped"],
        "contract": tally["contract"],
        "by_mutation": {k: dict(v) for k, v in sorted(by_kind.items())},
        "failures": bad,
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz_tally.json").write_text(json.dumps(summary, indent=2))
    print(
        "fuzz tally: {cases} cases, {typed_errors} typed errors, {correct} correct, "
        "{wrong} wrong, {hangs} hangs, {untyped} untyped, {contract} contract".format(**summary)
    )
    leftover = [t.name for t in threading.enumerate() if t.name.startswith("chunkpool-")]
    assert not bad, "\n".join(f"{k}\n    {v}" for k, v in sorted(bad.items()))
    assert not leftover, f"threads left running: {leftover}"
    assert summary["correct"] >= CASES // 10 and summary["typed_errors"] >= CASES // 4


@pytest.mark.render
def test_cli_says_one_line_for_damaged_stores(
    bases: list[Base], tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handful of fuzz cases through ``zarrscope --screenshot``: a store that fails to
    open exits 2 with exactly one line on stderr; one whose chunks fail either writes
    its picture (failed tiles hatched) and says so, or (a chunk it needs to set the
    contrast failed) exits 2 with one line; never a traceback."""
    from viewer.__main__ import main

    picked: dict[str, list[Case]] = {"typed-open": [], "typed-load": []}
    number = 0
    while len(picked["typed-open"]) < 3 or len(picked["typed-load"]) < 2:
        assert number < CASES, f"too few typed cases among {CASES}: {picked}"
        case = make_case(bases, tmp_path, number)
        kind = run_with_deadline(case).kind
        if kind in picked and len(picked[kind]) < (3 if kind == "typed-open" else 2):
            picked[kind].append(case)
        number += 1
    capsys.readouterr()
    for kind, cases in picked.items():
        for case in cases:
            out = tmp_path / f"{case.path.name}.png"
            argv = [str(case.path), "--screenshot", str(out), "--size", "64", "48"]
            code = main([*argv, "--timeout", str(CASE_DEADLINE)])
            err = capsys.readouterr().err
            what = f"{case.path.name} ({'+'.join(case.done)}): rc {code}, stderr {err!r}"
            assert "Traceback" not in err, what
            if kind == "typed-open" or code == 2:  # (the viewer samples chunks for contrast)
                assert code == 2, what
                assert len(err.splitlines()) == 1 and err.startswith("zarrscope: error: "), what
            else:
                assert code == 0 and out.exists(), what
                assert "tiles failed" in err.splitlines()[-1], what
