"""The `argus` command line."""

from __future__ import annotations

import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from argus import __version__
from argus.config import StackSettings
from argus.specfile import SpecError, load_spec

app = typer.Typer(help="Argus: the DeepEyesV2 recipe as a platform.", no_args_is_help=True, add_completion=False)
stack_app = typer.Typer(help="The local platform stack: S3 endpoint, MLflow, Prefect.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
search_app = typer.Typer(
    help="The search proxy: text and image search with a record/replay cache.", no_args_is_help=True
)
search_cache_app = typer.Typer(help="Cache snapshots and statistics.", no_args_is_help=True)
search_app.add_typer(search_cache_app, name="cache")
app.add_typer(search_app, name="search")
data_app = typer.Typer(help="DeepEyesV2 data: the miniature task suite, format inspection.", no_args_is_help=True)
app.add_typer(data_app, name="data")
models_app = typer.Typer(help="Model utilities: tiny models built from configs.", no_args_is_help=True)
app.add_typer(models_app, name="models")
train_app = typer.Typer(
    help="Training jobs run on this machine (torchrun with the PyTorchJob env contract).", no_args_is_help=True
)
app.add_typer(train_app, name="train")
sandbox_app = typer.Typer(help="The code-executor service (stateful Python sessions in gVisor).", no_args_is_help=True)
app.add_typer(sandbox_app, name="sandbox")

console = Console()
err_console = Console(stderr=True)

HomeOption = Annotated[
    Path | None,
    typer.Option("--home", help="Argus state directory (default: $ARGUS_HOME or ./.argus)", show_default=False),
]


def _load_settings(cls: type[Any], **given: Any) -> Any:
    """Settings from flags (given, when not None) over ARGUS_* env; a bad value names its variable."""
    try:
        return cls(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        for err in exc.errors():
            field = str(err["loc"][0]) if err["loc"] else "?"
            err_console.print(f"[red]error:[/] {field} (environment variable {prefix}{field.upper()}): {err['msg']}")
        raise typer.Exit(2) from None


def _settings(home: Path | None) -> StackSettings:
    settings: StackSettings = _load_settings(StackSettings, home=home)
    return settings


@app.command()
def version() -> None:
    """Print the Argus version."""
    console.print(f"argus {__version__}")


@app.command()
def validate(files: Annotated[list[Path], typer.Argument(help="pipeline spec YAML files")]) -> None:
    """Check pipeline specs; every problem names the file, line and field."""
    failed = 0
    for path in files:
        try:
            spec = load_spec(path)
        except SpecError as exc:
            failed += 1
            for issue in exc.issues:
                err_console.print(f"[red]error:[/] {issue}", highlight=False, soft_wrap=True)
            continue
        stages = [s for s, on in (("sft", spec.sft.enabled), ("rl", spec.rl.enabled)) if on]
        console.print(
            f"[green]ok[/] {path}: pipeline '{spec.name}' on backend {spec.backend}, "
            f"stages {' → '.join(['data', *stages, 'eval', 'register'])}, promote to {spec.serving.promote_to}",
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)


def _status_table(rows: list[object]) -> Table:
    from argus.stack import ComponentStatus

    table = Table(title="Argus stack")
    for col in ("component", "health", "managed", "pid", "restarts", "URL"):
        table.add_column(col)
    for row in rows:
        assert isinstance(row, ComponentStatus)
        table.add_row(
            row.title,
            "[green]healthy[/]" if row.healthy else "[red]unhealthy[/]",
            "local" if row.managed else "external",
            str(row.pid or "-"),
            str(row.restarts),
            row.ui_url,
        )
    return table


@stack_app.command("up")
def stack_up(home: HomeOption = None) -> None:
    """Start the stack (or reuse a running one) and wait until every component is healthy."""
    from argus.stack import StackError, up

    settings = _settings(home)
    try:
        with console.status("starting the Argus stack…"):
            rows = up(settings, on_progress=lambda msg: console.print(f"  {msg}", highlight=False))
    except StackError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(_status_table(list(rows)))
    console.print(f"state and logs: {settings.home}   stop with: argus stack down", highlight=False)


@stack_app.command("status")
def stack_status(home: HomeOption = None) -> None:
    """Show each component healthy or not; exit 1 when any is unhealthy."""
    from argus.stack import status

    rows = status(_settings(home))
    console.print(_status_table(list(rows)))
    if not all(r.healthy for r in rows):
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down(home: HomeOption = None) -> None:
    """Stop exactly what `argus stack up` started, and the models served on this machine."""
    from argus.backends.local import LocalBackend
    from argus.stack import down, effective_settings

    served = LocalBackend(effective_settings(_settings(home))).stop_serving()
    if served:
        console.print(f"stopped serving: {', '.join(served)}", highlight=False)
    stopped = down(_settings(home))
    console.print(f"stopped: {', '.join(stopped)}" if stopped else "the stack was not running")


@stack_app.command("check")
def stack_check(
    spec: Annotated[Path, typer.Argument(help="pipeline spec to record")] = Path("examples/quickstart.yaml"),
    home: HomeOption = None,
) -> None:
    """Run a real Prefect flow that records SPEC in MLflow and finds its artifacts in S3."""
    import os

    from argus.stack import effective_settings

    settings = effective_settings(_settings(home))
    # Prefect and MLflow clients read their endpoints from the environment at import time.
    os.environ.update(settings.client_env())
    os.environ["ARGUS_HOME"] = str(settings.home)
    from flows.check import stack_check as check_flow

    try:
        result = check_flow(str(spec))
    except SpecError as exc:
        for issue in exc.issues:
            err_console.print(f"[red]error:[/] {issue}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"MLflow run: {result['url']}", highlight=False, soft_wrap=True)
    for key in result["s3_keys"]:  # type: ignore[attr-defined]
        console.print(f"  artifact: {key}", highlight=False, soft_wrap=True)


@stack_app.command("env")
def stack_env(home: HomeOption = None) -> None:
    """Print shell exports that point MLflow, Prefect and S3 clients at the stack: eval "$(argus stack env)"."""
    from argus.stack import effective_settings

    for key, value in effective_settings(_settings(home)).client_env().items():
        print(f"export {key}={shlex.quote(value)}")


@sandbox_app.command("serve")
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
    warm_pool: Annotated[int | None, typer.Option(help="pre-started kernels")] = None,
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
        "idle_ttl_s": idle_ttl,
        "max_output_chars": max_output_chars,
        "max_images": max_images,
        "max_image_bytes": max_image_bytes,
        "state_dir": state_dir,
    }
    settings = _load_settings(SandboxSettings, **given)
    console.print(f"code executor: runner {settings.runner}, http://{settings.host}:{settings.port}", highlight=False)
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=log_level)


def _search_settings(**given: Any) -> Any:
    from argus.config import SearchSettings

    return _load_settings(SearchSettings, **given)


@search_app.command("serve")
def search_serve(
    backend: Annotated[str | None, typer.Option(help="offline | serpapi | brave")] = None,
    cache_mode: Annotated[str | None, typer.Option(help="live | record | replay | cache-first")] = None,
    cache_store: Annotated[str | None, typer.Option(help="sqlite | redis")] = None,
    cache_path: Annotated[Path | None, typer.Option(help="sqlite cache file")] = None,
    redis_url: Annotated[str | None, typer.Option()] = None,
    index_path: Annotated[Path | None, typer.Option(help="offline index (argus search index)")] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="file holding the upstream API key")] = None,
    host: Annotated[str | None, typer.Option()] = None,
    port: Annotated[int | None, typer.Option()] = None,
    rate_limit: Annotated[float | None, typer.Option(help="upstream calls per second")] = None,
    max_concurrency: Annotated[int | None, typer.Option(help="upstream calls in flight")] = None,
    budget_per_run: Annotated[int | None, typer.Option(help="upstream calls per X-Argus-Run-Id")] = None,
    log_level: Annotated[str, typer.Option()] = "info",
) -> None:
    """Serve the search proxy. Every option also reads ARGUS_SEARCH_<OPTION> from the environment."""
    import uvicorn

    from services.search.app import create_app

    settings = _search_settings(
        backend=backend,
        cache_mode=cache_mode,
        cache_store=cache_store,
        cache_path=cache_path,
        redis_url=redis_url,
        index_path=index_path,
        api_key_file=api_key_file,
        host=host,
        port=port,
        rate_limit_per_s=rate_limit,
        max_concurrency=max_concurrency,
        budget_per_run=budget_per_run,
    )
    try:
        application = create_app(settings)
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(
        f"search proxy: backend {settings.backend}, cache {settings.cache_mode} ({settings.cache_store}), "
        f"http://{settings.host}:{settings.port}",
        highlight=False,
    )
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=log_level)


@search_app.command("index")
def search_index(
    out: Annotated[Path, typer.Option(help="index file to create or extend")],
    corpus: Annotated[Path | None, typer.Option(help="JSONL text corpus")] = None,
    images: Annotated[Path | None, typer.Option(help="JSONL image corpus (paths relative to it)")] = None,
    mmsearch_cache: Annotated[
        Path | None, typer.Option(help="MMSearch-R1 / DeepEyesV2 image-search cache json")
    ] = None,
) -> None:
    """Build the offline backend's index (SQLite FTS5 + perceptual hashes)."""
    from services.search.index import CorpusError, build_index

    if corpus is None and images is None and mmsearch_cache is None:
        err_console.print("[red]error:[/] give at least one of --corpus, --images, --mmsearch-cache")
        raise typer.Exit(2)
    try:
        counts = build_index(out, corpus=corpus, images=images, mmsearch_cache=mmsearch_cache)
    except CorpusError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(
        f"{out}: added {counts['docs']} documents, {counts['images']} images, "
        f"{counts['cached_keys']} cached image-search keys",
        highlight=False,
    )


def _run_store(action: Callable[[Any], Awaitable[Any]], **given: Any) -> Any:
    import asyncio

    from services.search.cache import make_store

    async def go() -> Any:
        store = make_store(_search_settings(**given))
        try:
            return await action(store)
        finally:
            await store.aclose()

    return asyncio.run(go())


@search_cache_app.command("export")
def search_cache_export(
    dest: Annotated[str, typer.Argument(help="local path or s3://bucket/key (gzipped JSONL)")],
    cache_store: Annotated[str | None, typer.Option()] = None,
    cache_path: Annotated[Path | None, typer.Option()] = None,
    redis_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Write every cache entry to a snapshot."""
    from services.search.cache import export_snapshot

    n = _run_store(
        lambda store: export_snapshot(store, dest), cache_store=cache_store, cache_path=cache_path, redis_url=redis_url
    )
    console.print(f"exported {n} entries to {dest}", highlight=False)


@search_cache_app.command("import")
def search_cache_import(
    src: Annotated[str, typer.Argument(help="local path or s3://bucket/key")],
    cache_store: Annotated[str | None, typer.Option()] = None,
    cache_path: Annotated[Path | None, typer.Option()] = None,
    redis_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Load a snapshot into the cache (entries with the same key are replaced)."""
    from services.search.cache import import_snapshot

    try:
        n = _run_store(
            lambda store: import_snapshot(store, src),
            cache_store=cache_store,
            cache_path=cache_path,
            redis_url=redis_url,
        )
    except (OSError, ValueError) as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
    console.print(f"imported {n} entries from {src}", highlight=False)


@search_cache_app.command("stats")
def search_cache_stats(
    cache_store: Annotated[str | None, typer.Option()] = None,
    cache_path: Annotated[Path | None, typer.Option()] = None,
    redis_url: Annotated[str | None, typer.Option()] = None,
) -> None:
    """Count cache entries by kind and backend."""
    stats = _run_store(lambda store: store.stats(), cache_store=cache_store, cache_path=cache_path, redis_url=redis_url)
    table = Table(title=f"search cache: {stats['entries']} entries")
    table.add_column("kind/backend")
    table.add_column("entries", justify="right")
    for label, n in sorted(stats["by_kind"].items()):
        table.add_row(label, str(n))
    console.print(table)


@data_app.command("generate")
def data_generate(
    out: Annotated[str, typer.Option(help="output directory or s3:// prefix")],
    seed: Annotated[int, typer.Option()] = 0,
    sft_size: Annotated[int, typer.Option(min=1)] = 200,
    rl_size: Annotated[int, typer.Option(min=1)] = 200,
    eval_size: Annotated[int, typer.Option(min=1)] = 60,
    runner: Annotated[
        str, typer.Option(help="sandbox runner for the gold trajectories (Argus's own code): process | gvisor")
    ] = "process",
) -> None:
    """Generate the miniature suite: SFT gold trajectories (run through the real tools), RL, eval, corpus."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus.data.generate import GenerationError, generate
    from argus.toolenv import ToolEnvError

    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    ) as progress:
        bars: dict[str, Any] = {}

        def update(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                bars[stage] = progress.add_task(stage, total=total)
            progress.update(bars[stage], completed=done, total=total)

        try:
            result = generate(
                out,
                seed=seed,
                sft_size=sft_size,
                rl_size=rl_size,
                eval_size=eval_size,
                runner=runner,
                on_progress=update,
            )
        except (GenerationError, ToolEnvError) as exc:
            err_console.print(f"[red]error:[/] {exc}", highlight=False)
            raise typer.Exit(1) from None
    table = Table(title=f"{out} (seed {seed})")
    table.add_column("split")
    for fam in ("perception", "reasoning", "search", "integrated"):
        table.add_column(fam, justify="right")
    for split, counts in result.manifest["families"].items():
        table.add_row(split, *(str(counts.get(f, 0)) for f in ("perception", "reasoning", "search", "integrated")))
    console.print(table)
    console.print(f"{len(result.manifest['files'])} files, manifest: {out}/manifest.json", highlight=False)


@data_app.command("inspect")
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
        err_console.print(f"[red]error:[/] {exc}", highlight=False)
        raise typer.Exit(1) from None
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


@models_app.command("init-tiny")
def models_init_tiny(
    arch: Annotated[str, typer.Option(help="qwen2 | qwen2_5_vl")],
    out: Annotated[str, typer.Option(help="output directory or s3:// prefix")],
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Build a tiny Qwen2 / Qwen2.5-VL with a locally trained tokenizer and save it (no download)."""
    if arch not in ("qwen2", "qwen2_5_vl"):
        err_console.print(f"[red]error:[/] --arch must be qwen2 or qwen2_5_vl, not {arch!r}")
        raise typer.Exit(2)
    from argus.models.tiny import init_tiny

    with console.status(f"building tiny {arch}…"):
        files = init_tiny(arch, out, seed=seed)  # type: ignore[arg-type]
    console.print(f"wrote {len(files)} files to {out}", highlight=False)


@train_app.command("sft")
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
    import json as _json

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus.backends.local import LocalBackend
    from argus.cli_pipeline import spec_or_exit, start_stack
    from argus.jobs import base_model_uri, sft_job

    spec = spec_or_exit(config)
    settings = _settings(home)
    dataset = data or spec.data.sft
    if dataset is None:
        err_console.print(
            f"[red]error:[/] {config} generates its data (data.generate): run `argus data generate "
            "--out DIR` and pass --data DIR/sft/sft.json, or run the whole pipeline with `argus run`",
            highlight=False,
        )
        raise typer.Exit(2)
    name = run_name or f"{spec.name}-sft"
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
    backend = LocalBackend(settings)
    console.print(
        f"torchrun ({job.nproc_per_node} processes), log {backend.job_dir(name) / 'train.log'}", highlight=False
    )
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        bar = progress.add_task("SFT", total=None, info="starting (DeepSpeed init)")

        def on_event(event: dict[str, Any]) -> None:
            kind = event["event"]
            if kind == "start":
                progress.update(
                    bar, total=event["total"], completed=event["step"], info=f"MLflow run {event['mlflow_run_id']}"
                )
            elif kind == "resumed":
                progress.console.print(f"resumed from {event['checkpoint']}", highlight=False)
            elif kind == "restarting":
                progress.console.print(f"torchrun exited with {event['exit_code']}; restart {event['restart']}")
            elif kind == "step":
                progress.update(
                    bar, completed=event["step"], info=f"loss {event['loss']:.4f} · {event['tokens_per_s']:.0f} tok/s"
                )
            elif kind == "checkpoint":
                progress.console.print(f"checkpoint {event['uri']} ({event['seconds']} s)", highlight=False)
            elif kind == "exported":
                progress.console.print(f"exported {event['uri']}", highlight=False)

        try:
            result = backend.run(job, on_event)
        except KeyboardInterrupt:
            err_console.print("cancelled; the next run with the same name resumes from the last checkpoint")
            raise typer.Exit(130) from None
    if not result.succeeded:
        err_console.print(
            f"[red]error:[/] training job {name} {result.state.value}: {result.message}; the end of its log:\n"
            + result.log_tail,
            highlight=False,
        )
        raise typer.Exit(1)
    console.print(
        _json.dumps({"job": name, "export": job.config["output_uri"], "checkpoints": job.config["checkpoint_uri"]}),
        highlight=False,
    )


@app.command("eval")
def eval_model(
    model: Annotated[str, typer.Option(help="model directory or s3:// prefix (Hugging Face layout)")],
    data: Annotated[str, typer.Option(help="generated data root (its eval/eval.parquet and search/index.sqlite)")],
    limit: Annotated[int | None, typer.Option(help="evaluate only the first N tasks")] = None,
    max_turns: Annotated[int, typer.Option()] = 9,
    max_tokens: Annotated[int, typer.Option(help="per model turn")] = 256,
    runner: Annotated[str, typer.Option(help="sandbox runner: gvisor | process")] = "gvisor",
    out: Annotated[Path | None, typer.Option(help="write metrics and trajectories (JSON) here")] = None,
    home: HomeOption = None,
) -> None:
    """Evaluate a model with live tools: vLLM (serving virtualenv) + code executor + search proxy."""
    import json as _json
    import tempfile

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from argus.backends.local import LocalBackend
    from argus.data.formats import read_rl_parquet
    from argus.evaluation import evaluate_served
    from argus.storage import download_dir, join_uri
    from argus.toolenv import LocalToolEnvironment

    settings = _settings(home)
    tasks = read_rl_parquet(join_uri(data, "eval", "eval.parquet"))[:limit]
    backend = LocalBackend(settings)
    with tempfile.TemporaryDirectory(prefix="argus-eval-") as tmp:
        root = Path(tmp)
        index = Path(download_dir(join_uri(data, "search"), root / "search")) / "index.sqlite"
        with (
            console.status("starting the tools…"),
            LocalToolEnvironment(root / "tools", index_path=index, runner=runner) as tools,
        ):
            console.print("starting vLLM…")
            with Progress(
                TextColumn("eval"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
            ) as progress:
                bar = progress.add_task("eval", total=len(tasks))
                try:
                    result = evaluate_served(
                        backend,
                        name="eval",
                        model_uri=model,
                        tasks=tasks,
                        tools=tools,
                        max_turns=max_turns,
                        max_tokens=max_tokens,
                        on_done=lambda _t: progress.advance(bar),
                    )
                finally:
                    backend.close()
    _print_metrics(f"{model} on {len(tasks)} eval tasks", result.summary)
    if out is not None:
        out.write_text(_json.dumps(result.report(), indent=1))


def _print_metrics(title: str, summary: dict[str, Any]) -> None:
    from argus.evaluation import metrics_table_rows

    table = Table(title=title)
    for col in ("family", "n", "accuracy", "format rate", "tool-call rate", "tool mix", "mean turns"):
        table.add_column(col)
    for row in metrics_table_rows(summary):
        table.add_row(*map(str, row))
    console.print(table)


from argus.cli_k8s import k8s_app  # noqa: E402 - commands defined there
from argus.cli_pipeline import (  # noqa: E402 - commands defined there
    deploy_command,
    promote_command,
    rollback_command,
    run_command,
    runs_app,
    serving_app,
)

app.command("run")(run_command)
app.command("deploy")(deploy_command)
app.command("promote")(promote_command)
app.command("rollback")(rollback_command)
app.add_typer(runs_app, name="runs")
app.add_typer(serving_app, name="serving")
app.add_typer(k8s_app, name="k8s")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
