"""`argus data generate | inspect`: the miniature DeepEyesV2 suite and its files."""

from __future__ import annotations

import functools
from pathlib import Path
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
    dev_size: Annotated[int | None, typer.Option(min=1, help="the dev split (default: --eval-size)")] = None,
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
    from argus.data.tasks import SLICES

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
                dev_size=dev_size,
                runner=runner,  # type: ignore[arg-type]
                prompt=prompt,  # type: ignore[arg-type]
                on_progress=update,
            )
        except (GenerationError, ToolsUnavailable) as exc:
            exit_with_error(str(exc))
        finally:
            backend.close()
    table = Table(title=f"{out} (seed {seed}): tasks per slice")
    table.add_column("split")
    slices = list(SLICES)
    for name in slices:
        table.add_column(name, justify="right")
    for split, counts in result.manifest["slices"].items():
        table.add_row(split, *(str(counts.get(s, 0)) for s in slices))
    console.print(table)
    teachers = result.manifest["teachers"]
    console.print(
        "demonstrations per teacher: "
        + ", ".join(f"{t} {sum(per[t] for per in teachers.values())}" for t in next(iter(teachers.values()))),
        highlight=False,
    )
    console.print(f"{len(result.manifest['files'])} files, manifest: {out}/manifest.json", highlight=False)


@app.command("oracle")
def data_oracle(
    spec_file: Annotated[
        Path | None, typer.Option("--spec", help="take the suite's sizes and the eval turn budget from this spec")
    ] = None,
    seed: Annotated[int, typer.Option()] = 0,
    sft_size: Annotated[int, typer.Option(min=1)] = 1000,
    rl_size: Annotated[int, typer.Option(min=1)] = 200,
    eval_size: Annotated[int, typer.Option(min=1)] = 150,
    dev_size: Annotated[int | None, typer.Option(min=1)] = None,
    max_turns: Annotated[int, typer.Option(min=1, help="the target distribution's turn budget")] = 4,
    per_slice: Annotated[int, typer.Option(min=0, help="tasks per slice and split (0: all)")] = 12,
    prompt: Annotated[str, typer.Option(help="deepeyesv2 | compact")] = "compact",
    home: HomeOption = None,
) -> None:
    """Each scripted teacher's accuracy per slice on the demonstration (SFT) and target (RL, dev, eval)
    splits, through the real tools: the check that the suite's decisions are real."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus.backends.base import ToolsUnavailable
    from argus.backends.local.backend import LocalBackend
    from argus.data.oracle import oracle

    if spec_file is not None:
        from argus.specfile import SpecError, load_spec

        try:
            spec = load_spec(spec_file)
        except SpecError as exc:
            exit_with_error(str(exc), 2)
        gen = spec.data.generate
        if gen is None:
            exit_with_error(f"{spec_file}: data.generate is not set: the oracle table is of the generated suite", 2)
        seed, sft_size, rl_size, eval_size, dev_size = gen.seed, gen.sft_size, gen.rl_size, gen.eval_size, gen.dev_size
        max_turns, prompt = spec.eval.suites[0].max_turns, spec.prompt
    if prompt not in ("deepeyesv2", "compact"):
        exit_with_error(f"--prompt must be deepeyesv2 or compact, not {prompt!r}", 2)
    backend = LocalBackend(stack_settings(home))
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bar = progress.add_task("teacher episodes", total=None)
        try:
            table = oracle(
                tools=functools.partial(backend.tool_environment, f"oracle-{seed}"),
                seed=seed,
                sft_size=sft_size,
                rl_size=rl_size,
                eval_size=eval_size,
                dev_size=dev_size,
                max_turns=max_turns,
                per_slice=per_slice or None,
                prompt=prompt,  # type: ignore[arg-type]
                on_progress=lambda done, total: progress.update(bar, completed=done, total=total),
            )
        except ToolsUnavailable as exc:
            exit_with_error(str(exc))
        finally:
            backend.close()
    columns, rows = table.rows()
    out = Table(title=f"oracle: each teacher's accuracy per slice (seed {seed})", title_justify="left")
    for col in columns:
        out.add_column(col, justify="left" if col in ("split", "slice", "right on target") else "right")
    for row in rows:
        out.add_row(*row)
    console.print(out)


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
