"""`argus flows deploy`: the pipeline and its sub-flows as Prefect deployments (work pools included).

These are *flow deployments* (what the Prefect UI triggers); model servers are `argus serving`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from argus.cli._common import HomeOption, console, exit_with_error, prepare_flow_env, stack_settings, start_stack
from argus.config import repo_root

app = typer.Typer(
    help="Prefect deployments of the Argus flows (trigger them from the Prefect UI or API).", no_args_is_help=True
)
REPO = repo_root()


@app.command("deploy")
def deploy_command(
    home: HomeOption = None,
    prefect_file: Annotated[Path, typer.Option(help="deployment definitions")] = REPO / "prefect.yaml",
) -> None:
    """Register the pipeline and its sub-flows as Prefect deployments (process pool for this machine,
    Kubernetes pool for clusters) from prefect.yaml; trigger them from the Prefect UI or API."""
    settings = start_stack(stack_settings(home))
    prepare_flow_env(settings)
    from argus.tracking import code_version
    from flows.deployments import ensure_work_pools, list_flow_deployments, register_flow_deployments

    for pool, what in ensure_work_pools(prefect_file):
        console.print(f"work pool {pool}: {what}", highlight=False)
    try:
        with console.status("registering deployments…"):
            register_flow_deployments(prefect_file, code_version())
    except (OSError, ValueError, KeyError) as exc:
        exit_with_error(f"{prefect_file}: {exc}")

    table = Table(title="deployments")
    table.add_column("deployment", no_wrap=True)
    table.add_column("work pool", no_wrap=True)
    table.add_column("parameters", overflow="fold")
    for dep in list_flow_deployments():
        table.add_row(dep["name"], dep["pool"], dep["parameters"])
    console.print(table)
    console.print(
        f"trigger one: prefect deployment run 'pipeline/pipeline-local' -p spec_uri=examples/quickstart.yaml  "
        f"(UI: {settings.prefect_url.removesuffix('/api')}/deployments)",
        highlight=False,
    )
