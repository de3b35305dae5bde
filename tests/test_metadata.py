"""Reading multiscale metadata: OME-Zarr 0.4 (Zarr v2) and 0.5 (Zarr v3), older OME
styles, bioformats2raw collections, plain arrays and groups, and every validation error.

Stores are small and hold metadata only (no chunk is ever written), so this is fast.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zarr

from chunkpool import ChunkPool
from chunkpool.errors import SourceError
from chunkpool.info import Axis, MultiscaleInfo
from chunkpool.metadata import read_multiscales
from chunkpool.stores import open_node

SPACE = {"x", "y", "z"}
AXIS_TYPES = {"t": "time", "c": "channel", "z": "space", "y": "space", "x": "space"}


@pytest.fixture(params=[2, 3], ids=["v2-ome0.4", "v3-ome0.5"])
def zarr_format(request: pytest.FixtureRequest) -> int:
    """Each OME test runs on Zarr v2 with 0.4 metadata and on Zarr v3 with 0.5."""
    return request.param


def ome_attributes(
    zarr_format: int, multiscales: list[dict[str, Any]], omero: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Group attributes in the OME layout of the format: 0.4 for v2, 0.5 for v3."""
    if zarr_format == 2:
        attrs: dict[str, Any] = {"multiscales": [{"version": "0.4", **m} for m in multiscales]}
        if omero is not None:
            attrs["omero"] = omero
        return attrs
    ome: dict[str, Any] = {"version": "0.5", "multiscales": multiscales}
    if omero is not None:
        ome["omero"] = omero
    return {"ome": ome}


def axes_meta(names: str) -> list[dict[str, str]]:
    """OME 0.4+ axes for single-letter names, typed as OME types them."""
    return [{"name": n, "type": AXIS_TYPES[n]} for n in names]


def scale_tf(*values: Any) -> list[dict[str, Any]]:
    return [{"type": "scale", "scale": list(values)}]


def make_image(
    root: Path | str,
    zarr_format: int,
    shapes: list[tuple[int, ...]],
    *,
    axes: str | list[Any] | None = None,
    scales: list[list[float]] | None = None,
    dtype: str | list[str] = "uint16",
    omero: dict[str, Any] | None = None,
    **entry: Any,
) -> zarr.Group:
    """An OME image group with arrays "0", "1", ... of ``shapes`` and one multiscales
    entry; ``scales`` default to powers of two on the spatial axes."""
    ndim = len(shapes[0])
    names = axes if isinstance(axes, str) else "tczyx"[5 - ndim :]
    if scales is None:
        scales = [[2.0**i if n in SPACE else 1.0 for n in names] for i in range(len(shapes))]
    multiscale = {
        "axes": axes_meta(names) if axes is None or isinstance(axes, str) else axes,
        "datasets": [
            {"path": str(i), "coordinateTransformations": scale_tf(*s)}
            for i, s in enumerate(scales)
        ],
        **entry,
    }
    group = zarr.open_group(
        root,
        mode="w",
        zarr_format=zarr_format,
        attributes=ome_attributes(zarr_format, [multiscale], omero),
    )
    dtypes = dtype if isinstance(dtype, list) else [dtype] * len(shapes)
    for i, (shape, dt) in enumerate(zip(shapes, dtypes, strict=True)):
        group.create_array(str(i), shape=shape, chunks=shape, dtype=dt)
    return group


def read(root: Path | str) -> list[MultiscaleInfo]:
    return read_multiscales(*open_node(root))


def read_one(root: Path | str) -> MultiscaleInfo:
    (image,) = read(root)
    return image


def source_error(root: Path | str) -> str:
    """The message of the SourceError reading ``root`` raises; it must be one line and
    name the source."""
    with pytest.raises(SourceError) as info:
        read(root)
    message = str(info.value)
    assert str(root) in message
    assert "\n" not in message
    return message


# --- OME multiscales -----------------------------------------------------------------


def test_transforms_compose_dataset_then_multiscale(tmp_path: Path, zarr_format: int) -> None:
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        zarr_format=zarr_format,
        attributes=ome_attributes(
            zarr_format,
            [
                {
                    "name": "cells",
                    "axes": axes_meta("cyx"),
                    "datasets": [
                        {
                            "path": "s0",
                            "coordinateTransformations": [
                                {"type": "scale", "scale": [1, 0.5, 0.25]},
                                {"type": "translation", "translation": [0, 1, 2]},
                            ],
                        },
                        {"path": "s1", "coordinateTransformations": scale_tf(1, 1, 0.5)},
                    ],
                    "coordinateTransformations": [
                        {"type": "scale", "scale": [1, 2, 4]},
                        {"type": "translation", "translation": [0, 10, 20]},
                    ],
                }
            ],
        ),
    )
    group.create_array("s0", shape=(2, 64, 64), chunks=(1, 32, 32), dtype="uint8")
    group.create_array("s1", shape=(2, 32, 32), chunks=(1, 32, 32), dtype="uint8")

    image = read_one(tmp_path / "img.zarr")

    s0, s1 = image.levels
    # world = (pix * s_ds + t_ds) * s_ms + t_ms
    assert s0.scale == (1.0, 1.0, 1.0)
    assert s0.translation == (0.0, 1 * 2 + 10, 2 * 4 + 20)
    assert s1.scale == (1.0, 2.0, 2.0)
    assert s1.translation == (0.0, 10.0, 20.0)
    assert (s0.path, s1.path) == ("s0", "s1")
    assert (s0.level, s1.level) == (0, 1)
    assert image.name == "cells"
    assert image.ome_version == ("0.4" if zarr_format == 2 else "0.5")
    assert image.attributes["datasets"][0]["path"] == "s0"
    assert image.path == ""
    assert image.source == str(tmp_path / "img.zarr")


def test_level_fields(tmp_path: Path, zarr_format: int) -> None:
    make_image(tmp_path / "img.zarr", zarr_format, [(3, 40, 50), (3, 20, 25)], axes="cyx")

    level = read_one(tmp_path / "img.zarr").levels[0]

    assert level.shape == (3, 40, 50)
    assert level.chunk_shape == (3, 40, 50)
    assert level.shard_shape is None
    assert level.dtype == np.dtype("uint16")
    assert isinstance(level.array, zarr.Array)
    assert level.array.shape == (3, 40, 50)
    assert level.axes == (
        Axis("c", "channel"),
        Axis("y", "space"),
        Axis("x", "space"),
    )


def test_missing_transforms_are_inferred_from_shapes(
    tmp_path: Path, zarr_format: int, caplog: pytest.LogCaptureFixture
) -> None:
    """OME-Zarr 0.4+ wants a scale per dataset; without any transformation the levels'
    scales follow from their shapes (as for 0.1-0.3), with a warning: taking them as
    identity would draw level 1 at half the size of level 0."""
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        zarr_format=zarr_format,
        attributes=ome_attributes(
            zarr_format, [{"axes": axes_meta("yx"), "datasets": [{"path": "0"}, {"path": "1"}]}]
        ),
    )
    group.create_array("0", shape=(8, 8), dtype="uint8")
    group.create_array("1", shape=(4, 4), dtype="uint8")

    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        levels = read_one(tmp_path / "img.zarr").levels

    assert [lv.scale for lv in levels] == [(1.0, 1.0), (2.0, 2.0)]
    assert [lv.translation for lv in levels] == [(0.0, 0.0), (0.5, 0.5)]
    (record,) = caplog.records
    assert "no coordinateTransformations" in record.getMessage()


def test_identity_transform_is_accepted(tmp_path: Path, zarr_format: int) -> None:
    make_image(
        tmp_path / "img.zarr",
        zarr_format,
        [(8, 8)],
        coordinateTransformations=[{"type": "identity"}],
    )

    assert read_one(tmp_path / "img.zarr").levels[0].scale == (1.0, 1.0)


@pytest.mark.parametrize("names", ["yx", "zyx", "cyx", "tyx", "czyx", "tzyx", "tcyx", "tczyx"])
def test_every_axes_order(tmp_path: Path, zarr_format: int, names: str) -> None:
    shape = tuple(2 + i for i in range(len(names)))
    axes = [
        {"name": n, "type": AXIS_TYPES[n], **({"unit": "micrometer"} if n in SPACE else {})}
        for n in names
    ]
    make_image(tmp_path / "img.zarr", zarr_format, [shape], axes=axes)

    image = read_one(tmp_path / "img.zarr")
    level = image.levels[0]

    assert [a.name for a in image.axes] == list(names)
    assert [a.type for a in image.axes] == [AXIS_TYPES[n] for n in names]
    assert [a.unit for a in image.axes] == ["micrometer" if n in SPACE else None for n in names]
    assert level.spatial_axes == tuple(i for i, n in enumerate(names) if n in SPACE)
    assert level.channel_axis == (names.index("c") if "c" in names else None)
    assert level.time_axis == (names.index("t") if "t" in names else None)


def test_custom_axis_types_are_kept(tmp_path: Path, zarr_format: int) -> None:
    axes = [{"name": "angle", "type": "angle"}, *axes_meta("yx")]
    make_image(tmp_path / "img.zarr", zarr_format, [(3, 8, 8)], axes=axes)

    image = read_one(tmp_path / "img.zarr")

    assert image.axes[0] == Axis("angle", "angle")
    assert image.levels[0].spatial_axes == (1, 2)


def test_untyped_axes_get_types_from_names(tmp_path: Path, zarr_format: int) -> None:
    axes = [{"name": "c"}, {"name": "y"}, {"name": "x"}, {"name": "phase"}]
    make_image(tmp_path / "img.zarr", zarr_format, [(2, 8, 8, 3)], axes=axes)

    image = read_one(tmp_path / "img.zarr")

    assert [a.type for a in image.axes] == ["channel", "space", "space", None]


def test_ome_0_3_string_axes_and_scales_from_shapes(tmp_path: Path) -> None:
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        zarr_format=2,
        attributes={
            "multiscales": [
                {
                    "version": "0.3",
                    "axes": ["c", "y", "x"],
                    "datasets": [{"path": "0"}, {"path": "1"}],
                }
            ]
        },
    )
    group.create_array("0", shape=(2, 64, 32), dtype="uint8")
    group.create_array("1", shape=(2, 32, 16), dtype="uint8")

    image = read_one(tmp_path / "img.zarr")

    assert image.ome_version == "0.3"
    assert image.axes == (Axis("c", "channel"), Axis("y", "space"), Axis("x", "space"))
    assert image.levels[1].scale == (1.0, 2.0, 2.0)
    assert image.levels[1].translation == (0.0, 0.5, 0.5)


def test_ome_0_2_without_axes_is_tczyx(tmp_path: Path) -> None:
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        zarr_format=2,
        attributes={"multiscales": [{"version": "0.2", "datasets": [{"path": "0"}]}]},
    )
    group.create_array("0", shape=(1, 2, 3, 8, 8), dtype="uint8")

    image = read_one(tmp_path / "img.zarr")

    assert [a.name for a in image.axes] == list("tczyx")
    assert [a.type for a in image.axes] == ["time", "channel", "space", "space", "space"]


def test_missing_axes_on_v3_use_dimension_names(tmp_path: Path) -> None:
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        zarr_format=3,
        attributes={"ome": {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}},
    )
    group.create_array("0", shape=(2, 8, 8), dtype="uint8", dimension_names=["c", "y", "x"])

    assert [a.name for a in read_one(tmp_path / "img.zarr").axes] == ["c", "y", "x"]


def test_several_multiscales_give_several_images(tmp_path: Path, zarr_format: int) -> None:
    group = zarr.open_group(
        tmp_path / "img.zarr",
        mode="w",
        zarr_format=zarr_format,
        attributes=ome_attributes(
            zarr_format,
            [
                {"name": "raw", "axes": axes_meta("yx"), "datasets": [{"path": "raw"}]},
                {"name": "mask", "axes": axes_meta("yx"), "datasets": [{"path": "mask"}]},
            ],
        ),
    )
    group.create_array("raw", shape=(16, 16), dtype="uint16")
    group.create_array("mask", shape=(8, 8), dtype="uint8")

    images = read(tmp_path / "img.zarr")

    assert [im.name for im in images] == ["raw", "mask"]
    assert [im.dtype for im in images] == [np.dtype("uint16"), np.dtype("uint8")]


@pytest.mark.parametrize(
    ("zarr_format", "attributes"),
    [
        (3, {"multiscales": [{"version": "0.4", "axes": ["y", "x"], "datasets": [{"path": "0"}]}]}),
        (2, {"ome": {"version": "0.5", "multiscales": [{"datasets": [{"path": "0"}]}]}}),
    ],
    ids=["0.4-attributes-on-v3", "0.5-attributes-on-v2"],
)
def test_either_ome_layout_on_either_zarr_format(
    tmp_path: Path, zarr_format: int, attributes: dict[str, Any]
) -> None:
    group = zarr.open_group(
        tmp_path / "img.zarr", mode="w", zarr_format=zarr_format, attributes=attributes
    )
    group.create_array("0", shape=(8, 8), dtype="uint8")

    image = read_one(tmp_path / "img.zarr")

    assert image.ome_version in ("0.4", "0.5")
    assert image.levels[0].shape == (8, 8)


def test_image_in_a_subgroup_has_its_path(tmp_path: Path, zarr_format: int) -> None:
    zarr.open_group(tmp_path / "img.zarr", mode="w", zarr_format=zarr_format)
    make_image(tmp_path / "img.zarr" / "a" / "b", zarr_format, [(8, 8)])
    node, name = open_node(tmp_path / "img.zarr")

    (image,) = read_multiscales(node["a/b"], name)

    assert image.path == "a/b"
    assert image.levels[0].path == "0"


# --- levels: chunks, shards, dtypes, fill values ---------------------------------------


def test_sharded_level_has_inner_chunks_and_shards(tmp_path: Path) -> None:
    group = make_image(tmp_path / "img.zarr", 3, [(64, 64)], dtype="uint8")
    del group["0"]
    group.create_array("0", shape=(64, 64), chunks=(8, 8), shards=(32, 32), dtype="uint8")

    level = read_one(tmp_path / "img.zarr").levels[0]

    assert level.chunk_shape == (8, 8)
    assert level.shard_shape == (32, 32)
    assert level.chunk_grid_shape == (8, 8)


def test_v2_fill_value_none_is_zero(tmp_path: Path) -> None:
    zarr.create_array(
        tmp_path / "a.zarr", shape=(8, 8), dtype="int16", zarr_format=2, fill_value=None
    )

    fill_value = read_one(tmp_path / "a.zarr").levels[0].fill_value

    assert fill_value == 0
    assert isinstance(fill_value, np.int16)


@pytest.mark.parametrize(
    ("dtype", "fill_value"),
    [("uint16", 7), ("float32", math.nan), ("bool", True), ("float64", -1.5)],
)
def test_fill_value_is_a_scalar_of_the_dtype(
    tmp_path: Path, zarr_format: int, dtype: str, fill_value: Any
) -> None:
    zarr.create_array(
        tmp_path / "a.zarr",
        shape=(8, 8),
        dtype=dtype,
        zarr_format=zarr_format,
        fill_value=fill_value,
    )

    level = read_one(tmp_path / "a.zarr").levels[0]

    assert isinstance(level.fill_value, np.dtype(dtype).type)
    np.testing.assert_equal(level.fill_value, np.asarray(fill_value, dtype))


def test_big_endian_dtype_is_reported_native(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(8, 8), dtype=">u2", zarr_format=2, fill_value=3)

    level = read_one(tmp_path / "a.zarr").levels[0]

    assert level.dtype == np.dtype("uint16")
    assert level.dtype.isnative
    assert level.fill_value == 3
    assert level.fill_value.dtype.isnative


@pytest.mark.parametrize(
    "dtype",
    [
        *("bool", "uint8", "uint16", "uint32", "uint64"),
        *("int8", "int16", "int32", "int64", "float16", "float32", "float64"),
    ],
)
def test_supported_dtypes(tmp_path: Path, dtype: str) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(4, 4), dtype=dtype)

    assert read_one(tmp_path / "a.zarr").dtype == np.dtype(dtype)


# --- omero channels ------------------------------------------------------------------


def test_omero_channels(tmp_path: Path, zarr_format: int) -> None:
    omero = {
        "channels": [
            {
                "label": "DAPI",
                "color": "0000ff",
                "window": {"start": 10, "end": 900, "min": 0, "max": 65535},
                "active": True,
            },
            {
                "label": "GFP",
                "color": "#00FF00",
                "window": {"start": 5, "end": 50},
                "active": False,
            },
            {"color": "not a colour", "window": {"min": 0}},
            {},
        ]
    }
    make_image(tmp_path / "img.zarr", zarr_format, [(4, 8, 8)], axes="cyx", omero=omero)

    channels = read_one(tmp_path / "img.zarr").channels

    assert [c.index for c in channels] == [0, 1, 2, 3]
    assert [c.label for c in channels] == ["DAPI", "GFP", "Channel 2", "Channel 3"]
    assert [c.color for c in channels] == ["0000FF", "00FF00", None, None]
    assert [c.window for c in channels] == [(10.0, 900.0), (5.0, 50.0), None, None]
    assert [c.range for c in channels] == [(0.0, 65535.0), None, None, None]
    assert [c.active for c in channels] == [True, False, True, True]


def test_no_omero_means_no_channels(tmp_path: Path, zarr_format: int) -> None:
    make_image(tmp_path / "img.zarr", zarr_format, [(2, 8, 8)], axes="cyx")

    assert read_one(tmp_path / "img.zarr").channels == ()


# --- plain arrays and groups ---------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "names"),
    [((6, 7), "yx"), ((5, 6, 7), "zyx"), ((2, 5, 6, 7), "czyx"), ((3, 2, 5, 6, 7), "tczyx")],
)
def test_plain_array(tmp_path: Path, zarr_format: int, shape: tuple[int, ...], names: str) -> None:
    zarr.create_array(
        tmp_path / "a.zarr",
        shape=shape,
        chunks=(2,) * len(shape),
        dtype="float32",
        zarr_format=zarr_format,
    )

    image = read_one(tmp_path / "a.zarr")
    (level,) = image.levels

    assert [a.name for a in image.axes] == list(names)
    assert [a.type for a in image.axes] == [AXIS_TYPES[n] for n in names]
    assert level.scale == (1.0,) * len(shape)
    assert level.translation == (0.0,) * len(shape)
    assert level.shape == shape
    assert level.chunk_shape == (2,) * len(shape)
    assert (image.path, level.path) == ("", "")
    assert image.ome_version is None
    assert image.name is None
    assert image.attributes == {}
    assert image.channels == ()


def test_plain_array_uses_dimension_names(tmp_path: Path) -> None:
    zarr.create_array(
        tmp_path / "a.zarr", shape=(3, 8, 8), dtype="uint8", dimension_names=["c", "y", "x"]
    )

    assert [a.type for a in read_one(tmp_path / "a.zarr").axes] == ["channel", "space", "space"]


def test_plain_array_inside_a_group(tmp_path: Path) -> None:
    root = zarr.open_group(tmp_path / "g.zarr", mode="w")
    root.create_array("sub/data", shape=(8, 8), dtype="uint8")
    node, name = open_node(tmp_path / "g.zarr")

    (image,) = read_multiscales(node["sub/data"], name)

    assert (image.path, image.levels[0].path) == ("sub", "data")


def test_plain_group_levels_sorted_by_size_with_inferred_transforms(
    tmp_path: Path, zarr_format: int
) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=zarr_format)
    group.create_array("small", shape=(3, 4, 16, 8), dtype="uint16")
    group.create_array("big", shape=(3, 16, 64, 32), dtype="uint16")
    group.create_array("mid", shape=(3, 8, 32, 16), dtype="uint16")
    group.create_group("not-a-level")

    image = read_one(tmp_path / "g.zarr")

    assert [lv.path for lv in image.levels] == ["big", "mid", "small"]
    assert [a.name for a in image.axes] == list("czyx")
    assert [lv.scale for lv in image.levels] == [
        (1.0, 1.0, 1.0, 1.0),
        (1.0, 2.0, 2.0, 2.0),
        (1.0, 4.0, 4.0, 4.0),
    ]
    assert [lv.translation for lv in image.levels] == [
        (0.0, 0.0, 0.0, 0.0),
        (0.0, 0.5, 0.5, 0.5),
        (0.0, 1.5, 1.5, 1.5),
    ]
    assert image.ome_version is None
    assert image.attributes == {}


def test_plain_group_anisotropic_downsampling(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_array("0", shape=(10, 100, 90), dtype="uint8")
    group.create_array("1", shape=(10, 50, 30), dtype="uint8")

    level = read_one(tmp_path / "g.zarr").levels[1]

    assert level.scale == (1.0, 2.0, 3.0)
    assert level.translation == (0.0, 0.5, 1.0)


# --- bioformats2raw ------------------------------------------------------------------


def bioformats2raw_root(root: Path, zarr_format: int) -> None:
    attrs: dict[str, Any] = {"bioformats2raw.layout": 3}
    if zarr_format == 3:
        attrs = {"ome": {"version": "0.5", **attrs}}
    zarr.open_group(root, mode="w", zarr_format=zarr_format, attributes=attrs)


def test_bioformats2raw_series_from_ome_group(tmp_path: Path, zarr_format: int) -> None:
    root = tmp_path / "bf.zarr"
    bioformats2raw_root(root, zarr_format)
    series_attrs: dict[str, Any] = {"series": ["1", "0"]}
    if zarr_format == 3:
        series_attrs = {"ome": {"version": "0.5", **series_attrs}}
    zarr.open_group(root / "OME", mode="w", zarr_format=zarr_format, attributes=series_attrs)
    make_image(root / "0", zarr_format, [(16, 16), (8, 8)], name="first")
    make_image(root / "1", zarr_format, [(4, 32, 32)], axes="zyx", name="second")

    images = read(root)

    assert [im.name for im in images] == ["second", "first"]
    assert [im.path for im in images] == ["1", "0"]
    assert [im.n_levels for im in images] == [1, 2]


def test_bioformats2raw_numbered_series_without_ome_group(tmp_path: Path, zarr_format: int) -> None:
    root = tmp_path / "bf.zarr"
    bioformats2raw_root(root, zarr_format)
    for i in range(3):
        make_image(root / str(i), zarr_format, [(8 + i, 8)], name=f"s{i}")

    images = read(root)

    assert [im.name for im in images] == ["s0", "s1", "s2"]
    assert [im.path for im in images] == ["0", "1", "2"]


def test_bioformats2raw_error_names_the_series(tmp_path: Path) -> None:
    root = tmp_path / "bf.zarr"
    bioformats2raw_root(root, 2)
    make_image(root / "0", 2, [(8, 8)], axes=axes_meta("cyx"))

    message = source_error(root)

    assert f"{root}/0:" in message
    assert "3 axes" in message


def test_bioformats2raw_without_series(tmp_path: Path) -> None:
    bioformats2raw_root(tmp_path / "bf.zarr", 2)

    assert "without any series" in source_error(tmp_path / "bf.zarr")


# --- validation errors ---------------------------------------------------------------


def write_ome(
    root: Path, zarr_format: int, multiscale: dict[str, Any], arrays: dict[str, Any]
) -> None:
    """A group with one multiscales entry and arrays given as name → (shape, dtype)."""
    group = zarr.open_group(
        root,
        mode="w",
        zarr_format=zarr_format,
        attributes=ome_attributes(zarr_format, [multiscale]),
    )
    for name, (shape, dtype) in arrays.items():
        group.create_array(name, shape=shape, dtype=dtype)


def datasets(*paths: str, scale: tuple[float, ...] = (1.0, 1.0)) -> list[dict[str, Any]]:
    return [{"path": p, "coordinateTransformations": scale_tf(*scale)} for p in paths]


YX = axes_meta("yx")
U8 = "uint8"

INVALID_OME = {
    "no datasets": ({"axes": YX, "datasets": []}, {}, "no datasets"),
    "missing dataset": (
        {"axes": YX, "datasets": datasets("0", "1")},
        {"0": ((8, 8), U8)},
        "dataset '1' does not exist",
    ),
    "dataset is a group": (
        {"axes": YX, "datasets": datasets("0", "sub")},
        {"0": ((8, 8), U8), "sub/x": ((4, 4), U8)},
        "dataset 'sub' is a group, not an array",
    ),
    "dataset without path": ({"axes": YX, "datasets": [{}]}, {}, "dataset 0 has no 'path'"),
    "axes count": (
        {"axes": axes_meta("zyx"), "datasets": datasets("0", scale=(1, 1, 1))},
        {"0": ((8, 8), U8)},
        "3 axes (z, y, x) for 2-D arrays",
    ),
    "dataset transform length": (
        {"axes": YX, "datasets": datasets("0", scale=(1, 1, 1))},
        {"0": ((8, 8), U8)},
        "scale has 3 values for 2 dimensions",
    ),
    "multiscale transform length": (
        {
            "axes": YX,
            "datasets": datasets("0"),
            "coordinateTransformations": [{"type": "translation", "translation": [1]}],
        },
        {"0": ((8, 8), U8)},
        "translation has 1 values for 2 dimensions",
    ),
    "zero scale": (
        {"axes": YX, "datasets": datasets("0", scale=(1, 0))},
        {"0": ((8, 8), U8)},
        "non-positive scale",
    ),
    "negative scale": (
        {"axes": YX, "datasets": datasets("0", scale=(-1, 1))},
        {"0": ((8, 8), U8)},
        "non-positive scale",
    ),
    "scale not numbers": (
        {"axes": YX, "datasets": [{"path": "0", "coordinateTransformations": scale_tf("a", 1)}]},
        {"0": ((8, 8), U8)},
        "scale must be a list of numbers",
    ),
    "unsupported transform type": (
        {
            "axes": YX,
            "datasets": [{"path": "0", "coordinateTransformations": [{"type": "affine"}]}],
        },
        {"0": ((8, 8), U8)},
        "unsupported coordinate transformation type 'affine'",
    ),
    "transform in a file": (
        {
            "axes": YX,
            "datasets": [
                {"path": "0", "coordinateTransformations": [{"type": "scale", "path": "s.bin"}]}
            ],
        },
        {"0": ((8, 8), U8)},
        "stored in a file",
    ),
    "different ndim": (
        {"axes": YX, "datasets": datasets("0", "1")},
        {"0": ((8, 8), U8), "1": ((2, 4, 4), U8)},
        "level 1 ('1') is 3-D but level 0 is 2-D",
    ),
    "different dtype": (
        {"axes": YX, "datasets": datasets("0", "1")},
        {"0": ((8, 8), U8), "1": ((4, 4), "uint16")},
        "level 1 ('1') has dtype uint16 but level 0 has uint8",
    ),
    "level larger than previous": (
        {"axes": YX, "datasets": datasets("0", "1")},
        {"0": ((8, 8), U8), "1": ((4, 16), U8)},
        "level 1 ('1') shape (4, 16) is larger than level 0's (8, 8)",
    ),
    "fewer than 2 spatial axes": (
        {"axes": axes_meta("cx"), "datasets": datasets("0")},
        {"0": ((2, 8), U8)},
        "fewer than 2 spatial axes (axes: c, x)",
    ),
    "duplicate axis names": (
        {"axes": axes_meta("xx"), "datasets": datasets("0")},
        {"0": ((8, 8), U8)},
        "duplicate axis names x",
    ),
    "axis without name": (
        {"axes": [{"type": "space"}, {"name": "x"}], "datasets": datasets("0")},
        {"0": ((8, 8), U8)},
        "axis 0 has no name",
    ),
    "complex dtype": (
        {"axes": YX, "datasets": datasets("0")},
        {"0": ((8, 8), "complex64")},
        "unsupported dtype complex64",
    ),
}


@pytest.mark.parametrize("case", INVALID_OME.values(), ids=INVALID_OME.keys())
def test_invalid_ome_metadata(tmp_path: Path, zarr_format: int, case: tuple[Any, ...]) -> None:
    multiscale, arrays, problem = case
    write_ome(tmp_path / "img.zarr", zarr_format, multiscale, arrays)

    assert problem in source_error(tmp_path / "img.zarr")


def test_multiscales_not_a_list(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "g.zarr", mode="w", attributes={"multiscales": {"datasets": []}})

    assert "'multiscales' must be a non-empty list" in source_error(tmp_path / "g.zarr")


def test_error_names_the_multiscales_entry_when_several(tmp_path: Path) -> None:
    good = {"axes": YX, "datasets": datasets("0")}
    bad = {"axes": YX, "datasets": datasets("nope")}
    group = zarr.open_group(
        tmp_path / "img.zarr", mode="w", zarr_format=2, attributes=ome_attributes(2, [good, bad])
    )
    group.create_array("0", shape=(8, 8), dtype="uint8")

    assert "(multiscales[1]): dataset 'nope' does not exist" in source_error(tmp_path / "img.zarr")


def test_error_names_the_image_path(tmp_path: Path) -> None:
    zarr.open_group(tmp_path / "img.zarr", mode="w")
    write_ome(tmp_path / "img.zarr" / "inner", 3, {"axes": YX, "datasets": []}, {})
    node, name = open_node(tmp_path / "img.zarr")

    with pytest.raises(
        SourceError, match=f"^{tmp_path}/img.zarr/inner: multiscales has no datasets"
    ):
        read_multiscales(node["inner"], name)


@pytest.mark.parametrize(
    ("dtype", "shown"),
    [
        ("complex128", "complex128"),
        ([("a", "i4"), ("b", "f4")], "('a', '<i4')"),
        ("U4", "<U4"),
        ("M8[s]", "datetime64[s]"),
    ],
    ids=["complex", "structured", "string", "datetime"],
)
def test_unsupported_dtype_of_plain_array(tmp_path: Path, dtype: Any, shown: str) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(4, 4), dtype=dtype, zarr_format=2)

    message = source_error(tmp_path / "a.zarr")

    assert "unsupported dtype" in message
    assert shown in message


def test_unsupported_variable_length_string_dtype(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(4, 4), dtype=str, zarr_format=3)

    assert "unsupported dtype" in source_error(tmp_path / "a.zarr")


def test_one_dimensional_plain_array(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(16,), dtype="uint8")

    assert "fewer than 2 spatial axes (axes: x)" in source_error(tmp_path / "a.zarr")


def test_plain_array_whose_dimension_names_are_not_spatial(tmp_path: Path) -> None:
    zarr.create_array(
        tmp_path / "a.zarr", shape=(4, 4), dtype="uint8", dimension_names=["row", "col"]
    )

    assert "fewer than 2 spatial axes (axes: row, col)" in source_error(tmp_path / "a.zarr")


def test_empty_plain_array(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(0, 4), dtype="uint8")

    assert "is empty" in source_error(tmp_path / "a.zarr")


def test_empty_group(tmp_path: Path, zarr_format: int) -> None:
    zarr.open_group(tmp_path / "g.zarr", mode="w", zarr_format=zarr_format)

    assert "no multiscales metadata and no arrays" in source_error(tmp_path / "g.zarr")


def test_group_of_groups_lists_them(tmp_path: Path) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    group.create_group("b")
    group.create_group("a")

    assert "no arrays; subgroups: a, b" in source_error(tmp_path / "g.zarr")


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"0": ((8, 8), U8), "1": ((2, 4, 4), U8)}, "level 1 ('1') is 3-D but level 0 is 2-D"),
        ({"0": ((8, 8), U8), "1": ((4, 4), "int8")}, "has dtype int8 but level 0 has uint8"),
        ({"0": ((8, 8), U8), "1": ((4, 16), U8)}, "level 1 ('1') shape (4, 16) is larger"),
        (
            {"0": ((3, 8, 8, 8), U8), "1": ((2, 4, 4, 4), U8)},
            "level 1 ('1') changes the size of non-spatial axis 'c' (3 → 2)",
        ),
    ],
    ids=["ndim", "dtype", "larger", "channels"],
)
def test_invalid_plain_group(tmp_path: Path, arrays: dict[str, Any], problem: str) -> None:
    group = zarr.open_group(tmp_path / "g.zarr", mode="w")
    for name, (shape, dtype) in arrays.items():
        group.create_array(name, shape=shape, dtype=dtype)

    assert problem in source_error(tmp_path / "g.zarr")


def test_unreadable_dataset_metadata(tmp_path: Path) -> None:
    make_image(tmp_path / "img.zarr", 3, [(8, 8)])
    (tmp_path / "img.zarr" / "0" / "zarr.json").write_text("{broken")

    message = source_error(tmp_path / "img.zarr")

    assert "dataset '0': invalid Zarr metadata (JSONDecodeError: " in message


# --- what describes a different picture: geometry checks (issue 7) ---------------------


def ome_with_transforms(
    root: Path,
    zarr_format: int,
    shapes: list[tuple[int, ...]],
    transforms: list[list[dict[str, Any]]],
    *,
    axes: str = "yx",
    multiscale_transforms: list[dict[str, Any]] | None = None,
    paths: list[str] | None = None,
) -> None:
    """An OME image whose datasets have the given shapes and coordinateTransformations
    (listed in that order, under ``paths``, default "0", "1", ...)."""
    paths = paths or [str(i) for i in range(len(shapes))]
    multiscale: dict[str, Any] = {
        "axes": axes_meta(axes),
        "datasets": [
            {"path": p, "coordinateTransformations": tf}
            for p, tf in zip(paths, transforms, strict=True)
        ],
    }
    if multiscale_transforms is not None:
        multiscale["coordinateTransformations"] = multiscale_transforms
    write_ome(
        root, zarr_format, multiscale, {p: (s, U8) for p, s in zip(paths, shapes, strict=True)}
    )


def translate_tf(*values: Any) -> list[dict[str, Any]]:
    return [{"type": "translation", "translation": list(values)}]


PYRAMID_2 = [(8, 8), (4, 4)]

# (shapes, dataset transforms, multiscale transforms, what the message must say)
WRONG_GEOMETRY = {
    "denormal scale": ([(8, 8)], [scale_tf(1e-320, 1)], None, "level 0 ('0') has scale 1e-320"),
    "scale composing to 0": (
        [(8, 8)],
        [scale_tf(1e-200, 1)],
        scale_tf(1e-200, 1),
        "level 0 ('0') has scale 0.0 along y",
    ),
    "scale composing to inf": (
        [(8, 8)],
        [scale_tf(1, 1e200)],
        scale_tf(1, 1e200),
        "level 0 ('0') has scale inf along x",
    ),
    "translation composing to inf": (
        [(8, 8)],
        [scale_tf(1, 1) + translate_tf(0, 1e300)],
        scale_tf(1, 1e10),
        "level 0 ('0') has translation inf along x",
    ),
    "world coordinates overflowing": (
        [(8, 8)],
        [scale_tf(1, 1e308)],
        None,
        "level 0 ('0') reaches beyond the largest float along x",
    ),
    "level finer than level 0": (
        PYRAMID_2,
        [scale_tf(2, 2), scale_tf(1, 1)],
        None,
        "level 1 ('1') is finer than level 0 along y (scale 1.0 < 2.0)",
    ),
    "level with level 0's scale": (
        PYRAMID_2,
        [scale_tf(1, 1), scale_tf(1, 1)],
        None,
        "level 1 ('1') shrinks along y (8 → 4 pixels) but its scale does not grow (1.0)",
    ),
    "scale not growing along one axis": (
        PYRAMID_2,
        [scale_tf(1, 1), scale_tf(2, 1)],
        None,
        "level 1 ('1') shrinks along x (8 → 4 pixels) but its scale does not grow (1.0)",
    ),
    "one pixel shrinking without growing": (
        [(2, 8), (1, 4)],
        [scale_tf(1, 1), scale_tf(1, 2)],
        None,
        "level 1 ('1') shrinks along y (2 → 1 pixels) but its scale does not grow (1.0)",
    ),
    "level covering another extent": (
        PYRAMID_2,
        [scale_tf(1, 1), scale_tf(4, 2)],
        None,
        "level 1 ('1') spans 16.0 along y but level 0 spans 8.0",
    ),
    "level not shrinking but coarser": (
        PYRAMID_2[:1] * 2,
        [scale_tf(1, 1), scale_tf(1, 2)],
        None,
        "level 1 ('1') spans 16.0 along x but level 0 spans 8.0",
    ),
}


@pytest.mark.parametrize("case", WRONG_GEOMETRY.values(), ids=WRONG_GEOMETRY.keys())
def test_geometry_that_cannot_be_right_is_refused(
    tmp_path: Path, zarr_format: int, case: tuple[Any, ...]
) -> None:
    """Scales and translations are checked after composing the dataset's transforms
    with the multiscale's: non-finite, non-positive or denormal scales, world
    coordinates that overflow, and levels that do not describe the same picture
    coarser (finer than the previous level, a shape that shrinks at the same scale, a
    world extent off by more than one of the level's pixels) are a SourceError."""
    shapes, transforms, multiscale_tf, problem = case
    ome_with_transforms(
        tmp_path / "img.zarr", zarr_format, shapes, transforms, multiscale_transforms=multiscale_tf
    )

    assert problem in source_error(tmp_path / "img.zarr")


@pytest.mark.parametrize(
    ("axes", "shapes", "problem"),
    [
        ("cyx", [(3, 8, 8), (2, 4, 4)], "level 1 ('1') changes the size of non-spatial axis 'c'"),
        ("tyx", [(3, 8, 8), (2, 4, 4)], "level 1 ('1') changes the size of non-spatial axis 't'"),
    ],
    ids=["channels", "timepoints"],
)
def test_non_spatial_axis_changing_size_between_levels(
    tmp_path: Path, zarr_format: int, axes: str, shapes: list[tuple[int, ...]], problem: str
) -> None:
    make_image(tmp_path / "img.zarr", zarr_format, shapes, axes=axes)

    assert problem in source_error(tmp_path / "img.zarr")


def set_array_metadata(array_dir: Path, zarr_format: int, edit: Any) -> None:
    """Rewrite an array's metadata document (zarr.json or .zarray) through ``edit``."""
    name = "zarr.json" if zarr_format == 3 else ".zarray"
    meta = json.loads((array_dir / name).read_text())
    edit(meta)
    (array_dir / name).write_text(json.dumps(meta))


@pytest.mark.parametrize("level", [0, 1])
def test_zero_chunk_size_is_refused(tmp_path: Path, zarr_format: int, level: int) -> None:
    """A chunk size of 0 (which zarr reads, and which made chunk maths divide by zero)."""
    make_image(tmp_path / "img.zarr", zarr_format, PYRAMID_2)

    def zero_chunks(meta: dict[str, Any]) -> None:
        if zarr_format == 3:
            meta["chunk_grid"]["configuration"]["chunk_shape"] = [0, 4]
        else:
            meta["chunks"] = [0, 4]

    set_array_metadata(tmp_path / "img.zarr" / str(level), zarr_format, zero_chunks)

    message = source_error(tmp_path / "img.zarr")

    assert f"level {level} ('{level}') has chunk shape (0, 4)" in message


def test_zero_shard_size_is_refused(tmp_path: Path) -> None:
    zarr.create_array(tmp_path / "a.zarr", shape=(16, 16), chunks=(4, 4), shards=(8, 8), dtype=U8)

    def zero_shards(meta: dict[str, Any]) -> None:
        meta["chunk_grid"]["configuration"]["chunk_shape"] = [0, 8]

    set_array_metadata(tmp_path / "a.zarr", 3, zero_shards)

    assert "has shard shape (0, 8)" in source_error(tmp_path / "a.zarr")


def test_zero_chunk_size_fails_when_the_pool_opens(tmp_path: Path) -> None:
    """Not a ZeroDivisionError from ``get_chunk`` later: the pool does not open."""
    zarr.create_array(tmp_path / "a.zarr", shape=(16, 16), chunks=(8, 8), dtype=U8)
    set_array_metadata(
        tmp_path / "a.zarr",
        3,
        lambda m: m["chunk_grid"]["configuration"].update(chunk_shape=[8, 0]),
    )

    with pytest.raises(SourceError, match="chunk shape"):
        ChunkPool.from_zarr_node(str(tmp_path / "a.zarr"))


@pytest.mark.parametrize(
    ("shapes", "scales"),
    [
        ([(9, 9), (5, 5), (3, 3), (2, 2)], [1, 2, 4, 8]),  # sizes rounded up
        ([(9, 9), (4, 4), (2, 2), (1, 1)], [1, 2, 4, 8]),  # sizes rounded down
        ([(10, 10), (3, 3)], [0.325, 0.325 * 10 / 3]),  # a non-integer factor
        ([(8, 8), (8, 8)], [1e-9, 1e-9]),  # a level repeated, nanometres in metres
        ([(1, 8), (1, 4)], [1, 2]),  # one pixel high: its scale is free
    ],
    ids=["ceil", "floor", "non-integer", "repeated", "one-pixel"],
)
def test_plausible_pyramids_are_accepted(
    tmp_path: Path,
    zarr_format: int,
    shapes: list[tuple[int, int]],
    scales: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Levels whose world extent matches level 0's within one of their pixels (however
    their sizes were rounded) are fine, and say nothing."""
    make_image(tmp_path / "img.zarr", zarr_format, shapes, scales=[[s, s] for s in scales])

    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        image = read_one(tmp_path / "img.zarr")

    assert [lv.shape for lv in image.levels] == shapes
    assert not caplog.records


def test_datasets_listed_coarse_first_are_sorted_with_a_warning(
    tmp_path: Path, zarr_format: int, caplog: pytest.LogCaptureFixture
) -> None:
    """The spec wants datasets finest first; listed the other way round they are
    unambiguous: read finest first, with a warning on the "chunkpool" logger."""
    ome_with_transforms(
        tmp_path / "img.zarr",
        zarr_format,
        [(2, 2), (8, 8), (4, 4)],
        [scale_tf(4, 4), scale_tf(1, 1), scale_tf(2, 2)],
        paths=["s2", "s0", "s1"],
    )

    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        image = read_one(tmp_path / "img.zarr")

    assert [lv.path for lv in image.levels] == ["s0", "s1", "s2"]
    assert [lv.level for lv in image.levels] == [0, 1, 2]
    assert [lv.scale for lv in image.levels] == [(1.0, 1.0), (2.0, 2.0), (4.0, 4.0)]
    (record,) = caplog.records
    assert record.name.startswith("chunkpool") and record.levelno == logging.WARNING
    message = record.getMessage()
    assert str(tmp_path / "img.zarr") in message and "\n" not in message
    assert "datasets are not listed finest first" in message


@pytest.mark.parametrize("names", ["xy", "xcy", "yzx", "ctyx"])
def test_axes_out_of_spec_order_are_read_by_name_with_a_warning(
    tmp_path: Path, zarr_format: int, names: str, caplog: pytest.LogCaptureFixture
) -> None:
    """OME wants time, channel, then space axes, and z, y, x among those: other orders
    are still unambiguous (each axis has its name), so they are read as they are, with
    a warning."""
    make_image(
        tmp_path / "img.zarr", zarr_format, [tuple(4 + i for i in range(len(names)))], axes=names
    )

    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        image = read_one(tmp_path / "img.zarr")

    assert [a.name for a in image.axes] == list(names)
    (record,) = caplog.records
    message = record.getMessage()
    assert f"axes {', '.join(names)} are not in OME-Zarr's order" in message
    assert str(tmp_path / "img.zarr") in message


@pytest.mark.parametrize("names", ["yx", "zyx", "tczyx", "cyx"])
def test_axes_in_spec_order_say_nothing(
    tmp_path: Path, zarr_format: int, names: str, caplog: pytest.LogCaptureFixture
) -> None:
    make_image(tmp_path / "img.zarr", zarr_format, [tuple(4 + i for i in range(len(names)))])

    with caplog.at_level(logging.WARNING, logger="chunkpool"):
        read_one(tmp_path / "img.zarr")

    assert not caplog.records
