"""Upstream protection: a token bucket per upstream and coalescing of identical in-flight queries."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `acquire` waits for a token."""

    def __init__(
        self,
        rate: float,
        burst: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ):
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self._clock = clock
        self._sleep = sleep
        self.updated = clock()
        self._lock = asyncio.Lock()

    async def acquire(self) -> float:
        """Take one token; returns how long it waited."""
        async with self._lock:
            now = self._clock()
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            wait = 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate
            if wait:
                await self._sleep(wait)
                self.tokens = 0.0
                self.updated = self._clock()
            else:
                self.tokens -= 1
            return wait


class Coalescer:
    """N identical concurrent requests make one upstream call; the others await its result."""

    def __init__(self, on_join: Callable[[], None] = lambda: None) -> None:
        self._inflight: dict[str, asyncio.Future[Any]] = {}
        self._on_join = on_join

    async def run(self, key: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        pending = self._inflight.get(key)
        if pending is not None:
            self._on_join()
            return await asyncio.shield(pending)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            value = await fn()
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: followers re-raise it themselves
            raise
        else:
            future.set_result(value)
            return value
        finally:
            del self._inflight[key]


class FairShare:
    """At most `per_client` searches in flight for each client, so that one client's thousands of queries
    wait behind each other instead of in front of everyone else's: another client always finds the
    shared upstream slots (and the cache) within a few of the big client's searches."""

    def __init__(self, per_client: int) -> None:
        self.per_client = per_client
        self._slots: dict[str, asyncio.Semaphore] = {}
        self._holders: dict[str, int] = {}

    async def run(self, client: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        slots = self._slots.setdefault(client, asyncio.Semaphore(self.per_client))
        self._holders[client] = self._holders.get(client, 0) + 1
        try:
            async with slots:
                return await fn()
        finally:
            self._holders[client] -= 1
            if not self._holders[client]:  # forget idle clients: run ids are unbounded
                del self._holders[client], self._slots[client]
