"""`sft`: cold-start SFT as a training job on the backend (a PyTorchJob, or torchrun here), followed live.

The job's checkpoints and export go to prefixes keyed by its inputs (spec section, data hashes, base
model fingerprint, run name), so the same inputs resume and different inputs never pick up a
stranger's checkpoint. Prefect shows a progress artifact (share of optimizer steps); MLflow gets the
trainer's own metrics, nested under the pipeline's run.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import get_run_logger, task

from argus.backends.base import ToolEndpoints
from argus.backends.jobs import base_model_uri, sft_job
from argus.config import PipelineSpec
from argus.storage import fingerprint
from flows.context import RunContext
from flows.results import DataRef, SFTResult, cache_key
from flows.runtime import stack_settings
from flows.stages.training import run_job


def _sft_inputs(spec: PipelineSpec, run_name: str, data: DataRef, base_fingerprint: str) -> str:
    return cache_key("sft", spec.name, run_name, spec.sft.model_dump(mode="json"), data.hashes, base_fingerprint)


def _sft_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _sft_inputs(p["spec"], p["run_name"], p["data"], p["base_fingerprint"])


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
    return run_job(spec, run_name, job, "sft")


@task(name="base-model")
def build_base_model(spec: PipelineSpec) -> tuple[str, str]:
    """The spec's base model and its content fingerprint. A tiny model is built once per state directory,
    its copy pre-training (the `mini` size) reported in the flow's log as it goes."""
    log = get_run_logger()
    settings = stack_settings()
    last = [0.0]

    def progress(step: int, accuracy: float) -> None:
        if time.monotonic() - last[0] > 10:
            last[0] = time.monotonic()
            log.info("copy pre-training of the tiny base: step %d, copy accuracy %.3f", step, accuracy)

    uri = base_model_uri(spec, settings, progress)
    return uri, fingerprint(uri, settings)


def base_model(ctx: RunContext) -> tuple[str, str]:
    """The spec's base model (URI, fingerprint), after the data and tool stages rather than beside them:
    on 2 cores both are CPU-bound, and side by side the copy pre-training ran at a quarter of its speed
    and the data stage slowed too, so the three stages took as long as in sequence (3m49 against 3m48
    on fresh quickstarts) for more moving parts."""
    with ctx.stage("base-model") as clock:
        started = time.monotonic()
        uri, digest = build_base_model(ctx.spec)
        clock.work_s = time.monotonic() - started
    return uri, digest


def run(ctx: RunContext, data: DataRef, base: tuple[str, str], tools: ToolEndpoints) -> SFTResult:
    with ctx.stage("sft") as clock:
        state = train_sft(
            ctx.spec, ctx.run, data, base[0], base[1], ctx.mlflow_run_id, ctx.lineage, tools, return_state=True
        )
        result: SFTResult = state.result()
        clock.work_s, clock.cached = result.work_s, state.name == "Cached"
    return result
