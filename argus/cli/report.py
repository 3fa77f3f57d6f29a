"""How results are printed: a metrics table (one function renders them all), a pipeline's result, a
promotion. `run`, `runs show`, `eval` and `promote` share these."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from rich.table import Table

from argus.cli._common import console

if TYPE_CHECKING:
    from flows.results import PipelineResult, PromotionResult


def metrics_table(title: str, results: Mapping[str, Mapping[str, Any]]) -> Table:
    """A rich table of one or several evaluations (label → metrics per family)."""
    from argus.agent.evaluation import metrics_table as rows_of

    columns, rows = rows_of(results)
    table = Table(title=title, title_justify="left")
    labels = list(results)
    headline = f"{labels[-1]} acc" if len(labels) > 1 else "accuracy"
    for col in columns:
        # Cells wrap (an interval goes under its value) rather than lose their end on a narrow terminal.
        table.add_column(
            col,
            justify="left" if col in ("family", "tool mix") else "right",
            no_wrap=col in ("family", "n"),
            overflow="fold",
            style="bold" if col == headline and len(labels) > 1 else None,
        )
    for row in rows:
        table.add_row(*row)
    return table


def behaviour_table(title: str, results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> Table:
    """A rich table of how one or several evaluations used the tools, per slice (label → slice metrics)."""
    from argus.agent.evaluation import behaviour_table as rows_of

    columns, rows = rows_of(results)
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col == "slice" or "strategy" in col else "right", overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def print_result(result: PipelineResult) -> None:
    shown = {"base": result.base_eval, "SFT": result.sft_eval, **({"RL": result.rl_eval} if result.rl_eval else {})}
    console.print(
        metrics_table(
            f"{result.spec} / {result.run_name}: {' vs '.join(shown)} ({result.base_eval.suite} suite)",
            {label: report.metrics for label, report in shown.items()},
        )
    )
    # Per slice, the trained models (the base model takes no decision): what each did with the tools.
    trained = {label: report for label, report in shown.items() if label != "base"}
    if all(report.slices for report in trained.values()):
        console.print(
            behaviour_table(
                "per slice (greedy): accuracy, the strategy most taken at each decision with its share, "
                "tool calls per episode (repeat-call rate)",
                {label: report.slices for label, report in trained.items()},
            )
        )
    reg = result.registered
    console.print(
        f"registered [bold]{reg.name}[/] version [bold]{reg.version}[/] (aliases: {', '.join(reg.aliases)}) "
        f"source {reg.source}",
        highlight=False,
    )
    if result.serving is not None:
        srv = result.serving
        console.print(
            f"serving [bold]{reg.name}[/] v{srv.version} in {srv.to} at [bold]{srv.endpoint_url}[/]",
            highlight=False,
        )
        console.print(
            f"  try: curl -s {srv.endpoint_url}/chat/completions -H 'Content-Type: application/json' "
            f"""-d '{{"model": "{reg.name}", "messages": [{{"role": "user", "content": "hi"}}]}}'""",
            highlight=False,
            soft_wrap=True,
        )
    console.print(stage_table(result))
    print_links(
        [
            ("MLflow run", result.mlflow_run_url),
            ("Prefect run", result.flow_run_url),
            ("model", reg.url),
            *(
                (f"{label} eval" + (" (earlier run)" if report.cached else ""), report.mlflow_run_url)
                for label, report in shown.items()
            ),
        ]
    )


def stage_table(result: PipelineResult) -> Table:
    """The one stage table: every stage the run went through (deploy included) with its wall time and
    the time inside its own program, one duration format, one total."""
    from argus.events import fmt_duration
    from flows.results import busy_s
    from flows.summary import stage_rows

    table = Table(title=f"stages of {result.run_name}", title_justify="left")
    for col in ("stage", "state", "wall", "program"):
        table.add_column(col, justify="left" if col in ("stage", "state") else "right")
    for row in stage_rows(result.stages):
        table.add_row(*row)
    work = busy_s(result.stages)  # stages that ran side by side count once
    table.add_row(
        "[bold]total[/]",
        f"orchestration {fmt_duration(result.overhead_s)}",
        f"[bold]{fmt_duration(result.wall_s)}[/]",
        fmt_duration(work),
    )
    return table


def print_links(links: list[tuple[str, str]]) -> None:
    """Label and URL, one per line: a URL is never cut, whatever the terminal's width (it wraps)."""
    width = max(len(label) for label, _ in links) + 2
    for label, url in links:
        console.print(f"{label + ':':<{width}}{url}", highlight=False, soft_wrap=True)


def print_promotion(model: str, result: PromotionResult) -> None:
    detail = [f"switch {result.switch_s:.1f}s"] if result.switch_s is not None else []
    if result.previous_version:
        detail.append(f"previous v{result.previous_version}")
    console.print(
        f"{model} v{result.version} → {result.to}: {result.endpoint_url}"
        + (f" ({', '.join(detail)})" if detail else ""),
        highlight=False,
    )
