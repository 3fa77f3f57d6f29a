"""`register`: an exported model becomes a version of a registered model, with lineage and an alias."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact

from argus import registry, tracking
from argus.registry import ALIAS_CANDIDATE
from flows.results import RegisteredVersion, cache_key
from flows.runtime import artifact_key, flow_run_links, stack_settings


@task(name="register-version", retries=3, retry_delay_seconds=[2, 5, 10])
def register_version(
    model_uri: str, name: str, key: str, run_id: str | None, tags: dict[str, str], alias: str
) -> RegisteredVersion:
    settings = stack_settings()
    mv = registry.register_version(
        settings,
        name=name,
        source=model_uri,
        key=key,
        run_id=run_id,
        tags=tags,
        description=f"{model_uri} (run {run_id})" if run_id else model_uri,
    )
    registry.set_alias(settings, name, alias, mv.version)
    url = registry.version_url(settings, name, mv.version)
    get_run_logger().info("registered %s version %s (alias %s): %s", name, mv.version, alias, url)
    return RegisteredVersion(
        name=name,
        version=str(mv.version),
        source=model_uri,
        aliases=registry.aliases(settings, name, mv.version),
        url=url,
    )


@flow(name="register", flow_run_name="register-{name}")
def register(
    model_uri: str,
    name: str,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    alias: str = ALIAS_CANDIDATE,
) -> RegisteredVersion:
    """Register `model_uri` (its object-store URI becomes the version's `source`) as a version of `name`
    linked to the MLflow run that produced it; a re-run with the same inputs finds the same version."""
    settings = stack_settings()
    all_tags = {
        **{k: str(v) for k, v in (tags or {}).items()},
        **flow_run_links(settings),
        "argus.code_version": tracking.code_version(),
    }
    key = cache_key("register", model_uri, run_id)
    version = register_version(model_uri, name, key, run_id, all_tags, alias)
    create_link_artifact(version.url, link_text=f"{name} v{version.version}", key=artifact_key("model", name))
    return version
