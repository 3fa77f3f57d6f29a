"""`argus validate` and `argus version`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from argus import __version__
from argus.cli._common import console, print_spec_issues
from argus.specfile import SpecError, load_spec


def version_command() -> None:
    """Print the Argus version."""
    console.print(f"argus {__version__}")


def validate_command(files: Annotated[list[Path], typer.Argument(help="pipeline spec YAML files")]) -> None:
    """Check pipeline specs; every problem names the file, line and field."""
    failed = 0
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            failed += 1
            print_spec_issues(exc)
            continue
        stages = [s for s, on in (("sft", spec.sft.enabled), ("rl", spec.rl.enabled)) if on]
        console.print(
            f"[green]ok[/] {path}: pipeline '{spec.name}' on backend {spec.backend}, "
            f"stages {' → '.join(['data', *stages, 'eval', 'register'])}, promote to {spec.serving.promote_to}",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)
