"""Backends: where flows run their training jobs, tool environments and model servers.

`base` is the one abstract `Backend` and the models it speaks; `local/` runs everything as processes on
this machine, `kubernetes/` as PyTorchJobs and Argus custom resources. Each package holds what only it
uses; `jobs` builds the training jobs both run from a pipeline spec.
"""

from __future__ import annotations

from argus.backends.base import Backend, BackendError
from argus.config import PipelineSpec, StackSettings


def get_backend(kind: str, settings: StackSettings, spec: PipelineSpec | None = None) -> Backend:
    if kind == "local":
        from argus.backends.local.backend import LocalBackend

        return LocalBackend(settings)
    if kind == "kubernetes":
        if spec is None:
            raise BackendError("the kubernetes backend needs the pipeline spec (node pools, images, namespace)")
        from argus.backends.kubernetes.backend import KubernetesBackend

        return KubernetesBackend(settings, spec)
    raise BackendError(f"unknown backend {kind!r} (known: local, kubernetes)")


__all__ = ["Backend", "BackendError", "get_backend"]
