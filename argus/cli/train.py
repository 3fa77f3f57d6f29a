"""`argus train sft|rl`: a training job on this machine (torchrun with the PyTorchJob env contract)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from argus.cli._common import (
    HomeOption,
    console,
    err_console,
    exit_with_error,
    run_name_or_exit,
    spec_or_exit,
    stack_settings,
    start_stack,
)

if TYPE_CHECKING:
    from argus.backends.base import TrainingJob
    from argus.backends.local.backend import LocalBackend

app = typer.Typer(
    help="Training jobs run on this machine (torchrun with the PyTorchJob env contract).", no_args_is_help=True
)


@app.command("sft")
def train_sft(
    config: Annotated[Path, typer.Option("--config", help="pipeline spec (its model, data and sft sections)")],
    data: Annotated[str | None, typer.Option(help="sharegpt json (default: the spec's data.sft)")] = None,
    model: Annotated[str | None, typer.Option(help="base model dir or s3:// (default: the spec's model.base)")] = None,
    output: Annotated[str | None, typer.Option(help="export URI (default: s3://<models bucket>/<spec>/<run>)")] = None,
    run_name: Annotated[str | None, typer.Option(help="same name resumes; default <spec>-sft")] = None,
    nproc: Annotated[int | None, typer.Option(help="processes (default: the spec's sft.nproc_per_node)")] = None,
    home: HomeOption = None,
) -> None:
    """Cold-start SFT on this machine: torchrun with N processes, resuming from its last checkpoint."""
    from argus.backends.jobs import base_model_uri, sft_job
    from argus.backends.local.backend import LocalBackend

    spec = spec_or_exit(config)
    settings = stack_settings(home)
    dataset = data or spec.data.sft
    if dataset is None:
        exit_with_error(
            f"{config} generates its data (data.generate): run `argus data generate "
            "--out DIR` and pass --data DIR/sft/sft.json, or run the whole pipeline with `argus run`",
            2,
        )
    name = run_name_or_exit(run_name or f"{spec.name}-sft")
    settings = start_stack(settings)
    if model is None:
        with console.status("base model…"):
            model = base_model_uri(spec, settings)
    job = sft_job(
        spec,
        settings,
        name=name,
        dataset=dataset,
        model=model,
        output_uri=output,
        nproc_per_node=nproc,
        spec_file=config,
    )
    _run_job(LocalBackend(settings), job, "SFT")


@app.command("rl")
def train_rl(
    config: Annotated[Path, typer.Option("--config", help="pipeline spec (its model, data, tools and rl sections)")],
    model: Annotated[str, typer.Option(help="start model: an SFT export (dir or s3://)")],
    data: Annotated[str | None, typer.Option(help="RL parquet (default: the spec's data.rl)")] = None,
    search_data: Annotated[
        str | None, typer.Option(help="search index prefix (default: the spec's, or search/ beside the data)")
    ] = None,
    output: Annotated[str | None, typer.Option(help="export URI (default: s3://<models bucket>/<spec>/<run>)")] = None,
    run_name: Annotated[str | None, typer.Option(help="same name resumes; default <spec>-rl")] = None,
    nproc: Annotated[int | None, typer.Option(help="processes (default: the spec's rl.nproc_per_node)")] = None,
    home: HomeOption = None,
) -> None:
    """GRPO with tool rollouts on this machine: the spec's tools are started for the job's rollouts."""
    from argus.backends.jobs import rl_job
    from argus.backends.local.backend import LocalBackend
    from argus.storage import join_uri

    spec = spec_or_exit(config)
    settings = stack_settings(home)
    dataset = data or spec.data.rl
    if dataset is None:
        exit_with_error(
            f"{config} generates its data (data.generate): run `argus data generate --out DIR` and pass "
            "--data DIR/rl/train.parquet, or run the whole pipeline with `argus run`",
            2,
        )
    search = search_data or spec.data.search_corpus or join_uri(dataset.rsplit("/", 2)[0], "search")
    name = run_name_or_exit(run_name or f"{spec.name}-rl")
    settings = start_stack(settings)
    backend = LocalBackend(settings)
    with console.status("tool environment (code executor, search proxy)…"):
        tools = backend.tool_environment(f"{name}-tools", spec.tools, search)
        endpoints = tools.__enter__()
    try:
        job = rl_job(
            spec,
            settings,
            name=name,
            dataset=dataset,
            model=model,
            tools=endpoints,
            output_uri=output,
            nproc_per_node=nproc,
            spec_file=config,
        )
        _run_job(backend, job, "RL")
    finally:
        tools.__exit__(None, None, None)


def _run_job(backend: LocalBackend, job: TrainingJob, label: str) -> None:
    """torchrun the job here with a live progress bar; exits non-zero with the log's end on failure."""
    import json as _json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus import events

    name = job.name
    console.print(f"torchrun ({job.nproc_per_node} processes), log {backend.log_location(name)}", highlight=False)
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(label, total=None, info="starting (DeepSpeed init)")

        def on_event(event: events.Event) -> None:
            if isinstance(event, events.Start):
                progress.update(bar, total=event.total, completed=event.step, info=f"MLflow run {event.mlflow_run_id}")
            elif isinstance(event, events.Resumed):
                progress.console.print(f"resumed from {event.checkpoint}", highlight=False)
            elif isinstance(event, events.Restarting):
                progress.console.print(f"torchrun exited with {event.exit_code}; restart {event.restart}")
            elif isinstance(event, events.Step):
                rate = f" · {event.tokens_per_s:.0f} tok/s" if event.tokens_per_s is not None else ""
                reward = event.metrics.get("reward/overall/mean")
                rate += f" · reward {reward:.3f}" if reward is not None else ""
                progress.update(bar, completed=event.step, info=f"loss {event.loss:.4f}{rate}")
            elif isinstance(event, events.Checkpoint):
                progress.console.print(f"checkpoint {event.uri} ({event.seconds} s)", highlight=False)
            elif isinstance(event, events.Exported):
                progress.console.print(f"exported {event.uri}", highlight=False)

        try:
            result = backend.run(job, on_event)
        except KeyboardInterrupt:
            err_console.print("cancelled; the next run with the same name resumes from the last checkpoint")
            raise typer.Exit(130) from None
    if not result.succeeded:
        exit_with_error(
            f"training job {name} {result.state.value}: {result.message}; the end of its log:\n" + result.log_tail
        )
    console.print(
        _json.dumps({"job": name, "export": job.config["output_uri"], "checkpoints": job.config["checkpoint_uri"]}),
        highlight=False,
        soft_wrap=True,  # one line, however narrow the terminal: scripts parse it
    )
