"""Search providers behind one interface: SerpAPI (Google web and reverse image), Brave, offline.

Backends do one upstream call each and raise `UpstreamError` for failures; rate limits, retries,
coalescing, budgets and the cache are the proxy's job (`services/search/proxy.py`). API keys travel
only in the request to the upstream: they are never logged and never part of an error message.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from argus.config import SearchSettings
from argus.data.search_index import OfflineIndex
from services.search.models import ImageResult, WebResult

log = logging.getLogger("argus.search")
# httpx logs request URLs at INFO, and SerpAPI puts the key in the URL.
logging.getLogger("httpx").setLevel(logging.WARNING)

_TAG = re.compile(r"<[^>]+>")


class UpstreamError(Exception):
    def __init__(self, provider: str, status: int, message: str, *, retryable: bool):
        self.provider = provider
        self.status = status
        self.retryable = retryable
        super().__init__(f"{provider}: {message}")


class Unsupported(Exception):
    """The provider cannot do this kind of search (answered as 400)."""


@dataclass(frozen=True)
class Hit:
    result: WebResult
    score: float
    doc_id: str


ImageHost = Callable[[bytes], Awaitable[str]]


class SearchProvider(abc.ABC):
    name: str
    paid = True  # an upstream API with a quota: rate-limited; a local index is not

    @abc.abstractmethod
    async def search(self, query: str, k: int) -> list[Hit]: ...

    async def image_search(self, image: bytes | None, key: str | None, k: int) -> list[ImageResult]:
        raise Unsupported(f"provider '{self.name}' has no image search")

    async def aclose(self) -> None:  # noqa: B027 - optional hook
        pass


class _HTTPProvider(SearchProvider):
    def __init__(self, settings: SearchSettings, api_key: str | None):
        if not api_key:
            raise ValueError(
                f"provider '{self.name}' needs an API key (ARGUS_SEARCH_API_KEY_FILE or ARGUS_SEARCH_API_KEY)"
            )
        self._key = api_key
        self._client = httpx.AsyncClient(timeout=settings.upstream_timeout_s, follow_redirects=True)

    async def _get(self, url: str, params: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        try:
            resp = await self._client.get(url, params=params, headers=headers)
        except httpx.TransportError as exc:
            # The exception text can contain the URL (and so the key): report only its kind.
            raise UpstreamError(
                self.name, 502, f"upstream unreachable ({type(exc).__name__})", retryable=True
            ) from None
        if resp.status_code == 429 or resp.status_code >= 500:
            raise UpstreamError(self.name, resp.status_code, f"upstream answered {resp.status_code}", retryable=True)
        try:
            data = resp.json()
        except ValueError:
            raise UpstreamError(
                self.name, 502, f"upstream answered {resp.status_code} with non-JSON", retryable=False
            ) from None
        if resp.status_code >= 400:
            detail = data.get("error") if isinstance(data, dict) else None
            raise UpstreamError(
                self.name, 502, f"upstream answered {resp.status_code}: {self._redact(detail)}", retryable=False
            )
        return data

    def _redact(self, text: object) -> str:
        return str(text).replace(self._key, "***") if text else "no detail"

    async def fetch_image(self, url: str | None, limit: int = 5 << 20) -> str | None:
        """Best effort: thumbnails make image results useful to a VL model."""
        if not url:
            return None
        try:
            resp = await self._client.get(url)
            if resp.status_code == 200 and len(resp.content) <= limit:
                return base64.b64encode(resp.content).decode()
        except httpx.HTTPError:
            pass
        return None

    async def aclose(self) -> None:
        await self._client.aclose()


class SerpAPIProvider(_HTTPProvider):
    """Google web search and Google reverse image search through SerpAPI."""

    name = "serpapi"

    def __init__(self, settings: SearchSettings, api_key: str | None, image_host: ImageHost | None = None):
        super().__init__(settings, api_key)
        self.url = settings.serpapi_url
        self.image_host = image_host

    async def search(self, query: str, k: int) -> list[Hit]:
        data = await self._get(self.url, {"engine": "google", "q": query, "num": k, "api_key": self._key})
        if "error" in data:
            if "hasn't returned any results" in str(data["error"]):
                return []
            raise UpstreamError(self.name, 502, self._redact(data["error"]), retryable=False)
        hits = []
        for i, item in enumerate(data.get("organic_results", [])[:k], 1):
            result = WebResult(
                title=item.get("title", ""),
                link=item.get("link", ""),
                snippet=item.get("snippet", ""),
                date=item.get("date"),
            )
            hits.append(Hit(result, score=1.0 / i, doc_id=result.link))
        return hits

    async def image_search(self, image: bytes | None, key: str | None, k: int) -> list[ImageResult]:
        if image is None:
            raise Unsupported("serpapi image search needs an image, not a dataset key")
        if self.image_host is None:
            raise Unsupported("serpapi reverse image search needs a URL for the image: set ARGUS_SEARCH_IMAGE_BUCKET")
        image_url = await self.image_host(image)
        data = await self._get(
            self.url, {"engine": "google_reverse_image", "image_url": image_url, "api_key": self._key}
        )
        if "error" in data:
            if "hasn't returned any results" in str(data["error"]):
                return []
            raise UpstreamError(self.name, 502, self._redact(data["error"]), retryable=False)
        items = (data.get("image_results") or []) + (data.get("inline_images") or [])
        items = items[:k]
        thumbs = await asyncio.gather(*(self.fetch_image(it.get("thumbnail")) for it in items))
        return [
            ImageResult(
                title=it.get("title") or it.get("source") or "",
                link=it.get("link"),
                image=thumb,
                thumbnail_url=it.get("thumbnail"),
            )
            for it, thumb in zip(items, thumbs, strict=True)
        ]


class BraveProvider(_HTTPProvider):
    """Brave Search web API."""

    name = "brave"

    def __init__(self, settings: SearchSettings, api_key: str | None):
        super().__init__(settings, api_key)
        self.url = settings.brave_url

    async def search(self, query: str, k: int) -> list[Hit]:
        data = await self._get(
            self.url,
            {"q": query, "count": min(k, 20)},
            headers={"X-Subscription-Token": self._key, "Accept": "application/json"},
        )
        hits = []
        for i, item in enumerate(((data.get("web") or {}).get("results") or [])[:k], 1):
            result = WebResult(
                title=_TAG.sub("", item.get("title", "")),
                link=item.get("url", ""),
                snippet=_TAG.sub("", item.get("description", "")),
                date=item.get("page_age") or item.get("age"),
            )
            hits.append(Hit(result, score=1.0 / i, doc_id=result.link))
        return hits


class OfflineProvider(SearchProvider):
    """Full-text and perceptual-hash search over a local index; no network at all."""

    name = "offline"
    paid = False

    def __init__(self, index_path: Path):
        self.index = OfflineIndex(index_path)

    async def search(self, query: str, k: int) -> list[Hit]:
        return [
            Hit(
                WebResult(title=d["title"], link=d["url"] or f"offline://{d['id']}", snippet=d["text"], date=d["date"]),
                score=score,
                doc_id=d["id"],
            )
            # In a thread: SQLite releases the GIL, and the event loop goes on serving other clients.
            for d, score in await asyncio.to_thread(self.index.search, query, k)
        ]

    async def image_search(self, image: bytes | None, key: str | None, k: int) -> list[ImageResult]:
        if key is not None:
            cached = self.index.cached_images(key, k)
            if cached is None:
                raise LookupError(f"no cached image search for key {key!r}")
            return [
                ImageResult(title=c["title"], image=base64.b64encode(c["data"]).decode() if c["data"] else None)
                for c in cached
            ]
        assert image is not None
        return [
            ImageResult(title=d["title"], link=d["url"], image=base64.b64encode(d["data"]).decode())
            for d, _dist in self.index.image_search(image, k)
        ]


def s3_image_host(settings: SearchSettings) -> ImageHost | None:
    """Upload the query image and hand SerpAPI a presigned URL (it fetches the image itself)."""
    if not settings.image_bucket:
        return None
    from argus.config import StackSettings
    from argus.storage import s3_client

    client = s3_client(StackSettings())
    bucket = settings.image_bucket

    async def host(data: bytes) -> str:
        key = f"search-queries/{secrets.token_hex(12)}.png"
        await asyncio.to_thread(client.put_object, Bucket=bucket, Key=key, Body=data)
        url: str = await asyncio.to_thread(
            client.generate_presigned_url, "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=900
        )
        return url

    return host


def make_provider(settings: SearchSettings) -> SearchProvider:
    if settings.provider == "offline":
        return OfflineProvider(settings.index_path)
    key = settings.read_api_key()
    if settings.provider == "serpapi":
        return SerpAPIProvider(settings, key, s3_image_host(settings))
    return BraveProvider(settings, key)
