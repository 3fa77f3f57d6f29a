"""What every command module shares: the consoles, the `--home` option, settings and specs that either
load or stop the command with an error naming what is wrong, and the stack a command needs running.

A command never shows a traceback for a problem the user can fix: it prints `error: ...` on stderr and
exits non-zero (2 for a bad flag or variable, 1 for everything else).
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from pydantic_settings import BaseSettings
from rich.console import Console
from rich.table import Table

from argus.config import DNS_LABEL, PipelineSpec, StackSettings
from argus.specfile import SpecError, load_spec

# Piped output (CI logs, `| tee`) gets lines wide enough to read instead of rich's 80 columns: 200 fit
# the pipeline's three-evaluation table without folding its intervals (at 140 each folded over three
# lines). An explicit COLUMNS wins, as it does on a terminal.
console = Console() if sys.stdout.isatty() or os.environ.get("COLUMNS") else Console(width=200)
err_console = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Argus state directory (default: $ARGUS_HOME or ./.argus)", show_default=False),
]

S = TypeVar("S", bound=BaseSettings)


def exit_with_error(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_spec_issues(exc: SpecError) -> None:
    """Every problem of a spec, one `file:line: field: message` a line."""
    for issue in exc.issues:
        err_console.print(f"[red]error:[/] {issue}", highlight=False, soft_wrap=True)


def settings_or_exit(cls: type[S], **given: Any) -> S:
    """Settings from flags (given, when not None) over their environment variables; a bad value names
    its flag's variable and exits 2."""
    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            err_console.print(
                f"[red]error:[/] {field} (environment variable {prefix}{field.upper()}): {err['msg']}", highlight=False
            )
        raise typer.Exit(2) from None


def stack_settings(home: Path | None) -> StackSettings:
    return settings_or_exit(StackSettings, home=home)


def spec_or_exit(path: str | Path) -> PipelineSpec:
    """The spec at `path`, or every problem as `file:line: field: message` and exit 1."""
    try:
        return load_spec(path)
    except SpecError as exc:
        print_spec_issues(exc)
        raise typer.Exit(1) from None


def run_name_or_exit(name: str) -> str:
    """`name` when it can name a run: it becomes a Kubernetes object name, a Prefect flow run and part of
    S3 keys, so it must be a DNS label; otherwise a one-line error and exit 2, before anything starts."""
    if not re.match(DNS_LABEL, name):
        exit_with_error(f"--run-name {name!r} must be a DNS label (lowercase letters, digits, '-')", 2)
    return name


def start_stack(settings: StackSettings) -> StackSettings:
    """Start the local stack if it is not running; the settings it runs with."""
    from argus.stack import StackError, effective_settings, up

    try:
        with console.status("platform stack (S3 endpoint, MLflow, Prefect, worker)…"):
            up(settings)
    except StackError as exc:
        exit_with_error(str(exc))
    return effective_settings(settings)


def running_stack(home: Path | None) -> StackSettings:
    """The settings of the running stack, with this process's clients pointed at it; exit 1 if Prefect is
    not up."""
    from argus.stack import effective_settings
    from argus.supervision import http_ok

    settings = effective_settings(stack_settings(home))
    prepare_flow_env(settings)
    if not http_ok(f"{settings.prefect_url}/health"):
        exit_with_error(f"Prefect is not reachable at {settings.prefect_url} (run `argus stack up`)")
    return settings


class _ExpectedFailures(logging.Filter):
    """Drops the traceback of an expected flow failure from the console (the message stays, and the run's
    logs in Prefect, written by an earlier handler, keep the traceback)."""

    def filter(self, record: logging.LogRecord) -> bool:
        from flows.runtime import FlowError

        if record.exc_info and isinstance(record.exc_info[1], FlowError):
            record.exc_info = None
            record.exc_text = None
        return True


def prepare_flow_env(settings: StackSettings) -> None:
    """Point this process's Prefect, MLflow and S3 clients at the stack, as the worker does for its runs.
    Prefect reads its settings when it is first imported: the environment is set before that."""
    from argus.stack import effective_settings, flow_env

    settings = effective_settings(settings)
    os.environ.update({**settings.argus_env(), **settings.client_env(), **flow_env(settings)})
    from prefect.logging.configuration import setup_logging

    setup_logging()
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, _ExpectedFailures) for f in handler.filters):
            handler.addFilter(_ExpectedFailures())


def print_table(
    title: str,
    columns: list[str],
    rows: list[list[str]],
    *,
    url_column: str,
    out: Console | None = None,
) -> None:
    """A table with a URL column that is never cut: when the whole table fits the terminal unwrapped
    the URLs stay in their column, else the column goes and each row's URL is printed on its own line
    under the table (`first cell: URL`), where the terminal may wrap it but nothing truncates it."""
    from rich.measure import Measurement

    out = out or console
    at = columns.index(url_column)

    def build(with_urls: bool) -> Table:
        table = Table(title=title, title_justify="left")
        for i, col in enumerate(columns):
            if with_urls or i != at:
                table.add_column(col, no_wrap=i in (0, at), overflow="fold")
        for row in rows:
            table.add_row(*(cell for i, cell in enumerate(row) if with_urls or i != at))
        return table

    table = build(True)
    natural = Measurement.get(out, out.options.update(max_width=100_000), table).maximum  # unclamped width
    if natural <= out.width:
        out.print(table)
        return
    out.print(build(False))
    for row in rows:
        out.print(f"  {row[0]}: {row[at]}", highlight=False, soft_wrap=True)
