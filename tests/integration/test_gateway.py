"""The stable endpoint (real nginx) switches between two upstreams without dropping a request."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from argus.backends.local.gateway import GatewayError, NginxGateway
from argus.supervision import free_port, stop_group
from tests.conftest import serve_app

pytestmark = pytest.mark.integration


def upstream(name: str) -> FastAPI:
    """An OpenAI-shaped server that names itself in every answer."""
    app = FastAPI()

    @app.get("/v1/models")
    def models() -> dict[str, object]:
        return {"data": [{"id": name}]}

    @app.post("/v1/chat/completions")
    async def chat(delay: float = 0.01) -> dict[str, object]:
        await asyncio.sleep(delay)
        return {"choices": [{"message": {"content": name}}]}

    return app


def test_switch_under_load_drops_nothing_and_waits_for_in_flight(tmp_path: Path) -> None:
    with serve_app(upstream("blue")) as blue, serve_app(upstream("green")) as green:
        proxy = NginxGateway(tmp_path / "proxy", port=free_port())
        record = proxy.start(blue.removeprefix("http://"), "blue", "argus-quickstart/1")
        try:
            results: list[str] = []
            versions: set[tuple[str, str | None]] = set()
            stop = threading.Event()

            def load() -> None:
                with httpx.Client(timeout=30) as client:
                    while not stop.is_set():
                        try:
                            r = client.post(f"{proxy.url}/v1/chat/completions")
                            answer = r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else ""
                            results.append(answer or f"HTTP {r.status_code}")
                            # Every answer names the registered version that gave it.
                            versions.add((answer, r.headers.get("x-argus-model-version")))
                        except httpx.HTTPError as exc:
                            results.append(repr(exc))

            threads = [threading.Thread(target=load) for _ in range(4)]
            for t in threads:
                t.start()
            slow: list[str] = []
            # A long request that is in flight on blue when the switch happens must still complete.
            slow_thread = threading.Thread(
                target=lambda: slow.append(
                    httpx.post(f"{proxy.url}/v1/chat/completions", params={"delay": 3}, timeout=30).json()["choices"][
                        0
                    ]["message"]["content"]
                )
            )
            time.sleep(0.5)
            slow_thread.start()
            time.sleep(0.3)
            started = time.monotonic()
            old_workers = proxy.switch(green.removeprefix("http://"), "green", "argus-quickstart/2")
            assert proxy.serving("green")
            assert NginxGateway.wait_drained(old_workers, timeout_s=30)
            drained_after = time.monotonic() - started
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join()
            slow_thread.join()
        finally:
            stop_group(record, grace_s=5)
    failed = [r for r in results if r not in ("blue", "green")]
    assert results and not failed, failed[:5]
    order = [r for i, r in enumerate(results) if i == 0 or results[i - 1] != r]
    assert order[0] == "blue" and order[-1] == "green"
    assert slow == ["blue"]  # finished on the old upstream
    assert versions == {("blue", "argus-quickstart/1"), ("green", "argus-quickstart/2")}
    assert drained_after >= 1.5  # the old worker stayed until the slow request was done


def test_a_config_nginx_refuses_is_never_installed(tmp_path: Path) -> None:
    proxy = NginxGateway(tmp_path / "proxy", port=free_port())
    with pytest.raises(GatewayError):
        proxy.start("not a host:port:at all", "bad")
    assert not (tmp_path / "proxy" / "nginx.conf").exists()
