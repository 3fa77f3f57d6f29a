"""MLflow conventions shared by flows and trainers: tag names and links between MLflow and Prefect."""

from __future__ import annotations

from argus.config import StackSettings

TAG_PREFECT_FLOW_RUN_ID = "argus.prefect.flow_run_id"
TAG_PREFECT_FLOW_RUN_URL = "argus.prefect.flow_run_url"
TAG_SPEC_NAME = "argus.spec.name"
TAG_SPEC_FILE = "argus.spec.file"


def mlflow_run_url(settings: StackSettings, experiment_id: str, run_id: str) -> str:
    return f"{settings.mlflow_url}/#/experiments/{experiment_id}/runs/{run_id}"


def prefect_flow_run_url(settings: StackSettings, flow_run_id: str) -> str:
    return f"{settings.prefect_url.removesuffix('/api')}/runs/flow-run/{flow_run_id}"
