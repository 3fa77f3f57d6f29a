"""`sft`: cold-start SFT as a training job on the backend (a PyTorchJob, or torchrun here), followed live.

The job's checkpoints and export go to prefixes keyed by its inputs (spec section, data hashes, base
model fingerprint, run name), so the same inputs resume and different inputs never pick up a
stranger's checkpoint. Prefect shows a progress artifact (share of optimizer steps); MLflow gets the
trainer's own metrics, nested under the pipeline's run.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact

from argus import events
from argus.backends.base import ToolEndpoints
from argus.backends.jobs import base_model_uri, sft_job
from argus.config import PipelineSpec
from argus.storage import fingerprint
from flows.context import PipelineError, RunContext
from flows.results import DataRef, SFTResult, cache_key
from flows.runtime import artifact_key, make_backend, stack_settings


def _sft_inputs(spec: PipelineSpec, run_name: str, data: DataRef, base_fingerprint: str) -> str:
    return cache_key("sft", spec.name, run_name, spec.sft.model_dump(mode="json"), data.hashes, base_fingerprint)


def _sft_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _sft_inputs(p["spec"], p["run_name"], p["data"], p["base_fingerprint"])


class _Follower:
    """Turns the job's progress events into Prefect's progress artifact and the flow's log."""

    def __init__(self, run_name: str, job_name: str):
        self.log = get_run_logger()
        self.seen: dict[str, events.Event] = {}
        self.last_report = 0.0
        self.progress_id: UUID = create_progress_artifact(  # type: ignore[assignment]
            0.0, key=artifact_key(run_name, "sft-progress"), description=f"SFT job {job_name}: optimizer steps"
        )

    def __call__(self, event: events.Event) -> None:
        self.seen[event.event] = event
        if isinstance(event, events.Step):
            now = time.monotonic()
            if now - self.last_report > 5 or event.step == event.total:
                self.last_report = now
                update_progress_artifact(self.progress_id, 100.0 * event.step / event.total)
            if event.step % 25 == 0 or event.step == event.total:
                self.log.info("step %d/%d loss %.4f", event.step, event.total, event.loss)
        elif isinstance(event, events.Start):
            self.log.info("training: MLflow run %s, %d steps", event.mlflow_run_id, event.total)
        elif isinstance(event, events.Checkpoint | events.Exported | events.Resumed | events.Restarting):
            self.log.info("%s: %s", event.event, event.model_dump(exclude={"event", "time"}))


@task(name="sft", persist_result=True, cache_key_fn=_sft_key)
def train_sft(
    spec: PipelineSpec,
    run_name: str,
    data: DataRef,
    base_model: str,
    base_fingerprint: str,
    parent_run_id: str | None,
    lineage: dict[str, str],
    tools: ToolEndpoints | None = None,
) -> SFTResult:
    """Submit the SFT job to the backend and follow it; the same inputs reuse the checkpoint prefix,
    so a re-run after a crash resumes where the job stopped."""
    settings = stack_settings()
    suffix = _sft_inputs(spec, run_name, data, base_fingerprint)[-12:]
    name = f"{run_name}-sft"
    job = sft_job(
        spec,
        settings,
        name=name,
        dataset=data.sft,
        model=base_model,
        output_uri=f"s3://{settings.bucket_models}/{spec.name}/{run_name}/sft-{suffix}",
        lineage=lineage,
        env={"ARGUS_MLFLOW_PARENT_RUN_ID": parent_run_id} if parent_run_id else {},
    )
    if spec.sft.checkpoint.uri is None:
        job.config["checkpoint_uri"] = f"s3://{settings.bucket_checkpoints}/{spec.name}/{run_name}/sft-{suffix}"
    if spec.sft.curve.every_steps and tools is not None:  # the learning curve plays held-out tasks
        job.config.update(curve_data=data.eval, sandbox_url=tools.sandbox_url, search_url=tools.search_url)
    follower = _Follower(run_name, name)
    backend = make_backend(spec.backend, settings, spec)
    started = time.monotonic()
    try:
        result = backend.run(job, follower)
    finally:
        backend.close()
    work_s = time.monotonic() - started
    if not result.succeeded:
        raise PipelineError(f"SFT job {name} {result.state.value}: {result.message}\n{result.log_tail}")
    start, step, resumed = (follower.seen.get(k) for k in ("start", "step", "resumed"))
    return SFTResult(
        job_name=name,
        mlflow_run_id=start.mlflow_run_id if isinstance(start, events.Start) else None,
        model_uri=job.config["output_uri"],
        checkpoint_uri=job.config["checkpoint_uri"],
        steps=step.step if isinstance(step, events.Step) else None,
        final_loss=step.loss if isinstance(step, events.Step) else None,
        restarts=result.restarts,
        resumed_from=resumed.checkpoint if isinstance(resumed, events.Resumed) else None,
        work_s=work_s,
    )


def base_model(ctx: RunContext) -> tuple[str, str]:
    """The spec's base model (built once when it is a tiny model) and its content fingerprint."""
    uri = base_model_uri(ctx.spec, ctx.settings)
    return uri, fingerprint(uri, ctx.settings)


def run(ctx: RunContext, data: DataRef, base: tuple[str, str], tools: ToolEndpoints) -> SFTResult:
    with ctx.stage("sft") as clock:
        state = train_sft(
            ctx.spec, ctx.run, data, base[0], base[1], ctx.mlflow_run_id, ctx.lineage, tools, return_state=True
        )
        result: SFTResult = state.result()
        clock.work_s, clock.cached = result.work_s, state.name == "Cached"
    return result
