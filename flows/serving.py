"""Model servers as the flows use them: one deployment per model content, found again when it still
answers, smoke-tested like a client would, behind a stable endpoint per registered model."""

from __future__ import annotations

import re

import httpx
from prefect import task
from prefect.cache_policies import NO_CACHE

from argus.backends.base import Backend, ModelServer
from argus.config import ServingTarget, StackSettings
from argus.storage import fingerprint
from flows.runtime import FlowError


class PromotionError(FlowError):
    """The promotion stopped; production is as it was."""


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:40]


def endpoint_name(model: str) -> str:
    """The stable endpoint of a registered model."""
    return slug(model)


@task(name="smoke-test", retries=2, retry_delay_seconds=2, cache_policy=NO_CACHE)
def smoke_test(server: ModelServer) -> str:
    """One OpenAI chat completion through the server, as a client would send it."""
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        json={
            "model": server.served_name,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": 8,
            "temperature": 0,
        },
        timeout=60,
    )
    if response.status_code != 200:
        raise PromotionError(f"smoke test of {server.name}: HTTP {response.status_code}: {response.text[:300]}")
    body = response.json()
    if not body.get("choices"):
        raise PromotionError(f"smoke test of {server.name}: no choices in {body}")
    return str(body["choices"][0]["message"]["content"])


def deployment_name(model: str, model_uri: str, settings: StackSettings) -> str:
    """One deployment per model content: the pipeline's evaluation, staging and production of the same
    weights share one server (a new version of identical weights too)."""
    return f"{slug(model)}-{fingerprint(model_uri, settings)[:10]}"


@task(name="deploy", cache_policy=NO_CACHE)
def deploy(backend: Backend, name: str, model_uri: str, target: ServingTarget, served_name: str) -> ModelServer:
    """The running deployment of that name if it serves `model_uri` and answers, else a new one."""
    for existing in backend.deployments():
        if existing.name == name and existing.model_uri == model_uri:
            try:
                if httpx.get(f"{existing.base_url}/models", timeout=5).status_code == 200:
                    return existing
            except httpx.HTTPError:
                pass
    backend.remove(name)  # a broken deployment of that name from an earlier attempt is replaced
    try:
        return backend.deploy(name, model_uri, target, served_name, keep=True)
    except Exception as exc:
        backend.remove(name)
        raise PromotionError(f"deployment {name} of {model_uri} did not become healthy: {exc}") from exc
