"""`argus data generate | inspect`: the miniature DeepEyesV2 suite and its files."""

from __future__ import annotations

import functools
from typing import Annotated, Any

import typer
from rich.table import Table

from argus.cli._common import HomeOption, console, exit_with_error, stack_settings

app = typer.Typer(help="DeepEyesV2 data: the miniature task suite, format inspection.", no_args_is_help=True)


@app.command("generate")
def data_generate(
    out: Annotated[str, typer.Option(help="output directory or s3:// prefix")],
    seed: Annotated[int, typer.Option()] = 0,
    sft_size: Annotated[int, typer.Option(min=1)] = 200,
    rl_size: Annotated[int, typer.Option(min=1)] = 200,
    eval_size: Annotated[int, typer.Option(min=1)] = 60,
    runner: Annotated[
        str, typer.Option(help="sandbox runner for the gold trajectories (Argus's own code): process | gvisor")
    ] = "process",
    prompt: Annotated[str, typer.Option(help="deepeyesv2 (verbatim) | compact (miniature runs)")] = "deepeyesv2",
    home: HomeOption = None,
) -> None:
    """Generate the miniature suite: SFT gold trajectories (run through the real tools), RL, eval, corpus."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus.backends.base import ToolsUnavailable
    from argus.backends.local.backend import LocalBackend
    from argus.data.generate import GenerationError, generate

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bars: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        if prompt not in ("deepeyesv2", "compact"):
            exit_with_error(f"--prompt must be deepeyesv2 or compact, not {prompt!r}", 2)
        if runner not in ("process", "gvisor"):
            exit_with_error(f"--runner must be process or gvisor, not {runner!r}", 2)
        backend = LocalBackend(stack_settings(home))
        try:
            result = generate(
                out,
                tools=functools.partial(backend.tool_environment, f"generate-{seed}"),
                seed=seed,
                sft_size=sft_size,
                rl_size=rl_size,
                eval_size=eval_size,
                runner=runner,  # type: ignore[arg-type]
                prompt=prompt,  # type: ignore[arg-type]
                on_progress=update,
            )
        except (GenerationError, ToolsUnavailable) as exc:
            exit_with_error(str(exc))
        finally:
            backend.close()
    table = Table(title=f"{out} (seed {seed})")
    table.add_column("split")
    for fam in ("perception", "reasoning", "search", "integrated"):
        table.add_column(fam, justify="right")
    for split, counts in result.manifest["families"].items():
        table.add_row(split, *(str(counts.get(f, 0)) for f in ("perception", "reasoning", "search", "integrated")))
    console.print(table)
    console.print(f"{len(result.manifest['files'])} files, manifest: {out}/manifest.json", highlight=False)


@app.command("inspect")
def data_inspect(
    file: Annotated[str, typer.Argument(help="sharegpt .json, verl .parquet (local or s3://)")],
    sample: Annotated[int, typer.Option(help="which example to render")] = 0,
) -> None:
    """Counts per task family and one example rendered."""
    from collections import Counter

    from argus.data.formats import DataFormatError, read_rl_parquet, read_sharegpt

    try:
        if file.endswith(".parquet"):
            tasks = read_rl_parquet(file)
            counts = Counter(t.family for t in tasks)
            console.print(
                f"{file}: {len(tasks)} tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())),
                highlight=False,
            )
            if tasks:
                t = tasks[min(sample, len(tasks) - 1)]
                console.print(
                    f"[bold]{t.id}[/] ({t.family}, {len(t.image)}-byte image)\n{t.question}\n"
                    f"ground truth: {t.answer} ({t.answer_type})",
                    highlight=False,
                )
            return
        examples = read_sharegpt(file)
    except (DataFormatError, OSError) as exc:
        exit_with_error(str(exc))
    families = Counter(_family_of(ex.messages) for ex in examples)
    console.print(
        f"{file}: {len(examples)} trajectories, {sum(len(e.images) for e in examples)} images: "
        + ", ".join(f"{k} {v}" for k, v in sorted(families.items())),
        highlight=False,
    )
    if examples:
        ex = examples[min(sample, len(examples) - 1)]
        for msg in ex.messages[1:]:
            console.rule(msg["role"])
            console.print(msg["content"], highlight=False, markup=False)
        console.print(f"images: {ex.images}", highlight=False)


def _family_of(messages: list[dict[str, str]]) -> str:
    """The tools a trajectory used, as the paper's behaviour analysis groups them."""
    text = " ".join(m["content"] for m in messages if m["role"] == "assistant")
    used = [name for name, tag in (("code", "<code>"), ("search", "<tool_call>")) if tag in text]
    return "+".join(used) or "no tool"
