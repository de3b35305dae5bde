"""zarrscope's viewer: multiscale Zarr images as layers on the GPU, tiles fed by ChunkPools."""

from .app import Viewer, is_rgb
from .camera import Camera
from .display import ChannelDisplay
from .hud import HudInfo, hud_lines
from .layer import ImageLayer, Layer
from .slicing import Plane
from .state import LayerState, ViewState
from .textures import TextureBudget
from .tileset import ChannelTile, ChunkKey, Tile, TileSet, TileStatus
from .tiling import PlaneLevel, View, choose_level, plan_tiles, tiles_to_keep

__all__ = [
    "Camera",
    "ChannelDisplay",
    "ChannelTile",
    "ChunkKey",
    "HudInfo",
    "ImageLayer",
    "Layer",
    "LayerState",
    "Plane",
    "PlaneLevel",
    "TextureBudget",
    "Tile",
    "TileSet",
    "TileStatus",
    "View",
    "ViewState",
    "Viewer",
    "choose_level",
    "hud_lines",
    "is_rgb",
    "plan_tiles",
    "tiles_to_keep",
]
