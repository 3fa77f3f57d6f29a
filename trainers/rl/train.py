"""The RL program: GRPO with multi-turn tool rollouts, one process per rank under torchrun (locally) or a
PyTorchJob pod, with the SFT trainer's contract.

    torchrun --nproc_per_node 2 -m trainers.rl --config job.json      # or ARGUS_JOB_CONFIG='{...}'

Each step, every rank takes its share of `prompts_per_step` RL tasks (a seeded order over epochs, a pure
function of the step), plays `rollouts_per_prompt` live episodes of each against the run's code executor
and search proxy (`trainers.rl.rollout`, token-in/token-out), scores them with DeepEyesV2's reward,
normalises rewards within each prompt's group, and takes one optimizer step of the clipped policy loss
averaged over the sampled tokens (`trainers.rl.grpo`). Groups with equal rewards carry no signal and are
dropped (counted); episodes cut by the token budget or the time limit are masked out.

Two rollout engines behind one interface (`rl.engine`). The in-process engine generates with the weights
being trained, so there is nothing to sync. The vLLM engine (`trainers.rl.vllm`) samples from a vLLM
server, one per rank (started here, colocated, unless `rl.vllm.urls` names running ones); after every
step, and once at the start (a resumed job's weights are not the server's), the trainer loads its
weights into the server and checks the server's log-probabilities of a probe sequence against its own,
failing loudly past `rl.vllm.probe_tolerance`. Checked every step for both: the engine's
log-probabilities of the tokens it sampled against the trainer's recomputation, failing loudly past
`LOGPROB_TOLERANCE` (a sign of a stale or corrupted policy, or of a mismatched tokenisation).

Checkpoints and resume are `trainers.base`'s: model, optimizer, scheduler, RNG and the MLflow run; the
step is the data position. Rank 0 logs per-step figures to MLflow and prints `ARGUS {json}` progress.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import random
import shutil
import time
from collections import Counter, defaultdict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from argus import events, tracking
from argus.agent.behaviour import behaviour_by
from argus.agent.prompts import opening as opening_messages
from argus.agent.task import Task
from argus.agent.traces import log_trajectories
from argus.config import RLJobConfig
from argus.data.formats import DataFormatError, read_rl_parquet
from argus.models import chatml
from argus.models.chatml import VL_MODEL_TYPES, Media, Vision
from argus.models.export import export_record, prompt_mismatch
from argus.storage import read_uri
from argus.vllm_server import LocalVLLM, VLLMError
from trainers.base import DeepSpeedTrainer, materialise_model, run_program
from trainers.rl.grpo import group_advantages, groups_with_signal_first, has_signal, policy_loss, token_logprobs
from trainers.rl.rollout import (
    STOP_TOKENS,
    Engine,
    Episode,
    InProcessEngine,
    RolloutResult,
    RolloutSettings,
    rollout,
)
from trainers.rl.vllm import (
    SERVER_ARGS,
    SERVER_ENV,
    VLLMEngineError,
    VLLMServerEngine,
    cpu_server_args,
    probe_gap,
    served_model,
    write_weights,
)

log = logging.getLogger("argus.rl")
LOGPROB_TOLERANCE = 0.05  # mean |engine - trainer| log-probability per sampled token
PROBE_TOKENS = 512  # of the first task's opening: what the engine and the trainer both score after a sync


class RLTrainer(DeepSpeedTrainer):
    def __init__(self, job: RLJobConfig):
        super().__init__(job, job.rl, "rl")
        self.job: RLJobConfig = job
        self.rl = job.rl
        self.rollout_settings = RolloutSettings.of(job)

    # -- set-up --------------------------------------------------------------------------------------

    def load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        job = self.job
        model_dir = materialise_model(job.model, self.model_cache(), self.settings)
        reason = prompt_mismatch(str(model_dir), job.prompt, "trained by RL", None)
        if reason:
            raise SystemExit(f"error: {reason}")
        self.start_record = export_record(str(model_dir)) or {}
        config = AutoConfig.from_pretrained(model_dir)
        vl = config.model_type in VL_MODEL_TYPES
        if job.rl.engine == "in-process" and job.rl.deepspeed.zero_stage == 3:
            raise SystemExit("error: rl.deepspeed.zero_stage 3 shards the weights the in-process engine samples from")
        if vl and job.rl.engine == "vllm":
            # A VL policy rolled out blind (token ids without their images) would train on inputs unlike
            # its SFT data and pass the text probe all the same: refuse it rather than run it.
            raise SystemExit(
                f"error: {job.model}: rl.engine: vllm does not yet send a vision-language policy's images with "
                "its token ids; use rl.engine: in-process (it rolls out with the images)"
            )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.vision: Vision | None = None
        loader: Any = AutoModelForCausalLM
        if vl:
            from transformers import AutoModelForImageTextToText
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            loader = AutoModelForImageTextToText
            self.vision = Vision(Qwen2VLImageProcessorPil.from_pretrained(model_dir))
        model = loader.from_pretrained(model_dir, dtype=torch.float32)
        self.reference: Any = None
        if job.rl.kl_coef > 0:  # the frozen start model; DeepEyesV2 (kl 0) loads none
            self.reference = loader.from_pretrained(model_dir, dtype=torch.float32)
            self.reference.requires_grad_(False)
            self.reference.eval()
        self.dataset_sha256 = hashlib.sha256(read_uri(job.dataset, self.settings)).hexdigest()
        self.tasks: list[Task] = read_rl_parquet(job.dataset, self.settings)
        if not self.tasks:
            raise SystemExit(f"error: {job.dataset}: no RL tasks")
        self.per_rank = self.rl.episodes_per_rank(self.world) // self.rl.rollouts_per_prompt
        self.total_steps = job.rl.max_steps or max(
            1, math.ceil(job.rl.epochs * len(self.tasks) / job.rl.prompts_per_step)
        )
        self.initialize(model, self.total_steps * job.rl.updates_per_step)
        opening = chatml.encode(self.tokenizer, opening_messages(job.prompt, self.tasks[0].question))
        self.probe = opening[:PROBE_TOKENS]
        self.server: LocalVLLM | None = None
        self.rollout_engine: Engine = self.start_engine(model_dir, str(config.model_type))

    def start_engine(self, model_dir: Path, model_type: str) -> Engine:
        """The rollout engine of this rank: in-process, or a vLLM server (colocated: started here)."""
        spec = self.rl
        if spec.engine == "in-process":
            return InProcessEngine(self.engine.module, self.tokenizer, temperature=spec.temperature)
        stops = [int(self.tokenizer.convert_tokens_to_ids(t)) for t in STOP_TOKENS]
        urls = spec.vllm.urls
        # Ranks that share a server: the first of them loads the weights into it, the others only probe.
        self.syncs = not urls or self.rank < len(urls)
        if urls:
            url = urls[self.rank % len(urls)]
            served = served_model(url)
        else:
            env = dict(SERVER_ENV)
            extra = [*SERVER_ARGS, "--seed", str(spec.seed)]
            if torch.cuda.is_available():  # colocated: the server shares this rank's GPU
                env["CUDA_VISIBLE_DEVICES"] = os.environ.get("LOCAL_RANK", "0")
            else:
                extra += cpu_server_args(spec.vllm.max_model_len)
            served = "policy"
            self.server = LocalVLLM(
                str(model_dir),
                served_name=served,
                log_path=self.work / "vllm.log",
                max_model_len=spec.vllm.max_model_len,
                dtype="bfloat16" if spec.precision == "bf16" else "float32",
                memory_fraction=spec.vllm.memory_fraction,
                kv_cache_bytes=spec.vllm.kv_cache_memory,
                extra_args=extra,
                env=env,
                startup_timeout_s=spec.vllm.startup_timeout_s,
            )
            try:
                url = self.server.start()
            except VLLMError as exc:
                msg = f"error: {self.job.job_name}: the colocated vLLM server did not start: {exc}"
                raise SystemExit(msg) from None
            log.info("rank %d: colocated vLLM server for %s (%s) at %s", self.rank, model_dir, model_type, url)
        return VLLMServerEngine(
            url,
            served,
            stops,
            temperature=spec.temperature,
            timeout_s=spec.vllm.request_timeout_s,
            concurrency=spec.vllm.concurrency,
        )

    def sync_engine(self, step: int) -> dict[str, float]:
        """Load the trainer's weights into this rank's vLLM server, then check them there (a no-op for
        the in-process engine, which samples from the trainer's own weights)."""
        engine = self.rollout_engine
        if not isinstance(engine, VLLMServerEngine):
            return {}
        started = time.perf_counter()
        module = self.engine.module
        root = self.work / "vllm-weights"
        # Under ZeRO-3 every rank holds a shard: all of them take part in gathering the full weights.
        gather = (
            self.deepspeed.zero.GatheredParameters(list(module.parameters()))
            if self.rl.deepspeed.zero_stage == 3
            else nullcontext()
        )
        with gather:
            if self.syncs:
                written = write_weights(module, root / f"step-{step}")
        if self.syncs:
            engine.load_weights(written)
            for old in root.iterdir():
                if old != written:
                    shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()  # a shared server has its new weights before anyone probes it
        gap = probe_gap(engine, module, self.probe)
        tolerance = self.rl.vllm.probe_tolerance
        if gap > tolerance:
            raise VLLMEngineError(
                f"step {step}: after the weight sync the vLLM server at {engine.url} disagrees with the trainer: "
                f"mean |log-prob gap| {gap:.4f} on the {len(self.probe)}-token probe > {tolerance} "
                "(weights that did not load, or a different model)"
            )
        return {"time/sync_s": time.perf_counter() - started, "sync/probe_gap": gap}

    def close(self) -> None:
        if isinstance(self.rollout_engine, VLLMServerEngine):
            self.rollout_engine.close()
        if self.server is not None:
            self.server.stop()
            self.server = None

    def prompts_at(self, step: int, batch: int = 0) -> list[Task]:
        """This rank's prompts of `step` (0-based): a seeded permutation per epoch, read in order. Batch
        `b > 0` of a step (dynamic sampling's extra prompts) reads the same positions of another seeded
        permutation, so the prompts stay a pure function of the step and a resumed step replays them."""
        n, per_step = len(self.tasks), self.rl.prompts_per_step
        picked = []
        for k in range(step * per_step + self.rank * self.per_rank, step * per_step + (self.rank + 1) * self.per_rank):
            epoch, i = divmod(k, n)
            order = list(range(n))
            random.Random(f"{self.rl.seed}-{epoch}" + (f"-b{batch}" if batch else "")).shuffle(order)
            picked.append(self.tasks[order[i]])
        return picked

    # -- one step --------------------------------------------------------------------------------------

    def play(self, step: int) -> tuple[RolloutResult, list[Episode]]:
        """The step's rollouts, and the episodes it trains on. With `rl.filter_groups` a rank that found
        fewer than its share of groups with differing rewards plays further batches of prompts (at most
        `max_batches`), and trains on the groups with signal first (`groups_with_signal_first`)."""
        spec, size = self.rl, self.rl.rollouts_per_prompt
        played = [self.play_batch(step, 0)]
        episodes = list(played[0].episodes)

        def groups() -> list[list[float]]:
            return [[reward_of(ep) for ep in episodes[g : g + size]] for g in range(0, len(episodes), size)]

        if spec.filter_groups.enabled:
            while len(played) < spec.filter_groups.max_batches and sum(map(has_signal, groups())) < self.per_rank:
                played.append(self.play_batch(step, len(played)))
                episodes.extend(played[-1].episodes)
        chosen = groups_with_signal_first(groups(), self.per_rank)
        trained = [ep for g in chosen for ep in episodes[g * size : (g + 1) * size]]
        result = RolloutResult(
            episodes,
            sum(r.seconds for r in played),
            sum(r.generate_s for r in played),
            [b for r in played for b in r.batches],
        )
        return result, trained

    def play_batch(self, step: int, batch: int) -> RolloutResult:
        job = self.job
        return asyncio.run(
            rollout(
                self.prompts_at(step, batch),
                self.rollout_engine,
                self.tokenizer,
                self.rollout_settings,
                seed=hash((job.rl.seed, step, self.rank, *((batch,) if batch else ()))) & 0x7FFFFFFF,
                run_id=f"{job.job_name}-step{step}-r{self.rank}" + (f"-b{batch}" if batch else ""),
                vision=self.vision,
            )
        )

    def learn(self, episodes: list[Episode]) -> dict[str, float]:
        """Advantages, the old log-probabilities and the sync check, then `updates_per_step` optimizer
        updates, each accumulated over the micro-batches of its mini-batch of prompt groups.

        As verl's actor does, the old log-probabilities are the trainer's own recomputation before any
        update (so the first update's ratio is exactly 1, and later updates of the same rollouts are
        clipped against the policy that sampled them); the engine's are only compared with them."""
        spec = self.rl
        rewards = torch.tensor([reward_of(ep) for ep in episodes])
        adv = group_advantages(rewards, spec.rollouts_per_prompt)
        keep = [bool(k) and not ep.masked for k, ep in zip(adv.kept.tolist(), episodes, strict=True)]
        micro = spec.micro_batch_size
        sums: dict[str, float] = defaultdict(float)

        # The policy that sampled: its log-probabilities and entropy, and the engine's disagreement.
        old: list[torch.Tensor] = [torch.zeros(0)] * len(episodes)
        with torch.no_grad():
            for lo in range(0, len(episodes), micro):
                chunk = list(range(lo, min(lo + micro, len(episodes))))
                batch = self.batch(episodes, chunk, keep)
                logp, entropy = token_logprobs(self.engine, batch.ids, batch.attn, spec.temperature, media=batch.media)
                for row, i in enumerate(chunk):
                    old[i] = logp[row, : len(episodes[i].ids) - 1].clone()
                sums["gap"] += float(((logp - batch.engine_logp).abs() * batch.sampled).sum())
                sums["sampled"] += float(batch.sampled.sum())
                sums["entropy"] += float((entropy * batch.action).sum())
        gap = torch.tensor([sums["gap"], sums["sampled"]])
        self.dist.all_reduce(gap)
        gap_mean = float(gap[0] / gap[1].clamp(min=1))
        if gap_mean > LOGPROB_TOLERANCE:
            raise RuntimeError(
                f"rollout engine and trainer disagree: mean |log-prob gap| {gap_mean:.4f} per sampled token "
                f"> {LOGPROB_TOLERANCE} (stale weights, or tokens that are not the ones sampled)"
            )

        per_update = spec.episodes_per_update(self.world)
        n_micro = spec.micro_batches_per_step(self.world)
        skipped = 0
        for lo in range(0, len(episodes), per_update):
            update = list(range(lo, min(lo + per_update, len(episodes))))
            # An update in which no rank has a kept episode (every group's rewards equal, or masked) has
            # zero gradients; AdamW would still move the weights on its momentum. Skip it on every rank
            # (they agree by the all-reduce), and keep the schedule a function of the update's index.
            signal = torch.tensor([float(any(keep[i] for i in update))])
            self.dist.all_reduce(signal)
            if float(signal[0]) == 0.0:
                skipped += 1
                self.scheduler.step()
                continue
            # Every micro-batch divides by the update's count of trained tokens, so the micro-batch losses
            # sum to the token mean over the rank's mini-batch (DeepSpeed divides each by the accumulation
            # count).
            trained_tokens = sum(sum(episodes[i].mask) for i in update if keep[i])
            for m in range(n_micro):
                chunk = update[m * micro : (m + 1) * micro]
                batch = self.batch(episodes, chunk, keep)
                old_logp = torch.zeros_like(batch.action)
                for row, i in enumerate(chunk):
                    old_logp[row, : old[i].numel()] = old[i]
                logp, _ = token_logprobs(self.engine, batch.ids, batch.attn, spec.temperature, media=batch.media)
                ref_logp = None
                if self.reference is not None:
                    with torch.no_grad():
                        ref_logp, _ = token_logprobs(
                            self.reference, batch.ids, batch.attn, spec.temperature, media=batch.media
                        )
                parts = policy_loss(
                    logp,
                    old_logp,
                    adv.values[chunk],
                    batch.action,
                    clip_ratio=spec.clip_ratio,
                    ref_logp=ref_logp,
                    kl_coef=spec.kl_coef,
                    normaliser=max(trained_tokens, 1) / n_micro,
                )
                self.engine.backward(parts.loss)
                self.engine.step()
                sums["loss"] += float(parts.loss.detach())
                sums["kl"] += float(parts.kl) * float(parts.tokens)
                sums["clip"] += float(parts.clip_fraction) * float(parts.tokens)
                sums["trained"] += float(parts.tokens)
        stats = torch.tensor([sums["loss"], sums["entropy"], sums["kl"], sums["clip"], sums["trained"]])
        self.dist.all_reduce(stats)
        trained = float(stats[4])
        kept_tokens = sum(sum(ep.mask) for ep, k in zip(episodes, keep, strict=True) if k)
        masked_tokens = sum(sum(ep.mask) for ep, k in zip(episodes, keep, strict=True) if not k)
        return {
            "train/loss": float(stats[0]) / self.world / max(spec.updates_per_step - skipped, 1),  # per update
            "train/entropy": float(stats[1]) / max(trained, 1.0),
            "train/kl": float(stats[2]) / max(trained, 1.0),
            "train/clip_fraction": float(stats[3]) / max(trained, 1.0),
            "train/trained_tokens": trained,
            "train/updates": float(spec.updates_per_step - skipped),
            "train/skipped_updates": float(skipped),
            "train/logprob_gap": gap_mean,
            "rollout/dropped_groups": adv.dropped_groups / max(adv.groups, 1),
            "rollout/masked_token_share": masked_tokens / max(masked_tokens + kept_tokens, 1),
        }

    def batch(self, episodes: list[Episode], chunk: list[int], keep: list[bool]) -> Batch:
        """Episodes `chunk` padded into one batch; token-shifted masks (position t scores token t+1)."""
        pad = int(self.tokenizer.pad_token_id)
        width = max(len(episodes[i].ids) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        action = torch.zeros((len(chunk), width), dtype=torch.float32)
        sampled = torch.zeros_like(action)
        engine_logp = torch.zeros_like(action)
        for row, i in enumerate(chunk):
            ep = episodes[i]
            n = len(ep.ids)
            ids[row, :n] = torch.tensor(ep.ids)
            attn[row, :n] = 1
            sampled[row, :n] = torch.tensor(ep.mask, dtype=torch.float32)
            if keep[i]:
                action[row, :n] = sampled[row, :n]
            engine_logp[row, :n] = torch.tensor(ep.logprobs)
        media = Media.join([episodes[i].media for i in chunk])
        return Batch(ids, attn, action[:, 1:], sampled[:, 1:], engine_logp[:, 1:], media.inputs() if media else None)

    # -- the loop --------------------------------------------------------------------------------------

    def train(self) -> None:
        job = self.job
        step, _position, run_id = self.resume()
        self.start_step = step
        rl = job.rl
        sft_run = self.start_record.get("mlflow_run_id")
        tracker, run_id = self.open_run(
            "rl",
            run_id,
            {
                "prompts_per_step": rl.prompts_per_step,
                "rollouts_per_prompt": rl.rollouts_per_prompt,
                "micro_batch_size": rl.micro_batch_size,
                "max_turns": rl.max_turns,
                "temperature": rl.temperature,
                "clip_ratio": rl.clip_ratio,
                "kl_coef": rl.kl_coef,
                "engine": rl.engine,
                "tasks": len(self.tasks),
            },
            {tracking.TAG_SFT_RUN_ID: str(sft_run)} if sft_run else {},
            len(self.tasks),
        )
        every = job.rl.checkpoint.every_steps
        try:
            self.sync_engine(step)  # a resumed job's weights are the checkpoint's, not the start model's
            while step < self.total_steps:
                started = time.perf_counter()
                result, trained = self.play(step)
                rolled = time.perf_counter()
                figures = self.learn(trained)
                step += 1
                figures.update(self.sync_engine(step))
                figures.update(self.rollout_figures(result))
                # Every batch a rank plays has its share of prompts, so this counts the batches played.
                figures["rollout/batches"] = len(result.episodes) / len(trained)
                figures["time/rollout_s"] = rolled - started
                figures["time/generate_s"] = result.generate_s
                figures["time/train_s"] = time.perf_counter() - rolled
                figures["train/lr"] = float(self.scheduler.get_last_lr()[0])
                figures["train/step_time_s"] = time.perf_counter() - started
                gathered: list[dict[str, float]] = [{} for _ in range(self.world)]
                self.dist.all_gather_object(gathered, figures)
                if self.is_main and tracker is not None:
                    merged = merge_figures(gathered)
                    tracker.log_metrics(merged, step)
                    if job.rl.trajectories_every and (step % job.rl.trajectories_every == 0 or step == 1):
                        self.log_traces(tracker, step, result.episodes)
                    events.emit(
                        events.Step(
                            step=step,
                            total=self.total_steps,
                            loss=round(merged["train/loss"], 6),
                            lr=merged["train/lr"],
                            tokens=int(merged["train/trained_tokens"]),
                            step_time_s=round(merged["train/step_time_s"], 3),
                            metrics={k: round(v, 4) for k, v in merged.items() if k.startswith(SHOWN)},
                        )
                    )
                if step % every == 0 or step == self.total_steps:
                    self.save(step, step, run_id)
            self.export(run_id, step)
        except BaseException:
            if tracker is not None:
                tracker.end("FAILED")
            raise
        finally:
            self.close()
        if tracker is not None:
            tracker.set_tags({tracking.TAG_EXPORT_URI: job.output_uri})
            tracker.end("FINISHED")

    def rollout_figures(self, result: RolloutResult) -> dict[str, float]:
        """Reward, accuracy and format by family; tool use, tool errors and latency; turns and length."""
        eps = result.episodes
        out: dict[str, float] = {"rollout/episodes": float(len(eps))}
        by_family: dict[str, list[Episode]] = defaultdict(list)
        for ep in eps:
            by_family[ep.task.family].append(ep)
            by_family["overall"].append(ep)
        for family, group in by_family.items():
            rewards = [ep.trajectory.reward for ep in group if ep.trajectory and ep.trajectory.reward]
            n = max(len(group), 1)
            out[f"reward/{family}/mean"] = sum(r.score for r in rewards) / n
            out[f"reward/{family}/accuracy"] = sum(r.accuracy for r in rewards) / n
            out[f"reward/{family}/format_rate"] = sum(r.format for r in rewards) / n
        # Per slice: the reward and how the tools were used (strategy rates, calls, repeats), so MLflow
        # shows RL changing the behaviour next to the accuracy.
        slices: dict[str, list[Episode]] = defaultdict(list)
        for ep in eps:
            if ep.task.slice:
                slices[ep.task.slice].append(ep)
        for name, group in slices.items():
            rewards = [ep.trajectory.reward for ep in group if ep.trajectory and ep.trajectory.reward]
            out[f"slice/{name}/mean"] = sum(r.score for r in rewards) / len(group)
            out[f"slice/{name}/accuracy"] = sum(r.accuracy for r in rewards) / len(group)
        done = [(ep.task.slice or ep.task.family, ep.trajectory) for ep in eps if ep.trajectory is not None]
        acted = behaviour_by((name, t.messages, t.calls(), t.reward.accuracy if t.reward else 0.0) for name, t in done)
        for name, figures in acted.items():
            prefix = "rollout" if name == "overall" else f"slice/{name}"
            # (overall tool calls per episode is `rollout/tool_calls_per_episode` already)
            out.update(
                {
                    f"{prefix}/{k}": v
                    for k, v in figures.items()
                    if name != "overall" or "strategy" in k or "repeat" in k
                }
            )
        totals = [reward_of(ep) for ep in eps]
        size = self.rl.rollouts_per_prompt
        groups = [totals[g : g + size] for g in range(0, len(totals), size)]
        out["rollout/signal_groups"] = sum(map(has_signal, groups)) / max(len(groups), 1)
        mean = sum(totals) / max(len(totals), 1)
        out["reward/overall/std"] = math.sqrt(sum((t - mean) ** 2 for t in totals) / max(len(totals), 1))
        calls = [c for ep in eps if ep.trajectory for c in ep.trajectory.tool_calls]
        mix = Counter(c.tool for c in calls)
        out["rollout/tool_calls_per_episode"] = len(calls) / max(len(eps), 1)
        out["rollout/tool_call_rate"] = sum(1 for ep in eps if ep.trajectory and ep.trajectory.tool_calls) / max(
            len(eps), 1
        )
        out["rollout/tool_error_rate"] = sum(1 for c in calls if not c.ok) / max(len(calls), 1)
        for tool in ("python", "search", "image_search", "invalid"):
            out[f"rollout/tool_mix/{tool}"] = mix[tool] / max(len(calls), 1)
        for tool in ("python", "search", "image_search"):
            lat = [c.latency_s for c in calls if c.tool == tool]
            if lat:
                out[f"tools/{tool}_latency_s"] = sum(lat) / len(lat)
        out["time/tools_s"] = sum(c.latency_s for c in calls)
        out["rollout/turns"] = sum(ep.trajectory.turns for ep in eps if ep.trajectory) / max(len(eps), 1)
        out["rollout/response_tokens"] = sum(ep.generated for ep in eps) / max(len(eps), 1)
        out["rollout/truncated"] = sum(1 for ep in eps if ep.truncated) / max(len(eps), 1)
        out["rollout/timed_out"] = sum(1 for ep in eps if ep.timed_out) / max(len(eps), 1)
        out["rollout/episodes_per_s"] = len(eps) / max(result.seconds, 1e-9)
        out["rollout/tool_calls_per_s"] = len(calls) / max(result.seconds, 1e-9)
        return out

    def log_traces(self, tracker: tracking.RunTracker, step: int, episodes: list[Episode], limit: int = 8) -> None:
        """A sample of the step's episodes (rank 0's first `limit` that finished) as MLflow traces on the
        run: the same traces an evaluation writes, tagged with the step."""
        sample = [(t, ep.task) for ep in episodes if (t := ep.trajectory) is not None][:limit]
        try:
            log_trajectories(
                sample,
                experiment_id=tracker.experiment_id,
                run_id=tracker.run_id,
                tags={
                    tracking.TRACE_TAG_SOURCE: "rl",
                    tracking.TRACE_TAG_LABEL: f"step-{step}",
                    tracking.TRACE_TAG_MODEL: self.job.model,
                },
            )
        except Exception as exc:  # noqa: BLE001 - a sample that cannot be shown is no reason to stop training
            log.warning("step %d: the rollout traces were not written: %s", step, exc)

    def export_record(self) -> dict[str, Any]:
        return {"stage": "rl", "start_model": self.job.model, "start_record": self.start_record}


@dataclass(frozen=True)
class Batch:
    ids: torch.Tensor
    attn: torch.Tensor
    action: torch.Tensor  # [B, T-1]: 1 on sampled tokens of kept episodes (the loss mask)
    sampled: torch.Tensor  # [B, T-1]: 1 on every sampled token (the sync check's mask)
    engine_logp: torch.Tensor  # [B, T-1]: the engine's log-probabilities of what it sampled
    media: dict[str, torch.Tensor] | None = None  # a VL policy's images of the batch, in row order


SHOWN = ("rollout/", "reward/", "time/")  # the figures a progress line carries beside loss and lr


def reward_of(ep: Episode) -> float:
    """An episode's DeepEyesV2 reward; 0 for one cut by its time limit (it has no answer)."""
    return ep.trajectory.reward.score if ep.trajectory and ep.trajectory.reward else 0.0


def merge_figures(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """Ranks play equal shares of the step, so a rank mean is an unweighted mean; times are the slowest
    rank's (the step waits for it); episode counts add up. (`train/` figures are all-reduced already.)"""
    keys = {k for part in per_rank for k in part}
    merged = {}
    for key in sorted(keys):
        values = [part[key] for part in per_rank if key in part]
        if key.startswith("time/") or key == "train/step_time_s":
            merged[key] = max(values)
        elif key == "rollout/episodes":
            merged[key] = sum(values)
        else:
            merged[key] = sum(values) / len(values)
    return merged


def main(argv: list[str] | None = None) -> None:
    # httpx logs every request: thousands of tool calls a step (their failures are metrics instead).
    run_program(__doc__, RLJobConfig, RLTrainer, argv, (DataFormatError, ValueError), quiet=("httpx",))
