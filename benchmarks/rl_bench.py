"""RL trainer benchmark: Argus' GRPO step against TRL's `GRPOTrainer` on the same tiny model, tasks,
batch and group size, both rolling out the same multi-turn episodes against the same live tools
(gVisor code executor, offline search proxy), in one run.

    .venv/bin/python benchmarks/rl_bench.py [--steps 6] [--prompts 4] [--group 4]

TRL's side is its documented custom-rollout path: `rollout_func` returns `prompt_ids`,
`completion_ids`, `logprobs` and `env_mask` (0 on tool tokens), here filled by Argus' own rollout
(`trainers.rl.rollout`, the same lockstep episodes with TRL's model as the policy), so the two differ
only in how a step is trained and orchestrated. Argus runs twice: with the in-process engine, and with
the vLLM engine (a colocated vLLM server from the CPU build samples; the trainer loads its weights into
it after every step and checks them, counted in the step). All run one process on this machine's CPUs;
step times are medians over steps 2..N (step 1 pays for warm-up).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argus.backends.local.launch import TrainingRun  # noqa: E402
from argus.backends.local.tools import LocalToolEnvironment, ToolEndpoints  # noqa: E402
from argus.config import RLJobConfig, SandboxSpec, SFTJobConfig, StackSettings  # noqa: E402
from argus.supervision import free_port  # noqa: E402

# The quickstart's episode limits: v7's code turns run to ~190 tokens and its chains to four turns, so a
# tighter cap cuts the turns that carry the decisions and leaves every group at reward 0 (measured: a
# 96-token cap dropped all groups on every engine).
TURN_TOKENS, RESPONSE_TOKENS, MAX_TURNS = 256, 768, 4


def run_job(module: str, job: SFTJobConfig | RLJobConfig, root: Path, stack: StackSettings) -> list[dict[str, Any]]:
    path = root / f"{job.job_name}.json"
    path.write_text(job.model_dump_json())
    run = TrainingRun(module, path, root / f"{job.job_name}.log", 1, extra_env=stack.client_env())
    run.start()
    events: list[dict[str, Any]] = []
    if run.wait(lambda e: events.append(e.model_dump())) != 0:
        raise SystemExit(run.log_path.read_text()[-3000:])
    return events


def trl_run(model_dir: str, rl_parquet: str, tools: ToolEndpoints, args: argparse.Namespace) -> dict[str, float]:
    """TRL's GRPOTrainer with a rollout_func: the same episodes, TRL's training step."""
    os.environ["TRL_EXPERIMENTAL_SILENCE"] = "1"
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from argus.data.formats import read_rl_parquet
    from trainers.rl.rollout import InProcessEngine, RolloutSettings, rollout

    tasks = read_rl_parquet(rl_parquet)
    by_question = {t.question: t for t in tasks}
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    timing: dict[str, list[float]] = {"rollout": [], "episodes": [], "calls": [], "dropped": [], "reward": []}

    def rollout_func(prompts: list[str], trainer: Any) -> dict[str, Any]:
        started = time.perf_counter()
        engine = InProcessEngine(trainer.model, tok, temperature=1.0)
        result = asyncio.run(
            rollout(
                # TRL's sampler has already repeated each prompt num_generations times, consecutively.
                [by_question[p] for p in prompts],
                engine,
                tok,
                RolloutSettings(
                    sandbox_url=tools.sandbox_url,
                    search_url=tools.search_url,
                    prompt="compact",
                    group_size=1,
                    max_turns=MAX_TURNS,
                    turn_tokens=TURN_TOKENS,
                    response_tokens=RESPONSE_TOKENS,
                    tool_timeout_s=30.0,
                    episode_timeout_s=300.0,
                ),
                seed=len(timing["rollout"]),
                run_id="trl-bench",
            )
        )
        out: dict[str, Any] = {"prompt_ids": [], "completion_ids": [], "logprobs": [], "env_mask": [], "reward": []}
        for ep in result.episodes:
            first = ep.mask.index(1) if 1 in ep.mask else len(ep.ids)
            out["prompt_ids"].append(ep.ids[:first])
            out["completion_ids"].append(ep.ids[first:])
            out["logprobs"].append(ep.logprobs[first:])
            out["env_mask"].append(ep.mask[first:])
            reward = ep.trajectory.reward.score if ep.trajectory and ep.trajectory.reward else 0.0
            out["reward"].append(reward)
        timing["rollout"].append(time.perf_counter() - started)
        timing["episodes"].append(len(result.episodes))
        timing["calls"].append(sum(len(e.trajectory.tool_calls) for e in result.episodes if e.trajectory))
        groups = [out["reward"][g : g + args.group] for g in range(0, len(out["reward"]), args.group)]
        timing["dropped"].append(sum(1 for g in groups if max(g) == min(g)) / max(len(groups), 1))
        timing["reward"].append(statistics.mean(out["reward"]) if out["reward"] else 0.0)
        return out

    def reward_func(prompts: list[Any], completions: list[Any], reward: list[float], **_kw: Any) -> list[float]:
        return reward

    class Clock(TrainerCallback):  # type: ignore[misc]
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, *_a: Any, **_k: Any) -> None:
            self.ends.append(time.perf_counter())

    clock = Clock()
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="trl-bench-"),
        per_device_train_batch_size=args.prompts * args.group,
        num_generations=args.group,
        gradient_accumulation_steps=1,
        max_steps=args.steps,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        loss_type="dapo",
        epsilon=0.2,
        temperature=1.0,
        max_completion_length=RESPONSE_TOKENS * 2,
        use_cpu=True,
        bf16=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        seed=5,
        shuffle_dataset=False,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_func,
        args=config,
        train_dataset=Dataset.from_list([{"prompt": t.question} for t in tasks]),
        processing_class=tok,
        rollout_func=rollout_func,
        callbacks=[clock],
    )
    started = time.perf_counter()
    trainer.train()
    ends = [started, *clock.ends]
    step_times = [b - a for a, b in itertools.pairwise(ends)]
    figures = summarise(step_times, timing["rollout"], timing["episodes"], timing["calls"])
    # Groups whose rewards are all equal: TRL's group-scaled advantages are 0 there, as Argus drops them.
    figures["dropped"] = statistics.mean(timing["dropped"])
    figures["reward"] = statistics.mean(timing["reward"])
    return figures


def summarise(steps: list[float], rollouts: list[float], episodes: list[float], calls: list[float]) -> dict[str, float]:
    tail = slice(1, None) if len(steps) > 1 else slice(None)
    rollout_s = sum(rollouts[tail])
    return {
        "step_s": statistics.median(steps[tail]),
        "rollout_s": statistics.median(rollouts[tail]),
        "train_s": statistics.median(s - r for s, r in zip(steps[tail], rollouts[tail], strict=False)),
        "episodes_per_s": sum(episodes[tail]) / rollout_s,
        "calls_per_s": sum(calls[tail]) / rollout_s,
    }


def argus_run(
    engine: str,
    model: str,
    rl_parquet: str,
    tools: ToolEndpoints,
    root: Path,
    stack: StackSettings,
    args: argparse.Namespace,
) -> dict[str, float]:
    """Argus' trainer on the benchmark's job; `vllm`: a colocated vLLM server (the CPU build) samples,
    and the trainer loads its weights into it after every step (counted in the step time)."""
    job = RLJobConfig(
        job_name=f"bench-rl-{engine}",
        prompt="compact",
        dataset=rl_parquet,
        model=model,
        checkpoint_uri=f"s3://{stack.bucket_checkpoints}/rl-bench-{engine}",
        output_uri=str(root / f"rl-{engine}"),
        sandbox_url=tools.sandbox_url,
        search_url=tools.search_url,
        mlflow_experiment="rl-bench",
        rl={"enabled": True, "nproc_per_node": 1, "precision": "fp32", "max_steps": args.steps,
            "prompts_per_step": args.prompts, "rollouts_per_prompt": args.group,
            "micro_batch_size": args.prompts * args.group, "max_turns": MAX_TURNS,
            "max_turn_tokens": TURN_TOKENS, "max_response_tokens": RESPONSE_TOKENS, "seed": 5,
            "optim": {"lr": 1e-4, "warmup_ratio": 0.0, "scheduler": "constant"},
            "checkpoint": {"every_steps": 1000}, "trajectories_every": 0, "engine": engine},
    )  # fmt: skip
    steps = [e for e in run_job("trainers.rl", job, root, stack) if e["event"] == "step"]
    times = [e["time"] for e in steps]
    # Step 1's duration from its own figure; later ones from the gaps between step events.
    step_s = [steps[0]["step_time_s"]] + [b - a for a, b in itertools.pairwise(times)]
    figures = summarise(
        step_s,
        [s["metrics"].get("time/rollout_s", 0.0) for s in steps],
        [s["metrics"]["rollout/episodes"] for s in steps],
        [s["metrics"]["rollout/tool_calls_per_episode"] * s["metrics"]["rollout/episodes"] for s in steps],
    )
    figures["generate_s"] = statistics.median(s["metrics"].get("time/generate_s", 0.0) for s in steps[1:] or steps)
    figures["sync_s"] = statistics.median(s["metrics"].get("time/sync_s", 0.0) for s in steps[1:] or steps)
    figures["learn_s"] = statistics.median(s["metrics"]["time/train_s"] for s in steps[1:] or steps)
    # What there was to train: groups with equal rewards are dropped, and a step with none left trains nothing.
    figures["dropped"] = statistics.mean(s["metrics"]["rollout/dropped_groups"] for s in steps)
    figures["reward"] = statistics.mean(s["metrics"]["reward/overall/mean"] for s in steps)
    figures["tokens"] = statistics.mean(s["metrics"]["rollout/response_tokens"] for s in steps)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=4, help="prompts per step")
    parser.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    # The warm start: long enough that the model carries out both counting strategies and picks either
    # (the suite's decisions), so most groups have differing rewards and every step trains (the dropped
    # share is in the table); a model that solves nothing or everything would time rollouts, not training.
    parser.add_argument("--sft-size", type=int, default=128, help="demonstrations of the warm start")
    parser.add_argument("--sft-steps", type=int, default=300, help="SFT steps of the warm start")
    args = parser.parse_args()
    console = Console(width=200)

    with tempfile.TemporaryDirectory(prefix="argus-rl-bench-") as tmp:
        root = Path(tmp)
        env = {
            **os.environ,
            "ARGUS_HOME": str(root / "home"),
            "ARGUS_S3_PORT": str(free_port()),
            "ARGUS_MLFLOW_PORT": str(free_port()),
            "ARGUS_PREFECT_PORT": str(free_port()),
        }
        cli = [sys.executable, "-m", "argus.cli"]
        console.print("stack, data, tiny model and a short SFT warm start …")
        subprocess.run([*cli, "stack", "up"], env=env, check=True, capture_output=True)
        try:
            stack = StackSettings.model_validate(
                {k: env[f"ARGUS_{k.upper()}"] for k in ("home", "s3_port", "mlflow_port", "prefect_port")}
            )
            subprocess.run(
                [*cli, "data", "generate", "--out", str(root / "data"), "--sft-size", str(args.sft_size),
                 "--rl-size", "32", "--eval-size", "4", "--runner", "process", "--prompt", "compact"],
                env=env, check=True, capture_output=True,
            )  # fmt: skip
            subprocess.run(
                [*cli, "models", "init-tiny", "--arch", "qwen2", "--out", str(root / "base")],
                env=env,
                check=True,
                capture_output=True,
            )
            sft = SFTJobConfig(
                job_name="bench-sft",
                prompt="compact",
                dataset=str(root / "data" / "sft" / "sft.json"),
                model=str(root / "base"),
                checkpoint_uri=f"s3://{stack.bucket_checkpoints}/rl-bench-sft",
                output_uri=str(root / "sft"),
                sft={"nproc_per_node": 1, "precision": "fp32", "max_steps": args.sft_steps, "micro_batch_size": 4,
                     "optim": {"lr": 3e-3, "warmup_ratio": 0.0}, "checkpoint": {"every_steps": 1000}},
                mlflow_experiment="rl-bench",
            )  # fmt: skip
            run_job("trainers.sft", sft, root, stack)
            model = str(root / "sft")
            rl_parquet = str(root / "data" / "rl" / "train.parquet")
            with LocalToolEnvironment(
                root / "tools",
                index_path=root / "data" / "search" / "index.sqlite",
                sandbox=SandboxSpec(
                    runner="gvisor",
                    warm_pool=args.prompts * args.group,
                    max_sessions=64,
                    preload=["numpy", "PIL.Image", "scipy.ndimage"],  # as the quickstart's sandboxes
                ),
            ) as tools:
                ours: dict[str, dict[str, float]] = {}
                for engine in ("in-process", "vllm"):
                    console.print(f"Argus RL trainer, {engine} engine (torchrun, DeepSpeed ZeRO-2, MLflow, S3) …")
                    ours[engine] = argus_run(engine, model, rl_parquet, tools, root, stack, args)
                console.print("TRL GRPOTrainer with a rollout_func (same episodes) …")
                theirs = trl_run(model, rl_parquet, tools, args)
        finally:
            subprocess.run([*cli, "stack", "down"], env=env, capture_output=True)

    table = Table(
        title=f"GRPO step — tiny Qwen2, 1 process, {args.prompts} prompts x {args.group} rollouts, "
        f"≤{MAX_TURNS} turns, {args.steps} steps (medians of steps 2..N)"
    )
    a, v = ours["in-process"], ours["vllm"]
    for col in ("metric", "Argus, in-process engine", "Argus, vLLM engine (CPU build)", "TRL + rollout_func", "target"):
        table.add_column(col)
    table.add_row("step time", f"{a['step_s']:.2f} s", f"{v['step_s']:.2f} s", f"{theirs['step_s']:.2f} s",
                  "Argus ≤ TRL")  # fmt: skip
    table.add_row("  rollout (generation + tools)", f"{a['rollout_s']:.2f} s", f"{v['rollout_s']:.2f} s",
                  f"{theirs['rollout_s']:.2f} s", "")  # fmt: skip
    table.add_row("    of it generation", f"{a['generate_s']:.2f} s", f"{v['generate_s']:.2f} s", "", "")
    table.add_row("  weight sync + probe check", "—", f"{v['sync_s']:.2f} s", "—", "")
    table.add_row("  advantages, old log-probs, updates (+ sync)", f"{a['learn_s']:.2f} s", f"{v['learn_s']:.2f} s",
                  "", "")  # fmt: skip
    table.add_row("  the rest (scoring, loss, backward, step, logging)", f"{a['train_s']:.2f} s",
                  f"{v['train_s']:.2f} s", f"{theirs['train_s']:.2f} s", "")  # fmt: skip
    table.add_row("episodes / s", f"{a['episodes_per_s']:.2f}", f"{v['episodes_per_s']:.2f}",
                  f"{theirs['episodes_per_s']:.2f}", "")  # fmt: skip
    table.add_row("tool calls / s", f"{a['calls_per_s']:.2f}", f"{v['calls_per_s']:.2f}",
                  f"{theirs['calls_per_s']:.2f}", "")  # fmt: skip
    table.add_row("mean reward / dropped groups", f"{a['reward']:.3f} / {a['dropped']:.2f}",
                  f"{v['reward']:.3f} / {v['dropped']:.2f}", f"{theirs['reward']:.3f} / {theirs['dropped']:.2f}",
                  "dropped < 0.5")  # fmt: skip
    table.add_row("response tokens per episode", f"{a['tokens']:.0f}", f"{v['tokens']:.0f}", "", "")
    console.print(table)


if __name__ == "__main__":
    main()
