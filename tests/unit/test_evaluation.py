"""Evaluation arithmetic: Wilson intervals, pass@k, the metrics table."""

from __future__ import annotations

import pytest

from argus.agent.env import Trajectory
from argus.agent.evaluation import mcnemar, metrics_table, pass_rates, solved_counts, summarize, wilson
from argus.agent.reward import Reward


@pytest.mark.parametrize(
    ("successes", "n", "low", "high"),
    [
        # Published values of the 95 % Wilson score interval.
        (0, 10, 0.0, 0.2775),
        (5, 10, 0.2366, 0.7634),
        (0, 60, 0.0, 0.0602),
        (10, 10, 0.7225, 1.0),
        (90, 150, 0.5200, 0.6750),
    ],
)
def test_wilson_interval_matches_known_values(successes: int, n: int, low: float, high: float) -> None:
    lo, hi = wilson(successes, n)
    assert lo == pytest.approx(low, abs=1e-4) and hi == pytest.approx(high, abs=1e-4)


def test_mcnemar_counts_discordant_tasks_and_matches_the_exact_binomial() -> None:
    first = [True] * 10 + [False] * 2 + [True] * 5 + [False] * 3
    second = [False] * 10 + [True] * 2 + [True] * 5 + [False] * 3
    only_first, only_second, p = mcnemar(first, second)
    assert (only_first, only_second) == (10, 2)
    assert p == pytest.approx(0.0386, abs=1e-4)  # 2 * P(X <= 2), X ~ Binomial(12, 0.5)
    assert mcnemar([True, False], [True, False]) == (0, 0, 1.0)
    assert mcnemar([True] * 3, [False] * 3)[2] == pytest.approx(0.25)


def test_150_tasks_bound_the_interval_to_eight_points() -> None:
    lo, hi = wilson(75, 150)  # the widest case, p = 0.5
    assert (hi - lo) / 2 <= 0.08


def _traj(task: str, family: str, correct: bool) -> Trajectory:
    reward = Reward(score=1.0 if correct else 0.2, accuracy=1.0 if correct else 0.0, format=1.0, answer="x")
    return Trajectory(task_id=task, family=family, messages=[], images=[], reward=reward)


def test_pass_at_k_counts_tasks_any_sample_solved() -> None:
    # Two samples of three tasks: t1 solved by both, t2 by one, t3 by none.
    samples = [
        [_traj("t1", "search", True), _traj("t2", "search", True), _traj("t3", "perception", False)],
        [_traj("t1", "search", True), _traj("t2", "search", False), _traj("t3", "perception", False)],
    ]
    rates = pass_rates(samples)
    assert rates["overall"]["pass_at_1"] == pytest.approx(3 / 6)
    assert rates["overall"]["pass_at_2"] == pytest.approx(2 / 3)
    assert rates["search"]["pass_at_2"] == 1.0 and rates["perception"]["pass_at_2"] == 0.0
    assert solved_counts(samples) == [2, 1, 0] and solved_counts([]) == []
    # Every key is a valid MLflow metric name.
    from mlflow.utils.validation import _validate_metric_name

    for family in rates.values():
        for key in family:
            _validate_metric_name(f"overall/{key}")


def test_metrics_table_carries_intervals_and_puts_overall_first() -> None:
    summary = summarize([_traj("a", "search", True), _traj("b", "perception", False)])
    columns, rows = metrics_table({"base": summary, "SFT": summary})
    assert columns[:4] == ["family", "n", "base acc", "SFT acc"]
    assert [r[0] for r in rows] == ["overall", "perception", "search"]
    overall = rows[0]
    lo, hi = wilson(1, 2)
    assert overall[3] == f"0.500 [{lo:.2f}, {hi:.2f}]"


def test_one_evaluation_with_samples_shows_its_pass_rates() -> None:
    # What `argus eval --samples 2` prints: the greedy metrics, then pass@1 and pass@2 by family.
    summary = summarize([_traj("a", "search", True), _traj("b", "perception", False)])
    samples = [[_traj("a", "search", True), _traj("b", "perception", False)]] * 2
    rates = pass_rates(samples)
    columns, rows = metrics_table({"model": {f: {**m.__dict__, **rates.get(f, {})} for f, m in summary.items()}})
    assert columns[-2:] == ["pass@1", "pass@2"]
    assert rows[0][0] == "overall" and rows[0][-2:] == ["0.500", "0.500"]
    assert rows[1][0] == "perception" and rows[1][-2:] == ["0.000", "0.000"]
    columns, _ = metrics_table({"model": summary})  # no samples, no pass columns
    assert not any(c.startswith("pass@") for c in columns)


def test_the_prompt_round_trips_from_spec_to_job_and_refuses_a_mismatch(tmp_path: object) -> None:
    import json
    from pathlib import Path

    import yaml

    from argus.agent import prompts
    from argus.backends.jobs import sft_job
    from argus.config import StackSettings
    from argus.data.formats import SFTExample, task_to_row
    from argus.data.tasks import build_suite
    from argus.specfile import load_spec
    from flows.stages.evaluate import PromptMismatch, check_prompt
    from trainers.sft.data import check_prompt as check_dataset

    root = Path(str(tmp_path))
    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml").read_text())
    (root / "spec.yaml").write_text(yaml.safe_dump({**raw, "prompt": "compact"}))
    spec = load_spec(root / "spec.yaml")
    assert spec.prompt == "compact"
    settings = StackSettings(home=root)
    job = sft_job(spec, settings, name="rt-sft", dataset="d.json", model="m")
    assert job.config["prompt"] == "compact"
    # The data of that prompt opens with its system message, the RL/eval rows too.
    task = build_suite(0, 1, 0, 0).sft[0].task
    opening = prompts.opening("compact", task.question)
    assert task_to_row(task, 0, prompt="compact")["prompt"] == opening
    assert prompts.prompt_of(opening[0]["content"]) == "compact"
    check_dataset([SFTExample(messages=opening, images=[])], "compact", "d.json")
    with pytest.raises(Exception, match="'deepeyesv2' prompt, but the job trains with the 'compact'"):
        verbatim = prompts.opening("deepeyesv2", task.question)
        check_dataset([SFTExample(messages=verbatim, images=[])], "compact", "d.json")
    # A model records its training prompt; evaluating it with another is refused, naming both.
    model = root / "model"
    model.mkdir()
    (model / "argus_export.json").write_text(json.dumps({"prompt": "compact"}))
    check_prompt(str(model), "compact", settings)
    with pytest.raises(PromptMismatch, match=r"trained with the 'compact' prompt.*with the 'deepeyesv2' prompt"):
        check_prompt(str(model), "deepeyesv2", settings)
    check_prompt(str(root / "base-model"), "deepeyesv2", settings)  # no record: a base model


def test_the_in_process_policy_renders_the_training_layout_and_stops_at_the_turn_end() -> None:
    import asyncio

    from argus.agent import prompts
    from argus.models.tiny import build
    from trainers.rollout import LocalPolicy

    model, tokenizer, _ = build("qwen2", seed=0)
    policy = LocalPolicy(model, tokenizer, max_new_tokens=12)
    messages = prompts.opening("compact", "What colour is the shape in row 1, column 1?")
    rendered = policy.render(messages)
    assert rendered.startswith("<|im_start|>system\n") and rendered.endswith("<|im_start|>assistant\n")
    turn = asyncio.run(policy(messages, []))
    assert isinstance(turn, str) and "<|im_end|>" not in turn
    assert policy.generate(messages) == turn  # greedy: the same weights give the same turn


def test_tool_error_rate_is_the_share_of_failed_calls() -> None:
    from argus.agent.env import ToolCall

    ok = ToolCall(tool="python", latency_s=0.1, ok=True, request="print(1)")
    failed = ToolCall(tool="python", latency_s=0.1, ok=False, request="1/0")
    a, b = _traj("a", "search", True), _traj("b", "perception", False)
    a.tool_calls, b.tool_calls = [ok, ok], [failed, ok]
    summary = summarize([a, b])
    assert summary["overall"].tool_error_rate == pytest.approx(1 / 4)
    assert summary["search"].tool_error_rate == 0.0 and summary["perception"].tool_error_rate == 0.5
    assert summary["overall"].flat("eval")["eval/tool_error_rate"] == pytest.approx(0.25)
