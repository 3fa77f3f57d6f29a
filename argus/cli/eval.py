"""`argus eval`: a model through the eval suite with live tools, served by vLLM on this machine."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from argus.cli._common import HomeOption, console, exit_with_error, stack_settings
from argus.cli.report import behaviour_table, metrics_table


def eval_command(
    model: Annotated[str, typer.Option(help="model directory or s3:// prefix (Hugging Face layout)")],
    data: Annotated[
        str, typer.Option(help="generated data root (its <split>/<split>.parquet and search/index.sqlite)")
    ],
    split: Annotated[
        str, typer.Option(help="eval (held out) | dev (where settings are chosen) | rl | any <name>/<name>.parquet")
    ] = "eval",
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N tasks")] = None,
    max_turns: Annotated[int, typer.Option()] = 9,
    max_tokens: Annotated[int, typer.Option(help="per model turn")] = 256,
    runner: Annotated[str, typer.Option(help="sandbox runner: gvisor | process")] = "gvisor",
    prompt: Annotated[
        str, typer.Option(help="deepeyesv2 | compact: the prompt the model was trained with")
    ] = "deepeyesv2",
    concurrency: Annotated[int, typer.Option(min=1, help="episodes in flight")] = 8,
    samples: Annotated[
        int, typer.Option(min=0, help="also sample each task K times at temperature 1: pass@1 and pass@K")
    ] = 0,
    sample_limit: Annotated[
        int | None, typer.Option(min=1, help="sample only the first N tasks (default: every task)")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="write metrics and trajectories (JSON) here")] = None,
    home: HomeOption = None,
) -> None:
    """Evaluate a model with live tools: vLLM (serving virtualenv) + code executor + search proxy."""
    import json as _json
    import tempfile

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus.backends.local.backend import LocalBackend
    from argus.backends.local.tools import LocalToolEnvironment
    from argus.config import SandboxSpec
    from argus.data.formats import read_rl_parquet
    from argus.storage import download_dir, join_uri
    from flows.stages.evaluate import serve_and_evaluate

    if prompt not in ("deepeyesv2", "compact"):
        exit_with_error(f"--prompt must be deepeyesv2 or compact, not {prompt!r}", 2)
    if runner not in ("gvisor", "process"):
        exit_with_error(f"--runner must be gvisor or process, not {runner!r}", 2)
    settings = stack_settings(home)
    if not split.isidentifier():
        exit_with_error(f"--split must name a split of the data root (eval, dev, rl), not {split!r}", 2)
    parquet = join_uri(data, split, "train.parquet" if split == "rl" else f"{split}.parquet")
    try:
        tasks = read_rl_parquet(parquet, settings)[:limit]
    except FileNotFoundError:
        exit_with_error(f"{parquet}: no such file (is --data a generated data root with a {split} split?)", 2)
    backend = LocalBackend(settings)
    with tempfile.TemporaryDirectory(prefix="argus-eval-") as tmp:
        root = Path(tmp)
        index = Path(download_dir(join_uri(data, "search"), root / "search")) / "index.sqlite"
        with (
            console.status("starting the tools…"),
            LocalToolEnvironment(
                root / "tools",
                index_path=index,
                sandbox=SandboxSpec.model_validate({"runner": runner}),
            ) as tools,
        ):
            console.print("starting vLLM…")
            with Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
            ) as progress:
                bar = progress.add_task("greedy", total=len(tasks))
                sampled = samples * len(tasks[:sample_limit])
                sample_bar = progress.add_task(f"{samples} samples", total=sampled, visible=sampled > 0)
                try:
                    result = serve_and_evaluate(
                        backend,
                        name="eval",
                        model_uri=model,
                        tasks=tasks,
                        tools=tools,
                        max_turns=max_turns,
                        max_tokens=max_tokens,
                        prompt=prompt,  # type: ignore[arg-type]
                        concurrency=concurrency,
                        samples=samples,
                        sample_limit=sample_limit,
                        on_done=lambda _t: progress.advance(bar),
                        on_sample_done=lambda _t: progress.advance(sample_bar),
                    )
                finally:
                    backend.close()
    console.print(metrics_table(f"{model} on {len(tasks)} {split} tasks", {"model": result.metrics()}))
    if any(t.slice for t in tasks):
        console.print(behaviour_table("per slice", {"model": result.slice_metrics()}))
    if out is not None:
        out.write_text(_json.dumps(result.report(tasks), indent=1))
