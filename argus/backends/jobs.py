"""Training jobs as a backend runs them, built from a pipeline spec (one place for CLI and flows)."""

from __future__ import annotations

from pathlib import Path

from argus import tracking
from argus.backends.base import TrainingJob
from argus.config import PipelineSpec, SFTJobConfig, StackSettings


def base_model_uri(spec: PipelineSpec, settings: StackSettings) -> str:
    """The spec's base model; a tiny model (`init_tiny`) is built once under `<home>/models`."""
    if spec.model.base.uri is not None:
        return spec.model.base.uri
    from argus.models.tiny import init_tiny

    arch = spec.model.base.init_tiny
    assert arch is not None  # the spec model requires uri or init_tiny
    size = spec.model.base.tiny_size
    path = settings.home / "models" / f"tiny-{arch}-{size}-seed{spec.sft.seed}"
    if not (path / "config.json").exists():
        init_tiny(arch, str(path), seed=spec.sft.seed, size=size)
    return str(path)


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
        lineage={
            tracking.TAG_SPEC_NAME: spec.name,
            **({tracking.TAG_SPEC_FILE: str(spec_file)} if spec_file else {}),
            **(lineage or {}),
        },
    )
    return TrainingJob(
        name=name,
        module="trainers.sft",
        config=config.model_dump(mode="json"),
        nodes=spec.sft.nodes,
        nproc_per_node=nproc_per_node or spec.sft.nproc_per_node,
        image=spec.sft.image,
        node_pool=spec.sft.node_pool,
        resources=spec.sft.resources,
        env=env or {},
        backoff_limit=spec.sft.backoff_limit,
        active_deadline_seconds=spec.sft.active_deadline_seconds,
        labels={"argus.dev/spec": spec.name, "argus.dev/stage": "sft"},
    )
