"""What every flow needs from its surroundings: settings, a backend, MLflow, links to itself."""

from __future__ import annotations

from typing import Any

from argus import tracking
from argus.backends import Backend, get_backend
from argus.config import PipelineSpec, StackSettings


class FlowError(RuntimeError):
    """An expected failure (a failed job, a refused gate, a bad spec): its message says all the user
    needs, so the CLI prints it without a traceback; Prefect's run logs keep the traceback."""


def stack_settings() -> StackSettings:
    """The platform endpoints from the environment: `argus run` and the stack's worker set the `ARGUS_*`
    and the standard client variables alike; a flow-run pod on a cluster gets the standard ones from the
    `argus-stack` ConfigMap and the object store's Secret."""
    return StackSettings.for_workload()


def make_backend(kind: str, settings: StackSettings, spec: PipelineSpec | None = None) -> Backend:
    """The spec's backend; the Kubernetes one needs the spec itself (namespace, images, node pools)."""
    return get_backend(kind, settings, spec)


def mlflow_client(settings: StackSettings) -> Any:
    import mlflow

    mlflow.set_tracking_uri(settings.mlflow_url)
    return mlflow.MlflowClient(settings.mlflow_url)


def flow_run_links(settings: StackSettings) -> dict[str, str]:
    """Tags that link an MLflow object to the Prefect flow run that made it."""
    from prefect.runtime import flow_run

    flow_run_id = str(flow_run.get_id() or "")
    if not flow_run_id:
        return {}
    return {
        tracking.TAG_PREFECT_FLOW_RUN_ID: flow_run_id,
        tracking.TAG_PREFECT_FLOW_RUN_URL: tracking.prefect_flow_run_url(settings, flow_run_id),
    }


def artifact_key(*parts: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    import re

    return re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")[:100]


def transient(_task: Any, _task_run: Any, state: Any) -> bool:
    """Retry only what a retry can fix: the object store, MLflow or a service being briefly away."""
    import botocore.exceptions
    import httpx
    import requests
    from mlflow.exceptions import MlflowException

    from argus.backends.base import BackendError, ToolsUnavailable

    try:
        state.result()
    except (
        botocore.exceptions.BotoCoreError,
        botocore.exceptions.ClientError,
        httpx.TransportError,
        requests.ConnectionError,
        ConnectionError,
        TimeoutError,
        ToolsUnavailable,
    ):
        return True
    except MlflowException as exc:
        return int(exc.get_http_status_code()) >= 500  # type: ignore[no-untyped-call]
    except BackendError:
        return False
    except BaseException:  # noqa: BLE001 - anything else is a real error; retrying repeats it
        return False
    return False
