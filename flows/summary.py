"""What a finished pipeline run tells a person: the per-task comparison (an MLflow table on the pipeline
run), the run summary (a Prefect markdown artifact on the top-level flow run) and the lineage card (the
registered version's description). Pure renderers over the stages' typed results, plus the two calls
that record them."""

from __future__ import annotations

from typing import Any

from argus import tracking
from argus.agent.evaluation import behaviour_table, metrics_table
from argus.events import fmt_duration
from flows.context import RunContext
from flows.results import DataRef, EvalReport, PipelineResult, RLResult, SFTResult, StageTiming
from flows.runtime import artifact_key, mlflow_client


def comparison(reports: dict[str, EvalReport]) -> dict[str, list[Any]]:
    """One row per task: task, family, slice, gold answer, then each evaluation's answer, reward, whether it
    was right, the strategy it took at each decision and how many of its samples were right, in evaluation
    order (base, sft, rl); columns → values, as `MlflowClient.log_table` takes."""
    rows: dict[str, dict[str, Any]] = {}  # in the suite's order: the first evaluation's
    for label, report in reports.items():
        for r in report.tasks:
            first = {"task": r["task"], "family": r["family"], "slice": r.get("slice"), "gold": r["gold"]}
            row = rows.setdefault(r["task"], first)
            row[f"{label} answer"] = r["answer"]
            row[f"{label} strategy"] = r.get("strategy")
            row[f"{label} reward"] = round(float(r["reward"]), 3)
            row[f"{label} correct"] = bool(r["accuracy"] >= 1.0)
            row[f"{label} trace"] = r.get("trace_id")
            # Of the k samples at temperature 1 (None where the task was not sampled): a greedy failure
            # that no sample solves is one RL's sharpening cannot reach.
            row[f"{label} samples solved"] = r.get("solved_by_samples")
    columns = ["task", "family", "slice", "gold"] + [
        f"{label} {what}"
        for label in reports
        for what in ("answer", "reward", "correct", "strategy", "samples solved", "trace")
    ]
    return {c: [row.get(c) for row in rows.values()] for c in columns}


def _markdown_table(columns: list[str], rows: list[list[str]]) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, columns)) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
    return "\n".join(lines)


def stage_rows(stages: list[StageTiming]) -> list[list[str]]:
    """stage, state, wall, program: the one stage table (CLI and Prefect). A stage that ran beside
    others says which, so that the wall column is not read as a sum."""

    def span(s: StageTiming) -> tuple[float, float] | None:
        return None if s.ended_s is None else (s.ended_s - s.wall_s, s.ended_s)

    def beside(s: StageTiming) -> list[str]:
        mine = span(s)
        if mine is None:
            return []
        others = [(o.stage, span(o)) for o in stages if o is not s]
        return [name for name, theirs in others if theirs and min(mine[1], theirs[1]) - max(mine[0], theirs[0]) > 1.0]

    def state(s: StageTiming) -> str:
        if s.cached:
            return "skipped (done earlier)"
        overlapping = beside(s)
        return f"ran beside {', '.join(overlapping)}" if overlapping else "ran"

    return [[s.stage, state(s), fmt_duration(s.wall_s), "" if s.cached else fmt_duration(s.work_s)] for s in stages]


def eval_section(reports: dict[str, EvalReport]) -> str:
    columns, rows = metrics_table({label: report.metrics for label, report in reports.items()})
    return _markdown_table(columns, rows)


def behaviour_section(reports: dict[str, EvalReport]) -> str:
    """Per slice: each model's accuracy, strategy rates, tool calls per episode and repeat-call rate
    (empty when an evaluation predates slices)."""
    if not all(report.slices for report in reports.values()):
        return ""
    columns, rows = behaviour_table({label: report.slices for label, report in reports.items()})
    return _markdown_table(columns, rows)


def run_summary(result: PipelineResult) -> str:
    """The Prefect summary of a finished pipeline run (markdown)."""
    reg = result.registered
    lines = [
        f"## Pipeline `{result.run_name}` of `{result.spec}`",
        "",
        f"**{reg.name} v{reg.version}** ({', '.join(reg.aliases)}): [{reg.url}]({reg.url})",
    ]
    if result.serving is not None:
        lines.append(f"serving in {result.serving.to} at `{result.serving.endpoint_url}`")
    lines += [
        "",
        f"### Evaluation ({result.base_eval.suite} suite; accuracy with its 95 % Wilson interval)",
        "",
        eval_section(result.evaluations),
        "",
        "### What the tools were used for, per slice (greedy)",
        "",
        behaviour_section(result.evaluations) or "(no slices in this suite)",
        "",
        f"### Stages (total {fmt_duration(result.wall_s)}, orchestration {fmt_duration(result.overhead_s)})",
        "",
        _markdown_table(["stage", "state", "wall", "program"], stage_rows(result.stages)),
        "",
        "### Links",
        "",
        f"- MLflow pipeline run: [{result.mlflow_run_url}]({result.mlflow_run_url}) (per-task comparison: "
        "Artifacts → `comparison/per_task.json`)",
        *(
            f"- {label} evaluation: [{r.mlflow_run_url}]({r.mlflow_run_url}) (one trace per task)"
            for label, r in result.evaluations.items()
        ),
        f"- Prefect flow run: [{result.flow_run_url}]({result.flow_run_url})",
    ]
    return "\n".join(lines)


def lineage_card(
    *,
    settings: Any,
    experiment_id: str,
    model_uri: str,
    data: DataRef,
    trained: SFTResult,
    refined: RLResult | None,
    reports: dict[str, EvalReport],
    flow_run_url: str,
    pipeline_run_url: str,
    code_version: str,
    repository: str | None,
) -> str:
    """The registered version's description: where it came from, in a few lines a reviewer can check."""

    def run_link(run_id: str | None) -> str:
        if not run_id:
            return "(no run)"
        url = tracking.mlflow_run_url(settings, experiment_id, run_id)
        return f"[{run_id[:12]}]({url})"

    lines = [
        f"**Source** `{model_uri}`",
        "",
        "**Training**",
        f"- SFT: run {run_link(trained.mlflow_run_id)}, {trained.steps or '?'} steps, `{trained.model_uri}`",
    ]
    if refined is not None:
        lines.append(f"- RL (from the SFT model): run {run_link(refined.mlflow_run_id)}, {refined.steps or '?'} steps")
    lines += [
        f"- pipeline: [MLflow run]({pipeline_run_url}) · [Prefect flow run]({flow_run_url})",
        "",
        "**Data** (sha256)",
        *(f"- {name}: `{digest[:16]}`" for name, digest in sorted(data.hashes.items())),
        "",
        "**Code** " + f"`{code_version}`" + (f" of {repository}" if repository else ""),
        "",
        f"**Evaluation** ({next(iter(reports.values())).suite} suite, accuracy [95 % interval])",
        "",
        eval_section(reports),
    ]
    return "\n".join(lines)


# -- recording ---------------------------------------------------------------------------------------


def record_datasets(ctx: RunContext, data: DataRef) -> None:
    """The run's data as MLflow dataset inputs of the pipeline run (uri and content hash)."""
    found = {
        "sft": (data.sft, data.hashes.get("sft", ""), "training"),
        "eval": (data.eval, data.hashes.get("eval", ""), "evaluation"),
        **({"rl": (data.rl, data.hashes.get("rl", ""), "training")} if data.rl else {}),
    }
    tracking.log_datasets(mlflow_client(ctx.settings), ctx.mlflow_run_id, {k: v for k, v in found.items() if v[1]})


def record_comparison(ctx: RunContext, reports: dict[str, EvalReport]) -> None:
    """The per-task comparison as an MLflow table artifact of the pipeline run (MLflow appends to a
    table file that exists, so a resumed run writes it afresh under its own name)."""
    if not all(r.tasks for r in reports.values()):  # recorded before evaluations kept their tasks
        return
    client = mlflow_client(ctx.settings)
    path = "comparison/per_task.json"
    existing = {f.path for f in client.list_artifacts(ctx.mlflow_run_id, "comparison")}
    if path in existing:
        path = f"comparison/per_task-{ctx.flow_run_id[:8]}.json"
    client.log_table(ctx.mlflow_run_id, data=comparison(reports), artifact_file=path)


def record_summary(ctx: RunContext, result: PipelineResult) -> None:
    """The run summary as a markdown artifact of the top-level flow run."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(
        run_summary(result), key=artifact_key(ctx.run, "summary"), description=f"pipeline {ctx.run}: results"
    )
