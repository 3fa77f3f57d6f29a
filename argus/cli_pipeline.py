"""`argus run`, `argus runs list|show`, `argus deploy`: the pipeline from the command line.

`argus run` executes the `pipeline` flow in this process against the platform stack (started if
needed), exactly as a Prefect worker executes a deployment's flow run, and shows the stages live from
the Prefect API: what a user sees here is what the Prefect UI shows. A spec with `backend: kubernetes`
is submitted to the cluster instead (`argus.cli_cluster`).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from argus.config import DNS_LABEL, PipelineSpec, StackSettings
from argus.specfile import SpecError, load_spec

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

    from flows.results import PipelineResult, PromotionResult

# Piped output (CI logs, `| tee`) gets tables wide enough to read instead of rich's 80 columns.
console = Console() if sys.stdout.isatty() else Console(width=140)
err_console = Console(stderr=True)
runs_app = typer.Typer(help="Pipeline runs recorded by Prefect.", no_args_is_help=True)
serving_app = typer.Typer(help="Model serving: stable endpoints and vLLM deployments.", no_args_is_help=True)
REPO = Path(__file__).resolve().parents[1]
COLOURS = {"COMPLETED": "green", "RUNNING": "yellow", "FAILED": "red", "CRASHED": "red", "CANCELLED": "red"}


def spec_or_exit(path: str | Path) -> PipelineSpec:
    """The spec at `path`, or every problem as `file:line: field: message` and exit 1."""
    try:
        return load_spec(path)
    except SpecError as exc:
        for issue in exc.issues:
            err_console.print(f"[red]error:[/] {issue}", highlight=False)
        raise typer.Exit(1) from None


def _settings(home: Path | None) -> StackSettings:
    return StackSettings(home=home) if home else StackSettings()


def _prepare_env(settings: StackSettings) -> None:
    """Point this process's Prefect, MLflow and S3 clients at the stack, as the worker does for its runs."""
    from argus.stack import effective_settings, flow_env

    settings = effective_settings(settings)
    os.environ.update({**settings.argus_env(), **settings.client_env(), **flow_env(settings)})
    _quiet_expected_tracebacks()


class _ExpectedFailures(logging.Filter):
    """Drops the traceback of an expected flow failure from the console (the message stays, and the run's
    logs in Prefect, written by an earlier handler, keep the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.runtime import FlowError

        if record.exc_info and isinstance(record.exc_info[1], FlowError):
            record.exc_info = None
            record.exc_text = None
        return True


def _quiet_expected_tracebacks() -> None:
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ExpectedFailures) for f in handler.filters):
            handler.addFilter(_ExpectedFailures())


def start_stack(settings: StackSettings) -> StackSettings:
    from argus.stack import StackError, effective_settings, up

    try:
        with console.status("platform stack (S3 endpoint, MLflow, Prefect, worker)…"):
            up(settings)
    except StackError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    return effective_settings(settings)


def _fmt_s(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.0f}s" if seconds < 120 else f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def _stage_name(name: str) -> str:
    return re.sub(r"-[0-9a-f]{3}$", "", name)


class StageView:
    """Polls the Prefect API for the flow run's task runs (and the SFT progress artifact)."""

    def __init__(self, flow_run_id: Any, run_name: str):
        self.flow_run_id = flow_run_id
        self.run_name = run_name
        self.rows: list[tuple[str, str, str, str]] = []
        self.flow_state = ""  # set by whoever watches the flow run itself (a run in a cluster)
        self.stop = threading.Event()

    def poll(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterParentFlowRunId,
            TaskRunFilter,
        )
        from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort

        from flows.runtime import artifact_key

        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[self.flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )
            progress = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[artifact_key(self.run_name, "sft-progress")])
                ),
                flow_run_filter=FlowRunFilter(),
                task_run_filter=TaskRunFilter(),
                sort=ArtifactSort.UPDATED_DESC,
                limit=1,
                offset=0,
            )
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[self.flow_run_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )
        # A subflow appears as a task run in its parent; its own flow run carries the useful name.
        subflow_names = {fr.parent_task_run_id: fr.name for fr in children}
        rows = []
        for tr in task_runs:
            stage = subflow_names.get(tr.id) or _stage_name(tr.name)
            if stage in ("load-spec", "mlflow-run"):
                continue
            state = (tr.state.name if tr.state else None) or "PENDING"
            detail = ""
            if stage == "sft" and progress and state.upper() == "RUNNING":
                detail = f"{float(progress[0].data or 0):.0f}% of steps"  # type: ignore[arg-type]
            elapsed = tr.estimated_run_time.total_seconds() if tr.estimated_run_time else None
            rows.append((stage, state, _fmt_s(elapsed), detail))
        self.rows = rows

    def table(self) -> Table:
        title = f"pipeline {self.run_name}" + (f" · {self.flow_state}" if self.flow_state else "")
        table = Table(title=title, title_justify="left")
        for col in ("stage", "state", "time", ""):
            table.add_column(col)
        for stage, state, elapsed, detail in self.rows:
            colour = COLOURS.get(state.upper(), "cyan" if state == "Cached" else "white")
            table.add_row(stage, f"[{colour}]{state}[/]", elapsed, detail)
        return table

    def follow(self, live: Live) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
                live.update(self.table())
            except Exception:  # noqa: BLE001 - a missed refresh is not worth stopping the run for
                pass
            self.stop.wait(3.0)  # each poll is three API calls; the Prefect server shares the cores

    @contextlib.contextmanager
    def shown(self) -> Iterator[None]:
        """The table, live, refreshed from a thread while the block runs, and once more at its end. The
        thread runs in this context, so it talks to the Prefect API this context is set to."""
        with Live(self.table(), console=console, refresh_per_second=2, transient=False) as live:
            watcher = threading.Thread(target=contextvars.copy_context().run, args=(self.follow, live), daemon=True)
            watcher.start()
            try:
                yield
            finally:
                self.stop.set()
                watcher.join(timeout=5)
                try:
                    self.poll()
                    live.update(self.table())
                except Exception:  # noqa: BLE001 - the last refresh is cosmetic
                    pass


def print_result(result: PipelineResult) -> None:
    from flows.results import PipelineResult

    assert isinstance(result, PipelineResult)
    base, sft = result.base_eval, result.sft_eval
    table = Table(title=f"{result.spec} / {result.run_name}: base vs SFT ({base.suite} suite)", title_justify="left")
    for col in ("family", "n", "base acc", "SFT acc", "base fmt", "SFT fmt", "SFT tools", "SFT turns"):
        table.add_column(col, justify="right" if col != "family" else "left", no_wrap=True)
    for family in sorted(sft.metrics, key=lambda f: (f == "overall", f)):
        b, s = base.metrics[family], sft.metrics[family]
        table.add_row(
            family,
            str(s["n"]),
            f"{b['accuracy']:.3f}",
            f"[bold]{s['accuracy']:.3f}[/]",
            f"{b['format_rate']:.3f}",
            f"{s['format_rate']:.3f}",
            f"{s['tool_call_rate']:.3f}",
            f"{s['mean_turns']:.2f}",
        )
    console.print(table)
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
    for title, report in (("base eval", base), ("SFT eval", sft)):
        note = "  (recorded by an earlier run)" if report.cached else ""
        console.print(f"{title + ':':<14}{report.mlflow_run_url}{note}", highlight=False)


def run_command(
    spec_file: Annotated[str, typer.Argument(metavar="SPEC", help="pipeline spec: a YAML file or an s3:// URI")],
    run_name: Annotated[str | None, typer.Option(help="same name resumes a run (default: the spec's name)")] = None,
    home: Annotated[Path | None, typer.Option("--home", help="Argus state directory", show_default=False)] = None,
    detach: Annotated[
        bool, typer.Option(help="backend kubernetes: submit the run and return (it goes on in the cluster)")
    ] = False,
) -> None:
    """Run a pipeline spec: data, tool environment, SFT, evaluation, registry; resumes a crashed run.

    With `backend: kubernetes` the flow runs in the cluster of the spec's kube context (the current one
    if unset) and this command submits it and shows its stages."""
    spec = spec_or_exit(spec_file)
    run = run_name or spec.name
    if not re.match(DNS_LABEL, run):
        err_console.print(f"[red]error:[/] --run-name {run!r} must be a DNS label (lowercase letters, digits, '-')")
        raise typer.Exit(2)
    if spec.backend == "kubernetes":
        from argus.cli_cluster import run_on_cluster

        run_on_cluster(spec_file, spec, run, detach=detach)
        return
    if detach:
        err_console.print("[red]error:[/] --detach is for backend kubernetes; a local run lives in this process")
        raise typer.Exit(2)
    started = time.monotonic()
    settings = _settings(home)
    settings = start_stack(settings)
    stack_s = time.monotonic() - started
    _prepare_env(settings)

    from prefect.client.orchestration import get_client
    from prefect.flow_engine import run_flow

    from argus import tracking
    from flows.pipeline import pipeline

    params = {"spec_uri": str(spec_file), "run_name": run}
    with get_client(sync_client=True) as client:
        flow_run = client.create_flow_run(pipeline, parameters=params, name=run)
    console.print(
        f"Prefect flow run {tracking.prefect_flow_run_url(settings, str(flow_run.id))}"
        f"  (stack ready in {stack_s:.0f}s)",
        highlight=False,
    )
    view = StageView(flow_run.id, run)
    with view.shown():
        try:
            state: State[Any] = run_flow(  # type: ignore[assignment]
                pipeline,  # type: ignore[arg-type]
                flow_run=flow_run,
                parameters=params,
                return_type="state",
            )
        except KeyboardInterrupt:
            err_console.print(f"interrupted; `argus run {spec_file} --run-name {run}` resumes where this stopped")
            raise typer.Exit(130) from None
    if not state.is_completed():
        try:
            state.result()
        except BaseException as exc:  # noqa: BLE001 - report the flow's own error, not a traceback
            err_console.print(f"[red]error:[/] pipeline {run} {(state.name or '').lower()}: {exc}", highlight=False)
        err_console.print(f"re-run `argus run {spec_file} --run-name {run}` to resume; finished stages are skipped")
        raise typer.Exit(1)
    result = state.result()
    console.print()
    print_result(result)
    console.print(f"wall time {_fmt_s(time.monotonic() - started)} (stack start {stack_s:.0f}s)", highlight=False)


def _pipeline_runs(client: Any, name: str | None, limit: int) -> list[Any]:
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    return list(
        client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["pipeline"])),
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])) if name else None,
            sort=FlowRunSort.START_TIME_DESC,
            limit=limit,
        )
    )


@runs_app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option(help="newest N runs")] = 20,
    home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None,
) -> None:
    """Pipeline runs, newest first, with their state, duration and Prefect link."""
    settings = _running_stack(home)
    from prefect.client.orchestration import get_client

    from argus import tracking

    with get_client(sync_client=True) as client:
        runs = _pipeline_runs(client, None, limit)
    table = Table(title="pipeline runs")
    for col in ("run", "state", "started", "duration", "spec", "Prefect"):
        table.add_column(col)
    for fr in runs:
        table.add_row(
            fr.name,
            fr.state.name if fr.state else "",
            fr.start_time.strftime("%Y-%m-%d %H:%M:%S") if fr.start_time else "",
            _fmt_s(fr.total_run_time.total_seconds()),
            str(fr.parameters.get("spec_uri", "")),
            tracking.prefect_flow_run_url(settings, str(fr.id)),
        )
    console.print(table)


@runs_app.command("show")
def runs_show(
    name: Annotated[str, typer.Argument(help="run name")],
    home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None,
) -> None:
    """The newest run of NAME: its stages, and for a finished run the eval table, version and links."""
    settings = _running_stack(home)
    from prefect.client.orchestration import get_client

    from argus import tracking

    with get_client(sync_client=True) as client:
        runs = _pipeline_runs(client, name, 1)
    if not runs:
        err_console.print(f"[red]error:[/] no pipeline run named {name!r} (see `argus runs list`)")
        raise typer.Exit(1)
    fr = runs[0]
    console.print(
        f"{fr.name}: {fr.state.name if fr.state else '?'}  {tracking.prefect_flow_run_url(settings, str(fr.id))}",
        highlight=False,
    )
    view = StageView(fr.id, fr.name)
    view.poll()
    console.print(view.table())
    if fr.state is not None and fr.state.is_completed():
        try:
            result = fr.state.result()
        except Exception as exc:  # noqa: BLE001 - the result file may have been cleaned up
            err_console.print(f"the run's result is not available here: {exc}")
            return
        print_result(result)
    elif fr.state is not None and fr.state.message:
        console.print(fr.state.message, highlight=False)


def _running_stack(home: Path | None) -> StackSettings:
    from argus.stack import effective_settings

    settings = effective_settings(_settings(home))
    _prepare_env(settings)
    from argus.procs import http_ok

    if not http_ok(f"{settings.prefect_url}/health"):
        err_console.print(f"[red]error:[/] Prefect is not reachable at {settings.prefect_url} (run `argus stack up`)")
        raise typer.Exit(1)
    return settings


def deploy_command(
    home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None,
    prefect_file: Annotated[Path, typer.Option(help="deployment definitions")] = REPO / "prefect.yaml",
) -> None:
    """Register the pipeline and its sub-flows as Prefect deployments (process pool for this machine,
    Kubernetes pool for clusters) from prefect.yaml; trigger them from the Prefect UI or API."""
    settings = start_stack(_settings(home))
    _prepare_env(settings)
    from argus.deployments import ensure_work_pools

    for pool, what in ensure_work_pools(prefect_file):
        console.print(f"work pool {pool}: {what}", highlight=False)
    from argus.deployments import apply_deployments
    from argus.tracking import code_version

    try:
        with console.status("registering deployments…"):
            apply_deployments(prefect_file, code_version())
    except (OSError, ValueError, KeyError) as exc:
        err_console.print(f"[red]error:[/] {prefect_file}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    from argus.deployments import list_deployments

    table = Table(title="deployments")
    table.add_column("deployment", no_wrap=True)
    table.add_column("work pool", no_wrap=True)
    table.add_column("parameters", overflow="fold")
    for dep in list_deployments():
        table.add_row(dep["name"], dep["pool"], dep["parameters"])
    console.print(table)
    console.print(
        f"trigger one: prefect deployment run 'pipeline/pipeline-local' -p spec_uri=examples/quickstart.yaml  "
        f"(UI: {settings.prefect_url.removesuffix('/api')}/deployments)",
        highlight=False,
    )


def _run_serving_flow(call: Any) -> Any:
    from flows.promote import PromotionError

    try:
        return call()
    except PromotionError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None


def promote_command(
    model: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Option("--version", help="model version")],
    to: Annotated[str, typer.Option("--to", help="staging | production")],
    spec_file: Annotated[str | None, typer.Option("--spec", help="spec (default: the one the version names)")] = None,
    home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None,
) -> None:
    """Move a model version to staging (deploy + eval) or production (gated blue-green switch)."""
    if to not in ("staging", "production"):
        err_console.print(f"[red]error:[/] --to must be staging or production, not {to!r}")
        raise typer.Exit(2)
    settings = start_stack(_settings(home))
    _prepare_env(settings)
    from flows.promote import promote

    target: Literal["staging", "production"] = "staging" if to == "staging" else "production"
    result = _run_serving_flow(lambda: promote(model, version, target, spec_file))
    _print_promotion(model, result)


def _print_promotion(model: str, result: PromotionResult) -> None:
    detail = [f"switch {result.switch_s:.1f}s"] if result.switch_s is not None else []
    if result.previous_version:
        detail.append(f"previous v{result.previous_version}")
    console.print(
        f"{model} v{result.version} → {result.to}: {result.endpoint_url}"
        + (f" ({', '.join(detail)})" if detail else ""),
        highlight=False,
    )


def rollback_command(
    model: Annotated[str, typer.Argument(help="registered model name")],
    spec_file: Annotated[str | None, typer.Option("--spec", help="spec (default: the one the version names)")] = None,
    home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None,
) -> None:
    """Serve the previous production version again (blue-green, no dropped requests)."""
    settings = start_stack(_settings(home))
    _prepare_env(settings)
    from flows.promote import rollback

    result = _run_serving_flow(lambda: rollback(model, spec_file))
    _print_promotion(model, result)


@serving_app.command("status")
def serving_status(home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None) -> None:
    """Stable endpoints and deployments: model, version, aliases, health, URL."""
    import httpx

    from argus import registry
    from argus.backends.local import LocalBackend
    from argus.stack import effective_settings

    settings = effective_settings(_settings(home))
    backend = LocalBackend(settings)
    active = {e.active: e for e in backend.endpoints()}
    table = Table(title="serving")
    for col in ("endpoint", "deployment", "model", "version", "aliases", "health"):
        table.add_column(col, no_wrap=True)
    table.add_column("URL", overflow="fold")  # the one thing a user copies: never cut with an ellipsis
    rows = 0
    for dep in backend.deployments():
        stable = active.get(dep.name)
        try:
            served = registry.versions_with_source(settings, dep.served_name, dep.model_uri)
            version = ", ".join(f"v{mv.version}" for mv in served) or "-"
            # search results carry no aliases; each version is read for its own
            aliases = ", ".join(sorted({a for mv in served for a in registry.aliases(settings, mv.name, mv.version)}))
            aliases = aliases or "-"
        except Exception:  # noqa: BLE001 - the registry may be down; serving status still helps
            version = aliases = "?"
        url = stable.url if stable else dep.base_url
        try:
            healthy = httpx.get(f"{url}/models", timeout=3).status_code == 200
        except httpx.HTTPError:
            healthy = False
        health = "[green]healthy[/]" if healthy else "[red]unhealthy[/]"
        table.add_row(stable.name if stable else "-", dep.name, dep.served_name, version, aliases, health, url)
        rows += 1
    console.print(table if rows else "nothing is being served")


@serving_app.command("down")
def serving_down(home: Annotated[Path | None, typer.Option("--home", show_default=False)] = None) -> None:
    """Stop every stable endpoint and deployment on this machine."""
    from argus.backends.local import LocalBackend
    from argus.stack import effective_settings

    stopped = LocalBackend(effective_settings(_settings(home))).stop_serving()
    console.print("stopped: " + (", ".join(stopped) or "nothing was running"), highlight=False)
