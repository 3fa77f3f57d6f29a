"""Backends: where flows run their training jobs, tool environments and serving endpoints."""

from __future__ import annotations

from argus.backends.base import Backend, BackendError
from argus.config import StackSettings


def get_backend(kind: str, settings: StackSettings) -> Backend:
    if kind == "local":
        from argus.backends.local import LocalBackend

        return LocalBackend(settings)
    raise BackendError(f"backend {kind!r} is not available in this installation (known: local)")


__all__ = ["Backend", "BackendError", "get_backend"]
