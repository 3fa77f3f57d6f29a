"""`argus stack up | status | down | check | env`: the local platform stack."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from argus.cli._common import HomeOption, console, exit_with_error, print_spec_issues, print_table, stack_settings
from argus.specfile import SpecError

if TYPE_CHECKING:
    from argus.stack import ComponentStatus

app = typer.Typer(help="The local platform stack: S3 endpoint, MLflow, Prefect.", no_args_is_help=True)


def print_status(rows: list[ComponentStatus]) -> None:
    print_table(
        "Argus stack",
        ["component", "health", "managed", "pid", "restarts", "URL"],
        [
            [
                row.title,
                "[green]healthy[/]" if row.healthy else "[red]unhealthy[/]",
                "local" if row.managed else "external",
                str(row.pid or "-"),
                str(row.restarts),
                row.ui_url,
            ]
            for row in rows
        ],
        url_column="URL",
    )


@app.command("up")
def stack_up(home: HomeOption = None) -> None:
    """Start the stack (or reuse a running one) and wait until every component is healthy."""
    from argus.stack import StackError, up

    settings = stack_settings(home)
    try:
        with console.status("starting the Argus stack…"):
            rows = up(settings, on_progress=lambda msg: console.print(f"  {msg}", highlight=False))
    except StackError as exc:
        exit_with_error(str(exc))
    print_status(list(rows))
    console.print(f"state and logs: {settings.home}   stop with: argus stack down", highlight=False)


@app.command("status")
def stack_status(home: HomeOption = None) -> None:
    """Show each component healthy or not; exit 1 when any is unhealthy."""
    from argus.stack import status

    rows = status(stack_settings(home))
    print_status(list(rows))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@app.command("down")
def stack_down(home: HomeOption = None) -> None:
    """Stop exactly what `argus stack up` started, and the models served on this machine."""
    from argus.backends.local.backend import LocalBackend
    from argus.stack import down, effective_settings

    served = LocalBackend(effective_settings(stack_settings(home))).stop_serving()
    if served:
        console.print(f"stopped serving: {', '.join(served)}", highlight=False)
    stopped = down(stack_settings(home))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "the stack was not running")


@app.command("check")
def stack_check(
    spec: Annotated[Path, typer.Argument(help="pipeline spec to record")] = Path("examples/quickstart.yaml"),
    home: HomeOption = None,
) -> None:
    """Run a real Prefect flow that records SPEC in MLflow and finds its artifacts in S3."""
    import os

    from argus.stack import effective_settings

    settings = effective_settings(stack_settings(home))
    # Prefect and MLflow clients read their endpoints from the environment at import time.
    os.environ.update(settings.client_env())
    os.environ["ARGUS_HOME"] = str(settings.home)
    from flows.check import stack_check as check_flow

    try:
        result = check_flow(str(spec))
    except SpecError as exc:
        print_spec_issues(exc)
        raise typer.Exit(1) from None
    console.print(f"MLflow run: {result['url']}", highlight=False, soft_wrap=True)
    for key in result["s3_keys"]:  # type: ignore[attr-defined]
        console.print(f"  artifact: {key}", highlight=False, soft_wrap=True)


@app.command("env")
def stack_env(home: HomeOption = None) -> None:
    """Print shell exports that point MLflow, Prefect and S3 clients at the stack: eval "$(argus stack env)"."""
    from argus.stack import effective_settings

    for key, value in effective_settings(stack_settings(home)).client_env().items():
        print(f"export {key}={shlex.quote(value)}")
