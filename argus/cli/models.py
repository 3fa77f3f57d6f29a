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
) -> None:
    """Build a tiny Qwen2 / Qwen2.5-VL with a locally trained tokenizer and save it (no download)."""
    if arch not in ("qwen2", "qwen2_5_vl"):
        exit_with_error(f"--arch must be qwen2 or qwen2_5_vl, not {arch!r}", 2)
    from argus.models.tiny import init_tiny

    with console.status(f"building tiny {arch}…"):
        files = init_tiny(arch, out, seed=seed)  # type: ignore[arg-type]
    console.print(f"wrote {len(files)} files to {out}", highlight=False)
