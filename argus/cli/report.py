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
        table.add_column(
            col,
            justify="left" if col in ("family", "tool mix") else "right",
            no_wrap=True,
            style="bold" if col == headline and len(labels) > 1 else None,
        )
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
    timing = Table(title="time per stage", title_justify="left")
    for col in ("stage", "wall", "program", "orchestration", ""):
        timing.add_column(col, justify="left" if col in ("stage", "") else "right", no_wrap=col != "")
    for st in result.stages:
        note = f"skipped (took {st.work_s:.0f}s when it ran)" if st.work_s else "skipped"
        timing.add_row(
            st.stage,
            f"{st.wall_s:.1f}s",
            "—" if st.cached else f"{st.work_s:.1f}s",
            f"{st.wall_s - (0.0 if st.cached else st.work_s):.1f}s",
            note if st.cached else "",
        )
    work = sum(s.work_s for s in result.stages if not s.cached)
    timing.add_row(
        "[bold]total[/]",
        f"{result.wall_s:.1f}s",
        f"{work:.1f}s",
        f"{result.overhead_s:.1f}s ({100 * result.overhead_s / max(result.wall_s, 1e-9):.1f}%)",
        "",
    )
    console.print(timing)
    console.print(f"MLflow run:   {result.mlflow_run_url}", highlight=False)
    console.print(f"Prefect run:  {result.flow_run_url}", highlight=False)
    console.print(f"model:        {reg.url}", highlight=False)
    for label, report in shown.items():
        title = f"{label} eval"
        note = "  (recorded by an earlier run)" if report.cached else ""
        console.print(f"{title + ':':<14}{report.mlflow_run_url}{note}", highlight=False)


def print_promotion(model: str, result: PromotionResult) -> None:
    detail = [f"switch {result.switch_s:.1f}s"] if result.switch_s is not None else []
    if result.previous_version:
        detail.append(f"previous v{result.previous_version}")
    console.print(
        f"{model} v{result.version} → {result.to}: {result.endpoint_url}"
        + (f" ({', '.join(detail)})" if detail else ""),
        highlight=False,
    )
