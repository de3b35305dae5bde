"""Reading from remote stores despite flaky networks: timeouts, retries with backoff.

A request that times out, is reset, or gets a 5xx / 429 answer is tried again after an
exponentially growing, jittered delay; a permanent failure (403, 400, ...) is not. When
the attempts run out, the read fails with a :class:`~chunkpool.errors.ChunkReadError`
whose message names the key and the cause, never credentials (the store is named by
its redacted display name, and the original exception, which may quote a signed URL,
is neither chained nor kept as context).

One mechanism serves every remote read: :class:`~chunkpool.stores.RemoteStore` sends
each of its reads (metadata while opening, chunks while loading) through
:func:`call_with_retries`. A policy may also carry a ``deadline`` that bounds all the
reads of a one-shot job together (``zarrscope --screenshot --timeout``).
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from .errors import ChunkReadError
from .redaction import describe_error

__all__ = ["RetryPolicy", "call_with_retries", "is_transient"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, each limited to ``timeout`` seconds, the
    delay between attempts doubling from ``base_delay`` up to ``max_delay``.

    ``deadline`` (a :func:`time.monotonic` value, or None) is a time no read goes
    past: an attempt is cut at it, and no attempt or pause starts that would end after
    it. It bounds a whole job, whatever the number of reads.
    """

    attempts: int = 4
    timeout: float = 30.0
    base_delay: float = 0.2
    max_delay: float = 3.0
    deadline: float | None = None

    def delay(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (1-based), with 0-50% jitter."""
        base = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return base * (1 + 0.5 * random.random())

    def remaining(self) -> float:
        """Seconds left before the deadline (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def is_transient(err: BaseException) -> bool:
    """Whether trying again may succeed: timeouts, connection errors, 5xx, 408, 429."""
    status = _http_status(err)
    if status is not None:
        return status >= 500 or status in (408, 429)
    if isinstance(err, PermissionError | FileNotFoundError | NotImplementedError):
        return False
    if isinstance(err, TimeoutError | ConnectionError):
        return True
    if type(err).__module__.startswith("obstore"):
        return False  # obstore stores retry transient errors themselves (10 times)
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(err, aiohttp.ClientError):
        return True
    return isinstance(err, OSError)


def _http_status(err: BaseException) -> int | None:
    status = getattr(err, "status", None)  # aiohttp.ClientResponseError
    if isinstance(status, int):
        return status
    response = getattr(err, "response", None)  # botocore ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        return code if isinstance(code, int) else None
    return None


async def call_with_retries(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """``await call()`` with a timeout per attempt and retries on transient errors.

    ``what`` names the read in the error (``"<store name>/<key>"``, no credentials).
    Raises :class:`ChunkReadError` when it gives up: a permanent error, the attempts
    used up, or the policy's deadline reached. Cancellation is never retried.
    """
    attempt = 0
    reason = "timed out"  # if the deadline leaves no time for a first attempt
    while attempt < policy.attempts:
        if attempt:
            pause = policy.delay(attempt)
            if pause >= policy.remaining():
                break
            await asyncio.sleep(pause)
        timeout = min(policy.timeout, policy.remaining())
        if timeout <= 0:
            break
        attempt += 1
        try:
            return await asyncio.wait_for(call(), timeout)
        except Exception as err:
            reason = describe_error(err)
            if not is_transient(err):
                break
    if attempt > 1:
        reason = f"{reason} after {attempt} attempts"
    # raised outside the handler: the library's exception is neither cause nor context
    raise ChunkReadError(f"{what}: {reason}", reason=reason)
