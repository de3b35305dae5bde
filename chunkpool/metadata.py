"""Reading multiscale images (levels, axes, world transforms, channels) from zarr nodes.

Understands OME-Zarr 0.4 (Zarr v2, ``multiscales``/``omero`` attributes), 0.5 (Zarr v3,
the same under ``ome``) and, where easy, 0.1-0.3; the ``bioformats2raw.layout``
collection of images; and, without any OME metadata, a plain array or a plain group of
arrays taken as a pyramid. Reading is liberal (either attribute layout on either Zarr
format), validation strict: anything the loader or viewer could not handle, and any
metadata that would describe another picture than the data holds, raises a
:class:`~chunkpool.errors.SourceError` whose one line names the source, the image, the
level (number and path) and the problem.

What is an error (it cannot be right, or cannot be read correctly):

- a level's dtype unsupported or different from level 0's, its ndim different, a size
  0, a chunk or shard size below 1;
- a scale or translation that is not a finite number; a *composed* scale (dataset
  transforms, then the multiscale's) that is not a positive, finite, normal float
  (1e-320 is a denormal: 1/scale overflows); a composed translation that is not
  finite; world coordinates of a level's edges (translation + shape x scale) that
  overflow;
- levels that are not one picture at decreasing resolution: a level larger than the
  one before, finer than it along a spatial axis, shrinking along an axis at the same
  scale, or spanning a world extent more than one of its own pixels away from level
  0's (sizes rounded up or down when downsampling stay within one pixel);
- a non-spatial axis (channel, time, custom) whose size changes between levels;
- axes that do not match the arrays (count, duplicate names, fewer than two spatial);
- for local stores, a level (its directory or metadata document) that resolves out of
  the store's root through a symbolic link (see :mod:`chunkpool.links`).

What is a warning (a spec violation that is still unambiguous), logged when the image
is read, on the ``"chunkpool"`` logger (:mod:`logging`, level WARNING); it is read as meant:

- axes out of OME-Zarr's order (time, then channel or custom, then space as z, y, x),
  e.g. ``[x, y]`` or ``[x, c, y]``: every axis keeps its name and type, and a viewer
  shows the axis named x horizontally whatever its position;
- datasets not listed finest first: they are read in order of decreasing size;
- OME-Zarr 0.4+ datasets without any coordinateTransformations (the spec wants a scale
  each): the scales follow from the level shapes, as for 0.1-0.3.
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
import zarr
from zarr.storage import LocalStore

from .errors import SourceError
from .info import Axis, ChannelInfo, MultiscaleInfo, ScaleInfo, spatial_axis_indices
from .links import LinkEscapeError, StoreRoot
from .stores import describe_error
from .zarr_compat import members

__all__ = ["SUPPORTED_DTYPES", "read_multiscales"]

#: The pixel types chunkpool handles (in native byte order).
SUPPORTED_DTYPES = frozenset(
    np.dtype(name)
    for name in (
        "bool",
        *("uint8", "uint16", "uint32", "uint64"),
        *("int8", "int16", "int32", "int64"),
        *("float16", "float32", "float64"),
    )
)

# Default axis names by position from the end, as OME orders them (t, c, z, y, x).
_DEFAULT_AXIS_NAMES = ("t", "c", "z", "y", "x")
_AXIS_TYPES_BY_NAME = {
    "x": "space",
    "y": "space",
    "z": "space",
    "c": "channel",
    "ch": "channel",
    "channel": "channel",
    "t": "time",
    "time": "time",
}
# OME-Zarr versions without coordinateTransformations: level scales follow from shapes.
_VERSIONS_WITHOUT_TRANSFORMS = frozenset({"0.1", "0.2", "0.3"})
# The order OME-Zarr wants: time, then channel or custom axes, then space (as z, y, x).
_TIME_RANK, _OTHER_RANK, _SPACE_RANK = 0, 1, 2
_SPATIAL_ORDER = ("z", "y", "x")
# Metadata documents a node's directory may hold (Zarr v3, then v2).
_METADATA_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")
# How far a level's world extent may be from level 0's, in that level's pixels (plus
# rounding): sizes rounded up or down when downsampling stay within one pixel.
_EXTENT_TOLERANCE = 1 + 1e-6

logger = logging.getLogger("chunkpool")

Transform = tuple[tuple[float, ...], tuple[float, ...]]  # (scale, translation) per axis


def read_multiscales(node: zarr.Group | zarr.Array, source_name: str) -> list[MultiscaleInfo]:
    """Every multiscale image at ``node``, described as :class:`MultiscaleInfo`.

    A group with OME ``multiscales`` gives one image per entry; a
    ``bioformats2raw.layout`` group one image per series; a plain array one single-level
    image; a plain group of arrays one image whose levels are its arrays, largest first.
    ``source_name`` names the store in the result and in error messages.
    """
    if isinstance(node, zarr.Array):
        return [_plain_array_image(node, source_name)]
    attrs = _ome_attributes(node)
    where = _where(source_name, node.path)
    if "multiscales" in attrs:
        return _ome_images(node, attrs, where, source_name)
    if "bioformats2raw.layout" in attrs:
        return _bioformats2raw_images(node, where, source_name)
    return [_plain_group_image(node, where, source_name)]


# --- OME multiscales -----------------------------------------------------------------


def _ome_attributes(group: zarr.Group) -> dict[str, Any]:
    """The group's attributes with OME 0.5's ``ome`` namespace merged on top, so 0.4-
    and 0.5-style metadata read the same way whatever the Zarr format."""
    attrs = group.attrs.asdict()
    ome = attrs.get("ome")
    return {**attrs, **ome} if isinstance(ome, dict) else attrs


def _ome_images(
    group: zarr.Group, attrs: dict[str, Any], where: str, source: str
) -> list[MultiscaleInfo]:
    entries = attrs["multiscales"]
    if not isinstance(entries, list) or not entries:
        raise SourceError(f"{where}: 'multiscales' must be a non-empty list")
    channels = _channels(attrs.get("omero"))
    images = []
    for i, entry in enumerate(entries):
        entry_where = f"{where} (multiscales[{i}])" if len(entries) > 1 else where
        if not isinstance(entry, dict):
            raise SourceError(f"{entry_where}: multiscales entry is not an object")
        version = entry.get("version", attrs.get("version"))
        version = None if version is None else str(version)
        images.append(_ome_image(group, entry, version, channels, source, entry_where))
    return images


def _ome_image(
    group: zarr.Group,
    entry: dict[str, Any],
    version: str | None,
    channels: tuple[ChannelInfo, ...],
    source: str,
    where: str,
) -> MultiscaleInfo:
    """The image one ``multiscales`` entry describes, validated."""
    datasets = entry.get("datasets")
    if not isinstance(datasets, list) or not datasets:
        raise SourceError(f"{where}: multiscales has no datasets")
    paths = [_dataset_path(ds, i, where) for i, ds in enumerate(datasets)]
    arrays = [
        _dataset_array(node, path, where)
        for node, path in zip(members(group, paths), paths, strict=True)
    ]
    order = _finest_first(arrays)
    if order != sorted(order):
        logger.warning(
            "%s: datasets are not listed finest first (%s); read in order of size (%s)",
            where,
            ", ".join(map(repr, paths)),
            ", ".join(repr(paths[i]) for i in order),
        )
        datasets, paths, arrays = ([items[i] for i in order] for items in (datasets, paths, arrays))
    _check_levels(arrays, paths, where)
    axes = _ome_axes(entry.get("axes"), arrays[0], where)
    _check_axes(axes, arrays[0].ndim, where)
    if entry.get("axes") is not None:
        _warn_about_axis_order(axes, where)
    has_transforms = "coordinateTransformations" in entry or any(
        "coordinateTransformations" in ds for ds in datasets
    )
    if not has_transforms:
        if version not in _VERSIONS_WITHOUT_TRANSFORMS and len(arrays) > 1:
            logger.warning(
                "%s: no coordinateTransformations (OME-Zarr %s wants a scale per dataset); "
                "scales inferred from the level shapes",
                where,
                version or "0.4+",
            )
        transforms = _transforms_from_shapes(arrays, axes)
    else:
        transforms = _dataset_transforms(entry, datasets, paths, arrays[0].ndim, where)
    name = entry.get("name")
    return MultiscaleInfo(
        source=source,
        path=group.path,
        levels=_make_levels(arrays, paths, axes, transforms, where),
        name=name if isinstance(name, str) else None,
        channels=channels,
        ome_version=version,
        attributes=entry,
    )


def _finest_first(arrays: Sequence[zarr.Array]) -> list[int]:
    """Indices of ``arrays`` by decreasing number of pixels (stable: ties keep their
    listed order, and then the level checks decide)."""
    return sorted(range(len(arrays)), key=lambda i: -math.prod(arrays[i].shape))


def _warn_about_axis_order(axes: tuple[Axis, ...], where: str) -> None:
    """Log a warning if the axes are not in OME-Zarr's order. Such an order is still
    unambiguous: every axis is read (and shown) by its name and type."""
    spatial = spatial_axis_indices(axes)
    ranks = [
        _SPACE_RANK if i in spatial else _TIME_RANK if a.type == "time" else _OTHER_RANK
        for i, a in enumerate(axes)
    ]
    names = [axes[i].name.lower() for i in spatial if axes[i].name.lower() in _SPATIAL_ORDER]
    if ranks != sorted(ranks) or names != sorted(names, key=_SPATIAL_ORDER.index):
        logger.warning(
            "%s: axes %s are not in OME-Zarr's order (time, then channel or custom, then "
            "space as z, y, x); each axis is read by its name",
            where,
            ", ".join(a.name for a in axes),
        )


def _dataset_transforms(
    entry: dict[str, Any], datasets: list[dict[str, Any]], paths: list[str], ndim: int, where: str
) -> list[Transform]:
    """Per dataset: its own transforms, then the multiscale-level ones."""
    image_tf = _parse_transforms(
        entry.get("coordinateTransformations"), ndim, f"{where}: multiscale"
    )
    return [
        _compose(
            _parse_transforms(
                ds.get("coordinateTransformations"), ndim, f"{where}: dataset {path!r}"
            ),
            image_tf,
        )
        for ds, path in zip(datasets, paths, strict=True)
    ]


def _dataset_path(dataset: object, index: int, where: str) -> str:
    path = dataset.get("path") if isinstance(dataset, dict) else None
    if not isinstance(path, str) or not path:
        raise SourceError(f"{where}: dataset {index} has no 'path'")
    return path


def _dataset_array(node: zarr.Array | zarr.Group | Exception, path: str, where: str) -> zarr.Array:
    """A dataset's array, from what reading ``path`` gave (:func:`members`)."""
    if isinstance(node, KeyError):
        raise SourceError(f"{where}: dataset {path!r} does not exist")
    if isinstance(node, Exception):
        raise SourceError(f"{where}: dataset {path!r}: {describe_error(node)}") from None
    if not isinstance(node, zarr.Array):
        raise SourceError(f"{where}: dataset {path!r} is a group, not an array")
    return node


def _ome_axes(raw: object, array: zarr.Array, where: str) -> tuple[Axis, ...]:
    """Axes from OME ``axes``: dicts (0.4+), plain names (0.3) or absent (0.1/0.2)."""
    if raw is None:
        return _default_axes(array)
    if not isinstance(raw, list):
        raise SourceError(f"{where}: 'axes' must be a list")
    return tuple(_ome_axis(item, i, where) for i, item in enumerate(raw))


def _ome_axis(raw: object, index: int, where: str) -> Axis:
    if isinstance(raw, str) and raw:
        return _named_axis(raw)
    name = raw.get("name") if isinstance(raw, dict) else None
    if not isinstance(name, str) or not name:
        raise SourceError(f"{where}: axis {index} has no name")
    kind, unit = raw.get("type"), raw.get("unit")
    return Axis(
        name=name,
        type=kind if isinstance(kind, str) else _AXIS_TYPES_BY_NAME.get(name.lower()),
        unit=unit if isinstance(unit, str) else None,
    )


def _parse_transforms(raw: object, ndim: int, what: str) -> Transform:
    """One (scale, translation) from a ``coordinateTransformations`` list, applied in
    order; None (no transforms) is the identity."""
    scale, translation = [1.0] * ndim, [0.0] * ndim
    if raw is None:
        return tuple(scale), tuple(translation)
    if not isinstance(raw, list) or not all(isinstance(tf, dict) for tf in raw):
        raise SourceError(f"{what}: coordinateTransformations must be a list of objects")
    for tf in raw:
        kind = tf.get("type")
        if kind == "scale":
            factors = _transform_vector(tf, "scale", ndim, what)
            if any(f <= 0 for f in factors):
                raise SourceError(f"{what}: non-positive scale {factors}")
            scale = [s * f for s, f in zip(scale, factors, strict=True)]
            translation = [t * f for t, f in zip(translation, factors, strict=True)]
        elif kind == "translation":
            offsets = _transform_vector(tf, "translation", ndim, what)
            translation = [t + o for t, o in zip(translation, offsets, strict=True)]
        elif kind != "identity":
            raise SourceError(f"{what}: unsupported coordinate transformation type {kind!r}")
    return tuple(scale), tuple(translation)


def _transform_vector(tf: dict[str, Any], key: str, ndim: int, what: str) -> list[float]:
    values = tf.get(key)
    if values is None and "path" in tf:
        raise SourceError(f"{what}: {key} stored in a file ('path') is not supported")
    if not isinstance(values, list) or not all(_is_number(v) for v in values):
        raise SourceError(f"{what}: {key} must be a list of numbers, not {values!r}")
    if len(values) != ndim:
        raise SourceError(f"{what}: {key} has {len(values)} values for {ndim} dimensions")
    floats = [float(v) for v in values]
    if not all(math.isfinite(v) for v in floats):
        raise SourceError(f"{what}: {key} {floats} is not finite")
    return floats


def _compose(first: Transform, then: Transform) -> Transform:
    """The transform applying ``first``, then ``then``: (p*s1 + t1)*s2 + t2."""
    (s1, t1), (s2, t2) = first, then
    return (
        tuple(a * b for a, b in zip(s1, s2, strict=True)),
        tuple(t * s + u for t, s, u in zip(t1, s2, t2, strict=True)),
    )


# --- channels ------------------------------------------------------------------------


def _channels(omero: object) -> tuple[ChannelInfo, ...]:
    """Channel display metadata from OME ``omero``; () when absent or unusable."""
    raw = omero.get("channels") if isinstance(omero, dict) else None
    if not isinstance(raw, list):
        return ()
    return tuple(_channel(i, meta if isinstance(meta, dict) else {}) for i, meta in enumerate(raw))


def _channel(index: int, meta: dict[str, Any]) -> ChannelInfo:
    label, active = meta.get("label"), meta.get("active")
    window = meta.get("window") if isinstance(meta.get("window"), dict) else {}
    return ChannelInfo(
        index=index,
        label=str(label) if label not in (None, "") else f"Channel {index}",
        color=_color(meta.get("color")),
        window=_number_pair(window, "start", "end"),
        range=_number_pair(window, "min", "max"),
        active=active if isinstance(active, bool) else True,
    )


def _color(raw: object) -> str | None:
    """An "RRGGBB" colour (upper case), accepting a leading "#"; None if not one."""
    if not isinstance(raw, str):
        return None
    hex_digits = raw.removeprefix("#")
    if len(hex_digits) != 6 or not all(c in "0123456789abcdefABCDEF" for c in hex_digits):
        return None
    return hex_digits.upper()


def _number_pair(values: dict[str, Any], first: str, second: str) -> tuple[float, float] | None:
    a, b = values.get(first), values.get(second)
    return (float(a), float(b)) if _is_number(a) and _is_number(b) else None


# --- bioformats2raw ------------------------------------------------------------------


def _bioformats2raw_images(group: zarr.Group, where: str, source: str) -> list[MultiscaleInfo]:
    """One image per series of a ``bioformats2raw.layout`` collection."""
    paths = _series_paths(group, where)
    if not paths:
        raise SourceError(f"{where}: bioformats2raw layout without any series")
    images = []
    for path in paths:
        series = _child(group, path, "series", where)
        if not isinstance(series, zarr.Group):
            raise SourceError(f"{where}: series {path!r} is an array, not a group")
        images.extend(read_multiscales(series, source))
    return images


def _series_paths(group: zarr.Group, where: str) -> list[str]:
    """The series listed by the ``OME`` group, else the groups "0", "1", ... (found
    without listing the store, which HTTP stores cannot do)."""
    ome = _optional_child(group, "OME", "group", where)
    if isinstance(ome, zarr.Group):
        series = _ome_attributes(ome).get("series")
        if isinstance(series, list) and series:
            return [str(path) for path in series]
    paths = []
    while isinstance(_optional_child(group, str(len(paths)), "series", where), zarr.Group):
        paths.append(str(len(paths)))
    return paths


# --- plain arrays and groups ---------------------------------------------------------


def _plain_array_image(array: zarr.Array, source: str) -> MultiscaleInfo:
    """A lone array: one level at scale 1, translation 0."""
    where = _where(source, array.path)
    group_path, _, name = array.path.rpartition("/")
    _check_levels([array], [name], where)
    axes = _default_axes(array)
    _check_axes(axes, array.ndim, where)
    identity = ((1.0,) * array.ndim, (0.0,) * array.ndim)
    return MultiscaleInfo(
        source=source,
        path=group_path,
        levels=_make_levels([array], [name], axes, [identity], where),
    )


def _plain_group_image(group: zarr.Group, where: str, source: str) -> MultiscaleInfo:
    """A group of arrays without multiscales metadata, taken as a pyramid: its arrays
    sorted by size (largest first), scales inferred from the shapes."""
    try:
        members = list(group.members())
    except Exception as err:
        raise SourceError(f"{where}: listing the group: {describe_error(err)}") from None
    arrays = sorted(
        ((name, node) for name, node in members if isinstance(node, zarr.Array)),
        key=lambda item: (-math.prod(item[1].shape), item[0]),
    )
    if not arrays:
        subgroups = sorted(name for name, node in members if isinstance(node, zarr.Group))
        hint = f"; subgroups: {', '.join(subgroups)}" if subgroups else ""
        raise SourceError(f"{where}: no multiscales metadata and no arrays{hint}")
    names = [name for name, _ in arrays]
    levels = [array for _, array in arrays]
    _check_levels(levels, names, where)
    axes = _default_axes(levels[0])
    _check_axes(axes, levels[0].ndim, where)
    transforms = _transforms_from_shapes(levels, axes)
    return MultiscaleInfo(
        source=source, path=group.path, levels=_make_levels(levels, names, axes, transforms, where)
    )


def _transforms_from_shapes(
    arrays: Sequence[zarr.Array], axes: tuple[Axis, ...]
) -> list[Transform]:
    """Scales of a pyramid without metadata: level-0 size / level size per spatial axis,
    with pixel centres of block-averaged levels at (scale - 1) / 2 (non-spatial axes
    must keep their size: :func:`_check_geometry`)."""
    spatial = set(spatial_axis_indices(axes))
    base = arrays[0].shape
    transforms = []
    for array in arrays:
        scale = [
            n0 / n if i in spatial else 1.0
            for i, (n0, n) in enumerate(zip(base, array.shape, strict=True))
        ]
        transforms.append((tuple(scale), tuple((s - 1) / 2 for s in scale)))
    return transforms


# --- shared checks and construction ---------------------------------------------------


def _default_axes(array: zarr.Array) -> tuple[Axis, ...]:
    """Axes without OME metadata: zarr v3 ``dimension_names`` if all are set, else
    t, c, z, y, x by position from the last dimension (y, x for 2-D, ...)."""
    names = getattr(array.metadata, "dimension_names", None)
    if not names or not all(isinstance(n, str) and n for n in names):
        extra = tuple(f"dim_{i}" for i in range(array.ndim - len(_DEFAULT_AXIS_NAMES)))
        names = extra + _DEFAULT_AXIS_NAMES[max(0, len(_DEFAULT_AXIS_NAMES) - array.ndim) :]
    return tuple(_named_axis(name) for name in names)


def _named_axis(name: str) -> Axis:
    return Axis(name=name, type=_AXIS_TYPES_BY_NAME.get(name.lower()))


def _check_levels(arrays: Sequence[zarr.Array], paths: Sequence[str], where: str) -> None:
    """Levels must lie inside their (local) store, share a supported dtype and ndim, be
    non-empty, have chunks (and shards) of at least one pixel and never grow."""
    first = _native_dtype(arrays[0])
    for level, (array, path) in enumerate(zip(arrays, paths, strict=True)):
        label = f"level {level} ({path!r})"
        _check_inside_store(array, f"{where}: {label}")
        dtype = _native_dtype(array)
        if dtype not in SUPPORTED_DTYPES:
            raise SourceError(f"{where}: {label} has unsupported dtype {array.dtype}")
        if array.ndim != arrays[0].ndim:
            raise SourceError(
                f"{where}: {label} is {array.ndim}-D but level 0 is {arrays[0].ndim}-D"
            )
        if dtype != first:
            raise SourceError(f"{where}: {label} has dtype {dtype} but level 0 has {first}")
        if 0 in array.shape:
            raise SourceError(f"{where}: {label} is empty (shape {array.shape})")
        for what, sizes in (("chunk", array.chunks), ("shard", array.shards)):
            if sizes is not None and any(n < 1 for n in sizes):
                raise SourceError(
                    f"{where}: {label} has {what} shape {tuple(sizes)}: every size must be at "
                    "least 1"
                )
        if level and any(n > p for n, p in zip(array.shape, arrays[level - 1].shape, strict=True)):
            raise SourceError(
                f"{where}: {label} shape {array.shape} is larger than level {level - 1}'s "
                f"{arrays[level - 1].shape}"
            )


def _check_inside_store(node: zarr.Array | zarr.Group, what: str) -> None:
    """A node of a local store, its directory and its metadata documents, must resolve
    inside the store's root: no symbolic link out of it is followed (see
    :mod:`chunkpool.links`)."""
    store = node.store
    if not isinstance(store, LocalStore):
        return
    root = StoreRoot(store.root)
    prefix = f"{node.path}/" if node.path else ""
    try:
        root.check(node.path)
        for name in _METADATA_FILES:
            root.check(prefix + name)
    except LinkEscapeError as err:
        raise SourceError(f"{what}: {err}") from None


def _native_dtype(array: zarr.Array) -> np.dtype:
    """The array's dtype in native byte order (unchanged if it has no byte order)."""
    dtype = np.dtype(array.dtype)
    return dtype.newbyteorder("=") if dtype.kind in "biuf" else dtype


def _check_axes(axes: tuple[Axis, ...], ndim: int, where: str) -> None:
    names = [axis.name for axis in axes]
    if len(axes) != ndim:
        raise SourceError(f"{where}: {len(axes)} axes ({', '.join(names)}) for {ndim}-D arrays")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise SourceError(f"{where}: duplicate axis names {', '.join(duplicates)}")
    if len(spatial_axis_indices(axes)) < 2:
        raise SourceError(f"{where}: fewer than 2 spatial axes (axes: {', '.join(names)})")


def _make_levels(
    arrays: Sequence[zarr.Array],
    paths: Sequence[str],
    axes: tuple[Axis, ...],
    transforms: Sequence[Transform],
    where: str,
) -> tuple[ScaleInfo, ...]:
    levels = tuple(
        _scale_info(level, path, array, axes, transform)
        for level, (array, path, transform) in enumerate(
            zip(arrays, paths, transforms, strict=True)
        )
    )
    _check_geometry(levels, where)
    return levels


def _check_geometry(levels: Sequence[ScaleInfo], where: str) -> None:
    """The levels' world geometry (transforms composed) must be computable and describe
    one picture at decreasing resolutions (the rules: this module's docstring)."""
    for scale in levels:
        label = f"level {scale.level} ({scale.path!r})"
        for axis, s, t, n in zip(
            scale.axes, scale.scale, scale.translation, scale.shape, strict=True
        ):
            along = f"along {axis.name}"
            if not (math.isfinite(s) and s >= sys.float_info.min):
                raise SourceError(
                    f"{where}: {label} has scale {s!r} {along} (transforms composed): "
                    "not a positive, finite, normal number"
                )
            if not math.isfinite(t):
                raise SourceError(f"{where}: {label} has translation {t!r} {along}")
            if not (math.isfinite(t - s / 2) and math.isfinite(t + (n - 0.5) * s)):
                raise SourceError(
                    f"{where}: {label} reaches beyond the largest float {along} "
                    f"(translation {t!r}, {n} pixels of {s!r})"
                )
    base = levels[0]
    spatial = set(base.spatial_axes)
    for previous, scale in itertools.pairwise(levels):
        label = f"level {scale.level} ({scale.path!r})"
        for i, axis in enumerate(scale.axes):
            n0, n = previous.shape[i], scale.shape[i]
            if i not in spatial:
                if n != base.shape[i]:
                    raise SourceError(
                        f"{where}: {label} changes the size of non-spatial axis "
                        f"{axis.name!r} ({base.shape[i]} → {n})"
                    )
                continue
            s0, s = previous.scale[i], scale.scale[i]
            if s < s0:
                raise SourceError(
                    f"{where}: {label} is finer than level {previous.level} along "
                    f"{axis.name} (scale {s!r} < {s0!r})"
                )
            if n < n0 and s <= s0:
                raise SourceError(
                    f"{where}: {label} shrinks along {axis.name} ({n0} → {n} pixels) but "
                    f"its scale does not grow ({s!r})"
                )
            extent, extent0 = n * s, base.shape[i] * base.scale[i]
            if abs(extent - extent0) > s * _EXTENT_TOLERANCE:
                raise SourceError(
                    f"{where}: {label} spans {extent!r} along {axis.name} but level 0 spans "
                    f"{extent0!r}: more than one of its pixels apart"
                )


def _scale_info(
    level: int, path: str, array: zarr.Array, axes: tuple[Axis, ...], transform: Transform
) -> ScaleInfo:
    dtype = _native_dtype(array)
    fill_value = 0 if array.fill_value is None else array.fill_value
    return ScaleInfo(
        level=level,
        path=path,
        array=array,
        shape=tuple(array.shape),
        chunk_shape=tuple(array.chunks),
        shard_shape=None if array.shards is None else tuple(array.shards),
        dtype=dtype,
        fill_value=np.asarray(fill_value, dtype=dtype)[()],
        axes=axes,
        scale=transform[0],
        translation=transform[1],
    )


# --- helpers -------------------------------------------------------------------------


def _child(group: zarr.Group, path: str, what: str, where: str) -> zarr.Group | zarr.Array:
    """``group[path]``; a missing node or a read failure is a :class:`SourceError`."""
    node = _optional_child(group, path, what, where)
    if node is None:
        raise SourceError(f"{where}: {what} {path!r} does not exist")
    return node


def _optional_child(
    group: zarr.Group, path: str, what: str, where: str
) -> zarr.Group | zarr.Array | None:
    """``group[path]``, or None if there is no such node; a read failure is a
    :class:`SourceError`."""
    try:
        return group[path]
    except KeyError:
        return None
    except Exception as err:
        raise SourceError(f"{where}: {what} {path!r}: {describe_error(err)}") from None


def _where(source: str, path: str) -> str:
    """How messages name an image: the source, plus the path inside it if any."""
    return f"{source.rstrip('/')}/{path}" if path else source


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
