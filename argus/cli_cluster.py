"""`argus run SPEC` for `backend: kubernetes`: the flow runs in the cluster, this process submits it.

The cluster is checked first (API server, namespace, CRDs, Kueue queues), the spec is uploaded to the
cluster's object store (pods cannot read a file on this machine), and a flow run of the
`pipeline/pipeline-kubernetes` deployment is created on the cluster's Prefect with the spec's flows image
and namespace. Its Kubernetes worker starts it as a Job; this process shows its stages from the same
Prefect API until it ends (or returns at once with `--detach`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import typer

from argus.cli_pipeline import REPO, StageView, console, err_console
from argus.config import PipelineSpec, StackSettings

DEPLOYMENT = "pipeline/pipeline-kubernetes"


def spec_object_uri(settings: StackSettings, run: str, spec_file: str) -> str:
    return f"s3://{settings.bucket_data}/specs/{run}/{Path(spec_file).name}"


def _deployment(client: Any) -> Any:
    """The cluster's `pipeline-kubernetes` deployment, registered from prefect.yaml if it is missing."""
    from prefect.exceptions import ObjectNotFound

    from argus.deployments import KUBERNETES_POOL, apply_deployments, ensure_work_pools
    from argus.tracking import code_version

    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        pass
    ensure_work_pools(REPO / "prefect.yaml", only={KUBERNETES_POOL})
    apply_deployments(REPO / "prefect.yaml", code_version(), only={KUBERNETES_POOL})
    return client.read_deployment_by_name(DEPLOYMENT)


def _running_flow_run(client: Any, deployment_id: Any, run: str) -> Any | None:
    from prefect.client.schemas.filters import (
        DeploymentFilter,
        DeploymentFilterId,
        FlowRunFilter,
        FlowRunFilterName,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    active = [StateType.SCHEDULED, StateType.PENDING, StateType.RUNNING, StateType.CANCELLING, StateType.PAUSED]
    found = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=[run]), state=FlowRunFilterState(type=FlowRunFilterStateType(any_=active))
        ),
        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
        limit=1,
    )
    return found[0] if found else None


def _pipeline_mlflow_run(settings: StackSettings, spec: PipelineSpec, run: str) -> tuple[str, dict[str, float]] | None:
    """The pipeline's MLflow run (URL and metrics) as the flow in the cluster recorded it."""
    import mlflow

    from argus import tracking
    from flows.pipeline import find_pipeline_run

    client = mlflow.MlflowClient(settings.mlflow_url)
    experiment = client.get_experiment_by_name(spec.name)
    found = find_pipeline_run(client, experiment.experiment_id, run) if experiment is not None else None
    if found is None:
        return None
    return tracking.mlflow_run_url(settings, found.info.experiment_id, found.info.run_id), dict(found.data.metrics)


def run_on_cluster(spec_file: str, spec: PipelineSpec, run: str, *, detach: bool) -> None:
    from argus.k8s.cluster import Cluster, ClusterError

    try:
        cluster = Cluster(spec.kubernetes)
    except ClusterError as exc:
        err_console.print(f"[red]error:[/] {spec_file}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    problems = cluster.preflight(spec)
    if problems:
        err_console.print(f"[red]error:[/] the cluster is not ready for {spec_file} ({cluster.where}):")
        for problem in problems:
            err_console.print(f"  - {problem}", highlight=False)
        raise typer.Exit(1)
    try:
        with cluster.endpoints(StackSettings()) as settings:
            _submit_and_follow(spec_file, spec, run, settings, cluster.where, detach=detach)
    except ClusterError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def _submit_and_follow(
    spec_file: str, spec: PipelineSpec, run: str, settings: StackSettings, where: str, *, detach: bool
) -> None:
    # Prefect, MLflow and boto3 in this process talk to the cluster's services from here on.
    os.environ.update(settings.client_env())
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from argus import tracking
    from argus.k8s import render
    from argus.storage import write_uri

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_url}), get_client(sync_client=True) as client:
        try:
            deployment = _deployment(client)
        except Exception as exc:  # noqa: BLE001 - an unreachable API, a refused registration
            err_console.print(f"[red]error:[/] Prefect at {settings.prefect_url}: {exc}", highlight=False)
            raise typer.Exit(1) from None
        busy = _running_flow_run(client, deployment.id, run)
        if busy is not None:
            err_console.print(
                f"[red]error:[/] run {run!r} is already {busy.state.name.lower() if busy.state else 'active'} "
                f"in the cluster: {tracking.prefect_flow_run_url(settings, str(busy.id))}",
                highlight=False,
            )
            raise typer.Exit(1)
        # Only now: a run that is still queued or running keeps the spec object it was submitted with.
        if spec_file.startswith("s3://"):
            spec_uri = spec_file
        else:
            spec_uri = spec_object_uri(settings, run, spec_file)
            try:
                write_uri(spec_uri, Path(spec_file).read_bytes(), settings)
            except Exception as exc:  # noqa: BLE001 - botocore's errors carry the endpoint and the reason
                err_console.print(f"[red]error:[/] uploading the spec to {spec_uri}: {exc}", highlight=False)
                raise typer.Exit(1) from None
        flow_run = client.create_flow_run_from_deployment(
            deployment.id,
            parameters={"spec_uri": spec_uri, "run_name": run},
            name=run,
            job_variables={"image": render.image(spec, "flows"), "namespace": spec.kubernetes.namespace},
        )
        url = tracking.prefect_flow_run_url(settings, str(flow_run.id))
        console.print(f"Prefect flow run {url}  ({DEPLOYMENT} on {where}, spec {spec_uri})", highlight=False)
        if detach:
            console.print(f"detached: the run goes on in the cluster (cancel: prefect flow-run cancel {flow_run.id})")
            return
        state = _follow(client, flow_run.id, run)
    if not state.is_completed():
        err_console.print(
            f"[red]error:[/] pipeline {run} {(state.name or '').lower()}: {state.message or 'no message'}",
            highlight=False,
        )
        err_console.print(f"the same `argus run {spec_file} --run-name {run}` resumes; finished stages are skipped")
        raise typer.Exit(1)
    recorded = _pipeline_mlflow_run(settings, spec, run)
    if recorded is None:
        console.print(f"pipeline {run} completed (no MLflow run found for it)")
        return
    mlflow_url, metrics = recorded
    console.print(f"pipeline {run} completed\nMLflow run:   {mlflow_url}", highlight=False)
    for key, value in sorted(metrics.items()):
        console.print(f"  {key:<40} {value:.4g}", highlight=False)


def _follow(client: Any, flow_run_id: Any, run: str) -> Any:
    """Show the stages until the flow run ends; Ctrl-C stops watching, never the run."""
    view = StageView(flow_run_id, run)
    with view.shown():
        try:
            while True:
                state = client.read_flow_run(flow_run_id).state
                if state is not None and state.is_final():
                    view.flow_state = state.name
                    return state
                if state is not None and (state.is_scheduled() or state.is_pending()):
                    view.flow_state = f"{state.name}: waiting for the Kubernetes worker to start its pod"
                else:
                    view.flow_state = state.name if state is not None else ""
                time.sleep(3.0)
        except KeyboardInterrupt:
            err_console.print(
                f"stopped watching; the run goes on in the cluster (cancel: prefect flow-run cancel {flow_run_id})"
            )
            raise typer.Exit(130) from None
