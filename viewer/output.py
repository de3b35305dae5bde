"""The copy of a frame onto the canvas, exact at 1:1.

pygfx renders the scene into an internal ``rgba8unorm-srgb`` texture, then its output
pass (pygfx 0.17: ``renderers/wgpu/engine/effectpasses.py``, ``OutputPass``, shader
``renderers/wgpu/wgsl/ssaa.wgsl``) draws that texture onto the canvas. With
``pixel_filter="nearest"`` (what the viewer uses, at ``pixel_scale`` 1) the shader
reads each screen pixel at its source texel's centre, but through the pass's only
sampler, which filters linearly (``effectpasses.py``, ``EffectPass.__init__``:
``create_sampler(min_filter="linear", mag_filter="linear")``; ``ssaa.wgsl``: the
``textureSampleLevel(colorTex, texSampler, texCoordNear, 0.0)`` of the one-sample
case). The centre ``(i + 0.5) / width`` is not exact in f32, so a driver that filters
with full-precision weights (Mesa's lavapipe) mixes in a sliver of the neighbouring
texels. The mix happens in linear light (the texture is sRGB), where a dark sRGB step
is tiny: next to a bright neighbour, dark values (1..17 of 255) came out one too high,
in the right half of a 1920-pixel-wide screen (the error grows with x). Pixel-exact
tests on narrower canvases never saw it.

:func:`use_exact_output` gives the renderer an output pass that reads through a
nearest sampler whenever its filter is "nearest": a texel-centre coordinate then picks
exactly that texel (the f32 error is far below the half texel that would pick another),
so the canvas shows the rendered bytes unchanged. Every other filter keeps pygfx's
linear sampler (its kernels need filtering). Upstream, the same choice of sampler in
``OutputPass`` (or a ``textureLoad`` of ``iPosNear`` in ``ssaa.wgsl``'s one-sample
case) would make this module unnecessary.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import pygfx as gfx
from pygfx.renderers.wgpu.engine.effectpasses import OutputPass

__all__ = ["ExactOutputPass", "use_exact_output"]

logger = logging.getLogger("zarrscope")


class ExactOutputPass(OutputPass):
    """pygfx's output pass, reading its source texture through a nearest sampler when
    its filter is "nearest" (and through pygfx's linear one otherwise)."""

    def __init__(self, *, gamma: float = 1.0, filter: str = "nearest"):
        super().__init__(gamma=gamma, filter=filter)
        self._linear_entry = self._sampler_binding_entry
        nearest = self._device.create_sampler(min_filter="nearest", mag_filter="nearest")
        self._nearest_entry = {"binding": self._linear_entry["binding"], "resource": nearest}

    def _render(
        self, command_encoder: Any, source_textures: Iterable[Any], target_textures: list[Any]
    ) -> Any:
        # the filter can change between frames (``renderer.pixel_filter``)
        nearest = self.filter == "nearest"
        self._sampler_binding_entry = self._nearest_entry if nearest else self._linear_entry
        return super()._render(command_encoder, source_textures, target_textures)


def use_exact_output(renderer: gfx.WgpuRenderer) -> None:
    """Replace ``renderer``'s output pass by an :class:`ExactOutputPass` with the same
    filter and gamma. If pygfx no longer has the pass where 0.17 keeps it, the renderer
    is left as it is and a warning says so (frames then show as pygfx copies them; the
    exact-pixel test of wide screens, ``tests/test_render_output.py``, fails)."""
    current = getattr(renderer, "_output_pass", None)
    if type(current) is not OutputPass or not hasattr(current, "_sampler_binding_entry"):
        logger.warning(
            "pygfx's output pass is not the one this viewer knows (%s): dark pixels may "
            "show one level too bright on some drivers",
            type(current).__name__,
        )
        return
    renderer._output_pass = ExactOutputPass(gamma=current.gamma, filter=current.filter)
