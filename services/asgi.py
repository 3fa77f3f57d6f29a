"""What both HTTP services need from their transport: a body limit that holds however the body is sent,
text that always encodes, and work that stops when its client has gone.

The limit is ASGI middleware rather than a check of `Content-Length`: a chunked body declares no length,
so it is counted as it arrives and refused with 413 as soon as it passes the limit, before the app (and
FastAPI's JSON parsing) sees any of it; at most the limit is ever held in memory.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable, MutableMapping
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

T = TypeVar("T")

LONE_SURROGATE = re.compile(r"[\ud800-\udfff]")  # a str that came through json.loads with "\ud800" alone
REPLACED_NOTE = "text held unpaired UTF-16 surrogates, which are not Unicode; each was replaced with U+FFFD"


def safe_text(text: str) -> tuple[str, bool]:
    """`text` with every unpaired surrogate replaced by U+FFFD (which UTF-8 can encode), and whether any
    was: a string JSON decoding produced from `"\\ud800"` cannot be encoded again, and would fail the
    response it is in."""
    cleaned, n = LONE_SURROGATE.subn("\ufffd", text)
    return cleaned, n > 0


class BodyLimit:
    """Refuse request bodies over `max_bytes` with 413, declared (`Content-Length`) or not (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)  # the server stops reading at the declared length
            return
        if headers.get(b"transfer-encoding") is None:
            await self.app(scope, receive, send)  # no body
            return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # the client went away; the app sees the disconnect next
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await self._refuse(send)  # what is still on the wire is never read
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        detail = json.dumps({"detail": f"request body over the {self.max_bytes}-byte limit"}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                # The rest of the body is not read, so this connection cannot carry another request.
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": detail})


async def unless_disconnected(
    is_disconnected: Callable[[], Awaitable[bool]], work: Awaitable[T], poll_s: float = 0.25
) -> T:
    """Await `work`, cancelling it as soon as the client that asked for it has disconnected (a request
    that queued minutes of searches must not go on after its client has gone)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await is_disconnected():
                task.cancel()
                raise ClientGone
    finally:
        if not task.done():
            task.cancel()


class ClientGone(Exception):
    """The client disconnected before its answer was ready; nobody is left to answer."""


class Timed:
    """Calls `observe(path, status, seconds)` for every HTTP request once its answer has started."""

    def __init__(self, app: ASGIApp, observe: Callable[[str, int, float], None]):
        self.app = app
        self.observe = observe

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.observe(str(scope.get("path", "")), status, time.perf_counter() - started)


class ErrorDetail(BaseModel):
    """Every 4xx and 5xx answer of the services: the reason, in words."""

    detail: str


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` for a route's error answers, so that the document says what clients get."""

    def phrase(code: int) -> str:
        return HTTPStatus(code).phrase if code in HTTPStatus._value2member_map_ else "Client Closed Request"  # 499

    return {code: {"model": ErrorDetail, "description": phrase(code)} for code in codes}


def validation_failed(exc: RequestValidationError) -> JSONResponse:
    """A 422 in FastAPI's documented shape (loc, msg, type per error), without echoing the input back."""
    errors = [{"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")} for e in exc.errors()]
    return JSONResponse({"detail": errors}, status_code=422)
