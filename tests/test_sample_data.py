"""Tests of the built-in sample image (``sample_data``): OME-Zarr metadata of both
formats, an exactly consistent pyramid, non-trivial content, and where and when the
viewer's copy is made."""

from __future__ import annotations

import importlib
import io
import itertools
import json
import os
import pathlib
import re
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

from chunkpool import read_multiscales
from sample_data import default_sample_path, ensure_sample, make_sample

# The module (the package re-exports its function of the same name).
generator = importlib.import_module("sample_data.make_sample")

REPO = pathlib.Path(__file__).resolve().parents[1]
V3_SIZE = 4096  # several tile jobs, and levels made from their results afterwards
V2_SIZE = 1024  # one tile job writes every level


@pytest.fixture(scope="module")
def v3_sample(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("v3") / "sample.ome.zarr"
    return make_sample(path, zarr_format=3, size=V3_SIZE)


@pytest.fixture(scope="module")
def v2_sample(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    path = tmp_path_factory.mktemp("v2") / "sample.ome.zarr"
    return make_sample(path, zarr_format=2, size=V2_SIZE)


@pytest.fixture(params=["v3", "v2"])
def sample(request: pytest.FixtureRequest) -> tuple[pathlib.Path, int]:
    """Either sample with its level-0 size."""
    if request.param == "v3":
        return request.getfixturevalue("v3_sample"), V3_SIZE
    return request.getfixturevalue("v2_sample"), V2_SIZE


def levels_of(path: pathlib.Path) -> list[np.ndarray]:
    group = zarr.open_group(path, mode="r")
    return [group[str(level)][...] for level in range(len(list(group.array_keys())))]


def halve(image: np.ndarray) -> np.ndarray:
    """The documented pyramid rule: 2x2 block mean, rounded half up."""
    wide = image.astype(np.uint32)
    total = wide[:, ::2, ::2] + wide[:, 1::2, ::2] + wide[:, ::2, 1::2] + wide[:, 1::2, 1::2]
    return ((total + 2) // 4).astype(np.uint16)


def check_multiscale(multiscale: dict, size: int) -> None:
    assert multiscale["axes"] == [
        {"name": "c", "type": "channel"},
        {"name": "y", "type": "space", "unit": "micrometer"},
        {"name": "x", "type": "space", "unit": "micrometer"},
    ]
    datasets = multiscale["datasets"]
    assert len(datasets) == (size // 256).bit_length()  # down to a 256 px side
    for level, dataset in enumerate(datasets):
        assert dataset["path"] == str(level)
        scale, translation = dataset["coordinateTransformations"]
        factor = 2**level
        assert scale == {"type": "scale", "scale": [1.0, 0.5 * factor, 0.5 * factor]}
        # Pixel (0, 0) of level L averages level-0 pixels 0..factor-1: its centre is at
        # (factor - 1) / 2 level-0 pixels of 0.5 µm.
        shift = 0.5 * (factor - 1) * 0.5
        assert translation == {"type": "translation", "translation": [0.0, shift, shift]}


def check_omero(omero: dict, levels: list[np.ndarray]) -> None:
    channels = omero["channels"]
    assert [c["label"] for c in channels] == ["Nuclei", "Membrane"]
    assert [c["color"] for c in channels] == ["00FFFF", "FF00FF"]
    for index, channel in enumerate(channels):
        assert channel["active"] is True
        low, high = np.percentile(levels[-1][index], [0.5, 99.5])
        window = channel["window"]
        assert window["start"] == round(low)
        assert window["end"] == round(high)
        assert window["min"] == levels[0][index].min()
        assert window["max"] == levels[0][index].max()
        assert window["min"] <= window["start"] < window["end"] <= window["max"]


def test_v3_is_ome_zarr_0_5(v3_sample: pathlib.Path) -> None:
    meta = json.loads((v3_sample / "zarr.json").read_text())
    assert meta["zarr_format"] == 3
    assert meta["node_type"] == "group"
    ome = meta["attributes"]["ome"]
    assert ome["version"] == "0.5"
    (multiscale,) = ome["multiscales"]
    assert "version" not in multiscale  # 0.5 keeps it under "ome" only
    check_multiscale(multiscale, V3_SIZE)
    check_omero(ome["omero"], levels_of(v3_sample))
    for level in range(len(multiscale["datasets"])):
        array_meta = json.loads((v3_sample / str(level) / "zarr.json").read_text())
        side = V3_SIZE >> level
        assert array_meta["shape"] == [2, side, side]
        assert array_meta["data_type"] == "uint16"
        assert array_meta["chunk_grid"]["configuration"]["chunk_shape"] == [1, 256, 256]
        assert array_meta["dimension_names"] == ["c", "y", "x"]
        assert [c["name"] for c in array_meta["codecs"]] == ["bytes", "zstd"]


def test_v2_is_ome_zarr_0_4(v2_sample: pathlib.Path) -> None:
    assert json.loads((v2_sample / ".zgroup").read_text())["zarr_format"] == 2
    attrs = json.loads((v2_sample / ".zattrs").read_text())
    (multiscale,) = attrs["multiscales"]
    assert multiscale["version"] == "0.4"
    check_multiscale(multiscale, V2_SIZE)
    check_omero(attrs["omero"], levels_of(v2_sample))
    for level in range(len(multiscale["datasets"])):
        array_meta = json.loads((v2_sample / str(level) / ".zarray").read_text())
        side = V2_SIZE >> level
        assert array_meta["shape"] == [2, side, side]
        assert array_meta["dtype"] == "<u2"
        assert array_meta["chunks"] == [1, 256, 256]
        assert array_meta["dimension_separator"] == "/"  # required by OME-Zarr 0.4
        assert array_meta["compressor"] is not None
    assert (v2_sample / "0" / "1" / "0" / "0").is_file()  # "/"-nested chunk keys


def test_chunkpool_reads_the_sample(sample: tuple[pathlib.Path, int]) -> None:
    """The project's own metadata reader sees what the viewer needs."""
    path, size = sample
    (info,) = read_multiscales(zarr.open_group(path, mode="r"), "sample")
    assert info.ome_version == ("0.5" if (path / "zarr.json").exists() else "0.4")
    assert [level.shape for level in info.levels] == [
        (2, size >> level, size >> level) for level in range(len(info.levels))
    ]
    assert info.levels[1].scale == (1.0, 1.0, 1.0)
    assert info.levels[1].translation == (0.0, 0.25, 0.25)
    assert [(c.label, c.color, c.active) for c in info.channels] == [
        ("Nuclei", "00FFFF", True),
        ("Membrane", "FF00FF", True),
    ]


def test_levels_are_exact_block_means(sample: tuple[pathlib.Path, int]) -> None:
    path, size = sample
    levels = levels_of(path)
    assert levels[0].shape == (2, size, size)
    assert levels[0].dtype == np.uint16
    for finer, coarser in itertools.pairwise(levels):
        np.testing.assert_array_equal(coarser, halve(finer))


def test_content_has_structure_at_every_scale(v3_sample: pathlib.Path) -> None:
    levels = levels_of(v3_sample)
    background = np.median(levels[-1][:, :8, -8:])  # top-right corner: empty slide
    for level, image in enumerate(levels):
        middle, half = image.shape[-1] // 2, min(image.shape[-1] // 2, 512)
        crop = image[:, middle - half : middle + half, middle - half : middle + half]
        for channel in crop.astype(np.float32):
            # Enough foreground: not an empty slide with some noise.
            assert np.mean(channel > background + 300) > 0.01, level
            # Detail: energy left after removing everything smoother than 2x2 blocks.
            smooth = np.kron(halve(channel[None].astype(np.uint16))[0], np.ones((2, 2)))
            assert np.var(channel - smooth) > 0.02 * np.var(channel), level
            # Structure, not white noise: neighbouring pixels are correlated.
            assert np.corrcoef(channel[:, 1:].ravel(), channel[:, :-1].ravel())[0, 1] > 0.3
        # The channels show different things.
        assert abs(np.corrcoef(crop[0].ravel(), crop[1].ravel())[0, 1]) < 0.8, level
    coarsest = levels[-1].astype(np.float32)
    for flipped in (coarsest[:, ::-1], coarsest[:, :, ::-1], coarsest.transpose(0, 2, 1)):
        assert np.mean(np.abs(flipped - coarsest)) > 0.2 * coarsest.std()  # no symmetry


def test_image_does_not_depend_on_tiling(v3_sample: pathlib.Path) -> None:
    """Blocks rendered here, in any size, match what the tile jobs wrote."""
    scene = generator._build_scene(V3_SIZE)
    y0, x0 = 1536, 1792  # spans a 2048 px job tile edge
    stored = zarr.open_array(v3_sample / "0", mode="r")[:, y0 : y0 + 512, x0 : x0 + 512]
    quarters = np.block(
        [[generator._render_block(scene, y0 + y, x0 + x, 256) for x in (0, 256)] for y in (0, 256)]
    )
    np.testing.assert_array_equal(quarters, stored)


def test_default_path_follows_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    monkeypatch.setenv("ZARRSCOPE_SAMPLE_DIR", str(tmp_path / "mine"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert default_sample_path() == tmp_path / "mine" / "sample.ome.zarr"
    monkeypatch.delenv("ZARRSCOPE_SAMPLE_DIR")
    assert default_sample_path() == tmp_path / "cache" / "zarrscope" / "sample.ome.zarr"
    monkeypatch.delenv("XDG_CACHE_HOME")
    expected = pathlib.Path.home() / ".cache" / "zarrscope" / "sample.ome.zarr"
    assert default_sample_path() == expected


def test_ensure_sample_keeps_an_existing_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZARRSCOPE_SAMPLE_DIR", str(tmp_path))
    path = make_sample(tmp_path / "sample.ome.zarr", size=256)
    stamp = (path / "zarr.json").stat().st_mtime_ns
    assert ensure_sample() == path
    assert ensure_sample(path) == path
    assert (path / "zarr.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().err == ""


def test_ensure_sample_makes_a_missing_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("ZARRSCOPE_SAMPLE_DIR", str(tmp_path / "dir"))
    made: list[pathlib.Path] = []

    def fake_make_sample(path: pathlib.Path, *, progress: io.TextIOBase) -> pathlib.Path:
        # the real one takes ~20 s; it reports on the stream it is given
        assert progress is sys.stderr
        made.append(path)
        path.mkdir(parents=True)
        return path

    monkeypatch.setattr(generator, "make_sample", fake_make_sample)
    expected = tmp_path / "dir" / "sample.ome.zarr"
    assert ensure_sample() == expected
    assert made == [expected]
    assert ensure_sample() == expected
    assert made == [expected]  # not made again


def test_overwrite_replaces_and_leaves_nothing_behind(tmp_path: pathlib.Path) -> None:
    path = make_sample(tmp_path / "s.ome.zarr", zarr_format=2, size=256)
    with pytest.raises(FileExistsError):
        make_sample(path, size=256)
    assert (path / ".zattrs").is_file()  # untouched
    make_sample(path, zarr_format=3, size=256, overwrite=True)
    assert (path / "zarr.json").is_file()
    assert not (path / ".zattrs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.zarr"]


def test_interrupted_run_leaves_no_sample(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    def failing_write(generation: object, *args: object) -> None:
        (tmp_path / "s.ome.zarr" / "0" / "c").mkdir()  # the arrays are in place, writing began
        raise KeyboardInterrupt

    monkeypatch.setattr(generator._Generation, "_write", failing_write)
    with pytest.raises(KeyboardInterrupt):
        make_sample(tmp_path / "s.ome.zarr", size=256)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "bad", [{"size": 1000}, {"size": 128}, {"size": 2**17}, {"zarr_format": 4}]
)
def test_rejects_bad_arguments(tmp_path: pathlib.Path, bad: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        make_sample(tmp_path / "s.ome.zarr", **bad)


def test_command_line(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "cli.ome.zarr"
    assert generator.main([str(path), "--format", "2", "--size", "256"]) == 0
    assert (path / ".zattrs").is_file()
    with pytest.raises(SystemExit) as exit_info:
        generator.main([str(path), "--size", "256"])  # exists, no --overwrite
    assert exit_info.value.code == 2
    # Run as a script too (python sample_data/make_sample.py), in a clean process.
    env = {**os.environ, "ZARRSCOPE_SAMPLE_DIR": str(tmp_path / "default")}
    script = REPO / "sample_data" / "make_sample.py"
    result = subprocess.run(
        [sys.executable, str(script), "--size", "256"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "default" / "sample.ome.zarr" / "zarr.json").is_file()


# ------------------------------------------------ progress, parallel, opened at once

SMALL_SIZE = 2048  # with 1024 px tile jobs: 4 jobs, levels 2-0 made by them, 3 from them


@pytest.fixture
def small_tiles(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tile jobs of 1024 px, so that a 2048 px sample has several jobs, levels they write
    and a level made from their results."""
    monkeypatch.setattr(generator, "_TILE", 1024)


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal, as stderr is in an interactive shell."""

    def isatty(self) -> bool:
        return True


def chunk_files(root: pathlib.Path, level: int) -> list[pathlib.Path]:
    return [p for p in (root / str(level)).rglob("*") if p.is_file() and "zarr" not in p.name]


def test_progress_bar_on_a_terminal(small_tiles: None, tmp_path: pathlib.Path) -> None:
    stream = FakeTerminal()
    make_sample(tmp_path / "s.ome.zarr", size=SMALL_SIZE, workers=2, progress=stream)
    text = stream.getvalue()
    assert "\r" in text  # redrawn in place
    # The bar says which levels are being made, tiles done of all, elapsed < remaining.
    bar = r"\|[^|]*\| (\d)/4 tiles \[\d\d:\d\d<(?:\d\d:\d\d|\?)\]"
    done = [int(n) for n in re.findall(r"levels 3-0: +\d+%" + bar, text)]
    assert text.startswith("\rlevels 3-0:"), text  # named from its first frame
    assert done and max(done) == 4, text  # each of the 4 tiles is rendered once
    assert re.search(r"\d/4 tiles \[\d\d:\d\d<\d\d:\d\d\]", text)  # an estimate
    assert text.rstrip().splitlines()[-1].startswith("zarrscope: sample written")


def test_progress_off_a_terminal_is_one_line_at_each_end(
    small_tiles: None, tmp_path: pathlib.Path
) -> None:
    stream = io.StringIO()  # a log file or a pipe: no bar
    path = make_sample(tmp_path / "s.ome.zarr", size=SMALL_SIZE, progress=stream)
    text = stream.getvalue()
    assert "\r" not in text
    start, end = text.splitlines()
    assert start == f"zarrscope: generating the sample image at {path} ..."
    assert re.fullmatch(r"zarrscope: sample written in \d+\.\d s", end)


def test_parallel_output_is_byte_identical_to_sequential(
    small_tiles: None, tmp_path: pathlib.Path
) -> None:
    def files(root: pathlib.Path) -> dict[pathlib.Path, bytes]:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    sequential = files(make_sample(tmp_path / "one.ome.zarr", size=SMALL_SIZE, workers=1))
    parallel = files(make_sample(tmp_path / "four.ome.zarr", size=SMALL_SIZE, workers=4))
    assert len(sequential) > 2 * (8 * 8 + 4 * 4 + 2 * 2 + 1)  # every chunk, and metadata
    assert parallel == sequential


def test_the_sample_opens_at_once_and_each_tile_is_rendered_once(
    small_tiles: None, monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path
) -> None:
    """Hold the first tile's rendering: the sample is already at its path and opens, with
    every level and OME metadata (its first windows), no chunk yet, and says it is being
    written. Then each tile is rendered once. (What a reader sees meanwhile, tile after
    tile: tests/test_sample_live.py.)"""
    reached, release = threading.Event(), threading.Event()
    rendered: list[tuple[int, int]] = []
    real_render = generator._render_tile

    def held_render(scene: object, origin: tuple[int, int], cancel: object) -> np.ndarray:
        rendered.append(origin)
        reached.set()
        assert release.wait(60)
        return real_render(scene, origin, cancel)

    monkeypatch.setattr(generator, "_render_tile", held_render)
    path = tmp_path / "s.ome.zarr"
    errors: list[BaseException] = []

    def run() -> None:
        try:
            make_sample(path, size=SMALL_SIZE, workers=1)
        except BaseException as exc:
            errors.append(exc)

    maker = threading.Thread(target=run)
    maker.start()
    try:
        assert reached.wait(60)
        assert generator._sample_state(path) == "writing"
        assert not path.with_name(path.name + ".tmp").exists()  # in place, not aside
        (info,) = read_multiscales(zarr.open_group(path, mode="r"), "sample")
        assert len(info.levels) == 4
        assert [c.window for c in info.channels] == [(100.0, 4500.0)] * 2
        assert all(chunk_files(path, level) == [] for level in range(4))
    finally:
        release.set()
        maker.join(60)
    assert not maker.is_alive() and errors == []
    assert generator._sample_state(path) == "complete"
    assert sorted(rendered) == [(0, 0), (0, 1024), (1024, 0), (1024, 1024)]  # once each
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.ome.zarr"]
    levels = levels_of(path)
    for finer, coarser in itertools.pairwise(levels):
        np.testing.assert_array_equal(coarser, halve(finer))


def test_killed_generation_is_regenerated_not_shown_half_empty(
    monkeypatch: pytest.MonkeyPatch, tmp_path: pathlib.Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "sample.ome.zarr"
    # A generation killed outright (as SIGKILL or a power cut would) after its second
    # tile: nothing of it gets to clean up.
    script = (
        "import importlib, os, sys\n"
        "g = importlib.import_module('sample_data.make_sample')\n"
        "g._TILE = 1024\n"
        "real, made = g._make_tile, []\n"
        "def dying(*args):\n"
        "    made.append(real(*args))\n"
        "    if len(made) == 2:\n"
        "        os._exit(3)\n"
        "    return made[-1]\n"
        "g._make_tile = dying\n"
        f"g.make_sample(sys.argv[1], size={SMALL_SIZE}, workers=1)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *sys.path])}
    killed = subprocess.run(
        [sys.executable, "-c", script, str(path)], env=env, timeout=120, check=False
    )
    assert killed.returncode == 3
    assert len(chunk_files(path, 0)) == 2 * 2 * 4 * 4  # two tiles of level 0 at its path
    assert generator._sample_state(path) == "writing"

    # The viewer's next start does not take it for a sample: it makes it again ...
    made: list[pathlib.Path] = []

    def fake_make_sample(target: pathlib.Path, *, progress: io.TextIOBase) -> pathlib.Path:
        made.append(target)
        return target

    monkeypatch.setattr(generator, "make_sample", fake_make_sample)
    assert ensure_sample(path) == path
    assert made == [path]
    monkeypatch.undo()
    # ... and making it again replaces the remains without being asked to overwrite.
    monkeypatch.setattr(generator, "_TILE", 1024)
    make_sample(path, size=SMALL_SIZE)
    assert generator._sample_state(path) == "complete"
    assert len(chunk_files(path, 0)) == 2 * 8 * 8
    levels = levels_of(path)
    for finer, coarser in itertools.pairwise(levels):
        np.testing.assert_array_equal(coarser, halve(finer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sample.ome.zarr"]


def test_a_sample_from_before_the_marker_is_kept(tmp_path: pathlib.Path) -> None:
    """Samples made by earlier versions (renamed into place complete, with no marker)
    and other data at the sample's path are not regenerated or deleted."""
    path = tmp_path / "sample.ome.zarr"
    zarr.open_group(path, mode="w-").attrs["ome"] = {"version": "0.5"}
    stamp = (path / "zarr.json").stat().st_mtime_ns
    assert ensure_sample(path) == path
    assert (path / "zarr.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError):
        make_sample(path, size=256)
