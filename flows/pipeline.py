"""`pipeline`: data → tool environment → cold-start SFT → evaluation (base and SFT) → registry.

Each stage is a Prefect task or subflow over the `Backend`, so the same flow runs on this machine and
on a cluster. Stage results are persisted under keys of their inputs (spec sections, data hashes,
model fingerprints, the run name): re-running a spec with the same run name skips what finished and
resumes training from its last checkpoint. A failing stage tears down what the run started.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any, TypeVar
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from argus import registry, tracking
from argus.backends.base import Backend, BackendError, JobEvent, ToolEndpoints
from argus.config import DNS_LABEL, PipelineSpec, StackSettings
from argus.jobs import base_model_uri, sft_job
from argus.specfile import SpecError, load_spec
from argus.storage import fingerprint, join_uri, read_uri
from flows.evaluate import evaluate
from flows.promote import deploy, deployment_name, promote
from flows.register import register
from flows.results import DataRef, EvalReport, PipelineResult, SFTResult, StageTiming, cache_key
from flows.runtime import FlowError, artifact_key, backend, flow_run_links, mlflow_client, stack_settings, transient

TAG_PIPELINE_RUN = "argus.pipeline.run"
TAG_PIPELINE_ROOT = "argus.pipeline.root"  # marks the pipeline's own MLflow run among its stages' runs
T = TypeVar("T")


class PipelineError(FlowError):
    """A stage failed in a way its message explains."""


@task(name="load-spec", cache_policy=NO_CACHE)
def load_pipeline_spec(spec_uri: str) -> PipelineSpec:
    try:
        return load_spec(spec_uri)
    except SpecError as exc:
        raise PipelineError("invalid spec:\n" + "\n".join(map(str, exc.issues))) from None


# -- data ------------------------------------------------------------------------------------------


def _data_key(_ctx: Any, p: dict[str, Any]) -> str:
    spec: PipelineSpec = p["spec"]
    return cache_key("data", spec.name, spec.data.model_dump(mode="json"))


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

    root = f"s3://{settings.bucket_data}/{spec.name}/{cache_key('generated', gen.model_dump())[-16:]}"
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

        manifest = generate(
            root,
            seed=gen.seed,
            sft_size=gen.sft_size,
            rl_size=gen.rl_size,
            eval_size=gen.eval_size,
            stack=settings,
            on_progress=progress,
        ).manifest
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


# -- tool environment --------------------------------------------------------------------------------


@task(name="tool-environment", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def tool_environment(runner: Backend, name: str, spec: PipelineSpec, data: DataRef) -> ToolEndpoints:
    endpoints = runner.tools_up(name, spec.tools, data.search)
    get_run_logger().info("code executor %s, search proxy %s", endpoints.sandbox_url, endpoints.search_url)
    return endpoints


# -- SFT -----------------------------------------------------------------------------------------------


def _sft_inputs(spec: PipelineSpec, run_name: str, data: DataRef, base_fingerprint: str) -> str:
    return cache_key("sft", spec.name, run_name, spec.sft.model_dump(mode="json"), data.hashes, base_fingerprint)


def _sft_key(_ctx: Any, p: dict[str, Any]) -> str:
    return _sft_inputs(p["spec"], p["run_name"], p["data"], p["base_fingerprint"])


@task(name="sft", persist_result=True, cache_key_fn=_sft_key)
def train_sft(
    spec: PipelineSpec,
    run_name: str,
    data: DataRef,
    base_model: str,
    base_fingerprint: str,
    parent_run_id: str | None,
    lineage: dict[str, str],
) -> SFTResult:
    """Submit the SFT job to the backend and follow it; the same inputs reuse the checkpoint prefix,
    so a re-run after a crash resumes where the job stopped."""
    log = get_run_logger()
    settings = stack_settings()
    suffix = _sft_inputs(spec, run_name, data, base_fingerprint)[-12:]
    name = f"{run_name}-sft"
    job = sft_job(
        spec,
        settings,
        name=name,
        dataset=data.sft,
        model=base_model,
        output_uri=f"s3://{settings.bucket_models}/{spec.name}/{run_name}/sft-{suffix}",
        lineage=lineage,
        env={"ARGUS_MLFLOW_PARENT_RUN_ID": parent_run_id} if parent_run_id else {},
    )
    if spec.sft.checkpoint.uri is None:
        job.config["checkpoint_uri"] = f"s3://{settings.bucket_checkpoints}/{spec.name}/{run_name}/sft-{suffix}"
    progress_id: UUID = create_progress_artifact(  # type: ignore[assignment]
        0.0, key=artifact_key(run_name, "sft-progress"), description=f"SFT job {name}: optimizer steps"
    )
    seen: dict[str, JobEvent] = {}
    last_report = [0.0]

    def on_event(event: JobEvent) -> None:
        kind = event["event"]
        seen[kind] = event
        if kind == "step":
            now = time.monotonic()
            if now - last_report[0] > 5 or event["step"] == event["total"]:
                last_report[0] = now
                update_progress_artifact(progress_id, 100.0 * event["step"] / event["total"])
            if event["step"] % 25 == 0 or event["step"] == event["total"]:
                log.info("step %d/%d loss %.4f", event["step"], event["total"], event["loss"])
        elif kind == "start":
            log.info("training: MLflow run %s, %d steps", event["mlflow_run_id"], event["total"])
        elif kind in ("checkpoint", "exported", "resumed", "restarting"):
            log.info("%s: %s", kind, {k: v for k, v in event.items() if k not in ("event", "time")})

    runner = backend(spec.backend, settings, spec)
    started = time.monotonic()
    try:
        result = runner.run(job, on_event)
    finally:
        runner.close()
    work_s = time.monotonic() - started
    if not result.succeeded:
        raise PipelineError(f"SFT job {name} {result.state.value}: {result.message}\n{result.log_tail}")
    step = seen.get("step")
    return SFTResult(
        job_name=name,
        mlflow_run_id=seen["start"]["mlflow_run_id"] if "start" in seen else None,
        model_uri=job.config["output_uri"],
        checkpoint_uri=job.config["checkpoint_uri"],
        steps=step["step"] if step else None,
        final_loss=step["loss"] if step else None,
        restarts=result.restarts,
        resumed_from=seen["resumed"]["checkpoint"] if "resumed" in seen else None,
        work_s=work_s,
    )


# -- MLflow parent run -------------------------------------------------------------------------------


@task(name="mlflow-run", retries=3, retry_delay_seconds=[2, 5, 10], cache_policy=NO_CACHE)
def find_pipeline_run(client: Any, experiment_id: str, run_name: str) -> Any | None:
    """The pipeline's own MLflow run for `run_name` (not one of its stages' runs), if there is one."""
    found = client.search_runs(
        [experiment_id],
        f"tags.`{TAG_PIPELINE_RUN}` = '{run_name}' and tags.`{TAG_PIPELINE_ROOT}` = 'true'",
        max_results=1,
    )
    return found[0] if found else None


def pipeline_mlflow_run(spec: PipelineSpec, run_name: str, spec_uri: str) -> tuple[str, str]:
    """The pipeline's MLflow run (found again by run name on a re-run); the stages' runs nest under it."""
    import mlflow

    settings = stack_settings()
    client = mlflow_client(settings)
    experiment_id = mlflow.set_experiment(spec.name).experiment_id
    found = find_pipeline_run(client, experiment_id, run_name)
    links = flow_run_links(settings)
    if found is not None:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {
            TAG_PIPELINE_RUN: run_name,
            TAG_PIPELINE_ROOT: "true",
            tracking.TAG_SPEC_NAME: spec.name,
            tracking.TAG_SPEC_FILE: spec_uri,
        }
        run_id = client.create_run(experiment_id, run_name=f"pipeline-{run_name}", tags=tags).info.run_id
        client.log_dict(run_id, spec.model_dump(mode="json"), "spec/resolved.json")
    for key, value in {**links, "argus.code_version": tracking.code_version()}.items():
        client.set_tag(run_id, key, value)
    return run_id, tracking.mlflow_run_url(settings, experiment_id, run_id)


def _finish_mlflow_run(settings: StackSettings, run_id: str, status: str, metrics: dict[str, float]) -> None:
    import mlflow

    client = mlflow_client(settings)
    if metrics:
        client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, v, 0, 0) for k, v in sorted(metrics.items())])
    client.set_terminated(run_id, status)


# -- the flow --------------------------------------------------------------------------------------


def _flow_run_name() -> str:
    params = flow_run.parameters
    return str(params.get("run_name") or "pipeline")


def _timed(stages: list[StageTiming], name: str, call: Callable[[], tuple[T, float, bool]]) -> T:
    started = time.monotonic()
    value, work_s, cached = call()
    stages.append(StageTiming(stage=name, wall_s=time.monotonic() - started, work_s=work_s, cached=cached))
    return value


def _cached(state: Any) -> bool:
    return bool(state.name == "Cached")


@flow(name="pipeline", flow_run_name=_flow_run_name, persist_result=True)
def pipeline(spec_uri: str, run_name: str | None = None) -> PipelineResult:
    """Run the pipeline spec at `spec_uri` (a file or an s3:// object) as run `run_name` (default: the
    spec's name). The same spec and run name resume: finished stages are skipped."""
    import re

    log = get_run_logger()
    started = time.monotonic()
    settings = stack_settings()
    spec = load_pipeline_spec(spec_uri)
    run = run_name or spec.name
    if not re.match(DNS_LABEL, run):
        raise PipelineError(f"run name {run!r} must be a DNS label (lowercase letters, digits, '-')")
    runner = backend(spec.backend, settings, spec)
    parent_run_id, parent_url = pipeline_mlflow_run(spec, run, spec_uri)
    create_link_artifact(parent_url, link_text=f"MLflow run of pipeline {run}", key=artifact_key(run, "mlflow"))
    flow_run_id = str(flow_run.get_id())
    stages: list[StageTiming] = []
    kept: list[str] = []  # serving deployments this run started for the promotion that follows
    status = "FAILED"
    final: dict[str, float] = {}
    try:

        def data_stage() -> tuple[DataRef, float, bool]:
            state = prepare_data(spec, return_state=True)
            ref: DataRef = state.result()
            if _cached(state):
                try:
                    read_uri(join_uri(ref.root, "manifest.json") if ref.root else ref.eval, settings)
                except FileNotFoundError:
                    log.warning("cached data at %s is gone; preparing it again", ref.root)
                    ref = prepare_data.with_options(refresh_cache=True)(spec)
                    return ref, ref.work_s, False
            return ref, ref.work_s, _cached(state)

        data = _timed(stages, "prepare-data", data_stage)
        tools = _timed(
            stages, "tool-environment", lambda: (tool_environment(runner, f"{run}-tools", spec, data), 0.0, False)
        )
        base_model = base_model_uri(spec, settings)
        base_fp = fingerprint(base_model, settings)
        lineage = {
            TAG_PIPELINE_RUN: run,
            tracking.TAG_PREFECT_FLOW_RUN_ID: flow_run_id,
            tracking.TAG_PREFECT_FLOW_RUN_URL: tracking.prefect_flow_run_url(settings, flow_run_id),
            **{f"argus.data.{k}": v for k, v in data.hashes.items()},
        }

        def sft_stage() -> tuple[SFTResult, float, bool]:
            state = train_sft(spec, run, data, base_model, base_fp, parent_run_id, lineage, return_state=True)
            out: SFTResult = state.result()
            return out, out.work_s, _cached(state)

        sft = _timed(stages, "sft", sft_stage)
        reports: dict[str, EvalReport] = {}
        suite = spec.eval.suites[0]
        data_root = data.root or data.eval.rsplit("/eval/", 1)[0]
        for label, model_uri, baseline in (("base", base_model, True), ("sft", sft.model_uri, False)):

            def eval_stage(
                label: str = label, model_uri: str = model_uri, baseline: bool = baseline
            ) -> tuple[EvalReport, float, bool]:
                endpoint = None
                serve_s = 0.0
                if label == "sft" and spec.serving.promote_to != "none":
                    # The server this evaluation uses stays up and becomes the staging deployment.
                    started = time.monotonic()
                    endpoint = deploy(
                        runner,
                        deployment_name(spec.model.registered_name, model_uri, settings),
                        model_uri,
                        spec.serving.staging,
                        spec.model.registered_name,
                    )
                    serve_s = time.monotonic() - started
                    kept.append(endpoint.name)
                report = evaluate(
                    model_uri,
                    data_root,
                    label=label,
                    suite=suite if data.root else suite.model_copy(update={"data": suite.data or data.eval}),
                    tools=tools,
                    tools_spec=spec.tools,
                    serving=spec.serving.staging,
                    backend_kind=spec.backend,
                    experiment=spec.name,
                    parent_run_id=parent_run_id,
                    baseline=baseline,
                    endpoint=endpoint,
                    spec=spec,
                )
                work = serve_s + (0.0 if report.cached else report.serve_s + report.eval_s)
                return report, work, report.cached and not serve_s

            reports[label] = _timed(stages, f"evaluate-{label}", eval_stage)
        runner.tools_down(f"{run}-tools")

        metrics_tags = {
            f"eval.{label}.{family}.{metric}": f"{report.value(metric, family):.4f}"
            for label, report in reports.items()
            for family in report.metrics
            for metric in ("accuracy", "format_rate", "tool_call_rate")
        }
        registered = _timed(
            stages,
            "register",
            lambda: (
                register(
                    sft.model_uri,
                    spec.model.registered_name,
                    run_id=sft.mlflow_run_id,
                    tags={
                        **lineage,
                        "argus.pipeline.flow_run_id": flow_run_id,
                        registry.TAG_SPEC_URI: spec_uri,
                        registry.TAG_DATA_ROOT: data_root,
                        "argus.sft.mlflow_run_id": sft.mlflow_run_id or "",
                        "argus.eval.base.mlflow_run_id": reports["base"].mlflow_run_id,
                        "argus.eval.sft.mlflow_run_id": reports["sft"].mlflow_run_id,
                        **metrics_tags,
                    },
                ),
                0.0,
                False,
            ),
        )
        serving = None
        if spec.serving.promote_to != "none":
            serving = _timed(
                stages,
                "promote-staging",
                lambda: (promote(registered.name, registered.version, "staging", spec_uri), 0.0, False),
            )
            if spec.serving.promote_to == "production":
                serving = _timed(
                    stages,
                    "promote-production",
                    lambda: (promote(registered.name, registered.version, "production", spec_uri), 0.0, False),
                )
        if serving is not None:  # the aliases moved since registration
            registered = registered.model_copy(
                update={"aliases": registry.aliases(settings, registered.name, registered.version)}
            )
        final = {
            f"{label}.{family}.{metric}": report.value(metric, family)
            for label, report in reports.items()
            for family in report.metrics
            for metric in ("accuracy", "format_rate")
        }
        status = "FINISHED"
        result = PipelineResult(
            spec=spec.name,
            run_name=run,
            flow_run_id=flow_run_id,
            flow_run_url=tracking.prefect_flow_run_url(settings, flow_run_id),
            mlflow_run_url=parent_url,
            data=data,
            sft=sft,
            base_eval=reports["base"],
            sft_eval=reports["sft"],
            registered=registered,
            serving=serving,
            stages=stages,
            wall_s=time.monotonic() - started,
        )
        final["registered_version"] = float(registered.version)
        log.info(
            "done in %.0fs: %s v%s; orchestration overhead %.1fs (%.1f%%)",
            result.wall_s,
            registered.name,
            registered.version,
            result.overhead_s,
            100 * result.overhead_s / result.wall_s,
        )
        return result
    finally:
        if status != "FINISHED":
            routed = {e.active for e in _endpoints(runner, spec)}
            for name in kept:
                if name not in routed:  # never stop what a stable endpoint routes to
                    runner.remove(name)
        runner.close()
        _finish_mlflow_run(settings, parent_run_id, status, final)


def _endpoints(runner: Backend, spec: PipelineSpec) -> list[Any]:
    from flows.promote import endpoint_name

    found = runner.endpoint(endpoint_name(spec.model.registered_name))
    return [found] if found else []


__all__ = ["BackendError", "PipelineError", "pipeline"]
