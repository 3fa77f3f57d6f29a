"""What every Argus trainer shares: the job-config contract, seeding, DeepSpeed set-up, checkpoints
with exact resume, and the export of a servable model directory.

`trainers.sft` and `trainers.rl` subclass `DeepSpeedTrainer`; each keeps only its data and its loop. A
checkpoint holds the engine (model, optimizer, scheduler), every rank's RNG state and the trainer's own
position, and is committed only when every rank's files are in the object store (`CheckpointStore`),
so a pod killed mid-save resumes from the previous complete one.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ValidationError

from argus import events, tracking
from argus.config import RLSpec, SFTSpec, StackSettings
from argus.models.export import EXPORT_RECORD
from argus.storage import download_dir, is_s3, upload_dir
from trainers.checkpoint import CheckpointStore
from trainers.deepspeed import deepspeed_config

J = TypeVar("J", bound=BaseModel)
TAG = "ckpt"


def load_job(model: type[J], path: str | None) -> J:
    """A job config from --config FILE or $ARGUS_JOB_CONFIG; errors name the source and the field."""
    raw = Path(path).read_text() if path else os.environ.get("ARGUS_JOB_CONFIG")
    where = path or "ARGUS_JOB_CONFIG"
    if not raw:
        raise SystemExit("error: give --config FILE or set ARGUS_JOB_CONFIG")
    try:
        return model.model_validate(yaml.safe_load(raw))
    except (ValidationError, yaml.YAMLError) as exc:
        lines = [f"{where}: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in getattr(exc, "errors", lambda: [])()]
        raise SystemExit("error: invalid job config\n" + ("\n".join(lines) or str(exc))) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def lr_lambda(kind: str, warmup: int, total: int) -> Any:
    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def materialise_model(uri: str, cache: Path, settings: StackSettings) -> Path:
    if not is_s3(uri):
        return Path(uri)
    target = cache / hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not (target / "config.json").exists():
        # Download beside the target and rename: ranks sharing a cache never see a half-copied model.
        tmp = Path(tempfile.mkdtemp(dir=cache))
        download_dir(uri, tmp, settings)
        with contextlib.suppress(OSError):  # another rank won the race
            os.replace(tmp, target)
    return target


class DeepSpeedTrainer:
    """One rank of a DeepSpeed job: `spec` is the job's training section (SFT or RL)."""

    def __init__(self, job: Any, spec: SFTSpec | RLSpec, kind: str):
        import deepspeed
        import torch.distributed as dist

        self.job = job
        self.dist = dist
        self.settings = StackSettings.for_workload()
        self.rank = int(os.environ.get("RANK", "0"))
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.is_main = self.rank == 0
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.deepspeed = deepspeed
        self.spec = spec
        seed_everything(spec.seed)
        self.work = Path(tempfile.mkdtemp(prefix=f"argus-{kind}-{job.job_name}-r{self.rank}-"))

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def model_cache(self) -> Path:
        cache = Path(os.environ.get("ARGUS_MODEL_CACHE", Path.home() / ".cache" / "argus" / "models"))
        cache.mkdir(parents=True, exist_ok=True)
        return cache

    def open_run(
        self, stage: str, run_id: str | None, params: dict[str, object], tags: dict[str, str], examples: int
    ) -> tuple[tracking.RunTracker | None, str | None]:
        """Rank 0's MLflow run (the checkpoint's after a resume) with the job's lineage tags, and its id
        on every rank; rank 0 announces the start."""
        job = self.job
        tracker = None
        if self.is_main:
            all_tags = {
                tracking.TAG_JOB_NAME: job.job_name,
                tracking.TAG_STAGE: stage,
                tracking.TAG_DATASET_URI: job.dataset,
                tracking.TAG_DATASET_SHA256: self.dataset_sha256,
                tracking.TAG_BASE_MODEL_URI: job.model,
                tracking.TAG_CODE_VERSION: tracking.code_version(),
                tracking.TAG_NODE_POOL: job.node_pool or "local",
                tracking.TAG_PROMPT: job.prompt,
                **tags,
                **job.lineage,
            }
            tracker = tracking.RunTracker(job.mlflow_experiment, job.job_name, tags=all_tags, resume_run_id=run_id)
            run_id = tracker.run_id
            if not tracker.resumed:
                spec = self.spec
                tracker.log_params(
                    {
                        "world_size": self.world,
                        "zero_stage": spec.deepspeed.zero_stage,
                        "lr": spec.optim.lr,
                        "scheduler": spec.optim.scheduler,
                        "precision": spec.precision,
                        "seed": spec.seed,
                        "total_steps": self.total_steps,
                        **params,
                    }
                )
                tracking.log_datasets(
                    tracker.client, run_id, {f"{stage}-data": (job.dataset, self.dataset_sha256, "training")}
                )
            step = self.start_step
            events.emit(events.Start(step=step, total=self.total_steps, mlflow_run_id=run_id, examples=examples))
        return tracker, self.broadcast(run_id)

    total_steps: int = 0
    start_step: int = 0

    def initialize(self, model: Any, total_steps: int) -> None:
        """DeepSpeed engine, AdamW (DeepSpeed's CPU Adam under ZeRO-Offload) and the LR schedule."""
        spec = self.spec
        if spec.gradient_checkpointing:
            # The non-reentrant form: it works with inputs that need no gradient (frozen embeddings,
            # pixel values) and with ZeRO-3's parameter hooks, and is the one PyTorch recommends.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        optim = spec.optim
        optimizer: torch.optim.Optimizer
        betas = (optim.adam_beta1, optim.adam_beta2)
        if spec.deepspeed.offload_optimizer:
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam(W) is the one it
            # is built for (and the one it accepts by default).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, adamw_mode=True, betas=betas
            )
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, betas=betas)
        warmup = int(optim.warmup_ratio * total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.scheduler, warmup, total_steps))
        self.engine, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=deepspeed_config(spec, self.settings, self.world),
        )

    def resume(self) -> tuple[int, int, str | None]:
        """(step, data position, MLflow run id) of the newest complete checkpoint, or a fresh start."""
        store = CheckpointStore(self.job.checkpoint_uri, self.settings)
        latest = self.broadcast(store.latest() if self.is_main else None)
        if latest is None:
            return 0, 0, None
        if latest.manifest.get("world_size") != self.world:
            raise SystemExit(
                f"error: checkpoint {latest.uri} was written by {latest.manifest.get('world_size')} ranks; "
                f"this job has {self.world} (ZeRO optimizer shards need the same world size)"
            )
        started = time.perf_counter()
        local = store.download(latest, self.work / "resume")
        _path, client = self.engine.load_checkpoint(
            str(local), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        set_rng_state(torch.load(local / TAG / f"rng_rank{self.rank}.pt", weights_only=False))
        if self.is_main:
            events.emit(
                events.Resumed(step=latest.step, checkpoint=latest.uri, seconds=round(time.perf_counter() - started, 3))
            )
        return int(client["step"]), int(client["position"]), client.get("mlflow_run_id")

    def save(self, step: int, position: int, run_id: str | None) -> None:
        store = CheckpointStore(self.job.checkpoint_uri, self.settings)
        nonce = self.broadcast(store.new_nonce() if self.is_main else None)
        local = self.work / f"save-{step}"
        started = time.perf_counter()
        self.engine.save_checkpoint(
            str(local),
            tag=TAG,
            save_latest=False,
            client_state={"step": step, "position": position, "mlflow_run_id": run_id},
        )
        torch.save(rng_state(), local / TAG / f"rng_rank{self.rank}.pt")
        files = store.upload(local, store.partial_uri(step, nonce))
        gathered: list[dict[str, Any]] = [{} for _ in range(self.world)]
        self.dist.all_gather_object(gathered, files)
        if self.is_main:
            merged = {k: v for part in gathered for k, v in part.items()}
            ckpt = store.commit(
                step,
                nonce,
                merged,
                {"world_size": self.world, "job": self.job.job_name, "zero_stage": self.spec.deepspeed.zero_stage},
                keep_last=self.spec.checkpoint.keep_last,
            )
            events.emit(events.Checkpoint(step=step, uri=ckpt.uri, seconds=round(time.perf_counter() - started, 3)))
        self.dist.barrier()
        for path in sorted(local.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()

    # Set by the subclass's load(): what export writes beside the weights.
    tokenizer: Any
    image_processor: Any = None
    dataset_sha256: str = ""

    def export_record(self) -> dict[str, Any]:
        """What `argus_export.json` says of this model besides job, step and run: the subclass's lineage."""
        return {}

    def export(self, run_id: str | None, step: int) -> None:
        """A Hugging Face model directory (weights, config, tokenizer) at output_uri, ready to serve."""
        out = self.work / "export"
        module = self.engine.module
        params = list(module.parameters())
        # ZeRO-3 shards parameters across ranks: gather them (every rank must join) before saving.
        gather = (
            self.deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.spec.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if self.is_main:
                module.save_pretrained(out, safe_serialization=True)
        if self.is_main:
            self.tokenizer.save_pretrained(out)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(out)
            (out / EXPORT_RECORD).write_text(
                json.dumps(
                    {
                        "job": self.job.job_name,
                        "step": step,
                        "mlflow_run_id": run_id,
                        "base_model": self.job.model,
                        "dataset": self.job.dataset,
                        "dataset_sha256": self.dataset_sha256,
                        "prompt": self.job.prompt,
                        **self.export_record(),
                    },
                    indent=1,
                )
            )
            upload_dir(out, self.job.output_uri, self.settings)
            events.emit(events.Exported(uri=self.job.output_uri, step=step))
        self.dist.barrier()


def run_program(
    doc: str | None,
    config_model: type[J],
    trainer: Any,
    argv: list[str] | None,
    errors: tuple[type[Exception], ...],
    quiet: tuple[str, ...] = (),
) -> None:
    """A trainer's `main`: `--config FILE` (or $ARGUS_JOB_CONFIG), logging, DeepSpeed's op cache, then
    load and train; an error in `errors` (bad data, a refused start) exits 2 with its message."""
    from argus.supervision import die_with_parent
    from trainers.deepspeed import torch_extensions_dir

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="job config (JSON or YAML); default: $ARGUS_JOB_CONFIG")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    # torchrun starts each rank in its own session: a rank must never outlive its launcher.
    die_with_parent()
    job = load_job(config_model, args.config)
    try:
        program = trainer(job)
        program.load()
        program.train()
    except errors as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
