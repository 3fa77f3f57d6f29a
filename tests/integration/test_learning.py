"""The miniature learns: the quickstart's model, trained by the SFT trainer on a small slice of the suite,
answers held-out tasks (entities it has never seen, live gVisor sandbox and search proxy) that the same
model untrained does not."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from argus.agent.task import Task
from argus.backends.local.launch import TrainingRun
from argus.backends.local.tools import LocalToolEnvironment
from argus.config import SandboxSpec, SFTJobConfig, StackSettings
from argus.data.formats import read_rl_parquet
from argus.storage import download_dir
from tests.conftest import local_tools

pytestmark = [pytest.mark.integration, pytest.mark.slow]


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
def test_sft_lifts_held_out_accuracy_above_the_untrained_model(training_stack: StackSettings, tmp_path: Path) -> None:

    from argus.data.generate import generate
    from argus.models import tiny

    data = tmp_path / "data"
    # A slice: 300 gold trajectories (the quickstart trains on 1,000) and 16 held-out tasks.
    generate(
        str(data), tools=local_tools(training_stack), seed=23, sft_size=300, rl_size=1, eval_size=16, prompt="compact"
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
    path = tmp_path / "learns.json"
    path.write_text(cfg.model_dump_json())
    run = TrainingRun(
        "trainers.sft", path, tmp_path / f"learns-{time.monotonic_ns()}.log", 2, extra_env=training_stack.client_env()
    )
    run.start()
    assert run.wait(lambda _e: None) == 0, run.log_path.read_text()[-3000:]
    trained = download_dir(cfg.output_uri, tmp_path / "trained", training_stack)

    tasks = read_rl_parquet(str(data / "eval" / "eval.parquet"))
    index = data / "search" / "index.sqlite"
    with LocalToolEnvironment(tmp_path / "tools", index_path=index, sandbox=SandboxSpec(runner="gvisor")) as tools:
        before = held_out_accuracy(base, tasks, tools)
        after = held_out_accuracy(trained, tasks, tools)
    assert before == 0.0  # the base model has never seen the action format
    assert after > before, (before, after)
