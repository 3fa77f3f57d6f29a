"""`stack_check`: the smallest real flow through the whole platform.

It validates a pipeline spec, opens an MLflow run in the spec's experiment, uploads the spec through
MLflow's artifact proxy, confirms the object landed in the S3 bucket, and cross-links the Prefect flow
run and the MLflow run. `argus stack check` runs it; the stack tests use it to prove Prefect, MLflow and
S3 are wired together.
"""

from __future__ import annotations

import mlflow
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.runtime import flow_run

from argus import tracking
from argus.config import PipelineSpec, StackSettings
from argus.specfile import load_spec
from argus.storage import s3_client


@task
def validate_spec(spec_path: str) -> PipelineSpec:
    return load_spec(spec_path)


@task(retries=2, retry_delay_seconds=2)
def record_spec(spec: PipelineSpec, spec_path: str, settings: StackSettings) -> dict[str, str]:
    flow_run_id = str(flow_run.get_id())
    mlflow.set_tracking_uri(settings.mlflow_url)
    experiment_id = tracking.ensure_experiment(spec.name, tracking.experiment_description(spec.name))
    tags = {
        tracking.TAG_SPEC_NAME: spec.name,
        tracking.TAG_SPEC_FILE: spec_path,
        tracking.TAG_PREFECT_FLOW_RUN_ID: flow_run_id,
        tracking.TAG_PREFECT_FLOW_RUN_URL: tracking.prefect_flow_run_url(settings, flow_run_id),
    }
    with mlflow.start_run(run_name="stack-check", tags=tags) as run:
        mlflow.log_dict(spec.model_dump(mode="json"), "spec/resolved.json")
        mlflow.log_artifact(spec_path, "spec")
    return {
        "experiment_id": experiment_id,
        "run_id": run.info.run_id,
        "url": tracking.mlflow_run_url(settings, experiment_id, run.info.run_id),
    }


@task(retries=2, retry_delay_seconds=1)
def artifacts_in_bucket(run_id: str, settings: StackSettings) -> list[str]:
    """The MLflow server proxies artifacts into the bucket; look for this run's objects there."""
    client = s3_client(settings)
    keys = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=settings.bucket_mlflow):
        keys += [obj["Key"] for obj in page.get("Contents", []) if f"/{run_id}/" in obj["Key"]]
    if not keys:
        raise RuntimeError(f"no artifacts of MLflow run {run_id} in s3://{settings.bucket_mlflow}")
    return sorted(keys)


@flow(name="stack-check")
def stack_check(spec_path: str) -> dict[str, object]:
    settings = StackSettings()
    spec = validate_spec(spec_path)
    run = record_spec(spec, spec_path, settings)
    keys = artifacts_in_bucket(run["run_id"], settings)
    create_link_artifact(run["url"], link_text=f"MLflow run {run['run_id']}", key="mlflow-run")
    get_run_logger().info("MLflow run %s has %d artifacts in s3://%s", run["url"], len(keys), settings.bucket_mlflow)
    return {**run, "s3_keys": [f"s3://{settings.bucket_mlflow}/{k}" for k in keys]}
