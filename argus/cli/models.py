"""`argus models init-tiny`: tiny models built from configs (nothing is downloaded)."""

from __future__ import annotations

from typing import Annotated

import typer

from argus.cli._common import console, exit_with_error

app = typer.Typer(help="Model utilities: tiny models built from configs.", no_args_is_help=True)


@app.command("init-tiny")
def models_init_tiny(
    arch: Annotated[str, typer.Option(help="qwen2 | qwen2_5_vl")],
    out: Annotated[str, typer.Option(help="output directory or s3:// prefix")],
    seed: Annotated[int, typer.Option()] = 0,
    size: Annotated[
        str, typer.Option(help="nano (tests) | mini (the quickstart's: pre-trained to copy) | small")
    ] = "nano",
) -> None:
    """Build a tiny Qwen2 / Qwen2.5-VL with a locally trained tokenizer and save it (no download)."""
    if arch not in ("qwen2", "qwen2_5_vl"):
        exit_with_error(f"--arch must be qwen2 or qwen2_5_vl, not {arch!r}", 2)
    from argus.models.tiny import SIZES, init_tiny

    if size not in SIZES:
        exit_with_error(f"--size must be one of {', '.join(SIZES)}, not {size!r}", 2)

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[accuracy]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task(f"building tiny {arch} ({size})", total=None, accuracy="")

        def tick(step: int, accuracy: float) -> None:
            progress.update(
                bar, description=f"copy pre-training, step {step}", accuracy=f"copy accuracy {accuracy:.2f}"
            )

        files = init_tiny(arch, out, seed=seed, size=size, on_progress=tick)  # type: ignore[arg-type]
    console.print(f"wrote {len(files)} files to {out}", highlight=False)
