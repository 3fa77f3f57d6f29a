"""What the training stages (`sft`, `rl`) share: a training job submitted to the backend and followed
live, its progress events turned into Prefect's progress artifact and the flow's log, and its result."""

from __future__ import annotations

import time
from uuid import UUID

from prefect import get_run_logger
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from argus import events
from argus.backends.base import TrainingJob
from argus.config import PipelineSpec
from flows.context import PipelineError
from flows.results import SFTResult
from flows.runtime import artifact_key, make_backend, stack_settings


class Follower:
    """Turns a job's progress events into Prefect's progress artifact and the flow's log."""

    def __init__(self, run_name: str, job_name: str, stage: str):
        self.log = get_run_logger()
        self.stage = stage
        self.seen: dict[str, events.Event] = {}
        self.last_report = 0.0
        self.progress_id: UUID = create_progress_artifact(  # type: ignore[assignment]
            0.0,
            key=artifact_key(run_name, f"{stage}-progress"),
            description=f"{stage.upper()} job {job_name}: optimizer steps",
        )

    def __call__(self, event: events.Event) -> None:
        self.seen[event.event] = event
        if isinstance(event, events.Step):
            now = time.monotonic()
            if now - self.last_report > 5 or event.step == event.total:
                self.last_report = now
                update_progress_artifact(self.progress_id, 100.0 * event.step / event.total)
            every = 25 if self.stage == "sft" else 1  # an RL step takes a rollout: each one is news
            if event.step % every == 0 or event.step == event.total:
                reward = event.metrics.get("reward/overall/mean")
                extra = f" reward {reward:.3f}" if reward is not None else ""
                self.log.info("step %d/%d loss %.4f%s", event.step, event.total, event.loss, extra)
        elif isinstance(event, events.Start):
            self.log.info("training: MLflow run %s, %d steps", event.mlflow_run_id, event.total)
        elif isinstance(event, events.Checkpoint | events.Exported | events.Resumed | events.Restarting):
            self.log.info("%s: %s", event.event, event.model_dump(exclude={"event", "time"}))


def run_job(spec: PipelineSpec, run_name: str, job: TrainingJob, stage: str) -> SFTResult:
    """Run `job` on the spec's backend and follow it to the end; a failed job fails the stage."""
    follower = Follower(run_name, job.name, stage)
    backend = make_backend(spec.backend, stack_settings(), spec)
    started = time.monotonic()
    try:
        result = backend.run(job, follower)
    finally:
        backend.close()
    work_s = time.monotonic() - started
    if not result.succeeded:
        raise PipelineError(f"{stage.upper()} job {job.name} {result.state.value}: {result.message}\n{result.log_tail}")
    start, step, resumed = (follower.seen.get(k) for k in ("start", "step", "resumed"))
    return SFTResult(
        job_name=job.name,
        mlflow_run_id=start.mlflow_run_id if isinstance(start, events.Start) else None,
        model_uri=job.config["output_uri"],
        checkpoint_uri=job.config["checkpoint_uri"],
        steps=step.step if isinstance(step, events.Step) else None,
        final_loss=step.loss if isinstance(step, events.Step) else None,
        final_metrics=step.metrics if isinstance(step, events.Step) else {},
        restarts=result.restarts,
        resumed_from=resumed.checkpoint if isinstance(resumed, events.Resumed) else None,
        work_s=work_s,
    )
