"""`argus runs list | show`: pipeline runs as Prefect recorded them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from argus.cli._common import HomeOption, console, err_console, exit_with_error, print_table, running_stack
from argus.cli.report import print_result
from argus.cli.stage_view import StageView
from argus.events import fmt_duration

app = typer.Typer(help="Pipeline runs recorded by Prefect.", no_args_is_help=True)


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


@app.command("list")
def runs_list(
    limit: Annotated[int, typer.Option(help="newest N runs")] = 20,
    home: HomeOption = None,
) -> None:
    """Pipeline runs, newest first, with their state, duration and Prefect link."""
    settings = running_stack(home)
    from prefect.client.orchestration import get_client

    from argus import tracking

    with get_client(sync_client=True) as client:
        runs = _pipeline_runs(client, None, limit)
    rows = [
        [
            fr.name,
            fr.state.name if fr.state else "",
            fr.start_time.strftime("%Y-%m-%d %H:%M:%S") if fr.start_time else "",
            fmt_duration(fr.total_run_time.total_seconds()),
            str(fr.parameters.get("spec_uri", "")),
            tracking.prefect_flow_run_url(settings, str(fr.id)),
        ]
        for fr in runs
    ]
    print_table("pipeline runs", ["run", "state", "started", "duration", "spec", "Prefect"], rows, url_column="Prefect")


@app.command("show")
def runs_show(
    name: Annotated[str, typer.Argument(help="run name")],
    home: HomeOption = None,
) -> None:
    """The newest run of NAME: its stages, and for a finished run the eval table, version and links."""
    settings = running_stack(home)
    from prefect.client.orchestration import get_client

    from argus import tracking

    with get_client(sync_client=True) as client:
        runs = _pipeline_runs(client, name, 1)
    if not runs:
        exit_with_error(f"no pipeline run named {name!r} (see `argus runs list`)")
    fr = runs[0]
    console.print(
        f"{fr.name}: {fr.state.name if fr.state else '?'}  {tracking.prefect_flow_run_url(settings, str(fr.id))}",
        highlight=False,
    )
    view = StageView(fr.id, fr.name)
    if fr.state is not None and fr.state.is_completed():
        try:
            result = fr.state.result()
        except Exception as exc:  # noqa: BLE001 - the result file may have been cleaned up
            err_console.print(f"the run's result is not available here: {exc}")
        else:
            print_result(result)  # its stage table is the one table of a finished run
            return
    view.poll()
    console.print(view.table())
    if fr.state is not None and fr.state.message:
        console.print(fr.state.message, highlight=False)
