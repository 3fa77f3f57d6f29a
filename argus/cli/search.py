"""`argus search serve | index | cache`: the search proxy, its offline index and its cache."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from argus.cli._common import console, exit_with_error, settings_or_exit

app = typer.Typer(help="The search proxy: text and image search with a record/replay cache.", no_args_is_help=True)
cache_app = typer.Typer(help="Cache snapshots and statistics.", no_args_is_help=True)
app.add_typer(cache_app, name="cache")


def _search_settings(**given: Any) -> Any:
    from argus.config import SearchSettings

    return settings_or_exit(SearchSettings, **given)


@app.command("serve")
def search_serve(
    provider: Annotated[str | None, typer.Option(help="offline | serpapi | brave")] = None,
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
        provider=provider,
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
        exit_with_error(str(exc))
    console.print(
        f"search proxy: provider {settings.provider}, cache {settings.cache_mode} ({settings.cache_store}), "
        f"http://{settings.host}:{settings.port}",
        highlight=False,
    )
    uvicorn.run(application, host=settings.host, port=settings.port, log_level=log_level)


@app.command("index")
def search_index(
    out: Annotated[Path, typer.Option(help="index file to create or extend")],
    corpus: Annotated[Path | None, typer.Option(help="JSONL text corpus")] = None,
    images: Annotated[Path | None, typer.Option(help="JSONL image corpus (paths relative to it)")] = None,
    mmsearch_cache: Annotated[
        Path | None, typer.Option(help="MMSearch-R1 / DeepEyesV2 image-search cache json")
    ] = None,
) -> None:
    """Build the offline backend's index (SQLite FTS5 + perceptual hashes)."""
    from argus.data.search_index import CorpusError, build_index

    if corpus is None and images is None and mmsearch_cache is None:
        exit_with_error("give at least one of --corpus, --images, --mmsearch-cache", 2)
    try:
        counts = build_index(out, corpus=corpus, images=images, mmsearch_cache=mmsearch_cache)
    except CorpusError as exc:
        exit_with_error(str(exc))
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


@cache_app.command("export")
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


@cache_app.command("import")
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
        exit_with_error(str(exc))
    console.print(f"imported {n} entries from {src}", highlight=False)


@cache_app.command("stats")
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
