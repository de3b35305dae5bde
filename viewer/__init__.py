"""zarrscope's viewer: multiscale Zarr images on the GPU, tiles fed by a ChunkPool."""

from .app import Viewer
from .display import ChannelDisplay
from .layer import ImageLayer, LayerStatus
from .slicing import Plane
from .tiling import PlaneLevel, View, choose_level, plan_tiles, tiles_to_keep

__all__ = [
    "ChannelDisplay",
    "ImageLayer",
    "LayerStatus",
    "Plane",
    "PlaneLevel",
    "View",
    "Viewer",
    "choose_level",
    "plan_tiles",
    "tiles_to_keep",
]
