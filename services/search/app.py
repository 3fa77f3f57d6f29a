"""The search proxy HTTP service.

argus search serve --provider offline --cache-mode cache-first --port 8090
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from argus.config import SearchSettings
from argus.data.search_index import image_phash
from services.search import models as m
from services.search.cache import CacheStore, RedisStore, make_store
from services.search.metrics import SearchMetrics
from services.search.providers import SearchProvider, Unsupported, UpstreamError, make_provider
from services.search.proxy import BudgetExceeded, ReplayMiss, SearchProxy, decode_image
from services.search.render import render_images, render_web, retrieval_contents

RunId = Header(default="default", alias="X-Argus-Run-Id", max_length=256)


def create_app(
    settings: SearchSettings | None = None, provider: SearchProvider | None = None, store: CacheStore | None = None
) -> FastAPI:
    settings = settings or SearchSettings()
    metrics = SearchMetrics()
    # Built here, not at first request: a missing index or API key fails the start with its reason.
    proxy = SearchProxy(settings, provider or make_provider(settings), store or make_store(settings), metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if isinstance(proxy.store, RedisStore):
            await proxy.store.ping()
        try:
            yield
        finally:
            await proxy.provider.aclose()
            await proxy.store.aclose()

    app = FastAPI(title="Argus search proxy", version="1", lifespan=lifespan)
    app.state.proxy = proxy

    def reply(status: int, detail: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": [{"loc": list(e.get("loc", ())), "msg": e.get("msg", "")} for e in exc.errors()]},
            status_code=422,
        )

    @app.exception_handler(ReplayMiss)
    async def _miss(_r: Request, exc: ReplayMiss) -> JSONResponse:
        return reply(404, str(exc))

    @app.exception_handler(BudgetExceeded)
    async def _budget(_r: Request, exc: BudgetExceeded) -> JSONResponse:
        return reply(429, str(exc))

    @app.exception_handler(Unsupported)
    async def _unsupported(_r: Request, exc: Unsupported) -> JSONResponse:
        return reply(400, str(exc))

    @app.exception_handler(UpstreamError)
    async def _upstream(_r: Request, exc: UpstreamError) -> JSONResponse:
        # Search-R1's client retries 5xx; after our own retries an upstream 429 is still "try later".
        return reply(503 if exc.retryable else 502, str(exc), **({"Retry-After": "5"} if exc.retryable else {}))

    @app.middleware("http")
    async def _timing(request: Request, call_next: Callable[[Request], Awaitable[Any]]) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        path = request.url.path
        if path not in ("/metrics", "/healthz"):
            metrics.latency.labels(endpoint=path).observe(time.perf_counter() - started)
            metrics.requests.labels(endpoint=path, outcome=str(response.status_code)).inc()
        return response

    def check_query(query: str) -> str:
        if not query.strip():
            raise HTTPException(400, "query is empty")
        if len(query) > settings.max_query_chars:
            raise HTTPException(400, f"query is {len(query)} characters; the limit is {settings.max_query_chars}")
        return query

    def check_backend(name: str | None) -> None:
        if name is not None and name != proxy.provider.name:
            raise HTTPException(400, f"unknown backend {name!r}: this proxy serves {proxy.provider.name!r}")

    def check_top_k(k: int) -> int:
        if k > settings.max_top_k:
            raise HTTPException(422, f"top_k {k} is over the limit of {settings.max_top_k}")
        return k

    @app.post("/v1/search")
    async def search(req: m.SearchRequest, run_id: str = RunId) -> m.SearchResponse:
        check_backend(req.backend)
        query = check_query(req.query)
        hits, cached = await proxy.search(query, check_top_k(req.top_k), run_id)
        results = [h.result for h in hits]
        return m.SearchResponse(
            query=query,
            backend=proxy.provider.name,
            cached=cached,
            results=results,
            rendered=render_web(query, results),
        )

    @app.post("/v1/image_search")
    async def image_search(req: m.ImageSearchRequest, run_id: str = RunId) -> m.ImageSearchResponse:
        check_backend(req.backend)
        if (req.image is None) == (req.key is None):
            raise HTTPException(400, "give exactly one of 'image' (base64 bytes) or 'key' (a dataset key)")
        image = None
        if req.image is not None:
            try:
                image = decode_image(req.image, settings.max_image_bytes)
                image_phash(image)  # rejects bytes that are not an image before any upstream call
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
        try:
            results, cached = await proxy.image_search(image, req.key, check_top_k(req.top_k), run_id)
        except LookupError as exc:
            if isinstance(exc, ReplayMiss):
                raise
            raise HTTPException(404, str(exc).strip('"')) from None
        return m.ImageSearchResponse(
            backend=proxy.provider.name, cached=cached, results=results, rendered=render_images(results)
        )

    @app.post("/retrieve")
    async def retrieve(req: m.RetrieveRequest, run_id: str = RunId) -> m.RetrieveResponse:
        for q in req.queries:
            check_query(q)
        check_top_k(req.topk)
        found = await asyncio.gather(*(proxy.search(q, req.topk, run_id) for q in req.queries))
        out: list[list[dict[str, Any]]] = []
        for hits, _cached in found:
            docs = [{"id": h.doc_id, "contents": retrieval_contents(h.result)} for h in hits]
            out.append(
                [{"document": d, "score": h.score} for d, h in zip(docs, hits, strict=True)]
                if req.return_scores
                else docs
            )
        return m.RetrieveResponse(result=out)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "backend": proxy.provider.name,
            "cache_mode": settings.cache_mode,
            "cache_store": settings.cache_store,
        }

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
