"""`argus run SPEC`: the pipeline, on this machine or in a cluster.

Locally, the `pipeline` flow runs in this process against the platform stack (started if needed),
exactly as a Prefect worker executes a deployment's flow run, and the stages show live from the Prefect
API: what a user sees here is what the Prefect UI shows.

With `backend: kubernetes` the flow runs in the cluster and this process submits it: the cluster is
checked first (API server, namespace, CRDs, Kueue queues), the spec is uploaded to the cluster's object
store (pods cannot read a file on this machine), and a flow run of the `pipeline/pipeline-kubernetes`
deployment is created on the cluster's Prefect with the spec's flows image and namespace. Its Kubernetes
worker starts it as a Job; this process shows its stages from the same Prefect API until it ends (or
returns at once with `--detach`).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from argus.cli._common import (
    HomeOption,
    console,
    err_console,
    exit_with_error,
    prepare_flow_env,
    run_name_or_exit,
    spec_or_exit,
    stack_settings,
    start_stack,
)
from argus.cli.report import print_result
from argus.cli.stage_view import StageView
from argus.config import PipelineSpec, StackSettings, repo_root
from argus.events import fmt_duration

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

REPO = repo_root()


def run_command(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC", help="pipeline spec: a YAML file or an s3:// URI")],
    run_name: Annotated[str | None, typer.Option(help="same name resumes a run (default: the spec's name)")] = None,
    home: HomeOption = None,
    detach: Annotated[
        bool, typer.Option(help="backend kubernetes: submit the run and return (it goes on in the cluster)")
    ] = False,
) -> None:
    """Run a pipeline spec: data, tool environment, SFT, evaluation, registry; resumes a crashed run.

    With `backend: kubernetes` the flow runs in the cluster of the spec's kube context (the current one
    if unset) and this command submits it and shows its stages."""
    spec = spec_or_exit(spec_file)
    run = run_name_or_exit(run_name or spec.name)
    if spec.backend == "kubernetes":
        run_on_cluster(spec_file, spec, run, detach=detach)
        return
    if detach:
        exit_with_error("--detach is for backend kubernetes; a local run lives in this process", 2)
    started = time.monotonic()
    settings = start_stack(stack_settings(home))
    stack_s = time.monotonic() - started
    prepare_flow_env(settings)

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from argus import tracking
    from flows.pipeline import pipeline

    params = {"spec_uri": str(spec_file), "run_name": run}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(pipeline, parameters=params, name=run)
    console.print(
        f"Prefect flow run {tracking.prefect_flow_run_url(settings, str(flow_run.id))}"
        f"  (stack ready in {fmt_duration(stack_s)})",
        highlight=False,
    )
    view = StageView(flow_run.id, run)
    with view.shown(transient=True):
        try:
            state: State[Any] = run_flow(  # type: ignore[assignment]
                pipeline,  # type: ignore[arg-type]
                flow_run=flow_run,
                parameters=params,
                return_type="state",
            )
        except KeyboardInterrupt:
            err_console.print(f"interrupted; `argus run {spec_file} --run-name {run}` resumes where this stopped")
            raise typer.Exit(130) from None
    if not state.is_completed():
        console.print(view.table())  # the live view goes when it ends; a failed run keeps it
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001 - report the flow's own error, not a traceback
            err_console.print(f"[red]error:[/] pipeline {run} {(state.name or '').lower()}: {exc}", highlight=False)
        err_console.print(f"re-run `argus run {spec_file} --run-name {run}` to resume; finished stages are skipped")
        raise typer.Exit(1)
    result = state.result()
    print_result(result)


# -- a run in a cluster -----------------------------------------------------------------------------

DEPLOYMENT = "pipeline/pipeline-kubernetes"


def spec_object_uri(settings: StackSettings, run: str, spec_file: str) -> str:
    return f"s3://{settings.bucket_data}/specs/{run}/{Path(spec_file).name}"


def _deployment(client: Any) -> Any:
    """The cluster's `pipeline-kubernetes` deployment, registered from prefect.yaml if it is missing."""
    from prefect.exceptions import ObjectNotFound

    from argus.tracking import code_version
    from flows.deployments import KUBERNETES_POOL, ensure_work_pools, register_flow_deployments

    try:
        return client.read_deployment_by_name(DEPLOYMENT)
    except ObjectNotFound:
        pass
    ensure_work_pools(REPO / "prefect.yaml", only={KUBERNETES_POOL})
    register_flow_deployments(REPO / "prefect.yaml", code_version(), only={KUBERNETES_POOL})
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

    client = mlflow.MlflowClient(settings.mlflow_url)
    experiment = client.get_experiment_by_name(spec.name)
    found = tracking.find_pipeline_run(client, experiment.experiment_id, run) if experiment is not None else None
    if found is None:
        return None
    return tracking.mlflow_run_url(settings, found.info.experiment_id, found.info.run_id), dict(found.data.metrics)


def run_on_cluster(spec_file: str, spec: PipelineSpec, run: str, *, detach: bool) -> None:
    from argus.backends.kubernetes.cluster import Cluster, ClusterError

    try:
        cluster = Cluster(spec.kubernetes)
    except ClusterError as exc:
        exit_with_error(f"{spec_file}: {exc}")
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
        exit_with_error(str(exc))


def _submit_and_follow(
    spec_file: str, spec: PipelineSpec, run: str, settings: StackSettings, where: str, *, detach: bool
) -> None:
    # Prefect, MLflow and boto3 in this process talk to the cluster's services from here on.
    os.environ.update(settings.client_env())
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from argus import tracking
    from argus.backends.kubernetes import render
    from argus.storage import write_uri

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_url}), get_client(sync_client=True) as client:
        try:
            deployment = _deployment(client)
        except Exception as exc:  # noqa: BLE001 - an unreachable API, a refused registration
            exit_with_error(f"Prefect at {settings.prefect_url}: {exc}")
        busy = _running_flow_run(client, deployment.id, run)
        if busy is not None:
            exit_with_error(
                f"run {run!r} is already {busy.state.name.lower() if busy.state else 'active'} "
                f"in the cluster: {tracking.prefect_flow_run_url(settings, str(busy.id))}"
            )
        # Only now: a run that is still queued or running keeps the spec object it was submitted with.
        if spec_file.startswith("s3://"):
            spec_uri = spec_file
        else:
            spec_uri = spec_object_uri(settings, run, spec_file)
            try:
                write_uri(spec_uri, Path(spec_file).read_bytes(), settings)
            except Exception as exc:  # noqa: BLE001 - botocore's errors carry the endpoint and the reason
                exit_with_error(f"uploading the spec to {spec_uri}: {exc}")
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
