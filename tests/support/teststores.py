"""Zarr stores for tests that count, hold back or corrupt reads.

``GatedStore`` (synchronous reads, run in the pool's IO threads) and
``AsyncGatedStore`` (asynchronous reads, run on zarr's event loop) wrap a store and
record every chunk read that really happened, in order. Reads can be held at a gate
until the test releases them, which makes priority order and cancellation observable
by counting reads instead of timing them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

from zarr.abc.store import ByteRequest
from zarr.core.buffer import Buffer, BufferPrototype, default_buffer_prototype
from zarr.storage import WrapperStore


def _is_metadata(key: str) -> bool:
    return key.rsplit("/", 1)[-1] in ("zarr.json", ".zarray", ".zattrs", ".zgroup")


class _Recorder:
    """Shared bookkeeping: the gate, and the reads started and finished."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []
        self.gate = threading.Semaphore(0)
        self.gated = False
        self.delay = 0.0
        self.fail_keys: set[str] = set()

    def hold(self) -> None:
        """From now on, each chunk read waits for one :meth:`release`."""
        self.gated = True

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.gate.release()

    def open_gate(self) -> None:
        """Stop holding reads, and let every waiting one through."""
        self.gated = False
        self.gate.release(10_000)

    def wait_started(self, n: int, timeout: float = 10.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.started) >= n:
                    return list(self.started)
            time.sleep(0.002)
        raise TimeoutError(f"only {len(self.started)} of {n} reads started: {self.started}")


class GatedStore(WrapperStore):
    """A synchronous store wrapper that records, delays, gates or fails chunk reads."""

    def __init__(self, store: Any, recorder: _Recorder | None = None):
        super().__init__(store)
        self.rec = recorder or _Recorder()

    def _with_store(self, store: Any) -> GatedStore:
        return type(self)(store, self.rec)

    def _before(self, key: str) -> None:
        rec = self.rec
        with rec.lock:
            rec.started.append(key)
        if rec.delay:
            time.sleep(rec.delay)
        if rec.gated:
            rec.gate.acquire()
        if key in rec.fail_keys:
            raise OSError(f"injected failure reading {key}")

    def get_sync(
        self,
        key: str,
        *,
        prototype: BufferPrototype | None = None,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        if not _is_metadata(key):
            self._before(key)
        result = self._store.get_sync(
            key, prototype=prototype or default_buffer_prototype(), byte_range=byte_range
        )
        if not _is_metadata(key):
            with self.rec.lock:
                self.rec.finished.append(key)
        return result


class AsyncGatedStore(WrapperStore):
    """An asynchronous store wrapper (no ``get_sync``): reads run on zarr's loop, and a
    cancelled read is recorded as such."""

    def __init__(self, store: Any, recorder: _Recorder | None = None):
        super().__init__(store)
        self.rec = recorder or _Recorder()

    def _with_store(self, store: Any) -> AsyncGatedStore:
        return type(self)(store, self.rec)

    async def get(
        self,
        key: str,
        prototype: BufferPrototype,
        byte_range: ByteRequest | None = None,
    ) -> Buffer | None:
        if _is_metadata(key):
            return await self._store.get(key, prototype, byte_range)
        rec = self.rec
        with rec.lock:
            rec.started.append(key)
        try:
            if rec.delay:
                await asyncio.sleep(rec.delay)
            while rec.gated and not rec.gate.acquire(blocking=False):
                await asyncio.sleep(0.002)
            if key in rec.fail_keys:
                raise OSError(f"injected failure reading {key}")
            result = await self._store.get(key, prototype, byte_range)
        except asyncio.CancelledError:
            with rec.lock:
                rec.cancelled.append(key)
            raise
        with rec.lock:
            rec.finished.append(key)
        return result
