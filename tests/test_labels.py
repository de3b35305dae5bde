"""The label colour table and the 32-bit words of label IDs (no GPU: see
test_materials.py for the shader's side of the same table)."""

from __future__ import annotations

import numpy as np
import pytest

from viewer.labels import (
    LABEL_TEXTURE_FORMATS,
    LABEL_WORDS_FORMAT,
    PALETTE,
    join_uint64,
    label_colors,
    label_texture_data,
    label_words,
    split_uint64,
)

BIG = 2**60


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of (N, 3) sRGB values 0..255."""
    c = rgb / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    d = 6 / 29
    f = np.where(xyz > d**3, np.cbrt(xyz), xyz / (3 * d**2) + 4 / 29)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], -1)


def farthest_palette(n: int = 64) -> list[int]:
    """How PALETTE was made: greedy farthest-point sampling in CIELAB over the sRGB grid
    of step 17, lightness 40..90, chroma >= 30, from the most saturated colour."""
    levels = np.arange(0, 256, 17)
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    lab = srgb_to_lab(grid.astype(np.float64))
    chroma = np.hypot(lab[:, 1], lab[:, 2])
    ok = (lab[:, 0] >= 40) & (lab[:, 0] <= 90) & (chroma >= 30)
    grid, lab, chroma = grid[ok], lab[ok], chroma[ok]
    chosen = [int(np.argmax(chroma))]
    dist = np.linalg.norm(lab - lab[chosen[0]], axis=1)
    for _ in range(n - 1):
        chosen.append(int(np.argmax(dist)))
        dist = np.minimum(dist, np.linalg.norm(lab - lab[chosen[-1]], axis=1))
    return [(int(r) << 16) | (int(g) << 8) | int(b) for r, g, b in grid[chosen]]


def test_palette_is_the_documented_farthest_point_table() -> None:
    assert list(PALETTE) == farthest_palette()


def test_palette_colours_are_well_separated_and_never_grey() -> None:
    rgb = np.array([[(c >> 16) & 255, (c >> 8) & 255, c & 255] for c in PALETTE], np.float64)
    lab = srgb_to_lab(rgb)
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() >= 20.0
    assert np.hypot(lab[:, 1], lab[:, 2]).min() >= 30.0
    assert lab[:, 0].min() >= 40.0


def test_zero_is_transparent_and_every_other_id_opaque_from_the_palette() -> None:
    ids = np.array([[0, 1, 2, 3], [BIG + 1, BIG + 2, 2**64 - 1, 0]], np.uint64)
    colors = label_colors(ids)
    assert colors.shape == (2, 4, 4) and colors.dtype == np.uint8
    assert (colors[ids == 0] == 0).all()
    palette = {((c >> 16) & 255, (c >> 8) & 255, c & 255) for c in PALETTE}
    for rgba in colors[ids != 0]:
        assert rgba[3] == 255 and tuple(int(v) for v in rgba[:3]) in palette


def test_colours_are_stable_across_sessions() -> None:
    """Pinned: a change of hash or palette would recolour every saved view."""
    ids = np.array([1, 2, BIG + 1, BIG + 2, 2**64 - 1], np.uint64)
    assert [tuple(int(v) for v in c) for c in label_colors(ids)] == [
        (255, 51, 170, 255),
        (255, 170, 153, 255),
        (136, 0, 255, 255),
        (102, 204, 238, 255),
        (0, 102, 221, 255),
    ]


def test_ids_above_2_53_keep_their_own_colour() -> None:
    # float64 (and float32 all the more) cannot tell these apart; the table can
    assert float(BIG + 1) == float(BIG + 2)
    a, b = label_colors(np.array([BIG + 1, BIG + 2], np.uint64))
    assert (a != b).any()


def test_the_colour_is_a_function_of_the_64_bit_value_whatever_the_dtype() -> None:
    values = [0, 1, 5, 100, 127]
    want = label_colors(np.array(values, np.uint64))
    for dtype in (np.uint8, np.int8, np.uint16, np.int16, np.uint32, np.int32, np.int64):
        np.testing.assert_array_equal(label_colors(np.array(values, dtype)), want)
    minus_one = [label_colors(np.array([-1], t))[0] for t in (np.int8, np.int32, np.int64)]
    top = label_colors(np.array([2**64 - 1], np.uint64))[0]
    for color in minus_one:
        np.testing.assert_array_equal(color, top)


def test_colours_spread_evenly_over_the_palette() -> None:
    """Consecutive IDs (the usual case) use every colour about as often, and neighbours
    rarely share one."""
    ids = np.arange(1, 64 * 1024 + 1, dtype=np.uint64)
    packed = label_colors(ids)[:, :3].astype(np.int64) @ np.array([1 << 16, 1 << 8, 1])
    _, counts = np.unique(packed, return_counts=True)
    assert len(counts) == 64
    assert counts.min() > 0.8 * 1024 and counts.max() < 1.2 * 1024
    assert np.mean(packed[1:] == packed[:-1]) < 2 / 64


def test_split_and_join_round_trip_uint64_and_int64() -> None:
    u = np.array([[0, 1, 2**32 - 1, 2**32], [BIG + 1, 2**63, 2**64 - 2, 2**64 - 1]], np.uint64)
    words = split_uint64(u)
    assert words.shape == (2, 4, 2) and words.dtype == np.uint32
    assert words[1, 0].tolist() == [1, 1 << 28]
    np.testing.assert_array_equal(join_uint64(words), u)
    i = np.array([[-(2**63), -1, 0, 2**63 - 1]], np.int64)
    words = split_uint64(i)
    assert words[0, 1].tolist() == [2**32 - 1, 2**32 - 1]
    back = join_uint64(words, np.int64)
    assert back.dtype == np.int64
    np.testing.assert_array_equal(back, i)
    lo, hi = label_words(i)
    np.testing.assert_array_equal(np.stack([lo, hi], -1), words)


def test_texture_data_per_dtype() -> None:
    for dtype, want_dtype, shape in [
        (np.uint8, np.uint8, (3, 5)),
        (np.uint16, np.uint16, (3, 5)),
        (np.uint32, np.uint32, (3, 5)),
        (np.bool_, np.uint8, (3, 5)),
        (np.int8, np.int8, (3, 5)),
        (np.int16, np.int16, (3, 5)),
        (np.int32, np.int32, (3, 5)),
        (np.uint64, np.uint32, (3, 5, 2)),
        (np.int64, np.uint32, (3, 5, 2)),
    ]:
        plane = (np.arange(15).reshape(3, 5) % 2).astype(dtype)[:, ::-1]  # not contiguous
        data = label_texture_data(plane)
        assert data.dtype == want_dtype and data.shape == shape and data.flags.c_contiguous
        if data.ndim == 3:
            assert LABEL_WORDS_FORMAT == "rg32uint"
        else:
            assert LABEL_TEXTURE_FORMATS[data.dtype] in (
                "r8uint",
                "r16uint",
                "r32uint",
                "r8sint",
                "r16sint",
                "r32sint",
            )


def test_float_labels_are_refused_with_a_clear_message() -> None:
    with pytest.raises(TypeError, match="label IDs must be integers, not float32"):
        label_texture_data(np.zeros((2, 2), np.float32))
    with pytest.raises(TypeError, match="not float64"):
        label_colors(np.zeros(3))
    with pytest.raises(ValueError, match="2D"):
        label_texture_data(np.zeros((2, 2, 2), np.uint8))
    with pytest.raises(TypeError, match="uint64 or int64"):
        split_uint64(np.zeros((2, 2), np.uint32))
