"""Backends: where flows run their training jobs, tool environments and serving endpoints."""

from __future__ import annotations

from argus.backends.base import Backend, BackendError
from argus.config import PipelineSpec, StackSettings


def get_backend(kind: str, settings: StackSettings, spec: PipelineSpec | None = None) -> Backend:
    if kind == "local":
        from argus.backends.local import LocalBackend

        return LocalBackend(settings)
    if kind == "kubernetes":
        if spec is None:
            raise BackendError("the kubernetes backend needs the pipeline spec (node pools, images, namespace)")
        from argus.backends.kubernetes import KubernetesBackend

        return KubernetesBackend(settings, spec)
    raise BackendError(f"unknown backend {kind!r} (known: local, kubernetes)")


__all__ = ["Backend", "BackendError", "get_backend"]
