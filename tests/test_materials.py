"""Label and RGB(A) tiles rendered offscreen (wgpu/pygfx, lavapipe on CI), pixel-exact.

Each test draws a few tiles at 1:1 (texel (r, c) of a tile placed at (r0, c0) covers
screen pixel (r0 + r, c0 + c)) the way the viewer draws tiles (same renderer settings,
a y-down orthographic camera, image tiles with an additive ImageBasicMaterial beneath),
and compares the frame with numpy: the colours of :func:`viewer.labels.label_colors`,
and for what is translucent the blend pygfx does, in linear light (see
:mod:`viewer.materials`). Screenshots are kept under tests/_artifacts/.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterator, Sequence

import numpy as np
import pygfx as gfx
import pytest
from PIL import Image
from rendercanvas.offscreen import RenderCanvas as OffscreenCanvas

from viewer.labels import label_colors
from viewer.materials import (
    LabelMaterial,
    LabelShader,
    RGBMaterial,
    RGBShader,
    label_texture,
    rgb_texture,
    rgb_texture_data,
)

pytestmark = pytest.mark.render

ARTIFACTS = pathlib.Path(__file__).parent / "_artifacts"
#: Canvas (W, H): not square, so that a swap of x and y shows.
WIDTH, HEIGHT = 64, 48
BIG = 2**60


class Stage:
    """One offscreen canvas and renderer (set up as the viewer's), drawing a new scene
    of tiles per :meth:`render`."""

    def __init__(self) -> None:
        self.canvas = OffscreenCanvas(size=(WIDTH, HEIGHT), pixel_ratio=1)
        self.renderer = gfx.WgpuRenderer(self.canvas, pixel_filter="nearest", ppaa="none")
        self.renderer.pixel_scale = 1
        self.camera = gfx.OrthographicCamera(
            WIDTH, HEIGHT, maintain_aspect=False, depth_range=(-100, 100)
        )
        self.camera.local.scale_y = -1  # y down: row 0 at the top
        # pixel centres on integer world coordinates, as texel centres are
        self.camera.local.position = (WIDTH / 2 - 0.5, HEIGHT / 2 - 0.5, 0)
        self.scene = gfx.Scene()
        self.canvas.request_draw(lambda: self.renderer.render(self.scene, self.camera))

    def render(self, tiles: Sequence[gfx.WorldObject], name: str) -> np.ndarray:
        """The (H, W, 3) frame of ``tiles`` over black; saved as tests/_artifacts/NAME.png."""
        self.scene = gfx.Scene()
        self.scene.add(gfx.Background.from_color("#000000"), *tiles)
        frame = np.asarray(self.canvas.draw())[..., :3].copy()
        ARTIFACTS.mkdir(exist_ok=True)
        Image.fromarray(frame).save(ARTIFACTS / f"materials-{name}.png")
        return frame

    def close(self) -> None:
        self.canvas.close()


@pytest.fixture(scope="module")
def stage() -> Iterator[Stage]:
    made = Stage()
    yield made
    made.close()


def tile(
    data: np.ndarray | gfx.Texture,
    material: gfx.Material,
    at: tuple[int, int] = (0, 0),
    *,
    z: float = 1,
    scale: int = 1,
    order: int = 1,
) -> gfx.Image:
    """A tile whose texel (0, 0) covers screen pixel ``at`` (row, col), ``scale`` screen
    pixels per texel, at depth ``z`` (nearer is larger) and draw order ``order``."""
    texture = data if isinstance(data, gfx.Texture) else gfx.Texture(data, dim=2)
    image = gfx.Image(gfx.Geometry(grid=texture), material)
    offset = (scale - 1) / 2  # texel centres at the centre of their scale x scale pixels
    image.local.position = (at[1] + offset, at[0] + offset, z)
    image.local.scale = (scale, scale, 1)
    image.render_order = order
    return image


def label_tile(ids: np.ndarray, at: tuple[int, int] = (0, 0), **options: object) -> gfx.Image:
    placement = {k: options.pop(k) for k in ("z", "scale", "order") if k in options}
    return tile(label_texture(ids), LabelMaterial(**options), at, **placement)  # type: ignore[arg-type]


def image_tile(gray: np.ndarray) -> gfx.Image:
    """A uint8 grey tile drawn as the viewer's image tiles are (additive, depth band)."""
    material = gfx.ImageBasicMaterial(
        clim=(0, 255), interpolation="nearest", alpha_mode="add", depth_write=True
    )
    return tile(gray, material, z=0, order=0)


def background() -> np.ndarray:
    """A (H, W) uint8 grey ramp with noise: every level occurs under the labels."""
    rng = np.random.default_rng(8)
    return rng.integers(0, 256, (HEIGHT, WIDTH), dtype=np.uint8)


def linear(srgb8: np.ndarray) -> np.ndarray:
    c = np.asarray(srgb8, np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


def blend(src: np.ndarray, alpha: np.ndarray | float, dst: np.ndarray) -> np.ndarray:
    """What pygfx's "blend" mode makes of ``src`` over ``dst`` (sRGB uint8, ... x 3),
    before the 8-bit rounding: ``255 * srgb(alpha * linear(src) + (1 - alpha) *
    linear(dst))`` as float64, alpha taken as a float32 (as on the GPU)."""
    a = np.asarray(np.float32(alpha), np.float64)
    if a.ndim:
        a = a[..., None]
    lin = np.clip(a * linear(src) + (1 - a) * linear(dst), 0.0, 1.0)
    return 255.0 * np.where(lin <= 0.0031308, lin * 12.92, 1.055 * lin ** (1 / 2.4) - 0.055)


def rgb_of(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[..., None], 3, axis=-1)


def assert_frame(got: np.ndarray, want: np.ndarray, what: str) -> None:
    bad = (got.astype(np.int64) != want).any(axis=-1)
    if bad.any():
        rows, cols = np.nonzero(bad)
        sample = "; ".join(
            f"({r}, {c}): got {got[r, c].tolist()}, want {want[r, c].tolist()}"
            for r, c in list(zip(rows, cols, strict=True))[:4]
        )
        pytest.fail(f"{what}: {bad.sum()} of {bad.size} pixels wrong, e.g. {sample}")


#: How near an integer an exact blend must be for the frame to have to hold that integer.
ROUNDING_MARGIN = 0.05


def assert_blended(got: np.ndarray, ideal: np.ndarray, what: str) -> None:
    """``got`` holds, per channel, the floor or the ceiling of the exact blend ``ideal``
    (see :func:`blend`), and exactly the nearest integer where ``ideal`` is within
    ROUNDING_MARGIN of one (opaque and untouched pixels: always).

    Why not round(ideal) everywhere: the last step, linear -> 8-bit sRGB, is the render
    target's fixed-function encoding, and lavapipe's is an approximation (Vulkan allows
    it): measured, it rounds the other way for exact values between n + 0.1 and n + 0.8,
    never nearer an integer than that. The shader cannot do that step itself (it cannot
    read what is beneath), so the tolerance is the encoder's, not ours."""
    got = got.astype(np.float64)
    nearest = np.round(ideal)
    ok = (got == np.floor(ideal)) | (got == np.ceil(ideal))
    ok &= (np.abs(ideal - nearest) > ROUNDING_MARGIN) | (got == nearest)
    bad = ~ok.all(axis=-1)
    if bad.any():
        rows, cols = np.nonzero(bad)
        sample = "; ".join(
            f"({r}, {c}): got {got[r, c].tolist()}, exact {np.round(ideal[r, c], 2).tolist()}"
            for r, c in list(zip(rows, cols, strict=True))[:4]
        )
        pytest.fail(f"{what}: {bad.sum()} of {bad.size} pixels wrong, e.g. {sample}")


# -- labels ------------------------------------------------------------------------------


def many_ids(dtype: type) -> np.ndarray:
    """A (H, W) plane of distinct IDs of ``dtype``: its extremes, IDs above 2**53 side by
    side (for 64 bits), negatives (signed), 0 here and there."""
    info = np.iinfo(dtype)
    rng = np.random.default_rng(int(np.dtype(dtype).itemsize) * 10 + (info.min < 0))
    lo, hi = int(info.min), int(info.max)
    ids = rng.integers(lo, hi, (HEIGHT, WIDTH), dtype=dtype, endpoint=True)
    special = [0, 1, hi, lo, hi - 1] + ([BIG + 1, BIG + 2] if np.dtype(dtype).itemsize == 8 else [])
    ids[::7, ::5] = 0
    ids[1, : len(special)] = np.array(special, dtype=np.dtype(dtype))
    return ids


@pytest.mark.parametrize(
    "dtype", [np.uint64, np.int64, np.uint32, np.int32, np.uint16, np.int16, np.uint8, np.int8]
)
def test_shader_colours_equal_the_numpy_table(stage: Stage, dtype: type) -> None:
    """Opaque labels over black: every pixel is label_colors(ID) (0: black, i.e. not
    drawn), bit for bit, for every integer dtype and its texture format."""
    ids = many_ids(dtype)
    got = stage.render([label_tile(ids, opacity=1.0)], f"table-{np.dtype(dtype).name}")
    assert_frame(got, label_colors(ids)[..., :3].astype(np.int64), "label colours")
    if np.dtype(dtype).itemsize == 8:  # 2**60 + 1 and 2**60 + 2 sit at (1, 5), (1, 6)
        assert ids[1, 5] == BIG + 1 and ids[1, 6] == BIG + 2
        assert (got[1, 5] != got[1, 6]).any()


def test_labels_over_an_image_zero_transparent_and_opacity(stage: Stage) -> None:
    gray = background()
    ids = np.zeros((HEIGHT, WIDTH), np.uint64)
    ids[5:20, 4:30] = BIG + 1
    ids[12:40, 20:60] = BIG + 2
    ids[30:44, 2:12] = 7
    under = rgb_of(gray)
    colors = label_colors(ids)[..., :3]
    labelled = ids != 0
    for opacity in (1.0, 0.5, 0.3):
        got = stage.render(
            [image_tile(gray), label_tile(ids, opacity=opacity)], f"over-image-{opacity}"
        )
        want = np.where(labelled[..., None], blend(colors, opacity, under), under)
        assert_blended(got, want, f"labels at opacity {opacity} over an image")
    # where there is no label, the image shows unchanged
    assert (got[~labelled] == under[~labelled]).all()


def test_outline_of_a_known_square_within_the_tile(stage: Stage) -> None:
    """Outline mode: a texel is drawn iff a 4-neighbour inside the tile holds another ID.
    A square of 5 with a square of 9 inside it, and labels running off the tile's
    four edges (no outline along them: the tile edge is not compared)."""
    ids = np.zeros((HEIGHT, WIDTH), np.uint32)
    ids[4:20, 6:26] = 5
    ids[8:14, 10:18] = 9
    ids[30:, 40:] = 3  # to the bottom right corner
    ids[:3, :5] = 8  # to the top left corner
    drawn = np.zeros(ids.shape, bool)
    drawn[4, 6:26] = drawn[19, 6:26] = drawn[4:20, 6] = drawn[4:20, 25] = True  # 5's rim
    drawn[8, 10:18] = drawn[13, 10:18] = drawn[8:14, 10] = drawn[8:14, 17] = True  # 9's rim
    drawn[7, 10:18] = drawn[14, 10:18] = drawn[8:14, 9] = drawn[8:14, 18] = True  # 5 around 9
    drawn[30, 40:] = drawn[30:, 40] = True  # 3: only its top and left edges
    drawn[2, :5] = drawn[:3, 4] = True  # 8: only its bottom and right edges
    gray = background()
    got = stage.render([image_tile(gray), label_tile(ids, opacity=1.0, outline=True)], "outline")
    want = np.where(drawn[..., None], label_colors(ids)[..., :3], rgb_of(gray))
    assert_frame(got, want, "outline")


def test_selected_id_is_highlighted_the_others_dimmed(stage: Stage) -> None:
    """Selecting 2**60 + 1 draws it opaque and its neighbour 2**60 + 2 (equal in float)
    at opacity * dim; selected_only hides the neighbour; selecting nothing (0) is the
    plain opacity, selected_only or not."""
    gray = background()
    ids = np.zeros((HEIGHT, WIDTH), np.uint64)
    ids[4:30, 4:34] = BIG + 1
    ids[10:44, 30:60] = BIG + 2
    under, colors = rgb_of(gray), label_colors(ids)[..., :3]
    sel, other = ids == BIG + 1, ids == BIG + 2
    material = LabelMaterial(opacity=0.6, selected=BIG + 1, dim=0.5)
    assert material.selected == BIG + 1
    image = tile(label_texture(ids), material)
    got = stage.render([image_tile(gray), image], "selected")
    want = under.astype(np.float64)
    want[sel] = colors[sel]
    want[other] = blend(colors[other], np.float32(0.6) * np.float32(0.5), under[other])
    assert_blended(got, want, "selected highlighted")

    material.selected_only = True
    got = stage.render([image_tile(gray), image], "selected-only")
    want[other] = under[other]
    assert_frame(got, want.astype(np.int64), "selected only")

    material.selected = 0  # selected_only is still on: without a selection it does nothing
    got = stage.render([image_tile(gray), image], "no-selection")
    want = np.where((sel | other)[..., None], blend(colors, 0.6, under), under)
    assert_blended(got, want, "no selection")


def test_selecting_a_negative_int64_id(stage: Stage) -> None:
    ids = np.zeros((HEIGHT, WIDTH), np.int64)
    ids[:, :20] = -1
    ids[:, 20:40] = -2
    ids[:, 40:] = 2**32 - 1  # the low word of -1 alone
    material = LabelMaterial(opacity=1.0, selected=-1, selected_only=True)
    assert material.selected == 2**64 - 1
    got = stage.render([tile(label_texture(ids), material)], "negative")
    want = np.zeros((HEIGHT, WIDTH, 3), np.int64)
    want[:, :20] = label_colors(ids[:, :20])[..., :3]
    assert_frame(got, want, "selected -1 only")


def test_a_finer_tiles_background_hides_the_coarser_labels_beneath(stage: Stage) -> None:
    """The viewer's depth band: a fine tile (nearer, drawn first) covers a coarse one of
    the same layer; where the fine tile holds 0 the coarse label must not show through
    (the transparent texels write depth), and where the fine tile is missing it does."""
    gray = background()
    coarse = np.full((HEIGHT // 2, WIDTH // 2), 3, np.uint16)
    fine = np.zeros((HEIGHT, WIDTH // 2), np.uint16)
    fine[10:20, 5:15] = 4
    tiles = [
        image_tile(gray),
        label_tile(coarse, opacity=1.0, z=2, scale=2, order=2),
        label_tile(fine, opacity=1.0, z=3, order=1),
    ]
    got = stage.render(tiles, "depth-band")
    want = rgb_of(gray).astype(np.int64)
    want[:, WIDTH // 2 :] = label_colors(np.array([3]))[0, :3]
    want[10:20, 5:15] = label_colors(np.array([4]))[0, :3]
    assert_frame(got, want, "fine over coarse labels")


# -- RGB(A) --------------------------------------------------------------------------------


def primaries(dtype: type) -> np.ndarray:
    """(H, W, 3): rows of red, green, blue and grey ramps over every 8-bit level,
    (200, 0, 0), white and black blocks; uint16 as the 8-bit levels times 257."""
    rgb = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
    levels = np.arange(256, dtype=np.uint8).reshape(4, WIDTH)  # 4 rows of 64 levels
    for channel in range(3):
        rgb[channel * 4 : channel * 4 + 4, :, channel] = levels
    rgb[12:16] = levels[..., None]
    rgb[20:30, :20] = (200, 0, 0)
    rgb[20:30, 20:40] = (0, 200, 0)
    rgb[20:30, 40:] = (0, 0, 200)
    rgb[32:40] = 255
    rgb[40:, ::2] = (255, 0, 255)
    return rgb if dtype == np.uint8 else rgb.astype(np.uint16) * 257


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgb_primaries_and_white_exact(stage: Stage, dtype: type) -> None:
    data = primaries(dtype)
    got = stage.render([tile(rgb_texture(data), RGBMaterial())], f"rgb-{np.dtype(dtype).name}")
    assert_frame(got, primaries(np.uint8).astype(np.int64), "true colour")
    assert got[25, 5].tolist() == [200, 0, 0]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_rgba_blends_over_the_image_beneath(stage: Stage, dtype: type) -> None:
    """Every alpha level over a grey image; opacity scales the stored alpha."""
    gray = background()
    rng = np.random.default_rng(3)
    rgba8 = rng.integers(0, 256, (HEIGHT, WIDTH, 4), dtype=np.uint8)
    rgba8[..., 3].flat[:256] = np.arange(256)  # every alpha level
    data = rgba8 if dtype == np.uint8 else rgba8.astype(np.uint16) * 257
    for opacity in (1.0, 0.5):
        got = stage.render(
            [image_tile(gray), tile(rgb_texture(data), RGBMaterial(opacity=opacity))],
            f"rgba-{np.dtype(dtype).name}-{opacity}",
        )
        alpha = (rgba8[..., 3].astype(np.float32) / np.float32(255)) * np.float32(opacity)
        want = blend(rgba8[..., :3], alpha, rgb_of(gray))
        assert_blended(got, want, f"RGBA {np.dtype(dtype).name} at opacity {opacity}")


def test_wrong_textures_are_refused_clearly(stage: Stage) -> None:
    with pytest.raises(TypeError, match="uint8 or uint16"):
        rgb_texture_data(np.zeros((2, 2, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\|4\)"):
        rgb_texture_data(np.zeros((2, 2, 2), np.uint8))
    # pygfx makes a uint8 array a normalised texture: label_texture makes it r8uint
    with pytest.raises(TypeError, match="LabelMaterial cannot show a r8unorm texture"):
        LabelShader(tile(np.zeros((4, 4), np.uint8), LabelMaterial()))
    with pytest.raises(TypeError, match="LabelMaterial cannot show a r32float texture"):
        LabelShader(tile(np.zeros((4, 4), np.float32), LabelMaterial()))
    with pytest.raises(TypeError, match="RGBMaterial cannot show a r32uint texture"):
        RGBShader(tile(np.zeros((4, 4), np.uint32), RGBMaterial()))
