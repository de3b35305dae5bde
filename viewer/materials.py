"""pygfx materials for label tiles and true-colour RGB(A) tiles, with their shaders.

Both draw a ``gfx.Image`` whose ``geometry.grid`` is a 2D texture of one tile, as the
image tiles of :mod:`viewer.layer` do (same quad: texel (0, 0) centred on the object's
origin, one texel per unit before ``local.scale``), and read it with ``textureLoad``:
nearest, never filtered, so coarse levels show as stored. Blending, depth test/write,
``render_order`` and ``opacity`` are the plain :class:`pygfx.Material` settings, so a
layer places these tiles in its depth band exactly like image tiles.

Colour is handled as everywhere in pygfx: the stored values are sRGB; the shader
converts them to linear light, blending happens in linear light (the render target is
``rgba8unorm-srgb``), and the frame is sRGB again. So an opaque pixel stored as
(200, 0, 0) shows as (200, 0, 0) at 1:1, and a translucent one over a background
shows as ``srgb(a * linear(src) + (1 - a) * linear(dst))``.

* :class:`LabelMaterial`: integer label IDs (a texture from :func:`label_texture`:
  ``r8uint`` .. ``r32sint``, or ``rg32uint`` words for 64-bit IDs), coloured in the
  shader by the table of :mod:`viewer.labels` (bit-exact), with opacity, an outline
  mode and a selected ID.
* :class:`RGBMaterial`: (H, W, 3|4) uint8 or uint16 tiles, shown true-colour (uint16
  as 0..65535 -> 0..1), alpha blended when there are 4 channels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pygfx as gfx
import wgpu
from pygfx.renderers.wgpu import (
    BaseShader,
    Binding,
    GfxTextureView,
    register_wgpu_render_function,
    to_texture_format,
)

from .labels import (
    LABEL_TEXTURE_FORMATS,
    LABEL_WORDS_FORMAT,
    WGSL_LABEL_COLOR,
    label_texture_data,
    label_texture_format,
)

__all__ = ["LabelMaterial", "RGBMaterial", "label_texture", "rgb_texture", "rgb_texture_data"]

_VERTEX_AND_FRAGMENT = wgpu.ShaderStage.VERTEX | wgpu.ShaderStage.FRAGMENT
_U64_MASK = (1 << 64) - 1

#: The WGSL that reads one texel of a label texture as its ID's (low, high) words.
_UNSIGNED = "return vec2<u32>(textureLoad(t_img, p, 0).x, 0u);"
_SIGNED = (  # the texel is read sign-extended to i32; extend it to 64 bits
    "let v = textureLoad(t_img, p, 0).x;\n"
    "    return vec2<u32>(bitcast<u32>(v), select(0u, 0xFFFFFFFFu, v < 0));"
)
_LABEL_LOADERS = {
    fmt: _SIGNED if "sint" in fmt else _UNSIGNED for fmt in LABEL_TEXTURE_FORMATS.values()
}
_LABEL_LOADERS[LABEL_WORDS_FORMAT] = "return textureLoad(t_img, p, 0).xy;"

#: RGB(A) texture formats (rgb is padded to rgba by pygfx, alpha = max) and the scale
#: from a loaded texel to 0..1 (8unorm texels already are).
_RGB_FORMATS = {
    "rgb8unorm": "",
    "rgba8unorm": "",
    "rgb16uint": " / 65535.0",
    "rgba16uint": " / 65535.0",
}

# The tile quad and the texel under a fragment, shared by both shaders (from pygfx's
# image.wgsl: the quad spans texels -0.5 .. size - 0.5 in the object's space).
_COMMON_WGSL = """
{$ include 'pygfx.std.wgsl' $}

struct VertexInput {
    @builtin(vertex_index) vertex_index : u32,
};

@vertex
fn vs_main(in: VertexInput) -> Varyings {
    let size = vec2<f32>(textureDimensions(t_img));
    let corners = array<vec2<f32>, 4>(
        vec2<f32>(1.0, 0.0), vec2<f32>(1.0, 1.0), vec2<f32>(0.0, 0.0), vec2<f32>(0.0, 1.0)
    );
    let uv = corners[in.vertex_index];
    let data_pos = vec4<f32>(nonlinear_transform(vec3<f32>(uv * size - 0.5, 0.0)), 1.0);
    let world_pos = u_wobject.world_transform * data_pos;
    var varyings: Varyings;
    varyings.position = vec4<f32>(
        u_stdinfo.projection_transform * u_stdinfo.cam_transform * world_pos
    );
    varyings.world_pos = vec3<f32>(world_pos.xyz);
    varyings.texcoord = vec2<f32>(uv);
    return varyings;
}

fn texel_at(texcoord: vec2<f32>) -> vec2<i32> {
    let size = vec2<i32>(textureDimensions(t_img));
    return clamp(vec2<i32>(texcoord * vec2<f32>(size)), vec2<i32>(0), size - 1);
}

fn tile_output(rgb_srgb: vec3<f32>, alpha: f32, texcoord: vec2<f32>) -> FragmentOutput {
    do_alpha_test(alpha);
    var out: FragmentOutput;
    out.color = vec4<f32>(srgb2physical(rgb_srgb), alpha);
    $$ if write_pick
    out.pick = (
        pick_pack(u32(u_wobject.global_id), 20) +
        pick_pack(u32(texcoord.x * 4194303.0), 22) +
        pick_pack(u32(texcoord.y * 4194303.0), 22)
    );
    $$ endif
    return out;
}
"""

_LABEL_FRAGMENT = """
fn load_id(p: vec2<i32>) -> vec2<u32> {
    {{ load_id }}
}

fn differs(p: vec2<i32>, id: vec2<u32>) -> bool {
    return any(load_id(p) != id);
}

@fragment
fn fs_main(varyings: Varyings) -> FragmentOutput {
    {$ include 'pygfx.clipping_planes.wgsl' $}
    let p = texel_at(varyings.texcoord.xy);
    let last = vec2<i32>(textureDimensions(t_img)) - 1;
    let id = load_id(p);
    let selected = u_material.selected;
    let has_selection = any(selected != vec2<u32>(0u));
    let is_selected = has_selection && all(id == selected);
    // Pixels not drawn are transparent, not discarded: they still write depth, so that
    // (with depth_write) a finer tile's background hides the coarser tiles beneath.
    var shown = any(id != vec2<u32>(0u));
    if (u_material.selected_only != 0u && has_selection && !is_selected) {
        shown = false;
    }
    if (u_material.outline != 0u) {
        // 4-neighbours within this tile only (a texel on the tile's edge is not
        // compared with the next tile's).
        let edge = (p.x > 0 && differs(p - vec2<i32>(1, 0), id))
            || (p.x < last.x && differs(p + vec2<i32>(1, 0), id))
            || (p.y > 0 && differs(p - vec2<i32>(0, 1), id))
            || (p.y < last.y && differs(p + vec2<i32>(0, 1), id));
        shown = shown && edge;
    }
    let color = label_color(id.x, id.y);
    var alpha = u_material.opacity;
    if (has_selection && !is_selected) {
        alpha = alpha * u_material.dim;
    }
    if (is_selected) {
        alpha = 1.0;
    }
    if (!shown) {
        alpha = 0.0;
    }
    return tile_output(vec3<f32>(color.rgb) / 255.0, alpha, varyings.texcoord.xy);
}
"""

_RGB_FRAGMENT = """
@fragment
fn fs_main(varyings: Varyings) -> FragmentOutput {
    {$ include 'pygfx.clipping_planes.wgsl' $}
    let p = texel_at(varyings.texcoord.xy);
    let value = vec4<f32>(textureLoad(t_img, p, 0)){{ rgb_scale }};
    return tile_output(value.rgb, value.a * u_material.opacity, varyings.texcoord.xy);
}
"""


class LabelMaterial(gfx.Material):
    """Label tiles: a colour per integer ID from :mod:`viewer.labels`' table (0 is
    transparent), computed in the shader from the exact ID.

    * ``opacity``: the alpha of the labels (default 0.5), blended over what is beneath.
    * ``outline``: draw only the pixels whose 4-neighbour within the tile holds another
      ID (the background counts as another ID). A tile's edge texels are compared with
      their neighbours inside the tile only, so an ID boundary lying exactly on a tile
      seam draws no outline there. Outlines are one texel of the level shown wide.
    * ``selected``: an ID (0: none) drawn opaque (alpha 1), every other ID dimmed to
      ``opacity * dim``; ``selected_only`` hides the other IDs altogether (without a
      selection it changes nothing). Any Python int: negative ones by their 64-bit
      two's complement (int64 labels), so ``-1`` selects both int64 -1 and uint64
      2**64 - 1 (the same bits: the same colour).

    The defaults suit a label layer over image tiles: alpha blending, depth test and
    depth write on (pixels that are not drawn still write depth, see the shader), like
    the image tiles' depth bands. Other :class:`pygfx.Material` arguments pass through.
    """

    uniform_type: ClassVar[dict[str, str]] = dict(
        gfx.Material.uniform_type,
        selected="2xu4",
        outline="u4",
        selected_only="u4",
        dim="f4",
    )

    def __init__(
        self,
        *,
        opacity: float = 0.5,
        outline: bool = False,
        selected: int = 0,
        selected_only: bool = False,
        dim: float = 0.5,
        alpha_mode: str = "blend",
        depth_write: bool = True,
        **kwargs: Any,
    ):
        super().__init__(opacity=opacity, alpha_mode=alpha_mode, depth_write=depth_write, **kwargs)
        self.outline = outline
        self.selected = selected
        self.selected_only = selected_only
        self.dim = dim

    def _set(self, name: str, value: Any) -> None:
        self.uniform_buffer.data[name] = value
        self.uniform_buffer.update_full()

    @property
    def outline(self) -> bool:
        """Whether only the outlines of the labels are drawn."""
        return bool(self.uniform_buffer.data["outline"])

    @outline.setter
    def outline(self, value: bool) -> None:
        self._set("outline", 1 if value else 0)

    @property
    def selected(self) -> int:
        """The selected ID as an unsigned 64-bit value (0: none)."""
        lo, hi = (int(w) for w in self.uniform_buffer.data["selected"])
        return lo | (hi << 32)

    @selected.setter
    def selected(self, value: int) -> None:
        bits = int(value) & _U64_MASK
        self._set("selected", (bits & 0xFFFFFFFF, bits >> 32))

    @property
    def selected_only(self) -> bool:
        """Whether IDs other than the selected one are hidden (with a selection)."""
        return bool(self.uniform_buffer.data["selected_only"])

    @selected_only.setter
    def selected_only(self, value: bool) -> None:
        self._set("selected_only", 1 if value else 0)

    @property
    def dim(self) -> float:
        """The factor on the opacity of the IDs that are not selected (with a selection)."""
        return float(self.uniform_buffer.data["dim"])

    @dim.setter
    def dim(self, value: float) -> None:
        self._set("dim", min(max(float(value), 0.0), 1.0))


class RGBMaterial(gfx.Material):
    """True-colour tiles: an (H, W, 3) or (H, W, 4) uint8 or uint16 texture shown as the
    sRGB colour it stores (uint16 scaled by 1/65535), no contrast window. With 4
    channels the stored alpha (times ``opacity``) blends the tile over what is beneath.

    Defaults as for image tiles drawn in a depth band: alpha blending, depth test and
    depth write on. Other :class:`pygfx.Material` arguments pass through."""

    def __init__(self, *, alpha_mode: str = "blend", depth_write: bool = True, **kwargs: Any):
        super().__init__(alpha_mode=alpha_mode, depth_write=depth_write, **kwargs)


def rgb_texture_data(plane: np.ndarray) -> np.ndarray:
    """An (H, W, 3|4) uint8/uint16 plane as the contiguous array of its texture (for
    :class:`RGBMaterial`). Raises TypeError / ValueError for anything else."""
    plane = np.asarray(plane)
    if plane.ndim != 3 or plane.shape[2] not in (3, 4):
        raise ValueError(f"an RGB(A) plane is (H, W, 3|4), got shape {plane.shape}")
    if plane.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise TypeError(f"RGB(A) tiles are uint8 or uint16, not {plane.dtype}")
    return np.ascontiguousarray(plane)


def label_texture(plane: np.ndarray) -> gfx.Texture:
    """The texture of a 2D label plane (any integer dtype) for :class:`LabelMaterial`:
    its data from :func:`~viewer.labels.label_texture_data`, an integer format (pygfx
    would make uint8 a normalised one). A spare texture of the same shape and dtype can
    take another plane with ``texture.set_data(label_texture_data(plane))``."""
    data = label_texture_data(plane)
    return gfx.Texture(data, dim=2, format=label_texture_format(data))


def rgb_texture(plane: np.ndarray) -> gfx.Texture:
    """The texture of an (H, W, 3|4) uint8/uint16 plane for :class:`RGBMaterial`."""
    return gfx.Texture(rgb_texture_data(plane), dim=2)


class _TileShader(BaseShader):
    """What the label and RGB shaders share: the tile quad, its bindings, the texture."""

    type = "render"
    #: The texture formats the shader reads (set by each subclass).
    formats: ClassVar[dict[str, str]] = {}

    def __init__(self, wobject: gfx.Image):
        super().__init__(wobject)
        grid = wobject.geometry.grid
        if not isinstance(grid, gfx.Texture) or grid.dim != 2:
            raise TypeError(f"{type(self).__name__} needs a 2D texture as geometry.grid")
        fmt = to_texture_format(grid.format)
        if fmt not in self.formats:
            raise TypeError(
                f"{type(wobject.material).__name__} cannot show a {fmt} texture "
                f"(one of {', '.join(self.formats)})"
            )
        self["texture_format"] = fmt

    def get_bindings(self, wobject: gfx.Image, shared: Any, scene: Any) -> dict:
        bindings = [
            Binding("u_stdinfo", "buffer/uniform", shared.uniform_buffer),
            Binding("u_wobject", "buffer/uniform", wobject.uniform_buffer),
            Binding("u_material", "buffer/uniform", wobject.material.uniform_buffer),
            Binding(
                "t_img", "texture/auto", GfxTextureView(wobject.geometry.grid), _VERTEX_AND_FRAGMENT
            ),
        ]
        by_slot = dict(enumerate(bindings))
        self.define_bindings(0, by_slot)
        return {0: by_slot}

    def get_pipeline_info(self, wobject: gfx.Image, shared: Any) -> dict:
        return {
            "primitive_topology": wgpu.PrimitiveTopology.triangle_strip,
            "cull_mode": wgpu.CullMode.none,
        }

    def get_render_info(self, wobject: gfx.Image, shared: Any) -> dict:
        return {"indices": (4, 1)}


@register_wgpu_render_function(gfx.Image, LabelMaterial)
class LabelShader(_TileShader):
    """Label IDs -> colours (see :class:`LabelMaterial`)."""

    formats = _LABEL_LOADERS

    def __init__(self, wobject: gfx.Image):
        super().__init__(wobject)
        self["load_id"] = _LABEL_LOADERS[self["texture_format"]]

    def get_code(self) -> str:
        return _COMMON_WGSL + WGSL_LABEL_COLOR + _LABEL_FRAGMENT


@register_wgpu_render_function(gfx.Image, RGBMaterial)
class RGBShader(_TileShader):
    """Stored sRGB(A) -> colour (see :class:`RGBMaterial`)."""

    formats = _RGB_FORMATS

    def __init__(self, wobject: gfx.Image):
        super().__init__(wobject)
        self["rgb_scale"] = _RGB_FORMATS[self["texture_format"]]

    def get_code(self) -> str:
        return _COMMON_WGSL + _RGB_FRAGMENT
