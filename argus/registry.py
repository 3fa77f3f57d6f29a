"""The MLflow model registry as Argus uses it: versions whose `source` is an object-store URI,
lineage tags, and aliases (`candidate`, `staging`, `production`, `previous-production`; their names are in
`argus.tracking`)."""

from __future__ import annotations

from typing import Any

from argus.config import StackSettings
from argus.tracking import TAG_REGISTER_KEY


def _client(settings: StackSettings) -> Any:
    import mlflow

    return mlflow.MlflowClient(settings.mlflow_url, registry_uri=settings.mlflow_url)


def version_url(settings: StackSettings, name: str, version: str) -> str:
    from argus.tracking import UI_TRAINING_VIEW

    return f"{settings.mlflow_url}/#/models/{name}/versions/{version}{UI_TRAINING_VIEW}"


def find_version(settings: StackSettings, name: str, key: str) -> Any | None:
    """The version registered earlier with the same `argus.register.key` (a re-run reuses it)."""
    client = _client(settings)
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(TAG_REGISTER_KEY) == key:
            return mv
    return None


def versions_with_source(settings: StackSettings, name: str, source: str) -> list[Any]:
    """Every version of `name` whose weights are at `source`, oldest first (one deployment serves them all)."""
    found = [mv for mv in _client(settings).search_model_versions(f"name = '{name}'") if mv.source == source]
    return sorted(found, key=lambda mv: int(mv.version))


def register_version(
    settings: StackSettings,
    *,
    name: str,
    source: str,
    key: str,
    run_id: str | None,
    tags: dict[str, str],
    description: str = "",
) -> Any:
    """Create (or find, by `key`) a version of `name` whose source is `source`."""
    from mlflow.exceptions import MlflowException

    client = _client(settings)
    try:
        client.create_registered_model(name, description="Registered by Argus pipelines.")
    except MlflowException as exc:
        if "RESOURCE_ALREADY_EXISTS" not in str(exc.error_code):
            raise
    existing = find_version(settings, name, key)
    if existing is not None:
        mv = existing
        if description and existing.description != description:
            client.update_model_version(name, mv.version, description=description)
    else:
        mv = client.create_model_version(
            name, source, run_id=run_id, tags={TAG_REGISTER_KEY: key}, description=description
        )
    for k, v in tags.items():
        client.set_model_version_tag(name, mv.version, k, str(v))
    return client.get_model_version(name, mv.version)


def set_alias(settings: StackSettings, name: str, alias: str, version: str) -> None:
    _client(settings).set_registered_model_alias(name, alias, version)


def aliases(settings: StackSettings, name: str, version: str) -> list[str]:
    return list(_client(settings).get_model_version(name, version).aliases)


def get_version(settings: StackSettings, name: str, version: str) -> Any:
    return _client(settings).get_model_version(name, version)


def version_by_alias(settings: StackSettings, name: str, alias: str) -> Any | None:
    from mlflow.exceptions import MlflowException

    try:
        return _client(settings).get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def set_tags(settings: StackSettings, name: str, version: str, tags: dict[str, str]) -> None:
    client = _client(settings)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def delete_alias(settings: StackSettings, name: str, alias: str) -> None:
    import contextlib

    from mlflow.exceptions import MlflowException

    with contextlib.suppress(MlflowException):  # an alias that is not set is already gone
        _client(settings).delete_registered_model_alias(name, alias)
