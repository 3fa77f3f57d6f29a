"""The proxy's logic: cache modes, coalescing, budget, rate limit, bounded concurrency, retries.

Modes: `live` (always upstream, nothing stored), `record` (always upstream, stored), `replay` (cache
only; a miss is an error naming the query), `cache-first` (cached if present, else upstream and
stored). A replayed run therefore makes no upstream call and returns exactly what was recorded.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from argus.config import SearchSettings
from services.search.cache import CacheStore, Entry, cache_key
from services.search.limits import Coalescer, FairShare, TokenBucket
from services.search.metrics import SearchMetrics
from services.search.models import ImageResult, WebResult
from services.search.providers import Hit, SearchProvider, UpstreamError


class ReplayMiss(LookupError):
    def __init__(self, kind: str, query: str):
        super().__init__(f"replay mode: no recorded {kind} result for {query!r}")


class BudgetExceeded(Exception):
    def __init__(self, run_id: str, budget: int):
        super().__init__(f"run {run_id!r} has used its budget of {budget} upstream search calls")


def _retryable(exc: BaseException) -> bool:
    return isinstance(exc, UpstreamError) and exc.retryable


class SearchProxy:
    def __init__(self, settings: SearchSettings, provider: SearchProvider, store: CacheStore, metrics: SearchMetrics):
        self.settings = settings
        self.provider = provider
        self.store = store
        self.metrics = metrics
        self.bucket = TokenBucket(settings.rate_limit_per_s, settings.rate_burst)
        self.concurrency = asyncio.Semaphore(settings.max_concurrency)
        self.coalescer = Coalescer(on_join=metrics.coalesced.inc)
        # Per client, around the upstream work only: cache hits and joins of an identical query in
        # flight never wait behind another client's queue.
        self.fair = FairShare(settings.client_concurrency)

    async def _upstream(self, run_id: str, client: str, call: Callable[[], Awaitable[Any]]) -> Any:
        return await self.fair.run(client, lambda: self._call_upstream(run_id, call))

    async def _call_upstream(self, run_id: str, call: Callable[[], Awaitable[Any]]) -> Any:
        budget = self.settings.budget_per_run
        if budget is not None:
            used = await self.store.incr_budget(run_id)
            self.metrics.budget_used.labels(run_id=run_id).set(used)
            if used > budget:
                self.metrics.rejected.labels(reason="budget").inc()
                raise BudgetExceeded(run_id, budget)
        name = self.provider.name
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.settings.retries + 1),
            wait=wait_exponential_jitter(initial=self.settings.backoff_s, max=30),
            retry=retry_if_exception(_retryable),
            reraise=True,
        ):
            with attempt:
                if self.provider.paid:  # the rate limit protects a paid API, not our own index
                    await self.bucket.acquire()
                async with self.concurrency:
                    self.metrics.upstream_calls.labels(backend=name).inc()
                    started = time.perf_counter()
                    try:
                        return await call()
                    except UpstreamError as exc:
                        self.metrics.upstream_errors.labels(backend=name, status=str(exc.status)).inc()
                        raise
                    finally:
                        self.metrics.upstream_latency.labels(backend=name).observe(time.perf_counter() - started)
        raise AssertionError("unreachable")  # pragma: no cover - reraise=True

    async def _lookup(
        self,
        kind: str,
        query: str,
        params: dict[str, Any],
        run_id: str,
        client: str,
        call: Callable[[], Awaitable[Any]],
    ) -> tuple[Any, bool]:
        key = cache_key(kind, self.provider.name, query, params)
        mode = self.settings.cache_mode
        if mode in ("replay", "cache-first"):
            entry = await self.store.get(key)
            if entry is not None:
                self.metrics.cache.labels(kind=kind, result="hit").inc()
                return entry.value, True
            self.metrics.cache.labels(kind=kind, result="miss").inc()
            if mode == "replay":
                raise ReplayMiss(kind, query)

        async def fetch_and_store() -> Any:
            value = await self._upstream(run_id, client, call)
            if mode in ("record", "cache-first"):
                await self.store.put(
                    Entry(key=key, kind=kind, backend=self.provider.name, query=query, params=params, value=value)
                )
            return value

        return await self.coalescer.run(key, fetch_and_store), False

    async def search(self, query: str, top_k: int, run_id: str, client: str | None = None) -> tuple[list[Hit], bool]:
        """`client` is whom fairness counts (default: the run id)."""

        async def call() -> list[dict[str, Any]]:
            hits = await self.provider.search(query, top_k)
            return [{"result": h.result.model_dump(), "score": h.score, "doc_id": h.doc_id} for h in hits]

        value, cached = await self._lookup("search", query, {"top_k": top_k}, run_id, client or run_id, call)
        return [Hit(WebResult(**v["result"]), v["score"], v["doc_id"]) for v in value], cached

    async def image_search(
        self, image: bytes | None, key: str | None, top_k: int, run_id: str, client: str | None = None
    ) -> tuple[list[ImageResult], bool]:
        async def call() -> list[dict[str, Any]]:
            results = await self.provider.image_search(image, key, top_k)
            return [r.model_dump() for r in results]

        if key is not None:
            query, params = key, {"top_k": top_k, "by": "key"}
        else:
            assert image is not None
            query, params = hashlib.sha256(image).hexdigest(), {"top_k": top_k, "by": "image"}
        value, cached = await self._lookup("image_search", query, params, run_id, client or run_id, call)
        return [ImageResult(**v) for v in value], cached


def decode_image(b64: str, limit: int) -> bytes:
    """Base64 image bytes from a request, or ValueError with the reason."""
    if b64.startswith("data:"):
        header, comma, b64 = b64.partition(",")
        if not comma or not header.endswith(";base64"):
            raise ValueError("image data URI must be data:<type>;base64,<data>")
    try:
        data = base64.b64decode(b64, validate=True)
    except ValueError:
        raise ValueError("image is not valid base64") from None
    if not data:
        raise ValueError("image is empty")
    if len(data) > limit:
        raise ValueError(f"image is {len(data)} bytes; the limit is {limit}")
    return data
