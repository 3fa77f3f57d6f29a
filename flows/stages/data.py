"""`prepare-data`: the suite the run trains and evaluates on, in the object store, with content hashes.

The miniature suite is generated once per `data.generate` section (generation is deterministic, so a
suite already in the object store is reused); a spec that names its datasets has them hashed instead.
The hashes become lineage tags on every MLflow run and the registered version.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from typing import Any

from prefect import get_run_logger, task

from argus import tracking
from argus.config import PipelineSpec
from argus.data.tasks import SUITE_VERSION
from argus.storage import fingerprint, join_uri, read_uri
from flows.context import RunContext
from flows.results import DataRef, cache_key
from flows.runtime import make_backend, stack_settings, transient


def _data_key(_ctx: Any, p: dict[str, Any]) -> str:
    spec: PipelineSpec = p["spec"]
    return cache_key("data", spec.name, spec.data.model_dump(mode="json"), spec.prompt, SUITE_VERSION)


@task(
    name="prepare-data",
    persist_result=True,
    cache_key_fn=_data_key,
    retries=2,
    retry_delay_seconds=[5, 20],
    retry_condition_fn=transient,
)
def prepare_data(spec: PipelineSpec) -> DataRef:
    """Generate the miniature suite into the object store (or take the spec's URIs) and hash it."""
    log = get_run_logger()
    settings = stack_settings()
    started = time.monotonic()
    gen = spec.data.generate
    if gen is None:
        assert spec.data.sft and spec.data.eval and spec.data.search_corpus  # semantic_errors guarantees it
        uris = {"sft": spec.data.sft, "eval": spec.data.eval, "search": spec.data.search_corpus}
        if spec.data.rl:
            uris["rl"] = spec.data.rl
        hashes = {name: fingerprint(uri, settings) for name, uri in uris.items()}
        return DataRef(
            sft=uris["sft"], eval=uris["eval"], rl=uris.get("rl"), search=uris["search"], hashes=hashes,
            work_s=time.monotonic() - started,
        )  # fmt: skip
    from argus.data.generate import generate

    key = {**gen.model_dump(), "prompt": spec.prompt, "suite": SUITE_VERSION}
    root = f"s3://{settings.bucket_data}/{spec.name}/{cache_key('generated', key)[-16:]}"
    try:
        manifest = json.loads(read_uri(join_uri(root, "manifest.json"), settings))
        generated = False
        log.info("reusing the suite at %s (generation is deterministic)", root)
    except FileNotFoundError:
        log.info("generating the miniature suite into %s", root)
        last = [0.0]

        def progress(stage: str, done: int, total: int) -> None:
            if time.monotonic() - last[0] > 10 or done == total:
                last[0] = time.monotonic()
                log.info("%s: %d/%d", stage, done, total)

        backend = make_backend(spec.backend, settings, spec)
        try:
            manifest = generate(
                root,
                tools=functools.partial(backend.tool_environment, f"{spec.name}-gold"),
                seed=gen.seed,
                sft_size=gen.sft_size,
                rl_size=gen.rl_size,
                eval_size=gen.eval_size,
                dev_size=gen.dev_size,
                teachers={str(k): v for k, v in gen.teachers.items()} if gen.teachers else None,
                prompt=spec.prompt,
                stack=settings,
                on_progress=progress,
            ).manifest
        finally:
            backend.close()
        generated = True
    files = manifest["files"]
    hashes = {
        "manifest": hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest(),
        "sft": files["sft/sft.json"],
        "eval": files["eval/eval.parquet"],
        "rl": files["rl/train.parquet"],
        "search_index": files["search/index.sqlite"],
    }
    return DataRef(
        root=root,
        sft=join_uri(root, "sft", "sft.json"),
        eval=join_uri(root, "eval", "eval.parquet"),
        rl=join_uri(root, "rl", "train.parquet"),
        search=join_uri(root, "search"),
        hashes=hashes,
        generated=generated,
        work_s=time.monotonic() - started if generated else 0.0,
    )


def run(ctx: RunContext) -> DataRef:
    """The run's data; a cached reference whose objects are gone is prepared again."""
    with ctx.stage("prepare-data") as clock:
        state = prepare_data(ctx.spec, return_state=True)
        ref: DataRef = state.result()
        clock.cached = state.name == "Cached"
        if clock.cached:
            try:
                read_uri(join_uri(ref.root, "manifest.json") if ref.root else ref.eval, ctx.settings)
            except FileNotFoundError:
                get_run_logger().warning("cached data at %s is gone; preparing it again", ref.root)
                ref = prepare_data.with_options(refresh_cache=True)(ctx.spec)
                clock.cached = False
        clock.work_s = ref.work_s
    ctx.lineage.update({f"{tracking.TAG_DATA_PREFIX}{k}": v for k, v in ref.hashes.items()})
    return ref
