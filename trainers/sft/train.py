"""The cold-start SFT program: one process per rank under torchrun (locally) or a PyTorchJob pod.

    torchrun --nproc_per_node 2 -m trainers.sft --config job.json     # or ARGUS_JOB_CONFIG='{...}'

It reads the PyTorchJob env contract (torchrun turns PET_* into RANK / LOCAL_RANK / WORLD_SIZE),
trains with DeepSpeed (gloo on CPU, NCCL on GPUs), checkpoints to the object store every N steps and
resumes from the newest complete checkpoint on start, so a restarted pod continues instead of
starting over. Rank 0 logs to MLflow and prints one `ARGUS {json}` progress line per step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time

import torch

from argus import events, tracking
from argus.agent.task import Task
from argus.config import SFTJobConfig
from argus.data.formats import DataFormatError, read_rl_parquet, read_sharegpt
from argus.models import chatml
from argus.storage import is_s3, read_uri
from trainers.base import DeepSpeedTrainer, materialise_model, run_program
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
        self.is_vl = config.model_type in chatml.VL_MODEL_TYPES
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
        self.start_step = step
        tracker, run_id = self.open_run(
            "sft",
            run_id,
            {
                "micro_batch_size": job.sft.micro_batch_size,
                "grad_accum": job.sft.grad_accum,
                "max_seq_len": job.sft.max_seq_len,
                "examples": len(self.examples),
                "dropped_too_long": self.dropped,
                "model_type": "qwen2_5_vl" if self.is_vl else "qwen2",
            },
            {},
            len(self.examples),
        )
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
    run_program(__doc__, SFTJobConfig, Trainer, argv, (DataFormatError,))
