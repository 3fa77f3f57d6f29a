"""The miniature learns, by both stages: the quickstart's model, trained by the SFT trainer on a small slice
of the suite, answers held-out tasks (entities it has never seen, live gVisor sandbox and search proxy)
that the same model untrained does not; and RL from that mixed-strategy SFT model, on counting tasks of
the target distribution, moves the rate at which it samples the strategy the target calls for, and the
reward, beyond their intervals."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from argus.agent.behaviour import choices
from argus.agent.evaluation import wilson
from argus.agent.task import Task
from argus.backends.local.launch import TrainingRun
from argus.backends.local.tools import LocalToolEnvironment
from argus.config import RLJobConfig, SandboxSpec, SFTJobConfig, StackSettings
from argus.data.formats import read_rl_parquet, write_rl_parquet
from argus.data.tasks import SLICES
from argus.storage import download_dir
from tests.conftest import local_tools

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@dataclass
class Trained:
    data: Path
    base: str
    sft: str


def run_job(module: str, cfg: SFTJobConfig | RLJobConfig, tmp: Path, stack: StackSettings) -> None:
    path = tmp / f"{cfg.job_name}.json"
    path.write_text(cfg.model_dump_json())
    run = TrainingRun(module, path, tmp / f"{cfg.job_name}-{time.monotonic_ns()}.log", 2, extra_env=stack.client_env())
    run.start()
    assert run.wait(lambda _e: None) == 0, run.log_path.read_text()[-3000:]


@pytest.fixture(scope="module")
def trained(training_stack: StackSettings, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """The quickstart's model after a short SFT on a slice of the suite (300 gold trajectories, 300 steps;
    the quickstart trains 1,000 for 1,200), with the suite's mixed demonstrations."""
    from argus.data.generate import generate
    from argus.models import tiny

    tmp = tmp_path_factory.mktemp("learns")
    data = tmp / "data"
    generate(
        str(data), tools=local_tools(training_stack), seed=23, sft_size=300, rl_size=80, eval_size=16, prompt="compact"
    )
    # The quickstart's model, copy pre-training included (built once per session, see conftest).
    base = str(tiny.built("qwen2", "mini", 0, training_stack.models_dir))
    cfg = SFTJobConfig(
        job_name="learns",
        dataset=str(data / "sft" / "sft.json"),
        model=base,
        checkpoint_uri=f"s3://{training_stack.bucket_checkpoints}/tests/learns",
        output_uri=f"s3://{training_stack.bucket_models}/tests/learns",
        prompt="compact",
        # The quickstart's schedule, shorter.
        sft={
            "nproc_per_node": 2,
            "precision": "fp32",
            "max_steps": 300,
            "micro_batch_size": 4,
            "max_seq_len": 1024,
            "length_buckets": True,
            "seed": 0,
            "optim": {"lr": 3e-3, "warmup_ratio": 0.025, "scheduler": "cosine", "adam_beta2": 0.95},
            "checkpoint": {"every_steps": 300, "keep_last": 1},
        },
        mlflow_experiment="sft-tests",
        node_pool="cpu-test",
    )
    run_job("trainers.sft", cfg, tmp, training_stack)
    return Trained(data, base, str(download_dir(cfg.output_uri, tmp / "trained", training_stack)))


def held_out_accuracy(model_dir: str, tasks: list[Task], tools: LocalToolEnvironment) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.rollout import LocalPolicy, evaluate_in_process

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    policy = LocalPolicy(model, AutoTokenizer.from_pretrained(model_dir), max_new_tokens=128)
    summary = evaluate_in_process(
        policy, tasks, sandbox_url=tools.sandbox_url, search_url=tools.search_url, prompt="compact", max_turns=4
    )
    return summary["overall"].accuracy


@pytest.mark.timeout(1200)
def test_sft_lifts_held_out_accuracy_above_the_untrained_model(trained: Trained, tmp_path: Path) -> None:
    tasks = read_rl_parquet(str(trained.data / "eval" / "eval.parquet"))
    index = trained.data / "search" / "index.sqlite"
    with LocalToolEnvironment(tmp_path / "tools", index_path=index, sandbox=SandboxSpec(runner="gvisor")) as tools:
        before = held_out_accuracy(trained.base, tasks, tools)
        after = held_out_accuracy(trained.sft, tasks, tools)
    assert before == 0.0  # the base model has never seen the action format
    assert after > before, (before, after)


# The short SFT run here (300 steps, against the quickstart's 1,200) garbles the long `blobs` code at
# temperature 1 (right in 6 of 24 episodes that took it), so the reward barely tells the two strategies
# apart; at 0.5 it is right in 26 of 29 while the decision stays open (0.45), which is what a decision
# needs to teach RL (issue 33: tune the rollout temperature, not the learning rate).
TEMPERATURE = 0.5


def sampled_episodes(model_dir: str, tasks: list[Task], tools: Any, samples: int, seed: int) -> list[Any]:
    """`samples` sampled episodes (at the RL run's `TEMPERATURE`) of every task, through the live tools:
    the RL rollout itself, with the model's weights in this process."""
    import asyncio

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainers.rl.rollout import InProcessEngine, RolloutSettings, rollout

    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = InProcessEngine(AutoModelForCausalLM.from_pretrained(model_dir), tok, temperature=TEMPERATURE)
    settings = RolloutSettings(
        sandbox_url=tools.sandbox_url, search_url=tools.search_url, prompt="compact", group_size=samples, max_turns=3,
        turn_tokens=256, response_tokens=512,
    )  # fmt: skip
    result = asyncio.run(rollout(tasks, engine, tok, settings, seed=seed, run_id="learning"))
    return [ep.trajectory for ep in result.episodes if ep.trajectory is not None]


def by_option(episodes: list[Any]) -> dict[str, tuple[int, int]]:
    """Counting option -> (episodes solved, episodes), for the failure message."""
    out: dict[str, tuple[int, int]] = {}
    for t in episodes:
        option = choices(t.messages).get("count", "none")
        solved, n = out.get(option, (0, 0))
        out[option] = (solved + int(bool(t.reward and t.reward.accuracy >= 1.0)), n + 1)
    return out


def right_rate(episodes: list[Any], tasks: dict[str, Task]) -> tuple[int, int]:
    """(episodes that counted with the strategy their slice calls for, episodes that counted)."""
    right = counted = 0
    for t in episodes:
        option = choices(t.messages).get("count")
        if option is not None:
            counted += 1
            right += option == SLICES[tasks[t.task_id].slice].right["count"]
    return right, counted


@pytest.mark.timeout(1800)
def test_rl_teaches_the_strategy_the_target_calls_for(
    trained: Trained, training_stack: StackSettings, tmp_path: Path
) -> None:
    """RL from the mixed-strategy SFT model on the counting slice of the target distribution: the share
    of counting episodes that use the strategy the target calls for (`blobs`), and the mean reward, each rise beyond
    the 95 % interval of their value before RL (sampled episodes of held-out RL prompts, live tools)."""
    counting = [t for t in read_rl_parquet(str(trained.data / "rl" / "train.parquet")) if t.slice == "count"]
    train_tasks, held = counting[:-8], counting[-8:]  # measured on prompts RL never plays
    rl_data = tmp_path / "count.parquet"
    write_rl_parquet(str(rl_data), train_tasks, prompt="compact")
    by_id = {t.id: t for t in held}
    index = trained.data / "search" / "index.sqlite"
    with LocalToolEnvironment(
        tmp_path / "tools", index_path=index, sandbox=SandboxSpec(runner="gvisor", warm_pool=8, max_sessions=72)
    ) as tools:
        before = sampled_episodes(trained.sft, held, tools, samples=8, seed=1)
        cfg = RLJobConfig(
            job_name="learns-rl",
            prompt="compact",
            dataset=str(rl_data),
            model=trained.sft,
            checkpoint_uri=f"s3://{training_stack.bucket_checkpoints}/tests/learns-rl",
            output_uri=f"s3://{training_stack.bucket_models}/tests/learns-rl",
            sandbox_url=tools.sandbox_url,
            search_url=tools.search_url,
            mlflow_experiment="rl-tests",
            rl={"enabled": True, "nproc_per_node": 2, "precision": "fp32", "max_steps": 6, "prompts_per_step": 8,
                "rollouts_per_prompt": 4, "mini_batch_prompts": 4, "micro_batch_size": 8, "max_turns": 3,
                "temperature": TEMPERATURE,
                "max_turn_tokens": 256, "max_response_tokens": 512, "seed": 3,
                "optim": {"lr": 2e-4, "warmup_ratio": 0.0, "scheduler": "constant"},
                "checkpoint": {"every_steps": 100}, "trajectories_every": 0},
        )  # fmt: skip
        run_job("trainers.rl", cfg, tmp_path, training_stack)
        after_dir = str(download_dir(cfg.output_uri, tmp_path / "rl-model", training_stack))
        after = sampled_episodes(after_dir, held, tools, samples=8, seed=1)

    right0, n0 = right_rate(before, by_id)
    right1, n1 = right_rate(after, by_id)
    low1, _ = wilson(right1, n1)
    _, high0 = wilson(right0, n0)
    assert n0 >= 32 and n1 >= 32, (n0, n1)  # the SFT model counts, with either strategy
    assert 0.15 < right0 / n0 < 0.85, (right0, n0)  # a decision open before RL
    seen = f"solved/episodes by option: before {by_option(before)}, after {by_option(after)}"
    assert low1 > high0, f"right strategy {right0}/{n0} before RL, {right1}/{n1} after; {seen}"
    reward0 = [t.reward.score for t in before if t.reward]
    reward1 = [t.reward.score for t in after if t.reward]
    solved0 = sum(1 for t in before if t.reward and t.reward.accuracy >= 1.0)
    solved1 = sum(1 for t in after if t.reward and t.reward.accuracy >= 1.0)
    assert wilson(solved1, len(after))[0] > wilson(solved0, len(before))[1], seen
    assert sum(reward1) / len(reward1) > sum(reward0) / len(reward0)
