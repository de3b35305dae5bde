"""Label IDs: their colours, and their exact form on the GPU (no GPU needed here).

A label image stores integer IDs up to 64 bits; a float32 texture would merge IDs above
2**24, and WGSL has no 64-bit integers. So an ID travels in integer textures
(:func:`label_texture_data`): uint8/16/32 as they are (``r8uint`` .. ``r32uint``, read as
one ``u32``), int8/16/32 likewise (``r8sint`` .. ``r32sint``, sign-extended to 64 bits in
the shader), uint64/int64 as two ``u32`` words, low then high (``rg32uint``; int64 by
its two's-complement bits).

**Colours** (:func:`label_colors`). The colour of an ID is a function of its 64-bit
two's-complement value alone, so it is the same at every pyramid level, in every
session, and for the same value in any integer dtype (int32 -1 and int64 -1 alike):

* 0 is the background: transparent (alpha 0).
* Any other ID is hashed with integer-only arithmetic on its two 32-bit words,
  ``h = fmix32(lo ^ fmix32(hi ^ 0x9E3779B9))`` (``fmix32`` is MurmurHash3's finaliser,
  a bijection of u32, so IDs that differ only in their low word never collide in ``h``),
  and ``h >> 26`` picks one of the 64 colours of :data:`PALETTE`, opaque.
* :data:`PALETTE` is a fixed table of 64 well-separated colours: greedy farthest-point
  sampling in CIELAB (CIE76 distance) over the sRGB grid of step 17, restricted to
  lightness 40..90 and chroma >= 30, so that no label colour is near grey or black (they
  must stand out over a grey image) and any two palette colours are at least 20 dE apart
  (``tests/test_labels.py`` regenerates it). Like napari's cyclic label colormap, two
  IDs share a colour with probability 1/64; unlike a continuous hash -> hue, two
  different colours are never nearly equal.

The shader (:mod:`viewer.materials`) computes exactly the same hash on the same words
(u32 arithmetic wraps in WGSL as it does in numpy), so the colours on screen equal
:func:`label_colors` bit for bit: the WGSL is generated from this module
(:data:`WGSL_LABEL_COLOR`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "LABEL_TEXTURE_FORMATS",
    "LABEL_WORDS_FORMAT",
    "PALETTE",
    "WGSL_LABEL_COLOR",
    "join_uint64",
    "label_colors",
    "label_texture_data",
    "label_texture_format",
    "label_words",
    "split_uint64",
]

#: The label colours as 0xRRGGBB, in the order the hash indexes them (see the module).
PALETTE: tuple[int, ...] = (
    0x8800FF, 0x00FF00, 0xFF3300, 0x66CCEE, 0x777700, 0xAA3377, 0x00FFBB, 0x0066DD,
    0xFFAA99, 0xFFDD00, 0xFF11DD, 0x007755, 0xEEBBFF, 0x009900, 0xCCEE99, 0xFF9933,
    0xFF0066, 0x336699, 0xAA4422, 0xAAEE33, 0xBB66DD, 0x33FF77, 0x5555FF, 0x11CCBB,
    0x77AAFF, 0xDDBB55, 0xFF7799, 0xFF33AA, 0x995555, 0xAA8855, 0x55BB77, 0x9911CC,
    0x9966AA, 0xCC0022, 0xAABB22, 0x337722, 0xFF88DD, 0x008899, 0x88DD66, 0xFF7766,
    0x885500, 0x556633, 0xCC88AA, 0xEECC99, 0x22CC00, 0x99AA66, 0xDD00FF, 0xBB11AA,
    0xBB2244, 0x9988EE, 0xDD5511, 0xDD8855, 0x99DDBB, 0xFFBB22, 0x00CC66, 0x11EEFF,
    0x5555AA, 0xBB8800, 0x7744CC, 0x669911, 0xDD3377, 0xEE66FF, 0x3399CC, 0x0077CC,
)  # fmt: skip

#: Bits of the hash that index :data:`PALETTE` (its top ones: the best mixed).
PALETTE_SHIFT = 26
#: Mixed into the high word, so that ``hi == 0`` does not hash as a fixed point.
HIGH_SEED = 0x9E3779B9

_PALETTE_RGBA = np.array(
    [((c >> 16) & 255, (c >> 8) & 255, c & 255, 255) for c in PALETTE], dtype=np.uint8
)
assert len(PALETTE) == 1 << (32 - PALETTE_SHIFT)


def _fmix32(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finaliser, elementwise on a uint32 array (wrapping)."""
    x = x ^ (x >> np.uint32(16))
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> np.uint32(13))
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> np.uint32(16))


def label_words(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (low, high) uint32 words of the 64-bit two's-complement value of each ID.

    Raises TypeError for a non-integer array (a float "label" image is not one)."""
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iub":
        raise TypeError(f"label IDs must be integers, not {ids.dtype}")
    if ids.dtype.kind == "u":
        bits = ids.astype(np.uint64, copy=False)
    else:  # sign-extended to 64 bits, then its two's-complement bits
        bits = ids.astype(np.int64, copy=False).view(np.uint64)
    lo = (bits & np.uint64(0xFFFFFFFF)).astype(np.uint32)
    hi = (bits >> np.uint64(32)).astype(np.uint32)
    return lo, hi


def label_colors(ids: np.ndarray) -> np.ndarray:
    """The sRGB colour of each label ID as an ``(..., 4)`` uint8 RGBA array: 0 is
    transparent (0, 0, 0, 0), any other ID an opaque colour of :data:`PALETTE` chosen by
    a hash of its 64-bit value (see the module). Any integer dtype; bool counts as 0/1."""
    lo, hi = label_words(ids)
    with np.errstate(over="ignore"):
        h = _fmix32(lo ^ _fmix32(hi ^ np.uint32(HIGH_SEED)))
    colors = _PALETTE_RGBA[(h >> np.uint32(PALETTE_SHIFT)).astype(np.intp)]
    colors[(lo == 0) & (hi == 0)] = 0
    return colors


def split_uint64(plane: np.ndarray) -> np.ndarray:
    """An (H, W) uint64 or int64 plane as (H, W, 2) uint32 words (low, high): the data
    of an ``rg32uint`` texture. int64 is taken by its two's-complement bits."""
    plane = np.asarray(plane)
    if plane.dtype not in (np.dtype(np.uint64), np.dtype(np.int64)):
        raise TypeError(f"split_uint64 takes uint64 or int64, not {plane.dtype}")
    lo, hi = label_words(plane)
    return np.stack([lo, hi], axis=-1)


def join_uint64(words: np.ndarray, dtype: np.dtype | type = np.uint64) -> np.ndarray:
    """The reverse of :func:`split_uint64`: (..., 2) uint32 (low, high) words as one
    uint64 (or, with ``dtype=np.int64``, int64) value each."""
    words = np.asarray(words, dtype=np.uint32)
    if words.shape[-1] != 2:
        raise ValueError(f"expected (..., 2) words, got shape {words.shape}")
    value = words[..., 0].astype(np.uint64) | (words[..., 1].astype(np.uint64) << np.uint64(32))
    return value.view(np.dtype(dtype)) if np.dtype(dtype) == np.int64 else value


def label_texture_data(plane: np.ndarray) -> np.ndarray:
    """A 2D label plane as the contiguous array its texture is made of: 8-, 16- and
    32-bit integers as they are (one word per texel: ``r8uint`` .. ``r32sint``, read
    as u32 / sign-extended i32 by the shader), bool as uint8, uint64/int64 as uint32
    (H, W, 2) words (``rg32uint``). See :data:`LABEL_TEXTURE_FORMATS`.

    Raises TypeError for a non-integer plane, ValueError for one that is not 2D."""
    plane = np.asarray(plane)
    if plane.ndim != 2:
        raise ValueError(f"a label plane is 2D, got shape {plane.shape}")
    if plane.dtype.kind not in "iub":
        raise TypeError(f"label IDs must be integers, not {plane.dtype}")
    if plane.dtype.itemsize == 8:
        return split_uint64(plane)
    if plane.dtype == np.bool_:
        return np.ascontiguousarray(plane, dtype=np.uint8)
    return np.ascontiguousarray(plane)


#: The texture format of each array :func:`label_texture_data` makes (by its dtype):
#: integer formats, never normalised or float ones.
LABEL_TEXTURE_FORMATS = {
    np.dtype(np.uint8): "r8uint",
    np.dtype(np.uint16): "r16uint",
    np.dtype(np.uint32): "r32uint",
    np.dtype(np.int8): "r8sint",
    np.dtype(np.int16): "r16sint",
    np.dtype(np.int32): "r32sint",
}
#: The format of (H, W, 2) uint32 words (64-bit IDs).
LABEL_WORDS_FORMAT = "rg32uint"


def _wgsl_palette() -> str:
    rows = ", ".join(f"0x{c:06X}u" for c in PALETTE)
    return f"const LABEL_PALETTE = array<u32, {len(PALETTE)}>({rows});"


#: WGSL of ``label_color(lo, hi) -> vec4<u32>``: the sRGB RGBA (0..255) of an ID given
#: as its two 32-bit words, the same as :func:`label_colors` bit for bit.
WGSL_LABEL_COLOR = f"""
{_wgsl_palette()}

fn label_fmix32(x0: u32) -> u32 {{
    var x = x0;
    x = x ^ (x >> 16u);
    x = x * 0x85EBCA6Bu;
    x = x ^ (x >> 13u);
    x = x * 0xC2B2AE35u;
    return x ^ (x >> 16u);
}}

fn label_color(lo: u32, hi: u32) -> vec4<u32> {{
    if (lo == 0u && hi == 0u) {{
        return vec4<u32>(0u);
    }}
    let h = label_fmix32(lo ^ label_fmix32(hi ^ 0x{HIGH_SEED:08X}u));
    let c = LABEL_PALETTE[h >> {PALETTE_SHIFT}u];
    return vec4<u32>((c >> 16u) & 255u, (c >> 8u) & 255u, c & 255u, 255u);
}}
"""


def label_texture_format(data: np.ndarray) -> str:
    """The texture format of an array made by :func:`label_texture_data`."""
    return LABEL_WORDS_FORMAT if data.ndim == 3 else LABEL_TEXTURE_FORMATS[data.dtype]
