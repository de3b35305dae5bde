"""Local stores do not follow symbolic links out of their root, and the command line
refuses metadata that cannot be right with one line and status 2.

A level or chunk linked out of the store is refused (at open for a level's directory,
per chunk for chunk files and the directories under a level), naming the link but not
its target; links that stay inside the store are followed and read what zarr reads.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import zarr
from conftest import make_array, ramp

from chunkpool import ChunkLoadError, ChunkPool, ChunkReadError, SourceError, open_node
from chunkpool.metadata import read_multiscales

#: A directory name that must never show in a message (it stands for a private path).
SECRET = "private-Xq7"


def ome_pyramid(root: pathlib.Path) -> list[np.ndarray]:
    """A 2-level OME-Zarr 0.5 image of ramps at ``root``, arrays "0" and "1"."""
    levels = [ramp((32, 32)), ramp((16, 16)) + 7]
    group = zarr.open_group(root, mode="w")
    datasets = []
    for i, data in enumerate(levels):
        make_array(group.store, data, (8, 8), name=str(i))
        scale = {"type": "scale", "scale": [2.0**i, 2.0**i]}
        datasets.append({"path": str(i), "coordinateTransformations": [scale]})
    axes = [{"name": n, "type": "space"} for n in "yx"]
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": axes, "datasets": datasets}]}
    return levels


def move_out_and_link(inside: pathlib.Path, outside: pathlib.Path) -> None:
    """Move ``inside`` to ``outside`` and leave a symbolic link to it in its place."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(inside, outside)
    inside.symlink_to(outside)


def open_error(source: pathlib.Path) -> str:
    """The one-line SourceError message of opening ``source`` as an image."""
    with pytest.raises(SourceError) as info:
        read_multiscales(*open_node(source))
    message = str(info.value)
    assert "\n" not in message and str(source) in message
    return message


# -- levels linked out of the store ---------------------------------------------------


def test_level_linked_out_of_the_store_is_refused(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "img.zarr"
    ome_pyramid(store)
    move_out_and_link(store / "1", tmp_path / SECRET / "1")

    message = open_error(store)

    assert "level 1 ('1'): '1' is a symbolic link out of the store; not followed" in message
    assert SECRET not in message


def test_metadata_document_linked_out_of_the_store_is_refused(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "img.zarr"
    ome_pyramid(store)
    move_out_and_link(store / "0" / "zarr.json", tmp_path / SECRET / "zarr.json")

    message = open_error(store)

    assert "'0/zarr.json' is a symbolic link out of the store" in message
    assert SECRET not in message


def test_image_group_linked_out_of_the_store_is_refused(tmp_path: pathlib.Path) -> None:
    """The store's root may itself be a link (the user chose it); a group inside it
    that leads out is refused through its levels."""
    store = tmp_path / "plate.zarr"
    zarr.open_group(store, mode="w")
    ome_pyramid(tmp_path / SECRET / "image")
    (store / "image").symlink_to(tmp_path / SECRET / "image")
    (tmp_path / "alias.zarr").symlink_to(store)

    group = zarr.open_group(tmp_path / "alias.zarr", mode="r")
    with pytest.raises(SourceError) as info:
        read_multiscales(group["image"], "alias.zarr")

    assert "'image' is a symbolic link out of the store" in str(info.value)
    assert SECRET not in str(info.value)


def test_level_linked_inside_the_store_is_followed(tmp_path: pathlib.Path, pools) -> None:
    store = tmp_path / "img.zarr"
    levels = ome_pyramid(store)
    move_out_and_link(store / "1", store / "copies" / "1")

    pool = pools(zarr.open_group(store, mode="r"))

    got = next(iter(pool.iter_data([(1, (1, 1))])))
    np.testing.assert_array_equal(got, levels[1][8:16, 8:16])


# -- chunks linked out of the store ---------------------------------------------------


def chunk_path(array: zarr.Array, root: pathlib.Path, index: tuple[int, ...]) -> pathlib.Path:
    return root / array.metadata.encode_chunk_key(index)


LAYOUTS: dict[str, dict[str, Any]] = {
    "v3": {"chunks": (8, 8)},
    "v2": {"chunks": (8, 8), "zarr_format": 2},
    "v2-slash": {
        "chunks": (8, 8),
        "zarr_format": 2,
        "chunk_key_encoding": {"name": "v2", "separator": "/"},
    },
    "sharded": {"chunks": (8, 8), "shards": (16, 16)},
}


def array_with_linked_chunk(
    root: pathlib.Path, layout: str, target_dir: pathlib.Path
) -> tuple[zarr.Array, np.ndarray, tuple[int, ...]]:
    """A 32² ramp array at ``root`` whose chunk (or shard) file (1, 0) is replaced by
    a link to a file in ``target_dir`` holding another array's valid chunk: followed, it
    would decode without error into the wrong pixels. Returns the array (as opened by
    the pool), its data and the index of the linked chunk."""
    options = dict(LAYOUTS[layout])
    chunks = options.pop("chunks")
    data = ramp((32, 32))
    array = make_array(root, data, chunks, **options)
    decoy = make_array(target_dir / "decoy.zarr", data[::-1].copy(), chunks, **options)
    linked = chunk_path(array, root, (1, 0))
    linked.unlink()
    linked.symlink_to(chunk_path(decoy, target_dir / "decoy.zarr", (1, 0)))
    # the linked unit holds chunk (2, 0) when the array is sharded (16² shards of 8²)
    return array, data, (2, 0) if "shards" in options else (1, 0)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_chunk_file_linked_out_of_the_store_fails_that_chunk(
    tmp_path: pathlib.Path, pools: Callable[..., ChunkPool], layout: str
) -> None:
    """The chunk behind the link fails with a ChunkReadError naming the link (not its
    target); every other chunk loads."""
    root = tmp_path / "a.zarr"
    _, data, bad = array_with_linked_chunk(root, layout, tmp_path / SECRET)
    pool = pools(zarr.open_array(root, mode="r"))
    scale = pool.multiscale_info.levels[0]
    locs = [pool.get_chunk(0, index) for index in scale.iter_chunk_indices()]

    with pytest.raises(ChunkLoadError) as info:
        pool.wait_for_chunks_to_load(timeout=60)

    assert bad in {index for _, index in info.value.failures}
    for err in info.value.failures.values():
        assert isinstance(err, ChunkReadError)
        assert "is a symbolic link out of the store; not followed" in str(err), str(err)
        assert SECRET not in str(err)
    for loc in locs:
        if loc.error is None:
            np.testing.assert_array_equal(loc.data, data[scale.chunk_slices(loc.index)])


def test_chunk_directory_linked_out_of_the_store_fails_its_chunks(
    tmp_path: pathlib.Path, pools: Callable[..., ChunkPool]
) -> None:
    """A directory under the level ("c/1" of a v3 array) linked out of the store: its
    chunks fail, naming that directory; the others load."""
    root = tmp_path / "a.zarr"
    data = ramp((32, 32))
    make_array(root, data, (8, 8))
    outside = tmp_path / SECRET / "c1"
    shutil.copytree(root / "c" / "1", outside)
    shutil.rmtree(root / "c" / "1")
    (root / "c" / "1").symlink_to(outside)
    pool = pools(zarr.open_array(root, mode="r"))
    for index in pool.multiscale_info.levels[0].iter_chunk_indices():
        pool.get_chunk(0, index)

    with pytest.raises(ChunkLoadError) as info:
        pool.wait_for_chunks_to_load(timeout=60)

    assert sorted(index for _, index in info.value.failures) == [(1, i) for i in range(4)]
    err = next(iter(info.value.failures.values()))
    assert "'c/1' is a symbolic link out of the store" in str(err) and SECRET not in str(err)


def test_chunk_file_linked_inside_the_store_is_read(
    tmp_path: pathlib.Path, pools: Callable[..., ChunkPool]
) -> None:
    """A chunk file linked to another chunk file of the same store (deduplication)
    reads what zarr-python reads through the link."""
    root = tmp_path / "a.zarr"
    array = make_array(root, ramp((32, 32)), (8, 8))
    linked = chunk_path(array, root, (3, 3))
    linked.unlink()
    linked.symlink_to(os.path.relpath(chunk_path(array, root, (0, 1)), linked.parent))
    expected = zarr.open_array(root, mode="r")[...]
    pool = pools(zarr.open_array(root, mode="r"))

    got = next(iter(pool.iter_data([(0, (3, 3))])))

    np.testing.assert_array_equal(got, expected[24:32, 24:32])
    np.testing.assert_array_equal(got, expected[0:8, 8:16])


# -- the command line -------------------------------------------------------------------


def write_denormal_scale(root: pathlib.Path) -> None:
    ome_pyramid(root)
    group = zarr.open_group(root, mode="r+")
    ome = group.attrs["ome"]
    ome["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"] = [1e-320, 1]
    group.attrs["ome"] = ome


def write_tiny_pixels(root: pathlib.Path) -> None:
    ome_pyramid(root)
    group = zarr.open_group(root, mode="r+")
    ome = group.attrs["ome"]
    for i, dataset in enumerate(ome["multiscales"][0]["datasets"]):
        dataset["coordinateTransformations"][0]["scale"] = [1e-300 * 2**i] * 2
    group.attrs["ome"] = ome


def write_level_linked_out(root: pathlib.Path) -> None:
    ome_pyramid(root)
    move_out_and_link(root / "1", root.parent / SECRET / "1")


@pytest.mark.parametrize(
    ("write", "says"),
    [
        (write_denormal_scale, "level 0 ('0') has scale 1e-320 along y"),
        (write_tiny_pixels, "level 0 cannot be shown: its pixel size 1e-300 along y"),
        (write_level_linked_out, "'1' is a symbolic link out of the store"),
    ],
    ids=["denormal-scale", "beyond-float32", "level-linked-out"],
)
def test_cli_refuses_with_one_line_and_status_2(
    tmp_path: pathlib.Path, write: Callable[[pathlib.Path], None], says: str
) -> None:
    source = tmp_path / "img.zarr"
    write(source)
    out = tmp_path / "out.png"

    result = subprocess.run(
        [sys.executable, "-m", "viewer", str(source), "--screenshot", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("zarrscope: error: "), result.stderr
    assert says in lines[0] and SECRET not in lines[0]
    assert not out.exists()
