"""The cold-start SFT program: one process per rank under torchrun (locally) or a PyTorchJob pod.

    torchrun --nproc_per_node 2 -m trainers.sft --config job.json     # or ARGUS_JOB_CONFIG='{...}'

It reads the PyTorchJob env contract (torchrun turns PET_* into RANK / LOCAL_RANK / WORLD_SIZE),
trains with DeepSpeed (gloo on CPU, NCCL on GPUs), checkpoints to the object store every N steps and
resumes from the newest complete checkpoint on start, so a restarted pod continues instead of
starting over. Rank 0 logs to MLflow and prints one `ARGUS {json}` progress line per step.
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
from typing import Any

import numpy as np
import torch
import yaml
from pydantic import ValidationError

from argus import events, tracking
from argus.agent.task import Task
from argus.config import SFTJobConfig, StackSettings
from argus.data.formats import DataFormatError, read_rl_parquet, read_sharegpt
from argus.storage import download_dir, is_s3, read_uri, upload_dir
from argus.supervision import die_with_parent
from trainers.checkpoint import CheckpointStore
from trainers.deepspeed import deepspeed_config, torch_extensions_dir
from trainers.rollout import LocalPolicy, evaluate_in_process
from trainers.sft.data import Encoded, Encoder, Schedule, check_prompt, collate

log = logging.getLogger("argus.sft")
TAG = "ckpt"


def load_job(path: str | None) -> SFTJobConfig:
    raw = Path(path).read_text() if path else os.environ.get("ARGUS_JOB_CONFIG")
    where = path or "ARGUS_JOB_CONFIG"
    if not raw:
        raise SystemExit("error: give --config FILE or set ARGUS_JOB_CONFIG")
    try:
        return SFTJobConfig.model_validate(yaml.safe_load(raw))
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


class Trainer:
    def __init__(self, job: SFTJobConfig):
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
        seed_everything(job.sft.seed)
        self.work = Path(tempfile.mkdtemp(prefix=f"argus-sft-{job.job_name}-r{self.rank}-"))

    def broadcast(self, value: Any) -> Any:
        box = [value]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    # -- set-up --------------------------------------------------------------------------------------

    def load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        job = self.job
        cache = Path(os.environ.get("ARGUS_MODEL_CACHE", Path.home() / ".cache" / "argus" / "models"))
        cache.mkdir(parents=True, exist_ok=True)
        model_dir = materialise_model(job.model, cache, self.settings)
        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        config = AutoConfig.from_pretrained(model_dir)
        self.is_vl = config.model_type in ("qwen2_5_vl", "qwen2_vl")
        self.image_processor = None
        if self.is_vl:
            from transformers import AutoModelForImageTextToText
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self.image_processor = Qwen2VLImageProcessorPil.from_pretrained(model_dir)
            model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.dataset_sha256 = hashlib.sha256(read_uri(job.dataset, self.settings)).hexdigest()
        examples = read_sharegpt(job.dataset, check_images=not is_s3(job.dataset), settings=self.settings)
        check_prompt(examples, job.prompt, job.dataset)
        encoder = Encoder(self.tokenizer, self.image_processor, job.sft.max_seq_len, self.settings)
        encoded = [encoder.encode(ex, f"{job.dataset}: row {i}") for i, ex in enumerate(examples)]
        self.examples: list[Encoded] = [e for e in encoded if e is not None]
        self.dropped = len(encoded) - len(self.examples)
        self.curve_tasks: list[Task] | None = None
        if self.dropped and self.is_main:
            log.warning(
                "dropped %d of %d examples longer than max_seq_len=%d", self.dropped, len(encoded), job.sft.max_seq_len
            )
        self.schedule = Schedule(
            len(self.examples),
            job.sft.seed,
            self.world,
            self.rank,
            job.sft.micro_batch_size,
            lengths=[len(e.input_ids) for e in self.examples] if job.sft.length_buckets else None,
        )
        steps_per_epoch = max(1, self.schedule.rounds_per_epoch // job.sft.grad_accum)
        self.total_steps = job.sft.max_steps or max(1, math.ceil(job.sft.epochs * steps_per_epoch))
        optim = job.sft.optim
        optimizer: torch.optim.Optimizer
        if job.sft.deepspeed.offload_optimizer:
            # ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam(W) is the one it
            # is built for (and the one it accepts by default).
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)
        warmup = int(optim.warmup_ratio * self.total_steps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(optim.scheduler, warmup, self.total_steps))
        self.engine, self.optimizer, _, self.scheduler = self.deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=deepspeed_config(job.sft, self.settings)
        )

    # -- checkpoints ----------------------------------------------------------------------------------

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
                {"world_size": self.world, "job": self.job.job_name, "zero_stage": self.job.sft.deepspeed.zero_stage},
                keep_last=self.job.sft.checkpoint.keep_last,
            )
            events.emit(events.Checkpoint(step=step, uri=ckpt.uri, seconds=round(time.perf_counter() - started, 3)))
        self.dist.barrier()
        for path in sorted(local.rglob("*"), reverse=True):
            path.unlink() if path.is_file() else path.rmdir()

    # -- the learning curve ----------------------------------------------------------------------------

    def learning_curve(self, step: int, tracker: tracking.RunTracker | None) -> None:
        """Rank 0 plays the held-out curve tasks with the weights of this step; the others wait for it.
        Greedy generation draws no random numbers, so training continues exactly as without the curve."""
        job = self.job
        if self.is_main and tracker is not None:
            if job.curve_data is None or job.sandbox_url is None or job.search_url is None or self.is_vl:
                log.warning("sft.curve: no eval data or tools given (or a VL model), skipping the curve")
            else:
                if self.curve_tasks is None:
                    self.curve_tasks = read_rl_parquet(job.curve_data, self.settings)[: job.sft.curve.tasks]
                started = time.perf_counter()
                model = self.engine.module
                model.eval()
                try:
                    summary = evaluate_in_process(
                        LocalPolicy(model, self.tokenizer),
                        self.curve_tasks,
                        sandbox_url=job.sandbox_url,
                        search_url=job.search_url,
                        prompt=job.prompt,
                        max_turns=job.sft.curve.max_turns,
                        run_id=f"{job.job_name}-curve",
                    )
                finally:
                    model.train()
                figures = {
                    f"curve/{family}/{name}": getattr(m, name)
                    for family, m in summary.items()
                    for name in ("accuracy", "format_rate", "tool_call_rate")
                }
                figures["curve/seconds"] = time.perf_counter() - started
                tracker.log_metrics(figures, step)
                log.info("learning curve at step %d: %s", step, {k: round(v, 3) for k, v in figures.items()})
        self.dist.barrier()

    # -- the loop --------------------------------------------------------------------------------------

    def train(self) -> None:
        job = self.job
        step, position, run_id = self.resume()
        tracker = None
        if self.is_main:
            tags = {
                tracking.TAG_JOB_NAME: job.job_name,
                tracking.TAG_STAGE: "sft",
                tracking.TAG_DATASET_URI: job.dataset,
                tracking.TAG_DATASET_SHA256: self.dataset_sha256,
                tracking.TAG_BASE_MODEL_URI: job.model,
                tracking.TAG_CODE_VERSION: tracking.code_version(),
                tracking.TAG_NODE_POOL: job.node_pool or "local",
                tracking.TAG_PROMPT: job.prompt,
                **job.lineage,
            }
            tracker = tracking.RunTracker(job.mlflow_experiment, job.job_name, tags=tags, resume_run_id=run_id)
            run_id = tracker.run_id
            if not tracker.resumed:
                tracker.log_params(
                    {
                        "world_size": self.world,
                        "zero_stage": job.sft.deepspeed.zero_stage,
                        "lr": job.sft.optim.lr,
                        "scheduler": job.sft.optim.scheduler,
                        "micro_batch_size": job.sft.micro_batch_size,
                        "grad_accum": job.sft.grad_accum,
                        "max_seq_len": job.sft.max_seq_len,
                        "precision": job.sft.precision,
                        "total_steps": self.total_steps,
                        "examples": len(self.examples),
                        "dropped_too_long": self.dropped,
                        "seed": job.sft.seed,
                        "model_type": "qwen2_5_vl" if self.is_vl else "qwen2",
                    }
                )
            events.emit(
                events.Start(step=step, total=self.total_steps, mlflow_run_id=run_id, examples=len(self.examples))
            )
        run_id = self.broadcast(run_id)
        pad = self.tokenizer.pad_token_id
        accum = job.sft.grad_accum
        every = job.sft.checkpoint.every_steps
        try:
            while step < self.total_steps:
                started = time.perf_counter()
                losses, tokens = [], 0
                for _ in range(accum):
                    batch = collate([self.examples[i] for i in self.schedule.micro_batch_at(position)], pad)
                    position += 1
                    loss = self.engine(**batch).loss
                    self.engine.backward(loss)
                    self.engine.step()
                    losses.append(loss.detach())
                    tokens += int(batch["attention_mask"].sum())
                step += 1
                stats = torch.tensor([torch.stack(losses).mean().item(), float(tokens)])
                self.dist.all_reduce(stats)
                step_time = time.perf_counter() - started
                grad_norm = self.engine.get_global_grad_norm()
                if self.is_main and tracker is not None:
                    metrics = {
                        "train/loss": float(stats[0]) / self.world,
                        "train/lr": float(self.scheduler.get_last_lr()[0]),
                        "train/grad_norm": float(grad_norm) if grad_norm is not None else 0.0,
                        "train/tokens_per_s": float(stats[1]) / step_time,
                        "train/step_time_s": step_time,
                    }
                    tracker.log_metrics(metrics, step)
                    events.emit(
                        events.Step(
                            step=step,
                            total=self.total_steps,
                            tokens=int(stats[1]),
                            **{k.split("/")[1]: round(v, 6) for k, v in metrics.items()},
                        )
                    )
                curve = job.sft.curve.every_steps
                if curve and (step % curve == 0 or step == self.total_steps):
                    self.learning_curve(step, tracker)
                if step % every == 0 or step == self.total_steps:
                    self.save(step, position, run_id)
            self.export(run_id, step)
        except BaseException:
            if tracker is not None:
                tracker.end("FAILED")
            raise
        if tracker is not None:
            tracker.set_tags({tracking.TAG_EXPORT_URI: job.output_uri})
            tracker.end("FINISHED")

    def export(self, run_id: str | None, step: int) -> None:
        """A Hugging Face model directory (weights, config, tokenizer) at output_uri, ready to serve."""
        out = self.work / "export"
        module = self.engine.module
        params = list(module.parameters())
        # ZeRO-3 shards parameters across ranks: gather them (every rank must join) before saving.
        gather = (
            self.deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            if self.job.sft.deepspeed.zero_stage == 3
            else contextlib.nullcontext()
        )
        with gather:
            if self.is_main:
                module.save_pretrained(out, safe_serialization=True)
        if self.is_main:
            self.tokenizer.save_pretrained(out)
            if self.image_processor is not None:
                self.image_processor.save_pretrained(out)
            (out / "argus_export.json").write_text(
                json.dumps(
                    {
                        "job": self.job.job_name,
                        "step": step,
                        "mlflow_run_id": run_id,
                        "base_model": self.job.model,
                        "dataset": self.job.dataset,
                        "dataset_sha256": self.dataset_sha256,
                        "prompt": self.job.prompt,
                    },
                    indent=1,
                )
            )
            upload_dir(out, self.job.output_uri, self.settings)
            events.emit(events.Exported(uri=self.job.output_uri, step=step))
        self.dist.barrier()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="job config (JSON or YAML); default: $ARGUS_JOB_CONFIG")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    # torchrun starts each rank in its own session: a rank must never outlive its launcher.
    die_with_parent()
    job = load_job(args.config)
    try:
        trainer = Trainer(job)
        trainer.load()
        trainer.train()
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
