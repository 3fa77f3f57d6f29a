"""`argus k8s`: what Argus would create on a cluster, as YAML (nothing is sent anywhere)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from argus.cli._common import spec_or_exit

app = typer.Typer(help="Kubernetes objects of a pipeline run and Argus' CRDs, as YAML.", no_args_is_help=True)


def _print(objects: list[dict[str, object]]) -> None:
    import yaml

    typer.echo(yaml.safe_dump_all(objects, sort_keys=False), nl=False)


@app.command("render")
def render_command(
    spec_file: Annotated[Path, typer.Argument(help="pipeline spec YAML")],
    run_name: Annotated[str | None, typer.Option("--run-name", help="run name (default: the spec's name)")] = None,
) -> None:
    """Print every object a run of SPEC creates: the tool environment, the SFT job's ConfigMap and
    PyTorchJob, and the ModelServing resources of the stages it promotes to."""
    from argus.backends.kubernetes.render import render

    _print(render(spec_or_exit(spec_file), run_name))


@app.command("crds")
def crds_command() -> None:
    """Print the CustomResourceDefinitions of ToolEnvironment and ModelServing (manifests/base/crds)."""
    from argus.backends.kubernetes.crds import KINDS, crd

    _print([crd(kind) for kind in KINDS])
