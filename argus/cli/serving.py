"""`argus promote | rollback | serving status | serving down`: model versions on servers.

A *deployment* is one model server (vLLM); a stable *endpoint* is the address clients use, routed to one
deployment at a time (nginx here, a Service on a cluster).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import typer

from argus.cli._common import (
    HomeOption,
    console,
    exit_with_error,
    prepare_flow_env,
    print_table,
    spec_or_exit,
    stack_settings,
    start_stack,
)
from argus.cli.report import print_promotion
from argus.config import StackSettings

if TYPE_CHECKING:
    from argus.backends.base import Backend

app = typer.Typer(help="Model serving: stable endpoints and vLLM deployments.", no_args_is_help=True)
ClusterSpecOption = Annotated[
    str | None, typer.Option("--spec", help="a kubernetes spec: its cluster's servers (default: this machine)")
]


def _serving_backend(spec_file: str | None, home: Path | None) -> tuple[StackSettings, Backend]:
    """This machine's backend, or the backend of `spec_file` (its cluster, when it says kubernetes)."""
    from argus.backends import BackendError, get_backend
    from argus.stack import effective_settings

    settings = effective_settings(stack_settings(home))
    if spec_file is None:
        return settings, get_backend("local", settings)
    spec = spec_or_exit(spec_file)
    try:
        return settings, get_backend(spec.backend, settings, spec)
    except BackendError as exc:
        exit_with_error(f"{spec_file}: {exc}")


def _run_serving_flow(call: Any) -> Any:
    from flows.serving import PromotionError

    try:
        return call()
    except PromotionError as exc:
        exit_with_error(str(exc))


def promote_command(
    model: Annotated[str, typer.Argument(help="registered model name")],
    version: Annotated[str, typer.Option("--version", help="model version")],
    to: Annotated[str, typer.Option("--to", help="staging | production")],
    spec_file: Annotated[str | None, typer.Option("--spec", help="spec (default: the one the version names)")] = None,
    home: HomeOption = None,
) -> None:
    """Move a model version to staging (deploy + eval) or production (gated blue-green switch)."""
    if to not in ("staging", "production"):
        exit_with_error(f"--to must be staging or production, not {to!r}", 2)
    prepare_flow_env(start_stack(stack_settings(home)))
    from flows.stages.serve import promote

    target: Literal["staging", "production"] = "staging" if to == "staging" else "production"
    result = _run_serving_flow(lambda: promote(model, version, target, spec_file))
    print_promotion(model, result)


def rollback_command(
    model: Annotated[str, typer.Argument(help="registered model name")],
    spec_file: Annotated[str | None, typer.Option("--spec", help="spec (default: the one the version names)")] = None,
    home: HomeOption = None,
) -> None:
    """Serve the previous production version again (blue-green, no dropped requests)."""
    prepare_flow_env(start_stack(stack_settings(home)))
    from flows.stages.serve import rollback

    result = _run_serving_flow(lambda: rollback(model, spec_file))
    print_promotion(model, result)


@app.command("status")
def serving_status(
    spec_file: ClusterSpecOption = None,
    home: HomeOption = None,
) -> None:
    """Stable endpoints and deployments: model, version, aliases, health, URL."""
    import httpx

    from argus import registry

    settings, backend = _serving_backend(spec_file, home)
    active = {e.active: e for e in backend.endpoints()}
    rows: list[list[str]] = []
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
        rows.append([dep.name, stable.name if stable else "-", dep.served_name, version, aliases, health, url])
    if not rows:
        console.print("nothing is being served")
        return
    columns = ["deployment", "endpoint", "model", "version", "aliases", "health", "URL"]
    print_table("serving", columns, rows, url_column="URL")


@app.command("down")
def serving_down(
    spec_file: ClusterSpecOption = None,
    home: HomeOption = None,
) -> None:
    """Stop every stable endpoint and deployment on this machine (or in the cluster of `--spec`)."""
    _settings, backend = _serving_backend(spec_file, home)
    stopped = backend.stop_serving()
    console.print("stopped: " + (", ".join(stopped) or "nothing was running"), highlight=False)
