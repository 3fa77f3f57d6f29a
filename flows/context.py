"""The run context: what every stage of one pipeline run shares, and how a stage is timed.

`open_run` loads the spec, checks the run name, picks the backend, and finds (or creates) the
pipeline's MLflow run, under which every stage's runs nest. `RunContext.stage(name)` times a stage for
the result table (`RunContext.beside`, a stage submitted to run beside the ones that follow): the wall
time, the time inside the stage's own program (data generation, training, serving and evaluation: the
stage reports it on the clock), and whether Prefect skipped it because an earlier run finished it.
`close` ends the MLflow run and stops what the run started and still runs.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from prefect import get_run_logger, task
from prefect.artifacts import create_link_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import PrefectFuture
from prefect.runtime import flow_run

from argus import tracking
from argus.backends.base import Backend
from argus.config import DNS_LABEL, PipelineSpec, StackSettings
from argus.specfile import SpecError, load_spec
from flows.results import StageTiming
from flows.runtime import FlowError, artifact_key, flow_run_links, make_backend, mlflow_client, stack_settings
from flows.serving import endpoint_name

T = TypeVar("T")


class PipelineError(FlowError):
    """A stage failed in a way its message explains."""


@dataclass
class StageClock:
    """What a stage reports about itself while it runs."""

    work_s: float = 0.0
    cached: bool = False


@dataclass
class RunContext:
    spec: PipelineSpec
    spec_uri: str
    run: str
    settings: StackSettings
    backend: Backend
    flow_run_id: str
    mlflow_run_id: str
    mlflow_run_url: str
    experiment_id: str
    lineage: dict[str, str] = field(default_factory=dict)  # tags on every MLflow object the run makes
    stages: list[StageTiming] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # servers started for the promotion that follows
    beside_runs: list[PrefectFuture[Any]] = field(default_factory=list)  # stages started by `beside`
    started: float = field(default_factory=time.monotonic)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[StageClock]:
        """Time a stage; when it finishes, its durations go on the pipeline's MLflow run at once
        (`stage/<name>/wall_s`, `.../work_s`, `.../cached`), so a run in progress shows its stages."""
        started = time.monotonic()
        clock = StageClock()
        yield clock
        self._record(name, started, time.monotonic(), clock)

    def beside(self, name: str, future: PrefectFuture[T]) -> Callable[[], T]:
        """Stage `name`, a task submitted just now (`future`), running beside the stages that follow.
        The returned call waits for its result and records the stage, timed from the submission to the
        task's own end (not to whenever the pipeline got round to waiting), so the table shows the overlap."""
        started = time.monotonic()
        ended: list[float] = []
        self.beside_runs.append(future)
        future.add_done_callback(lambda _f: ended.append(time.monotonic()))

        def wait() -> T:
            result = future.result()
            end = ended[0] if ended else time.monotonic()
            self._record(name, started, end, StageClock(work_s=end - started))
            return result

        return wait

    def _record(self, name: str, started: float, ended: float, clock: StageClock) -> None:
        timing = StageTiming(
            stage=name, wall_s=ended - started, work_s=clock.work_s, cached=clock.cached, ended_s=ended - self.started
        )
        self.stages.append(timing)
        import mlflow

        now = int(time.time() * 1000)
        figures = {"wall_s": timing.wall_s, "work_s": timing.work_s, "cached": float(timing.cached)}
        try:
            mlflow_client(self.settings).log_batch(
                self.mlflow_run_id,
                metrics=[mlflow.entities.Metric(f"stage/{name}/{k}", v, now, 0) for k, v in figures.items()],
            )
        except Exception as exc:  # noqa: BLE001 - a missed timing is no reason to fail a finished stage
            get_run_logger().warning("recording stage %s on MLflow: %s", name, exc)

    @property
    def wall_s(self) -> float:
        return time.monotonic() - self.started

    def close(self, status: str, metrics: dict[str, float]) -> None:
        """End the pipeline's MLflow run; after a failure, stop the servers kept for a promotion that will
        not happen (never one a stable endpoint routes to). Stages still running beside the failed one
        are waited for first: a server still starting would come up after its removal."""
        import mlflow

        for future in self.beside_runs:
            future.wait()
        try:
            if status != "FINISHED" and self.kept:
                stable = self.backend.endpoint(endpoint_name(self.spec.model.registered_name))
                for name in self.kept:
                    if stable is None or name != stable.active:
                        self.backend.remove(name)
            self.backend.close()
        finally:
            client = mlflow_client(self.settings)
            if metrics:
                client.log_batch(
                    self.mlflow_run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in sorted(metrics.items())]
                )
            client.set_terminated(self.mlflow_run_id, status)


@task(name="load-spec", cache_policy=NO_CACHE)
def load_pipeline_spec(spec_uri: str) -> PipelineSpec:
    try:
        return load_spec(spec_uri)
    except SpecError as exc:
        raise PipelineError("invalid spec:\n" + "\n".join(map(str, exc.issues))) from None


@task(name="mlflow-run", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def find_pipeline_run(client: Any, experiment_id: str, run_name: str) -> Any | None:
    return tracking.find_pipeline_run(client, experiment_id, run_name)


def _pipeline_mlflow_run(settings: StackSettings, spec: PipelineSpec, run: str, spec_uri: str) -> tuple[str, str, str]:
    """The pipeline's MLflow run (found again by run name on a re-run); the stages' runs nest under it."""

    client = mlflow_client(settings)
    experiment_id = tracking.ensure_experiment(spec.name, tracking.experiment_description(spec.name))
    found = find_pipeline_run(client, experiment_id, run)
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {
            tracking.TAG_PIPELINE_RUN: run,
            tracking.TAG_PIPELINE_ROOT: "true",
            tracking.TAG_SPEC_NAME: spec.name,
            tracking.TAG_SPEC_FILE: spec_uri,
        }
        run_id = client.create_run(experiment_id, run_name=f"pipeline-{run}", tags=tags).info.run_id
        client.log_dict(run_id, spec.model_dump(mode="json"), "spec/resolved.json")
    for key, value in {**flow_run_links(settings), tracking.TAG_CODE_VERSION: tracking.code_version()}.items():
        client.set_tag(run_id, key, value)
    return run_id, tracking.mlflow_run_url(settings, experiment_id, run_id), experiment_id


def open_run(spec_uri: str, run_name: str | None) -> RunContext:
    settings = stack_settings()
    spec = load_pipeline_spec(spec_uri)
    run = run_name or spec.name
    if not re.match(DNS_LABEL, run):
        raise PipelineError(f"run name {run!r} must be a DNS label (lowercase letters, digits, '-')")
    backend = make_backend(spec.backend, settings, spec)
    mlflow_run_id, mlflow_url, experiment_id = _pipeline_mlflow_run(settings, spec, run, spec_uri)
    create_link_artifact(mlflow_url, link_text=f"MLflow run of pipeline {run}", key=artifact_key(run, "mlflow"))
    flow_run_id = str(flow_run.get_id())
    get_run_logger().info("pipeline %s of %s: MLflow run %s", run, spec.name, mlflow_url)
    return RunContext(
        spec=spec,
        spec_uri=spec_uri,
        run=run,
        settings=settings,
        backend=backend,
        flow_run_id=flow_run_id,
        mlflow_run_id=mlflow_run_id,
        mlflow_run_url=mlflow_url,
        experiment_id=experiment_id,
        lineage={
            tracking.TAG_PIPELINE_RUN: run,
            tracking.TAG_PREFECT_FLOW_RUN_ID: flow_run_id,
            tracking.TAG_PREFECT_FLOW_RUN_URL: tracking.prefect_flow_run_url(settings, flow_run_id),
        },
    )
