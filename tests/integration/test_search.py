"""The search proxy: backends' HTTP handling, offline index, cache modes, Redis, limits, bad input."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, ImageDraw

from argus.config import SearchSettings, StackSettings
from argus.data.search_index import CorpusError, build_index
from services.search.app import create_app
from services.search.cache import SQLiteStore, cache_key, export_snapshot, import_snapshot, normalize_query
from services.search.limits import TokenBucket
from tests.conftest import Cli, s3_endpoint, serve_app

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "search"
API_KEY = "sk-test-9f8e7d6c5b4a"


def png(color: str, offset: int = 0) -> bytes:
    img = Image.new("RGB", (64, 64), "white")
    ImageDraw.Draw(img).ellipse((8 + offset, 8, 40 + offset, 40), fill=color)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


# -- a local stand-in for the upstream APIs (test fixture) -------------------------------------------


class FakeUpstream:
    """Serves the fixture bodies the way SerpAPI and Brave answer, and records every call."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self.failures: list[int] = []  # statuses to answer first, one per call
        self.gate: threading.Event | None = None
        self.fetched_images: list[bytes] = []
        self.app = FastAPI()
        self.base = ""
        app = self.app

        @app.get("/search.json")
        async def serpapi(request: Request) -> Response:
            params = dict(request.query_params)
            self.calls.append({"api": "serpapi", **params})
            if (early := await self._early()) is not None:
                return early
            if params.get("api_key") != API_KEY:
                return JSONResponse(
                    {"error": f"Invalid API key. Your API key should be here: {params.get('api_key')}"}, status_code=401
                )
            if params["engine"] == "google_reverse_image":
                async with httpx.AsyncClient() as client:  # SerpAPI fetches the image itself
                    self.fetched_images.append((await client.get(params["image_url"])).content)
                body = json.loads(
                    (FIXTURES / "serpapi_reverse_image.json").read_text().replace("THUMB", f"{self.base}/thumb")
                )
                return JSONResponse(body)
            if params["q"] == "nothing at all":
                return JSONResponse({"error": "Google hasn't returned any results for this query."})
            body = json.loads((FIXTURES / "serpapi_google.json").read_text())
            body["organic_results"] = body["organic_results"][: int(params.get("num", 10))]
            return JSONResponse(body)

        @app.get("/res/v1/web/search")
        async def brave(request: Request) -> Response:
            self.calls.append({"api": "brave", **dict(request.query_params)})
            if (early := await self._early()) is not None:
                return early
            if request.headers.get("x-subscription-token") != API_KEY:
                return JSONResponse(
                    {"type": "ErrorResponse", "error": {"code": "SUBSCRIPTION_TOKEN_INVALID"}}, status_code=401
                )
            return JSONResponse(json.loads((FIXTURES / "brave_web.json").read_text()))

        @app.get("/thumb/{name}")
        async def thumb(name: str) -> Response:
            return Response(png("red"), media_type="image/png")

    async def _early(self) -> Response | None:
        if self.gate is not None:
            await asyncio.to_thread(self.gate.wait, 30)
        if self.failures:
            return JSONResponse({"error": "try later"}, status_code=self.failures.pop(0))
        return None


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with serve_app(fake.app) as url:
        fake.base = url
        yield fake


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    docs = [
        {
            "id": "zorblat",
            "title": "Zorblat",
            "text": "Zorblat is a fictional mountain 4321 meters tall.",
            "url": "https://offline.example/zorblat",
            "date": "2024-01-02",
        },
        {
            "id": "quill",
            "title": "Ada Quill",
            "text": "Ada Quill first climbed Zorblat in 1911.",
            "url": "https://offline.example/quill",
        },
        {"id": "s-r1", "contents": '"Vantor River"\nThe Vantor River flows past Zorblat.'},
    ] + [{"id": f"filler-{i}", "title": f"Filler {i}", "text": f"unrelated text number {i}"} for i in range(50)]
    (root / "corpus.jsonl").write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    for i, color in enumerate(["red", "blue", "green"]):
        (root / f"img{i}.png").write_bytes(png(color, 8 * i))
    (root / "images.jsonl").write_text(
        "\n".join(
            json.dumps(
                {"id": f"i{i}", "title": f"{c} disc", "image": f"img{i}.png", "url": f"https://offline.example/i{i}"}
            )
            for i, c in enumerate(["red", "blue", "green"])
        )
    )
    (root / "mmsearch.json").write_text(
        json.dumps(
            {
                "17": {
                    "tool_returned_web_title": ["Red disc page", "Blue disc page"],
                    "cached_images_path": ["img0.png", "img1.png"],
                }
            }
        )
    )
    out = root / "index.sqlite"
    counts = build_index(
        out, corpus=root / "corpus.jsonl", images=root / "images.jsonl", mmsearch_cache=root / "mmsearch.json"
    )
    assert counts == {"docs": 53, "images": 3, "cached_keys": 1}
    return out


def settings(tmp_path: Path, **kw: Any) -> SearchSettings:
    base: dict[str, Any] = {
        "cache_path": tmp_path / "cache.sqlite",
        "backoff_s": 0.01,
        "rate_limit_per_s": 1000,
        "rate_burst": 1000,
    }
    return SearchSettings(**{**base, **kw})


@pytest.fixture
def offline(tmp_path: Path, index: Path) -> Iterator[httpx.Client]:
    with serve_app(create_app(settings(tmp_path, index_path=index))) as url, httpx.Client(base_url=url) as c:
        yield c


# -- offline backend and protocols -----------------------------------------------------------------------


def test_offline_text_search_and_rendering(offline: httpx.Client) -> None:
    body = offline.post("/v1/search", json={"query": "How tall is Zorblat?", "top_k": 2}).json()
    assert body["backend"] == "offline" and body["cached"] is False
    assert body["results"][0]["title"] == "Zorblat"
    second = body["results"][1]
    assert body["rendered"] == (
        "A Google search for 'How tall is Zorblat?' found 2 results:\n\n## Web Results\n"
        "1. [Zorblat](https://offline.example/zorblat)\nDate published: 2024-01-02\n"
        "\nZorblat is a fictional mountain 4321 meters tall.\n\n"
        f"2. [{second['title']}]({second['link']})\n\n{second['snippet']}"
    )
    again = offline.post("/v1/search", json={"query": "  how TALL is zorblat? ", "top_k": 2}).json()
    assert again["cached"] is True and again["results"] == body["results"]  # normalized key


def test_search_r1_retrieve_round_trip(offline: httpx.Client) -> None:
    # The request and response shapes of Search-R1's retriever, as verl's search tool uses them.
    payload = {"queries": ["Vantor River", "Ada Quill climbed"], "topk": 2, "return_scores": True}
    result = offline.post("/retrieve", json=payload).json()["result"]
    assert len(result) == 2 and all(1 <= len(r) <= 2 for r in result)
    first = result[0][0]
    assert set(first) == {"document", "score"} and set(first["document"]) == {"id", "contents"}
    assert first["document"] == {"id": "s-r1", "contents": "Vantor River\nThe Vantor River flows past Zorblat."}
    assert result[1][0]["document"]["id"] == "quill"
    plain = offline.post("/retrieve", json={**payload, "return_scores": False}).json()["result"]
    assert plain[0][0] == first["document"]


def test_offline_image_search(offline: httpx.Client) -> None:
    query = base64.b64encode(png("blue", 8)).decode()
    body = offline.post("/v1/image_search", json={"image": query, "top_k": 2}).json()
    assert body["results"][0]["title"] == "blue disc"
    assert Image.open(io.BytesIO(base64.b64decode(body["results"][0]["image"]))).size == (64, 64)
    assert body["rendered"] == (
        "A Google image search for the image found 2 results:\n\n## Web Results\n"
        f"1. <image>\n[blue disc] \n\n\n2. <image>\n[{body['results'][1]['title']}] \n"
    )
    cached = offline.post("/v1/image_search", json={"key": "17"}).json()
    assert [r["title"] for r in cached["results"]] == ["Red disc page", "Blue disc page"]
    missing = offline.post("/v1/image_search", json={"key": "999"})
    assert missing.status_code == 404 and "999" in missing.text


# -- live backends' HTTP handling ----------------------------------------------------------------------


def test_serpapi_web_search(tmp_path: Path, upstream: FakeUpstream) -> None:
    s = settings(tmp_path, provider="serpapi", api_key=API_KEY, serpapi_url=f"{upstream.base}/search.json")
    with serve_app(create_app(s)) as url:
        body = httpx.post(f"{url}/v1/search", json={"query": "zorblat mountain height", "top_k": 2}).json()
        empty = httpx.post(f"{url}/v1/search", json={"query": "nothing at all"}).json()
    assert [r["link"] for r in body["results"]] == [
        "https://mountains.example/zorblat",
        "https://guides.example/zorblat",
    ]
    assert body["results"][0]["date"] == "Mar 3, 2024"
    assert upstream.calls[0] == {
        "api": "serpapi",
        "engine": "google",
        "q": "zorblat mountain height",
        "num": "2",
        "api_key": API_KEY,
    }
    assert empty["results"] == [] and empty["rendered"].startswith("A Google search for 'nothing at all' found 0")


def test_serpapi_reverse_image_search_through_a_presigned_url(tmp_path: Path, upstream: FakeUpstream) -> None:
    with s3_endpoint(tmp_path) as stack, pytest.MonkeyPatch.context() as mp:
        assert isinstance(stack, StackSettings)
        mp.setenv("ARGUS_S3_PORT", str(stack.s3_port))
        mp.setenv("ARGUS_HOME", str(tmp_path))
        s = settings(
            tmp_path,
            provider="serpapi",
            api_key=API_KEY,
            serpapi_url=f"{upstream.base}/search.json",
            image_bucket=stack.bucket_cache,
        )
        query = png("red")
        with serve_app(create_app(s)) as url:
            body = httpx.post(
                f"{url}/v1/image_search", json={"image": base64.b64encode(query).decode()}, timeout=30
            ).json()
    assert upstream.fetched_images == [query]
    assert [r["title"] for r in body["results"]] == ["Red disc on white - stock image", "Red disc, variant"]
    assert all(base64.b64decode(r["image"]) == png("red") for r in body["results"])


def test_brave_web_search(tmp_path: Path, upstream: FakeUpstream) -> None:
    s = settings(tmp_path, provider="brave", api_key=API_KEY, brave_url=f"{upstream.base}/res/v1/web/search")
    with serve_app(create_app(s)) as url:
        body = httpx.post(f"{url}/v1/search", json={"query": "zorblat mountain height", "top_k": 5}).json()
        image = httpx.post(f"{url}/v1/image_search", json={"image": base64.b64encode(png("red")).decode()})
    assert body["results"][0] == {
        "title": "Zorblat - Fictional Mountains Wiki",
        "link": "https://mountains.example/zorblat",
        "snippet": "Zorblat rises 4,321 m above the Quill valley.",
        "date": "2024-03-03T00:00:00",
    }
    assert upstream.calls[0]["count"] == "5"
    assert image.status_code == 400 and "no image search" in image.text


def test_retries_on_5xx_and_429_then_gives_up(tmp_path: Path, upstream: FakeUpstream) -> None:
    s = settings(tmp_path, provider="serpapi", api_key=API_KEY, serpapi_url=f"{upstream.base}/search.json", retries=2)
    with serve_app(create_app(s)) as url:
        upstream.failures = [500, 503]
        ok = httpx.post(f"{url}/v1/search", json={"query": "zorblat one"})
        assert ok.status_code == 200 and len(upstream.calls) == 3
        upstream.failures = [429, 429, 429]
        busy = httpx.post(f"{url}/v1/search", json={"query": "zorblat two"})
        metrics = httpx.get(f"{url}/metrics").text
    assert busy.status_code == 503 and busy.headers["Retry-After"] == "5" and "429" in busy.text
    assert len(upstream.calls) == 6
    assert 'argus_search_upstream_errors_total{backend="serpapi",status="429"} 3.0' in metrics


def test_api_key_is_never_returned_or_logged(
    tmp_path: Path, upstream: FakeUpstream, caplog: pytest.LogCaptureFixture
) -> None:
    key_file = tmp_path / "serpapi.key"
    key_file.write_text(API_KEY + "-wrong\n")
    s = settings(tmp_path, provider="serpapi", api_key_file=key_file, serpapi_url=f"{upstream.base}/search.json")
    caplog.set_level(logging.DEBUG)
    with serve_app(create_app(s)) as url:
        bad = httpx.post(f"{url}/v1/search", json={"query": "zorblat"})
        texts = [bad.text, httpx.get(f"{url}/healthz").text, httpx.get(f"{url}/metrics").text]
    assert bad.status_code == 502 and "Invalid API key" in bad.text
    assert upstream.calls[0]["api_key"] == API_KEY + "-wrong"  # the key did reach the upstream
    for text in [*texts, caplog.text]:
        assert API_KEY not in text


# -- cache modes, replay, snapshots ----------------------------------------------------------------------


def test_record_then_replay_makes_no_upstream_call_and_is_byte_identical(
    tmp_path: Path, upstream: FakeUpstream
) -> None:
    live = {"provider": "serpapi", "api_key": API_KEY, "serpapi_url": f"{upstream.base}/search.json"}
    queries = [{"query": "zorblat mountain height", "top_k": 3}, {"query": "ada quill", "top_k": 1}]
    with serve_app(create_app(settings(tmp_path, cache_mode="record", **live))) as url:
        recorded = [httpx.post(f"{url}/v1/search", json=q).content for q in queries]
        retrieved = httpx.post(f"{url}/retrieve", json={"queries": ["zorblat mountain height"], "topk": 3}).content
    assert len(upstream.calls) == 3
    snapshot = tmp_path / "snap.jsonl.gz"
    store = SQLiteStore(tmp_path / "cache.sqlite")
    assert asyncio.run(export_snapshot(store, str(snapshot))) == 2
    asyncio.run(store.aclose())
    # The next run: a fresh cache filled from the snapshot, replay only.
    fresh = SQLiteStore(tmp_path / "replay.sqlite")
    assert asyncio.run(import_snapshot(fresh, str(snapshot))) == 2
    asyncio.run(fresh.aclose())
    with serve_app(
        create_app(settings(tmp_path, cache_mode="replay", cache_path=tmp_path / "replay.sqlite", **live))
    ) as url:
        replayed = [httpx.post(f"{url}/v1/search", json=q).content for q in queries]
        again = httpx.post(f"{url}/retrieve", json={"queries": ["zorblat mountain height"], "topk": 3}).content
        miss = httpx.post(f"{url}/v1/search", json={"query": "never recorded"})
    assert len(upstream.calls) == 3  # nothing new upstream
    assert [r.replace(b'"cached":true', b'"cached":false') for r in replayed] == recorded
    assert again == retrieved
    assert miss.status_code == 404 and "never recorded" in miss.text and "replay" in miss.text


def test_live_mode_stores_nothing_and_cache_first_fills(tmp_path: Path, upstream: FakeUpstream) -> None:
    live = {"provider": "serpapi", "api_key": API_KEY, "serpapi_url": f"{upstream.base}/search.json"}
    with serve_app(create_app(settings(tmp_path, cache_mode="live", **live))) as url:
        for _ in range(2):
            assert httpx.post(f"{url}/v1/search", json={"query": "zorblat"}).json()["cached"] is False
    assert len(upstream.calls) == 2
    with serve_app(create_app(settings(tmp_path, cache_mode="cache-first", **live))) as url:
        first = httpx.post(f"{url}/v1/search", json={"query": "zorblat"}).json()
        second = httpx.post(f"{url}/v1/search", json={"query": "ZORBLAT"}).json()
    assert (first["cached"], second["cached"]) == (False, True) and len(upstream.calls) == 3


def test_snapshot_round_trip_through_s3(tmp_path: Path) -> None:
    from services.search.cache import Entry

    with s3_endpoint(tmp_path) as stack:
        assert isinstance(stack, StackSettings)

        async def go() -> list[Entry]:
            src, dst = SQLiteStore(tmp_path / "a.sqlite"), SQLiteStore(tmp_path / "b.sqlite")
            for i in range(5):
                await src.put(
                    Entry(
                        key=f"k{i}",
                        kind="search",
                        backend="offline",
                        query=f"q{i}",
                        params={"top_k": 3},
                        value=[{"i": i}],
                    )
                )
            uri = f"s3://{stack.bucket_cache}/snapshots/run-1.jsonl.gz"
            assert await export_snapshot(src, uri, stack) == 5
            assert await import_snapshot(dst, uri, stack) == 5
            out = [e async for e in dst.entries()]
            await src.aclose()
            await dst.aclose()
            return out

        entries = asyncio.run(go())
    assert [e.value for e in entries] == [[{"i": i}] for i in range(5)]


def test_cache_keys_are_normalized() -> None:
    assert normalize_query("  Zorblat\tMOUNTAIN  height ") == "zorblat mountain height"
    assert normalize_query("\uff3a\uff4f\uff52\uff42\uff4c\uff41\uff54") == "zorblat"  # NFKC: full-width
    same = cache_key("search", "serpapi", "Zorblat  Height", {"top_k": 3})
    assert same == cache_key("search", "serpapi", "zorblat height", {"top_k": 3})
    assert same != cache_key("search", "brave", "zorblat height", {"top_k": 3})
    assert same != cache_key("search", "serpapi", "zorblat height", {"top_k": 4})


# -- Redis, budget, coalescing, rate limit ------------------------------------------------------------------


def test_redis_cache_shared_by_two_replicas(tmp_path: Path, upstream: FakeUpstream, redis_url: str) -> None:
    live = {
        "provider": "serpapi",
        "api_key": API_KEY,
        "serpapi_url": f"{upstream.base}/search.json",
        "cache_store": "redis",
        "redis_url": redis_url,
        "budget_per_run": 2,
    }
    with serve_app(create_app(settings(tmp_path, **live))) as a, serve_app(create_app(settings(tmp_path, **live))) as b:
        run = {"X-Argus-Run-Id": "redis-run"}
        assert httpx.post(f"{a}/v1/search", json={"query": "shared q"}, headers=run).json()["cached"] is False
        assert httpx.post(f"{b}/v1/search", json={"query": "shared q"}, headers=run).json()["cached"] is True
        assert httpx.post(f"{b}/v1/search", json={"query": "second"}, headers=run).status_code == 200
        over = httpx.post(f"{a}/v1/search", json={"query": "third"}, headers=run)  # budget shared across replicas
    assert over.status_code == 429 and "budget of 2" in over.text and "redis-run" in over.text
    assert len(upstream.calls) == 2


def test_budget_per_run(tmp_path: Path, upstream: FakeUpstream) -> None:
    s = settings(
        tmp_path, provider="serpapi", api_key=API_KEY, serpapi_url=f"{upstream.base}/search.json", budget_per_run=2
    )
    with serve_app(create_app(s)) as url:
        run_a = {"X-Argus-Run-Id": "run-a"}
        for q in ("one", "two"):
            assert httpx.post(f"{url}/v1/search", json={"query": q}, headers=run_a).status_code == 200
        assert (
            httpx.post(f"{url}/v1/search", json={"query": "one"}, headers=run_a).status_code == 200
        )  # cache hit: free
        over = httpx.post(f"{url}/v1/search", json={"query": "three"}, headers=run_a)
        other = httpx.post(f"{url}/v1/search", json={"query": "three"}, headers={"X-Argus-Run-Id": "run-b"})
        metrics = httpx.get(f"{url}/metrics").text
    assert over.status_code == 429 and "run 'run-a' has used its budget of 2" in over.text
    assert other.status_code == 200
    assert 'argus_search_budget_used{run_id="run-a"} 3.0' in metrics


def test_identical_concurrent_queries_make_one_upstream_call(tmp_path: Path, upstream: FakeUpstream) -> None:
    s = settings(
        tmp_path, provider="serpapi", api_key=API_KEY, serpapi_url=f"{upstream.base}/search.json", cache_mode="live"
    )
    upstream.gate = threading.Event()
    with serve_app(create_app(s)) as url:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post("/v1/search", json={"query": "same question"})) for _ in range(20)
                ]
                # Hold the upstream until every other request has joined the one in flight.
                for _ in range(1500):  # bounded: 30 s
                    if "argus_search_coalesced_total 19.0" in (await client.get("/metrics")).text:
                        break
                    await asyncio.sleep(0.02)
                upstream.gate.set()  # type: ignore[union-attr]
                return list(await asyncio.gather(*tasks))

        responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * 20
    assert len({r.content for r in responses}) == 1
    assert len(upstream.calls) == 1


def test_token_bucket_spaces_calls() -> None:
    now = [0.0]
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    async def go() -> None:
        bucket = TokenBucket(rate=4.0, burst=2, clock=lambda: now[0], sleep=fake_sleep)
        waits = [await bucket.acquire() for _ in range(6)]
        assert waits[:2] == [0.0, 0.0]  # the burst
        assert waits[2:] == pytest.approx([0.25] * 4)  # then one call every 1/rate seconds
        now[0] += 10  # idle time refills up to the burst, not beyond
        assert [await bucket.acquire() for _ in range(3)] == pytest.approx([0.0, 0.0, 0.25])

    asyncio.run(go())


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/v1/search", {"query": ""}, 400, "query is empty"),
        ("/v1/search", {"query": "   "}, 400, "query is empty"),
        ("/v1/search", {"query": "x" * 5000}, 400, "the limit is 2048"),
        ("/v1/search", {"query": "zorblat", "top_k": 500}, 400, "over the limit of 50"),
        ("/v1/search", {"query": "zorblat", "top_k": 0}, 422, "greater than or equal to 1"),
        ("/v1/search", {"query": "zorblat", "backend": "bing"}, 400, "unknown backend 'bing'"),
        ("/v1/search", {"query": 42}, 422, "valid string"),
        ("/v1/search", {"q": "zorblat"}, 422, "query"),
        ("/v1/image_search", {"image": "%%% not base64 %%%"}, 400, "not valid base64"),
        (
            "/v1/image_search",
            {"image": base64.b64encode(b"definitely not an image").decode()},
            400,
            "not a readable image",
        ),
        ("/v1/image_search", {}, 400, "exactly one of"),
        ("/v1/image_search", {"image": base64.b64encode(png("red")).decode(), "key": "17"}, 400, "exactly one of"),
        ("/v1/image_search", {"key": "17", "backend": "serpapi"}, 400, "unknown backend"),
        ("/retrieve", {"queries": []}, 422, "at least 1 item"),
        ("/retrieve", {"queries": ["ok", ""]}, 400, "query is empty"),
    ],
)
def test_bad_input_gets_4xx_with_a_reason(
    offline: httpx.Client, path: str, body: object, status: int, reason: str
) -> None:
    resp = offline.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert reason in resp.text and "Traceback" not in resp.text


def test_oversized_image_is_refused(tmp_path: Path, index: Path) -> None:
    with serve_app(create_app(settings(tmp_path, index_path=index, max_image_bytes=2048))) as url:
        resp = httpx.post(f"{url}/v1/image_search", json={"image": base64.b64encode(b"x" * 4096).decode()})
    assert resp.status_code == 400 and "the limit is 2048" in resp.text


def test_misconfiguration_fails_at_start_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="argus search index"):
        create_app(settings(tmp_path, index_path=tmp_path / "missing.sqlite"))
    with pytest.raises(ValueError, match="needs an API key"):
        create_app(settings(tmp_path, provider="serpapi"))


def test_index_cli_reports_bad_corpus_lines(tmp_path: Path, cli: Cli) -> None:
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text('{"id": 1, "text": "fine"}\n{not json}\n')
    result = cli("search", "index", "--out", str(tmp_path / "i.sqlite"), "--corpus", str(corpus), check=False)
    assert result.returncode == 1 and f"{corpus}:2: invalid JSON" in result.stderr
    with pytest.raises(CorpusError, match=":1: a document needs 'text' or 'contents'"):
        corpus.write_text('{"id": 1}\n')
        build_index(tmp_path / "j.sqlite", corpus=corpus)


def test_cache_cli_export_import_stats(tmp_path: Path, cli: Cli, index: Path, offline: httpx.Client) -> None:
    # `offline` wrote two entries into tmp_path/cache.sqlite through the real service.
    offline.post("/v1/search", json={"query": "zorblat"})
    offline.post("/v1/image_search", json={"key": "17"})
    cache = str(tmp_path / "cache.sqlite")
    stats = cli("search", "cache", "stats", "--cache-path", cache).stdout
    assert "search/offline" in stats and "image_search/offline" in stats
    snap = str(tmp_path / "snap.jsonl.gz")
    assert "exported 2 entries" in cli("search", "cache", "export", snap, "--cache-path", cache).stdout
    other = str(tmp_path / "other.sqlite")
    assert "imported 2 entries" in cli("search", "cache", "import", snap, "--cache-path", other).stdout
    broken = tmp_path / "broken.gz"
    broken.write_bytes(b"not gzip")
    bad = cli("search", "cache", "import", str(broken), "--cache-path", other, check=False)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr


# -- reliability: hostile input, big clients, clients that go away -----------------------------------------


def header_only_png(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` (a decompression bomb is a few KB that inflate to GBs): only
    its header is needed, since the proxy must refuse it before decoding anything."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1024)) + chunk(b"IEND", b"")
    )


@pytest.mark.reliability
@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"image": "data:image/png;base64"}, "data:<type>;base64,<data>"),  # a data URI with no comma
        ({"image": "data:image/png," + base64.b64encode(png("red")).decode()}, "data:<type>;base64,<data>"),
        ({"image": base64.b64encode(header_only_png(20000, 20000)).decode()}, "not a readable image"),  # 400 Mpx
        ({"image": base64.b64encode(header_only_png(12000, 12000)).decode()}, "the limit is 25000000"),
    ],
)
def test_hostile_images_get_400_with_a_reason(offline: httpx.Client, body: dict[str, str], reason: str) -> None:
    resp = offline.post("/v1/image_search", json=body)
    assert resp.status_code == 400 and reason in resp.json()["detail"], resp.text
    assert offline.post("/v1/search", json={"query": "after"}).status_code == 200  # the connection still serves


@pytest.mark.reliability
def test_unpaired_surrogates_are_replaced_and_said_so(offline: httpx.Client) -> None:
    raw = json.dumps({"query": "river \ud800 founded"})  # json escapes it as \\ud800, which decodes to a lone one
    resp = offline.post("/v1/search", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query"] == "river \ufffd founded" and "U+FFFD" in body["notes"][0]
    retrieve = offline.post(
        "/retrieve", content=json.dumps({"queries": ["a\udc00"]}), headers={"Content-Type": "application/json"}
    )
    assert retrieve.status_code == 200 and retrieve.json()["notes"]
    key = offline.post(
        "/v1/image_search", content=json.dumps({"key": "\ud800"}), headers={"Content-Type": "application/json"}
    )
    assert key.status_code == 404, key.text  # a key that matches nothing, said as much


@pytest.mark.reliability
def test_chunked_bodies_over_the_limit_are_refused(tmp_path: Path, index: Path) -> None:
    from tests.conftest import chunked, raw_request

    with serve_app(create_app(settings(tmp_path, index_path=index, max_body_bytes=1 << 16))) as url:
        head = (
            "POST /v1/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\n"
        )
        answer = raw_request(url, head, chunked(4 << 20))  # 4 MiB against a 64 KiB limit, no Content-Length
        assert answer.startswith(b"HTTP/1.1 413") and b"65536-byte limit" in answer, answer[:300]
        small = b'{"query": "ok"}'
        ok = raw_request(url, head, [f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"])
        assert ok.startswith(b"HTTP/1.1 200"), ok[:300]  # a chunked body under the limit is served


class SlowIndex:
    """A local provider that takes a few milliseconds a query and counts them (the offline index answers in
    well under one, too fast to watch a queue)."""

    name = "slow"
    paid = False

    def __init__(self) -> None:
        self.calls = 0

    async def search(self, query: str, k: int) -> list[Any]:
        from services.search.models import WebResult
        from services.search.providers import Hit

        self.calls += 1
        await asyncio.sleep(0.005)
        return [Hit(WebResult(title=query, link=f"offline://{query}", snippet=query), score=1.0, doc_id=query)]

    async def image_search(self, image: bytes | None, key: str | None, k: int) -> list[Any]:
        return []

    async def aclose(self) -> None:
        pass


@pytest.mark.reliability
def test_a_huge_retrieve_neither_starves_others_nor_outlives_its_client(tmp_path: Path) -> None:
    from tests.conftest import raw_request

    provider = SlowIndex()
    app = create_app(settings(tmp_path, max_retrieve_queries=5000, client_concurrency=4), provider=provider)  # type: ignore[arg-type]
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=60) as small:
        assert small.post("/v1/search", json={"query": "warm"}).status_code == 200  # now cached
        assert small.post("/retrieve", json={"queries": ["q"] * 5001}).status_code == 413  # over the cap, said so
        body = json.dumps({"queries": [f"q{i}" for i in range(5000)], "topk": 1}).encode()
        head = (
            f"POST /retrieve HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Argus-Run-Id: big\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        big = threading.Thread(target=raw_request, args=(url, head, [body]), kwargs={"timeout": 2})
        big.start()  # its socket times out after 2 s of silence and closes: a client that went away
        while provider.calls < 50:
            threading.Event().wait(0.01)
        # Another client's cached search is answered while the 5,000 queries are still queued.
        resp = small.post("/v1/search", json={"query": "warm"}, headers={"X-Argus-Run-Id": "small"})
        assert resp.status_code == 200 and resp.json()["cached"] is True
        assert provider.calls < 5000
        big.join()
        # Once the big client has gone, its queued searches are cancelled instead of run for nobody.
        before = -1
        while provider.calls != before:
            before = provider.calls
            threading.Event().wait(0.5)
        assert provider.calls < 5000, provider.calls
