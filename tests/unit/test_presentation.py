"""What a person reads about a run: the stage table, the per-task comparison, the Prefect summary, the
lineage card, and CLI tables that keep every URL whole at 80 and 120 columns."""

from __future__ import annotations

import re

import pytest
from rich.console import Console

from argus.agent.env import Trajectory
from argus.agent.evaluation import EvalRun, by_slice, summarize
from argus.agent.reward import Reward
from argus.agent.task import Task
from argus.config import StackSettings
from argus.events import fmt_duration
from flows.results import DataRef, EvalReport, PipelineResult, RegisteredVersion, SFTResult, StageTiming

URL = "http://127.0.0.1:4200/runs/flow-run/0b7cf2b2-6d5e-4c5b-9b1a-0d3f2e6c9a11"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, ""), (0.43, "0.4s"), (9.94, "9.9s"), (42.4, "42s"), (119.4, "119s"), (400, "6m40s"), (3723, "1h02m03s")],
)
def test_one_duration_format(seconds: float | None, text: str) -> None:
    assert fmt_duration(seconds) == text


def _eval(label: str, answers: dict[str, tuple[str, float]], solved_by_samples: list[int] | None = None) -> EvalReport:
    tasks = [
        Task(
            id=t,
            family="search" if t.startswith("s") else "perception",
            slice="search" if t.startswith("s") else "count",
            question="q",
            answer="gold-" + t,
            image=b"",
        )
        for t in answers
    ]
    # The counting task's turn names its strategy (cells for the base model, blobs after SFT).
    counting = "<think>Counting " + ("cell by cell" if label == "base" else "blob by blob") + ": x</think>"
    trajectories = [
        Trajectory(
            task_id=task.id,
            family=task.family,
            slice=task.slice,
            messages=[{"role": "assistant", "content": counting}] if task.slice == "count" else [],
            images=[],
            reward=Reward(score=score, accuracy=1.0 if score >= 1 else 0.0, format=1.0, answer=answer),
        )
        for task, (answer, score) in zip(tasks, answers.values(), strict=True)
    ]
    result = EvalRun(
        trajectories,
        summarize(trajectories),
        0.0,
        1.0,
        solved_by_samples=solved_by_samples or [],
        slices=summarize(trajectories, by_slice),
    )
    return EvalReport(
        label=label,
        model_uri=f"s3://models/{label}",
        model_fingerprint="f" * 16,
        suite="eval",
        metrics={k: m.__dict__ for k, m in result.summary.items()},
        slices=result.slice_metrics(),
        mlflow_run_id=f"{label}-run-0123456789",
        mlflow_run_url=f"http://127.0.0.1:5000/#/experiments/1/runs/{label}-run",
        serve_s=0.0,
        eval_s=1.0,
        tasks=result.per_task(tasks, [f"tr-{label}-{t}" for t in answers]),
    )


def _result() -> PipelineResult:
    base = _eval("base", {"s1": ("x", 0.0), "p1": ("y", 0.2)})
    sft = _eval("sft", {"s1": ("gold-s1", 1.0), "p1": ("y", 0.2)}, solved_by_samples=[3])  # s1 sampled
    trained = SFTResult(
        job_name="sft-x", mlflow_run_id="sft-run-abcdef", model_uri="s3://m/sft", checkpoint_uri="s3://c", steps=150
    )
    return PipelineResult(
        spec="quickstart",
        run_name="e2e",
        flow_run_id="0b7cf2b2",
        flow_run_url=URL,
        mlflow_run_url="http://127.0.0.1:5000/#/experiments/1/runs/pipeline-run",
        data=DataRef(
            sft="s3://d/sft", eval="s3://d/eval", search="s3://d/search", hashes={"sft": "a" * 64, "eval": "b" * 64}
        ),
        sft=trained,
        base_eval=base,
        sft_eval=sft,
        registered=RegisteredVersion(
            name="argus-quickstart",
            version="3",
            source="s3://m/sft",
            aliases=["candidate"],
            url="http://127.0.0.1:5000/#/models/argus-quickstart/versions/3",
        ),
        stages=[
            StageTiming(stage="prepare-data", wall_s=3.0, work_s=2.5),
            StageTiming(stage="sft", wall_s=161.0, work_s=150.0),
            StageTiming(stage="deploy-sft", wall_s=84.0, work_s=83.0),
            StageTiming(stage="evaluate-sft", wall_s=260.0, work_s=250.0),
            StageTiming(stage="register", wall_s=0.4, cached=True),
        ],
        wall_s=520.0,
    )


def test_the_per_task_comparison_lines_up_every_evaluation() -> None:
    from flows.summary import comparison

    table = comparison(_result().evaluations)
    assert table["task"] == ["s1", "p1"] and table["gold"] == ["gold-s1", "gold-p1"]
    assert table["base answer"] == ["x", "y"] and table["sft answer"] == ["gold-s1", "y"]
    assert table["sft correct"] == [True, False] and table["base reward"] == [0.0, 0.2]
    assert table["sft trace"] == ["tr-sft-s1", "tr-sft-p1"]
    assert table["sft samples solved"] == [3, None] and table["base samples solved"] == [None, None]
    assert table["slice"] == ["search", "count"]
    assert table["base strategy"] == ["", "count=cells"] and table["sft strategy"] == ["", "count=blobs"]
    assert len({len(v) for v in table.values()}) == 1  # a rectangle, as MLflow's table view needs


def test_summary_and_lineage_card_carry_the_stages_the_numbers_and_the_links() -> None:
    from flows.summary import lineage_card, run_summary

    result = _result()
    text = run_summary(result)
    assert "| deploy-sft | ran | 84s | 83s |" in text  # the deploy is a stage of its own
    assert "| register | skipped (done earlier) | 0.4s |  |" in text
    assert "total 8m40s" in text and URL in text and result.registered.url in text
    # per slice, each model's strategy beside its accuracy
    count_row = next(line for line in text.splitlines() if line.startswith("| count |"))
    assert "| cells 1.00 |" in count_row and "| blobs 1.00 |" in count_row
    first_row = next(line for line in text.splitlines() if line.startswith("| overall"))
    assert re.search(r"0\.500 \[0\.\d\d, 0\.\d\d\]", first_row)  # accuracy with its interval, overall first
    card = lineage_card(
        settings=StackSettings(),
        experiment_id="1",
        model_uri="s3://m/sft",
        data=result.data,
        trained=result.sft,
        refined=None,
        reports=result.evaluations,
        flow_run_url=URL,
        pipeline_run_url=result.mlflow_run_url,
        code_version="0123456789abcdef0123456789abcdef01234567",
        repository="https://github.com/example/argus",
    )
    assert "0123456789abcdef0123456789abcdef01234567" in card and "https://github.com/example/argus" in card
    assert "runs/sft-run-abcdef" in card and URL in card and "`" + "a" * 16 + "`" in card
    assert "| overall |" in card


def test_orchestration_overhead_counts_overlapping_stages_once() -> None:
    from flows.results import busy_s
    from flows.summary import stage_rows

    # The candidate's server starts (100-118 s) while the SFT model is evaluated (10-160 s, of which
    # 140 s in its program); the RL evaluation follows. Busy: 20-160 and 165-295.
    stages = [
        StageTiming(stage="evaluate-sft", wall_s=150.0, work_s=140.0, ended_s=160.0),
        StageTiming(stage="deploy-rl", wall_s=18.0, work_s=18.0, ended_s=118.0),
        StageTiming(stage="evaluate-rl", wall_s=135.0, work_s=130.0, ended_s=295.0),
        StageTiming(stage="register", wall_s=0.4, work_s=0.3, cached=True, ended_s=295.4),
    ]
    assert busy_s(stages) == pytest.approx(270.0)
    result = _result().model_copy(update={"stages": stages, "wall_s": 300.0})
    assert result.overhead_s == pytest.approx(30.0)
    states = {row[0]: row[1] for row in stage_rows(stages)}
    assert states["deploy-rl"] == "ran beside evaluate-sft" and states["evaluate-sft"] == "ran beside deploy-rl"
    assert states["evaluate-rl"] == "ran" and states["register"] == "skipped (done earlier)"
    # In sequence, busy is the sum of the work, with or without the stages' places.
    assert busy_s(_result().stages) == pytest.approx(2.5 + 150.0 + 83.0 + 250.0)


@pytest.mark.parametrize("width", [80, 120])
def test_cli_tables_never_cut_a_url(width: int) -> None:
    from argus.cli import report
    from argus.cli._common import print_table

    out = Console(width=width, record=True, force_terminal=False)
    rows = [
        [
            "argus-quickstart-0123456789",
            "argus-quickstart",
            "argus-quickstart",
            "v3",
            "candidate, production",
            "healthy",
            URL,
        ],
        ["mlflow", "healthy", "local", "1234", "0", "http://127.0.0.1:5000"],
    ]
    print_table(
        "serving",
        ["deployment", "endpoint", "model", "version", "aliases", "health", "URL"],
        rows[:1],
        url_column="URL",
        out=out,
    )
    print_table(
        "stack", ["component", "health", "managed", "pid", "restarts", "URL"], rows[1:], url_column="URL", out=out
    )
    original = report.console
    report.console = out
    try:
        report.print_result(_result())
    finally:
        report.console = original
    text = out.export_text()
    for url in (URL, "http://127.0.0.1:5000", _result().registered.url, _result().mlflow_run_url):
        assert url in text.replace("\n", "") or url in text, url  # whole, maybe wrapped by the terminal
        assert url in "".join(line.rstrip() for line in text.splitlines()), url
    assert "…" not in text  # rich's ellipsis: nothing was cut
    headers: list[list[str]] = []  # each table's header lines, split into cells
    for line in [*text.splitlines(), ""]:
        if line.startswith("┃"):
            headers.append(line.strip().strip("┃").split("┃"))
            continue
        if headers:  # the header ended: no column may be nameless (an empty column)
            assert all("".join(col).strip() for col in zip(*headers, strict=True)), headers
            headers = []
    assert text.count("total") == 1  # one stage table, one total
    assert "deploy-sft" in text
