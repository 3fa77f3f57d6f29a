"""The cold-start SFT program: one process per rank under torchrun (locally) or a PyTorchJob pod.

    torchrun --nproc_per_node 2 -m trainers.sft --config job.json     # or ARGUS_JOB_CONFIG='{...}'

It reads the PyTorchJob env contract (torchrun turns PET_* into RANK / LOCAL_RANK / WORLD_SIZE),
trains with DeepSpeed (gloo on CPU, NCCL on GPUs), checkpoints to the object store every N steps and
resumes from the newest complete checkpoint on start, so a restarted pod continues instead of
starting over. Rank 0 logs to MLflow and prints one `ARGUS {json}` progress line per step.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import os
import sys
import time

import torch

from argus import events, tracking
from argus.agent.task import Task
from argus.config import SFTJobConfig
from argus.data.formats import DataFormatError, read_rl_parquet, read_sharegpt
from argus.storage import is_s3, read_uri
from argus.supervision import die_with_parent
from trainers.base import DeepSpeedTrainer, load_job, materialise_model
from trainers.deepspeed import torch_extensions_dir
from trainers.rollout import LocalPolicy, evaluate_in_process
from trainers.sft.data import Encoded, Encoder, Schedule, check_prompt, collate

log = logging.getLogger("argus.sft")
TAG = "ckpt"


class Trainer(DeepSpeedTrainer):
    def __init__(self, job: SFTJobConfig):
        super().__init__(job, job.sft, "sft")
        self.job: SFTJobConfig = job

    # -- set-up --------------------------------------------------------------------------------------

    def load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        job = self.job
        model_dir = materialise_model(job.model, self.model_cache(), self.settings)
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
        self.initialize(model, self.total_steps)

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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="job config (JSON or YAML); default: $ARGUS_JOB_CONFIG")
    args = parser.parse_args(argv)
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(torch_extensions_dir()))
    # torchrun starts each rank in its own session: a rank must never outlive its launcher.
    die_with_parent()
    job = load_job(SFTJobConfig, args.config)
    try:
        trainer = Trainer(job)
        trainer.load()
        trainer.train()
    except DataFormatError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
