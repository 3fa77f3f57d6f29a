"""`rl`: GRPO with multi-turn tool rollouts, as a training job on the backend, from the SFT model.

It runs between `sft` and `evaluate` when the spec enables RL. The job's rollouts call the run's own
tool environment (the code executor and the search proxy the evaluations use). Its checkpoints and
export go to prefixes keyed by its inputs (the spec's rl section, the data hashes, the start model, the
run name), not by the tools' addresses, which change between runs: a re-run resumes from the newest
complete checkpoint and rolls out against the tools it has now.
"""

from __future__ import annotations

from typing import Any

from prefect import task

from argus import tracking
from argus.backends.base import ToolEndpoints
from argus.backends.jobs import rl_job
from argus.config import PipelineSpec
from flows.context import PipelineError, RunContext
from flows.results import DataRef, RLResult, SFTResult, cache_key
from flows.runtime import stack_settings
from flows.stages.training import run_job


def _rl_inputs(spec: PipelineSpec, run_name: str, data: DataRef, start_model: str) -> str:
    return cache_key("rl", spec.name, run_name, spec.rl.model_dump(mode="json"), spec.prompt, data.hashes, start_model)


def _rl_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _rl_inputs(p["spec"], p["run_name"], p["data"], p["start_model"])


@task(name="rl", persist_result=True, cache_key_fn=_rl_key)
def train_rl(
    spec: PipelineSpec,
    run_name: str,
    data: DataRef,
    start_model: str,
    parent_run_id: str | None,
    lineage: dict[str, str],
    tools: ToolEndpoints,
) -> RLResult:
    """Submit the RL job and follow it; the same inputs reuse its checkpoint prefix, so a re-run resumes."""
    if data.rl is None:
        raise PipelineError("rl.enabled but the data has no RL split (data.rl, or data.generate.rl_size > 0)")
    settings = stack_settings()
    suffix = _rl_inputs(spec, run_name, data, start_model)[-12:]
    job = rl_job(
        spec,
        settings,
        name=f"{run_name}-rl",
        dataset=data.rl,
        model=start_model,
        tools=tools,
        output_uri=f"s3://{settings.bucket_models}/{spec.name}/{run_name}/rl-{suffix}",
        lineage=lineage,
        env={"ARGUS_MLFLOW_PARENT_RUN_ID": parent_run_id} if parent_run_id else {},
    )
    if spec.rl.checkpoint.uri is None:
        job.config["checkpoint_uri"] = f"s3://{settings.bucket_checkpoints}/{spec.name}/{run_name}/rl-{suffix}"
    return run_job(spec, run_name, job, "rl")


def run(ctx: RunContext, data: DataRef, start: SFTResult, tools: ToolEndpoints) -> RLResult:
    lineage = {
        **ctx.lineage,
        tracking.TAG_SFT_RUN_ID: start.mlflow_run_id or "",
        tracking.TAG_RL_START_MODEL: start.model_uri,
    }
    with ctx.stage("rl") as clock:
        state = train_rl(ctx.spec, ctx.run, data, start.model_uri, ctx.mlflow_run_id, lineage, tools, return_state=True)
        result: RLResult = state.result()
        clock.work_s, clock.cached = result.work_s, state.name == "Cached"
    return result
