"""The components of the local platform stack: how each is started, checked and reached.

S3 first (MLflow stores its artifacts there), then MLflow, Prefect's server and a Prefect worker for the
`argus-local` process pool. A component whose endpoint is configured (ARGUS_S3_ENDPOINT,
ARGUS_MLFLOW_TRACKING_URI, ARGUS_PREFECT_API_URL) is external: never started or stopped here, only
health-checked.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from argus import supervision
from argus.config import StackSettings, repo_root
from argus.storage import s3_healthy


class StackError(RuntimeError):
    pass


@dataclass(frozen=True)
class Component:
    name: str
    title: str
    port_field: str
    command: Callable[[StackSettings], list[str]]
    env: Callable[[StackSettings], dict[str, str]]
    healthy: Callable[[StackSettings], bool]
    url: Callable[[StackSettings], str]
    ui_url: Callable[[StackSettings], str]
    external: Callable[[StackSettings], bool]

    def port(self, settings: StackSettings) -> int:
        return int(getattr(settings, self.port_field))

    def log_path(self, settings: StackSettings) -> Path:
        return settings.home / "logs" / f"{self.name}.log"


def _s3_command(s: StackSettings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "argus.stack.s3server",
        "--host",
        s.host,
        "--port",
        str(s.s3_port),
        "--data-dir",
        str(s.home / "s3"),
        "--region",
        s.s3_region,
    ]


def _mlflow_command(s: StackSettings) -> list[str]:
    (s.home / "mlflow").mkdir(parents=True, exist_ok=True)
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        s.host,
        "--port",
        str(s.mlflow_port),
        "--backend-store-uri",
        f"sqlite:///{s.home / 'mlflow' / 'mlflow.db'}",
        # Proxied artifacts: clients upload through the tracking server and need no S3 keys.
        "--serve-artifacts",
        "--artifacts-destination",
        f"s3://{s.bucket_mlflow}/artifacts",
        "--workers",
        "1",
        # Clients (MLflow's own, requests-based) keep connections open between calls; uvicorn closed them
        # after 5 s idle, and a trace export that picked one up just then was reset and retried, with a
        # urllib3 warning in the run's log. Idle connections now stay open longer than the clients' pauses.
        "--uvicorn-opts",
        "--timeout-keep-alive 120",
    ]


def _mlflow_env(s: StackSettings) -> dict[str, str]:
    return {
        "MLFLOW_S3_ENDPOINT_URL": s.s3_url,
        "AWS_ACCESS_KEY_ID": s.s3_access_key,
        "AWS_SECRET_ACCESS_KEY": s.s3_secret_key,
        "AWS_DEFAULT_REGION": s.s3_region,
        # MLflow's GenAI job runner forks seven huey consumers; Argus schedules nothing through it.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }


def _prefect_command(s: StackSettings) -> list[str]:
    return [sys.executable, "-m", "prefect", "server", "start", "--host", s.host, "--port", str(s.prefect_port)]


def _prefect_env(s: StackSettings) -> dict[str, str]:
    home = s.home / "prefect"
    home.mkdir(parents=True, exist_ok=True)
    return {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}",
        "PREFECT_UI_API_URL": s.prefect_url,
    }


def _worker_command(s: StackSettings) -> list[str]:
    return [
        sys.executable,
        "-m",
        "prefect",
        "worker",
        "start",
        "--pool",
        s.work_pool,
        "--type",
        "process",
        "--name",
        f"argus-local-{s.worker_port}",
        "--with-healthcheck",
    ]


def worker_env(s: StackSettings) -> dict[str, str]:
    """What a flow run started by the worker sees: the same environment `argus run` gives a flow."""
    return {
        **s.argus_env(),
        **s.client_env(),
        **flow_env(s),
        "PREFECT_WORKER_WEBSERVER_HOST": s.host,
        "PREFECT_WORKER_WEBSERVER_PORT": str(s.worker_port),
    }


def flow_env(s: StackSettings) -> dict[str, str]:
    """Prefect settings for a process that runs Argus flows against this stack."""
    return {
        "PREFECT_API_URL": s.prefect_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        # Stage results persist here: a re-run finds them and skips the finished stages.
        "PREFECT_LOCAL_STORAGE_PATH": str(s.home / "prefect" / "results"),
        "PREFECT_RESULTS_PERSIST_BY_DEFAULT": "false",
        "ARGUS_REPO": str(repo_root()),
    }


COMPONENTS: tuple[Component, ...] = (
    Component(
        name="s3",
        title="S3 endpoint",
        port_field="s3_port",
        command=_s3_command,
        env=lambda s: {},
        healthy=s3_healthy,
        url=lambda s: s.s3_url,
        ui_url=lambda s: s.s3_url,
        external=lambda s: s.s3_endpoint is not None,
    ),
    Component(
        name="mlflow",
        title="MLflow",
        port_field="mlflow_port",
        command=_mlflow_command,
        env=_mlflow_env,
        healthy=lambda s: supervision.http_ok(f"{s.mlflow_url}/health"),
        url=lambda s: s.mlflow_url,
        ui_url=lambda s: s.mlflow_url,
        external=lambda s: s.mlflow_tracking_uri is not None,
    ),
    Component(
        name="prefect",
        title="Prefect",
        port_field="prefect_port",
        command=_prefect_command,
        env=_prefect_env,
        healthy=lambda s: supervision.http_ok(f"{s.prefect_url}/health"),
        url=lambda s: s.prefect_url,
        ui_url=lambda s: s.prefect_url.removesuffix("/api"),
        external=lambda s: s.prefect_api_url is not None,
    ),
    Component(
        name="worker",
        title="Prefect worker",
        port_field="worker_port",
        command=_worker_command,
        env=worker_env,
        healthy=lambda s: supervision.http_ok(f"http://{s.host}:{s.worker_port}/health"),
        url=lambda s: f"pool {s.work_pool}",
        ui_url=lambda s: f"{s.prefect_url.removesuffix('/api')}/work-pools/work-pool/{s.work_pool}",
        # With an external Prefect API the platform team runs its own workers.
        external=lambda s: s.prefect_api_url is not None,
    ),
)
