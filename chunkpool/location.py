"""ChunkLocation: one chunk of one level, its refs, its data and its lifetime state.

A location is created when a chunk is first requested and lives until it is
destroyed (its last ref dropped and the cache did not keep it, or the pool was
destroyed). Its fields are owned by the pool and change only under the pool's lock;
the public properties are safe to read from any thread.
"""

from __future__ import annotations

import concurrent.futures
import enum
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ChunkCancelledError, ChunkLoadError, ChunkPoolError
from .info import ScaleInfo
from .scheduler import JobState, LoadJob

if TYPE_CHECKING:
    from .pool import ChunkPool

__all__ = ["TRANSITIONS", "ChunkKey", "ChunkLocation", "ChunkState", "Handler"]

ChunkKey = tuple[int, tuple[int, ...]]
Handler = Callable[["ChunkLocation"], Any]


class ChunkState(enum.Enum):
    """Where a chunk is in its life (see "Chunk state: one owner" in the README)."""

    # members are singletons compared by identity: hash them so too, in C (Enum's own
    # __hash__ is Python code, run at every checked move: thousands a second)
    __hash__ = object.__hash__

    PENDING = "pending"  # waiting in the pool's queue
    LOADING = "loading"  # being fetched or decoded
    LOADED = "loaded"
    FAILED = "failed"
    CANCELLED = "cancelled"  # lost its last ref before it loaded
    DESTROYED = "destroyed"  # released by the pool after it loaded or failed


#: The moves a chunk's stored state may make; the pool makes them, and only the pool
#: (``ChunkPool._move``), under its lock. LOADING is not stored: a PENDING chunk is
#: LOADING while its load job is past the scheduler's queue (the job's own progress,
#: which only the scheduler writes). A reload (refresh) keeps a chunk LOADED.
TRANSITIONS: dict[ChunkState, frozenset[ChunkState]] = {
    ChunkState.PENDING: frozenset({ChunkState.LOADED, ChunkState.FAILED, ChunkState.CANCELLED}),
    ChunkState.LOADED: frozenset({ChunkState.DESTROYED}),
    ChunkState.FAILED: frozenset({ChunkState.DESTROYED}),
    ChunkState.CANCELLED: frozenset(),
    ChunkState.DESTROYED: frozenset(),
}


class _RefEntry:
    """What one ref registered on a chunk, when it registered a load or drop handler
    (a ref without either is held as its priority alone: see ``_refs``)."""

    __slots__ = ("drop_handler", "load_handler", "priority")

    def __init__(self, priority: float, load_handler: Handler | None, drop_handler: Handler | None):
        self.priority = priority
        self.load_handler = load_handler
        self.drop_handler = drop_handler


def _priority_of(entry: float | _RefEntry) -> float:
    """The priority of a ref's registration (a value of ``ChunkLocation._refs``)."""
    return entry.priority if type(entry) is _RefEntry else entry


def _load_handlers(refs: dict[str, float | _RefEntry]) -> dict[str, Handler] | None:
    """The load handlers registered among ``refs`` (ref -> handler), None if none."""
    handlers = None
    for r, e in refs.items():
        if type(e) is _RefEntry and e.load_handler is not None:
            if handlers is None:
                handlers = {}
            handlers[r] = e.load_handler
    return handlers


_PENDING = ChunkState.PENDING
_QUEUED = JobState.QUEUED


class ChunkLocation:
    """A chunk of a multiscale image: where it is, who uses it, and its data.

    Thousands are made per second, so a location is a slots object and its future is
    made only when someone asks for it (:attr:`future`, or :meth:`wait` on a chunk
    still loading).
    """

    __slots__ = (
        "__weakref__",
        "_cached_at",
        "_checked",
        "_data",
        "_destroy_handlers",
        "_error",
        "_future",
        "_held_bytes",
        "_index",
        "_job",
        "_nbytes",
        "_pool",
        "_refs",
        "_scale_info",
        "_seq",
        "_stamp",
        "_state",
        "_unfired_loads",
        "_waiting",
    )

    def __init__(
        self,
        pool: ChunkPool,
        scale_info: ScaleInfo,
        index: tuple[int, ...],
        nbytes: int | None = None,
    ):
        self._pool = pool
        self._scale_info = scale_info
        self._index = index
        self._nbytes = scale_info.chunk_nbytes(index) if nbytes is None else nbytes
        self._future: concurrent.futures.Future | None = None  # made on demand
        self._state = _PENDING
        self._data: np.ndarray | None = None
        self._error: BaseException | None = None
        # ref -> its priority (a number) or, with a load or drop handler, a _RefEntry:
        # the common ref without handlers adds no object, and a dict of numbers stays
        # untracked by the garbage collector (which walks every tracked object held)
        self._refs: dict[str, float | _RefEntry] = {}
        # made when first needed (None: none); fewer objects per chunk for the
        # garbage collector to track, which costs ~2 µs per chunk with thousands held
        self._destroy_handlers: dict[str, Handler] | None = None
        self._unfired_loads: dict[str, Handler] | None = None  # sync mode: fired by wait()
        self._job: LoadJob | None = None
        # bytes counted for it in memory_usage: data + ENTRY_OVERHEAD once loaded,
        # under a memory budget its reservation while its admitted load runs
        self._held_bytes = 0
        self._waiting = False  # a request waiting for room in its memory budget
        self._seq = 0  # request order, under a memory budget
        self._cached_at = 0  # cache order, while cached
        # the stored object's version when the data was read (local files; else None),
        # and when that was last checked (refresh revalidates the oldest checks first)
        self._stamp: tuple[int, int] | None = None
        self._checked = 0

    def __repr__(self) -> str:
        return f"<ChunkLocation level={self.level} index={self._index} {self.state.value}>"

    @property
    def scale_info(self) -> ScaleInfo:
        """The info of the level this chunk belongs to."""
        return self._scale_info

    @property
    def level(self) -> int:
        return self._scale_info.level

    @property
    def index(self) -> tuple[int, ...]:
        return self._index

    @property
    def key(self) -> ChunkKey:
        """``(level, index)``: the chunk's identity in the pool."""
        return (self._scale_info.level, self._index)

    @property
    def nbytes(self) -> int:
        """Size of the chunk's (uncompressed, cropped to the array) data in bytes."""
        return self._nbytes

    @property
    def slices(self) -> tuple[slice, ...]:
        """The region of the level's array that this chunk covers."""
        return self._scale_info.chunk_slices(self._index)

    @property
    def future(self) -> concurrent.futures.Future:
        """A future resolved with the data, or the load error; cancelled on cancel."""
        future = self._future
        return future if future is not None else self._pool._future_of(self)

    @property
    def state(self) -> ChunkState:
        state = self._state
        job = self._job
        if state is _PENDING and job is not None and job.state is not _QUEUED:
            return ChunkState.LOADING
        return state

    @property
    def loaded(self) -> bool:
        """Whether the data is available."""
        return self._data is not None

    @property
    def over_budget(self) -> bool:
        """Whether its load waits for room in the pool's memory budget (not started)."""
        return self._waiting

    @property
    def error(self) -> BaseException | None:
        """The exception of a failed load, else None."""
        return self._error

    @property
    def data(self) -> np.ndarray:
        """The chunk's data: a read-only numpy array, cropped to the array's bounds.

        Raises ChunkLoadError if the load failed, and ChunkPoolError (a RuntimeError
        too) if the data is not there yet.
        """
        data = self._data
        if data is not None:
            return data
        if self._error is not None:
            raise ChunkLoadError({self.key: self._error})
        raise _NotLoadedError(f"chunk {self.key} is {self.state.value}, not loaded")

    @property
    def refs(self) -> set[str]:
        """The refs that currently hold this chunk."""
        return set(self._refs)

    @property
    def priority(self) -> float:
        """The most urgent priority among the refs holding the chunk."""
        refs = self._refs
        if len(refs) == 1:
            for entry in refs.values():
                return _priority_of(entry)
        return min(map(_priority_of, refs.values()), default=0.0)

    def wait(self, timeout: float | None = None) -> np.ndarray:
        """Block until the chunk is loaded and return its data.

        Without async handlers, this is also where the chunk's load handlers run.
        Raises ChunkLoadError if the load failed, ChunkCancelledError if it was
        cancelled, TimeoutError on timeout.
        """
        if self._data is None and self._error is None:  # not loaded or failed (yet)
            try:
                self.future.result(timeout)
            except concurrent.futures.CancelledError:
                raise ChunkCancelledError(f"chunk {self.key} was cancelled") from None
            except concurrent.futures.TimeoutError:
                raise TimeoutError(f"chunk {self.key} did not load within {timeout} s") from None
            except Exception:
                pass  # a failed load: its handlers still run, then it raises below
        if self._unfired_loads:  # set before the data or error is (see ChunkPool)
            self._pool._fire_unfired_loads(self)
        return self.data


class _NotLoadedError(ChunkPoolError, RuntimeError):
    """Data accessed before the chunk loaded."""
