"""Training jobs as a backend runs them, built from a pipeline spec (one place for CLI and flows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from argus.backends.base import TrainingJob
from argus.config import PipelineSpec, SFTJobConfig, SFTSpec, StackSettings


def generated_deepspeed_config(sft: SFTSpec, *, cuda: bool, bf16_ok: bool) -> dict[str, Any]:
    """The DeepSpeed config of an SFT job: the trainer builds it for the device it finds, the Kubernetes
    renderer for GPU pods (it becomes the job's ConfigMap)."""
    zero: dict[str, Any] = {"stage": sft.deepspeed.zero_stage}
    if sft.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if sft.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {
        "train_micro_batch_size_per_gpu": sft.micro_batch_size,
        "gradient_accumulation_steps": sft.grad_accum,
        "gradient_clipping": sft.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": sft.precision == "bf16" and bf16_ok},
        "fp16": {"enabled": sft.precision == "fp16" and cuda},
        # AdamW from torch: the same optimizer with or without DeepSpeed, which the benchmark relies on.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def base_model_uri(spec: PipelineSpec, settings: StackSettings) -> str:
    """The spec's base model; a tiny model (`init_tiny`) is built once under `<home>/models`."""
    if spec.model.base.uri is not None:
        return spec.model.base.uri
    from argus.models.tiny import init_tiny

    arch = spec.model.base.init_tiny
    assert arch is not None  # the spec model requires uri or init_tiny
    path = settings.home / "models" / f"tiny-{arch}-seed{spec.sft.seed}"
    if not (path / "config.json").exists():
        init_tiny(arch, str(path), seed=spec.sft.seed)
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
        dataset=dataset,
        model=model,
        sft=spec.sft,
        mlflow_experiment=spec.name,
        checkpoint_uri=spec.sft.checkpoint.uri or f"s3://{settings.bucket_checkpoints}/{spec.name}/{name}",
        output_uri=output_uri or f"s3://{settings.bucket_models}/{spec.name}/{name}",
        node_pool=spec.sft.node_pool,
        lineage={
            "argus.spec.name": spec.name,
            **({"argus.spec.file": str(spec_file)} if spec_file else {}),
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
