"""chunkpool: a ref-counted, prioritised, cancellable pool of Zarr chunks.

See ``chunkpool/README.md`` for the design.
"""

from .budget import ENTRY_OVERHEAD, MemoryBudget
from .errors import (
    ChunkCancelledError,
    ChunkDecodeError,
    ChunkIndexError,
    ChunkLoadError,
    ChunkPoolError,
    ChunkReadError,
    DecodeWorkerError,
    EventLoopError,
    MemoryBudgetError,
    PoolDestroyedError,
    SourceError,
)
from .follow import follow
from .info import Axis, ChannelInfo, MultiscaleInfo, ScaleInfo
from .kpi import KpiLog, LoadRecord
from .location import ChunkLocation, ChunkState
from .manager import ChunkManager
from .metadata import read_multiscales
from .pool import ChunkPool
from .refresh import Changes
from .retry import RetryPolicy
from .stats import LinkEstimate, PoolStats
from .stores import open_node

__all__ = [
    "ENTRY_OVERHEAD",
    "Axis",
    "Changes",
    "ChannelInfo",
    "ChunkCancelledError",
    "ChunkDecodeError",
    "ChunkIndexError",
    "ChunkLoadError",
    "ChunkLocation",
    "ChunkManager",
    "ChunkPool",
    "ChunkPoolError",
    "ChunkReadError",
    "ChunkState",
    "DecodeWorkerError",
    "EventLoopError",
    "KpiLog",
    "LinkEstimate",
    "LoadRecord",
    "MemoryBudget",
    "MemoryBudgetError",
    "MultiscaleInfo",
    "PoolDestroyedError",
    "PoolStats",
    "RetryPolicy",
    "ScaleInfo",
    "SourceError",
    "follow",
    "open_node",
    "read_multiscales",
]
