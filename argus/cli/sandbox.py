"""`argus sandbox serve`: the code executor (stateful Python sessions in gVisor)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from argus.cli._common import console, settings_or_exit

app = typer.Typer(help="The code-executor service (stateful Python sessions in gVisor).", no_args_is_help=True)


@app.command("serve")
def sandbox_serve(
    runner: Annotated[str | None, typer.Option(help="gvisor | process")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    timeout: Annotated[float | None, typer.Option(help="default per-call timeout, seconds")] = None,
    max_timeout: Annotated[float | None, typer.Option(help="largest timeout a request may ask for")] = None,
    memory_mb: Annotated[int | None, typer.Option(help="memory limit per session")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU quota per session")] = None,
    pids: Annotated[int | None, typer.Option(help="process/thread limit per session")] = None,
    scratch_mb: Annotated[int | None, typer.Option(help="tmpfs working directory size per session")] = None,
    max_sessions: Annotated[int | None, typer.Option(help="live sessions before 429")] = None,
    warm_pool: Annotated[int | None, typer.Option(help="pre-started kernels (size it to the session burst)")] = None,
    warm_parallel: Annotated[int | None, typer.Option(help="kernels booted at once while refilling")] = None,
    admission_timeout: Annotated[
        float | None, typer.Option(help="at capacity, seconds a call waits for a slot before 429/504")
    ] = None,
    oneshot_pool: Annotated[int | None, typer.Option(help="pre-booted sandboxes serving /run_code")] = None,
    profile: Annotated[str | None, typer.Option(help="kernel library profile (default | minimal)")] = None,
    idle_ttl: Annotated[float | None, typer.Option(help="close sessions idle this long, seconds")] = None,
    max_output_chars: Annotated[int | None, typer.Option(help="stdout/stderr kept per call")] = None,
    max_images: Annotated[int | None, typer.Option(help="images returned per call")] = None,
    max_image_bytes: Annotated[int | None, typer.Option(help="largest PNG returned")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="runsc state and bundles")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the code executor. Every option also reads ARGUS_SANDBOX_<OPTION> from the environment."""
    import uvicorn

    from argus.config import SandboxSettings
    from services.sandbox.app import create_app

    given: dict[str, Any] = {
        "runner": runner,
        "host": host,
        "port": port,
        "timeout_s": timeout,
        "max_timeout_s": max_timeout,
        "memory_mb": memory_mb,
        "cpus": cpus,
        "pids": pids,
        "scratch_mb": scratch_mb,
        "max_sessions": max_sessions,
        "warm_pool": warm_pool,
        "warm_parallel": warm_parallel,
        "admission_timeout_s": admission_timeout,
        "oneshot_pool": oneshot_pool,
        "profile": profile,
        "idle_ttl_s": idle_ttl,
        "max_output_chars": max_output_chars,
        "max_images": max_images,
        "max_image_bytes": max_image_bytes,
        "state_dir": state_dir,
    }
    settings = settings_or_exit(SandboxSettings, **given)
    where = f"http://{settings.host}:{settings.port}"
    console.print(f"code executor: runner {settings.runner}, profile {settings.profile}, {where}", highlight=False)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)
