"""The `argus` command line."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from argus import __version__
from argus.config import StackSettings
from argus.specfile import SpecError, load_spec

app = typer.Typer(help="Argus: the DeepEyesV2 recipe as a platform.", no_args_is_help=True, add_completion=False)
stack_app = typer.Typer(help="The local platform stack: S3 endpoint, MLflow, Prefect.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")

console = Console()
err_console = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Argus state directory (default: $ARGUS_HOME or ./.argus)", show_default=False),
]


def _settings(home: Path | None) -> StackSettings:
    try:
        return StackSettings(home=home) if home is not None else StackSettings()
    except ValidationError as exc:
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            err_console.print(f"[red]error:[/] environment variable ARGUS_{field.upper()}: {err['msg']}")
        raise typer.Exit(2) from None


@app.command()
def version() -> None:
    """Print the Argus version."""
    console.print(f"argus {__version__}")


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="pipeline spec YAML files")]) -> None:
    """Check pipeline specs; every problem names the file, line and field."""
    failed = 0
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            failed += 1
            for issue in exc.issues:
                err_console.print(f"[red]error:[/] {issue}", highlight=False, soft_wrap=True)
            continue
        stages = [s for s, on in (("sft", spec.sft.enabled), ("rl", spec.rl.enabled)) if on]
        console.print(
            f"[green]ok[/] {path}: pipeline '{spec.name}' on backend {spec.backend}, "
            f"stages {' → '.join(['data', *stages, 'eval', 'register'])}, promote to {spec.serving.promote_to}",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)


def _status_table(rows: list[object]) -> Table:
    from argus.stack import ComponentStatus

    table = Table(title="Argus stack")
    for col in ("component", "health", "managed", "pid", "restarts", "URL"):
        table.add_column(col)
    for row in rows:
        assert isinstance(row, ComponentStatus)
        table.add_row(
            row.title,
            "[green]healthy[/]" if row.healthy else "[red]unhealthy[/]",
            "local" if row.managed else "external",
            str(row.pid or "-"),
            str(row.restarts),
            row.ui_url,
        )
    return table


@stack_app.command("up")
def stack_up(home: HomeOption = None) -> None:
    """Start the stack (or reuse a running one) and wait until every component is healthy."""
    from argus.stack import StackError, up

    settings = _settings(home)
    try:
        with console.status("starting the Argus stack…"):
            rows = up(settings, on_progress=lambda msg: console.print(f"  {msg}", highlight=False))
    except StackError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(_status_table(list(rows)))
    console.print(f"state and logs: {settings.home}   stop with: argus stack down", highlight=False)


@stack_app.command("status")
def stack_status(home: HomeOption = None) -> None:
    """Show each component healthy or not; exit 1 when any is unhealthy."""
    from argus.stack import status

    rows = status(_settings(home))
    console.print(_status_table(list(rows)))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(home: HomeOption = None) -> None:
    """Stop exactly what `argus stack up` started."""
    from argus.stack import down

    stopped = down(_settings(home))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "the stack was not running")


@stack_app.command("check")
def stack_check(
    spec: Annotated[Path, typer.Argument(help="pipeline spec to record")] = Path("examples/quickstart.yaml"),
    home: HomeOption = None,
) -> None:
    """Run a real Prefect flow that records SPEC in MLflow and finds its artifacts in S3."""
    import os

    from argus.stack import effective_settings

    settings = effective_settings(_settings(home))
    # Prefect and MLflow clients read their endpoints from the environment at import time.
    os.environ.update(settings.client_env())
    os.environ["ARGUS_HOME"] = str(settings.home)
    from flows.check import stack_check as check_flow

    try:
        result = check_flow(str(spec))
    except SpecError as exc:
        for issue in exc.issues:
            err_console.print(f"[red]error:[/] {issue}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"MLflow run: {result['url']}", highlight=False, soft_wrap=True)
    for key in result["s3_keys"]:  # type: ignore[attr-defined]
        console.print(f"  artifact: {key}", highlight=False, soft_wrap=True)


@stack_app.command("env")
def stack_env(home: HomeOption = None) -> None:
    """Print shell exports that point MLflow, Prefect and S3 clients at the stack: eval "$(argus stack env)"."""
    from argus.stack import effective_settings

    for key, value in effective_settings(_settings(home)).client_env().items():
        print(f"export {key}={shlex.quote(value)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
