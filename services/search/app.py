"""The search proxy HTTP service.

argus search serve --provider offline --cache-mode cache-first --port 8090
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from argus.config import SearchSettings
from argus.data.search_index import image_phash
from services.asgi import (
    REPLACED_NOTE,
    BodyLimit,
    ClientGone,
    Timed,
    error_responses,
    safe_text,
    unless_disconnected,
    validation_failed,
)
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
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # chunked bodies included

    def client_of(request: Request, run_id: str) -> str:
        return run_id if run_id != "default" else (request.client.host if request.client else "unknown")

    def reply(status: int, detail: str, **headers: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status, headers=headers or None)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_failed(exc)

    @app.exception_handler(ReplayMiss)
    async def _miss(_r: Request, exc: ReplayMiss) -> JSONResponse:
        return reply(404, str(exc))

    @app.exception_handler(BudgetExceeded)
    async def _budget(_r: Request, exc: BudgetExceeded) -> JSONResponse:
        return reply(429, str(exc))

    @app.exception_handler(Unsupported)
    async def _unsupported(_r: Request, exc: Unsupported) -> JSONResponse:
        return reply(400, str(exc))

    @app.exception_handler(ClientGone)
    async def _gone(_r: Request, _exc: ClientGone) -> JSONResponse:
        return reply(499, "the client disconnected; its searches were cancelled")

    @app.exception_handler(UpstreamError)
    async def _upstream(_r: Request, exc: UpstreamError) -> JSONResponse:
        # Search-R1's client retries 5xx; after our own retries an upstream 429 is still "try later".
        return reply(503 if exc.retryable else 502, str(exc), **({"Retry-After": "5"} if exc.retryable else {}))

    def timed(path: str, status: int, seconds: float) -> None:
        if path not in ("/metrics", "/healthz"):
            metrics.latency.labels(endpoint=path).observe(seconds)
            metrics.requests.labels(endpoint=path, outcome=str(status)).inc()

    # Pure ASGI, not `@app.middleware("http")`: Starlette's BaseHTTPMiddleware hides a client's disconnect
    # from the endpoint, and /retrieve must see it to cancel the searches of a client that has gone.
    app.add_middleware(Timed, observe=timed)

    def check_query(query: str, notes: list[str]) -> str:
        if not query.strip():
            raise HTTPException(400, "query is empty")
        if len(query) > settings.max_query_chars:
            raise HTTPException(400, f"query is {len(query)} characters; the limit is {settings.max_query_chars}")
        query, replaced = safe_text(query)
        if replaced and REPLACED_NOTE not in notes:
            notes.append(REPLACED_NOTE)
        return query

    def check_backend(name: str | None) -> None:
        if name is not None and name != proxy.provider.name:
            raise HTTPException(400, f"unknown backend {name!r}: this proxy serves {proxy.provider.name!r}")

    def check_top_k(k: int) -> int:
        if k > settings.max_top_k:
            raise HTTPException(400, f"top_k {k} is over the limit of {settings.max_top_k}")
        return k

    search_errors = error_responses(400, 404, 413, 429, 499, 502, 503)

    @app.post("/v1/search", responses=search_errors)
    async def search(request: Request, req: m.SearchRequest, run_id: str = RunId) -> m.SearchResponse:
        check_backend(req.backend)
        notes: list[str] = []
        query = check_query(req.query, notes)
        top_k = check_top_k(req.top_k)
        hits, cached = await proxy.search(query, top_k, run_id, client_of(request, run_id))
        results = [h.result for h in hits]
        return m.SearchResponse(
            query=query,
            backend=proxy.provider.name,
            cached=cached,
            results=results,
            rendered=render_web(query, results),
            notes=notes,
        )

    @app.post("/v1/image_search", responses=search_errors)
    async def image_search(request: Request, req: m.ImageSearchRequest, run_id: str = RunId) -> m.ImageSearchResponse:
        check_backend(req.backend)
        if (req.image is None) == (req.key is None):
            raise HTTPException(400, "give exactly one of 'image' (base64 bytes) or 'key' (a dataset key)")
        image = None
        if req.image is not None:
            try:
                image = decode_image(req.image, settings.max_image_bytes)
                # Rejects bytes that are not an image, and images over the pixel limit (a decompression
                # bomb is a few KB of PNG), before anything is decoded or sent upstream.
                image_phash(image, settings.max_image_pixels)
            except ValueError as exc:
                raise HTTPException(400, str(exc)) from None
        key = safe_text(req.key)[0] if req.key is not None else None  # a key with a lone surrogate matches none
        top_k = check_top_k(req.top_k)
        try:
            results, cached = await proxy.image_search(image, key, top_k, run_id, client_of(request, run_id))
        except LookupError as exc:
            if isinstance(exc, ReplayMiss):
                raise
            raise HTTPException(404, str(exc).strip('"')) from None
        return m.ImageSearchResponse(
            backend=proxy.provider.name, cached=cached, results=results, rendered=render_images(results)
        )

    @app.post("/retrieve", responses=search_errors)
    async def retrieve(request: Request, req: m.RetrieveRequest, run_id: str = RunId) -> m.RetrieveResponse:
        if len(req.queries) > settings.max_retrieve_queries:
            raise HTTPException(
                413,
                f"{len(req.queries)} queries in one request; the limit is {settings.max_retrieve_queries} "
                "(ARGUS_SEARCH_MAX_RETRIEVE_QUERIES): send them in batches",
            )
        notes: list[str] = []
        queries = [check_query(q, notes) for q in req.queries]
        top_k = check_top_k(req.topk)
        client = client_of(request, run_id)
        found: list[Any] = [None] * len(queries)
        pending = iter(enumerate(queries))

        async def worker() -> None:
            # A few workers per request, not one task per query: thousands of queries never flood the
            # event loop, and each worker yields after every query (a cache hit never suspends).
            for i, q in pending:
                found[i] = await proxy.search(q, top_k, run_id, client)
                await asyncio.sleep(0)

        workers = asyncio.gather(*(worker() for _ in range(min(settings.client_concurrency, len(queries)))))
        # Queued searches of a client that has gone are cancelled, not left to run for nobody.
        await unless_disconnected(request.is_disconnected, workers)
        out: list[list[dict[str, Any]]] = []
        for hits, _cached in found:
            docs = [{"id": h.doc_id, "contents": retrieval_contents(h.result)} for h in hits]
            out.append(
                [{"document": d, "score": h.score} for d, h in zip(docs, hits, strict=True)]
                if req.return_scores
                else docs
            )
        return m.RetrieveResponse(result=out, notes=notes)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        return {
            "status": "ok",
            "backend": proxy.provider.name,
            "cache_mode": settings.cache_mode,
            "cache_store": settings.cache_store,
        }

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
