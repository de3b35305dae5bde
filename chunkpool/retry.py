"""Reading from remote stores despite flaky networks: timeouts, retries with backoff.

A request that times out, is reset, or gets a 5xx / 429 answer is tried again after an
exponentially growing, jittered delay; a permanent failure (403, 400, ...) is not. When
the attempts run out, the read fails with a :class:`~chunkpool.errors.ChunkReadError`
whose message names the key and the cause, never credentials (the store is named by
its redacted display name, and the original exception, which may quote a signed URL,
is not chained).
"""

from __future__ import annotations

import asyncio
import random
import sys
from dataclasses import dataclass
from typing import Any

from .errors import ChunkReadError
from .stores import describe_error

__all__ = ["RetryPolicy", "get_with_retries", "is_transient"]


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try: ``attempts`` in all, each limited to ``timeout`` seconds, the
    delay between attempts doubling from ``base_delay`` up to ``max_delay``."""

    attempts: int = 4
    timeout: float = 30.0
    base_delay: float = 0.2
    max_delay: float = 3.0

    def delay(self, attempt: int) -> float:
        """The pause before retry number ``attempt`` (1-based), with 0-50% jitter."""
        base = min(self.max_delay, self.base_delay * 2 ** (attempt - 1))
        return base * (1 + 0.5 * random.random())


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


async def get_with_retries(
    store: Any, key: str, prototype: Any, byte_range: Any, policy: RetryPolicy, name: str
) -> Any:
    """``store.get(key, ...)`` with a timeout per attempt and retries on transient
    errors. Raises ChunkReadError (naming ``name``/``key``) when it gives up."""
    attempt = 1
    while True:
        try:
            return await asyncio.wait_for(store.get(key, prototype, byte_range), policy.timeout)
        except Exception as err:
            transient = is_transient(err)
            if not transient or attempt >= policy.attempts:
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                message = f"{name}/{key}: {describe_error(err)}{tries}"
                raise ChunkReadError(message) from None
        await asyncio.sleep(policy.delay(attempt))
        attempt += 1
