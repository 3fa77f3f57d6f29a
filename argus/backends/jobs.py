"""Training jobs as a backend runs them, built from a pipeline spec (one place for CLI and flows)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from argus import tracking
from argus.backends.base import ToolEndpoints, TrainingJob
from argus.config import PipelineSpec, RLJobConfig, SFTJobConfig, StackSettings, TrainingJobSpec


def base_model_uri(
    spec: PipelineSpec,
    settings: StackSettings,
    on_progress: Callable[[int, float], None] = lambda _step, _accuracy: None,
) -> str:
    """The spec's base model; a tiny model (`init_tiny`) is built once in the settings' model cache
    (`tiny.built`: whole or not at all, shared by every home that points at the same cache)."""
    if spec.model.base.uri is not None:
        return spec.model.base.uri
    from argus.models import tiny

    arch = spec.model.base.init_tiny
    assert arch is not None  # the spec model requires uri or init_tiny
    return str(tiny.built(arch, spec.model.base.tiny_size, spec.sft.seed, settings.models_dir, on_progress))


def _lineage(spec: PipelineSpec, spec_file: str | Path | None, lineage: dict[str, str] | None) -> dict[str, str]:
    return {
        tracking.TAG_SPEC_NAME: spec.name,
        **({tracking.TAG_SPEC_FILE: str(spec_file)} if spec_file else {}),
        **(lineage or {}),
    }


def _job(
    spec: PipelineSpec,
    stage: str,
    section: TrainingJobSpec,
    config: SFTJobConfig | RLJobConfig,
    nproc_per_node: int | None,
    env: dict[str, str] | None,
) -> TrainingJob:
    return TrainingJob(
        name=config.job_name,
        module=f"trainers.{stage}",
        config=config.model_dump(mode="json"),
        nodes=section.nodes,
        nproc_per_node=nproc_per_node or section.nproc_per_node,
        image=section.image,
        node_pool=section.node_pool,
        resources=section.resources,
        env=env or {},
        backoff_limit=section.backoff_limit,
        active_deadline_seconds=section.active_deadline_seconds,
        labels={"argus.dev/spec": spec.name, "argus.dev/stage": stage},
    )


def sft_job(
    spec: PipelineSpec,
    settings: StackSettings,
    *,
    name: str,
    dataset: str,
    model: str,
    output_uri: str | None = None,
    nproc_per_node: int | None = None,
    lineage: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    spec_file: str | Path | None = None,
) -> TrainingJob:
    config = SFTJobConfig(
        job_name=name,
        prompt=spec.prompt,
        dataset=dataset,
        model=model,
        sft=spec.sft,
        mlflow_experiment=spec.name,
        checkpoint_uri=spec.sft.checkpoint.uri or f"s3://{settings.bucket_checkpoints}/{spec.name}/{name}",
        output_uri=output_uri or f"s3://{settings.bucket_models}/{spec.name}/{name}",
        node_pool=spec.sft.node_pool,
        lineage=_lineage(spec, spec_file, lineage),
    )
    return _job(spec, "sft", spec.sft, config, nproc_per_node, env)


def rl_job(
    spec: PipelineSpec,
    settings: StackSettings,
    *,
    name: str,
    dataset: str,
    model: str,
    tools: ToolEndpoints,
    output_uri: str | None = None,
    nproc_per_node: int | None = None,
    lineage: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    spec_file: str | Path | None = None,
) -> TrainingJob:
    """The RL job: from `model` (the SFT export) on the RL split, rolling out against `tools`."""
    config = RLJobConfig(
        job_name=name,
        prompt=spec.prompt,
        dataset=dataset,
        model=model,
        rl=spec.rl,
        mlflow_experiment=spec.name,
        checkpoint_uri=spec.rl.checkpoint.uri or f"s3://{settings.bucket_checkpoints}/{spec.name}/{name}",
        output_uri=output_uri or f"s3://{settings.bucket_models}/{spec.name}/{name}",
        node_pool=spec.rl.node_pool,
        lineage=_lineage(spec, spec_file, lineage),
        sandbox_url=tools.sandbox_url,
        search_url=tools.search_url,
        judge_url=tools.judge_url,
    )
    return _job(spec, "rl", spec.rl, config, nproc_per_node, env)
