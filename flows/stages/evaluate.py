"""`evaluate`: a model through the eval suite with live tools, served by vLLM through the backend.

Usable on its own (`evaluate(model_uri, data_uri)`: brings up its own tool environment) and as the
pipeline's evaluation stage (given the pipeline's tool endpoints). Results are persisted under a key of
the model's content fingerprint and the suite, so a model is evaluated once per suite: the base
model's numbers become the baseline every later run compares against, without re-running it.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from argus import tracking
from argus.agent.env import Trajectory
from argus.agent.evaluation import EvalRun, evaluate_endpoint, metrics_table
from argus.agent.task import Task
from argus.agent.traces import TraceWriter
from argus.backends.base import Backend, ModelServer, ToolEndpoints
from argus.config import EvalSuite, PipelineSpec, Prompt, ServingTarget, StackSettings, ToolsSpec
from argus.data.formats import read_rl_parquet
from argus.models.export import prompt_mismatch
from argus.storage import fingerprint, join_uri
from flows.context import RunContext
from flows.results import DataRef, EvalReport, cache_key
from flows.runtime import FlowError, artifact_key, flow_run_links, make_backend, mlflow_client, stack_settings
from flows.serving import deploy, deployment_name


def serve_and_evaluate(
    backend: Backend,
    *,
    name: str,
    model_uri: str,
    tasks: list[Task],
    tools: ToolEndpoints,
    target: ServingTarget | None = None,
    server: ModelServer | None = None,
    max_turns: int = 9,
    max_tokens: int = 256,
    concurrency: int = 8,
    run_id: str = "eval",
    prompt: Prompt = "deepeyesv2",
    samples: int = 0,
    sample_limit: int | None = None,
    on_done: Callable[[Trajectory], None] = lambda _t: None,
    on_sample_done: Callable[[Trajectory], None] = lambda _t: None,
) -> EvalRun:
    """Run the suite against `server` (one the pipeline serves already), or against a vLLM server this
    starts through the backend and removes again (`argus eval`, a model with no server of its own),
    with the tools live."""
    started = time.monotonic()
    own = server is None
    if server is None:
        server = backend.deploy(name, model_uri, target or ServingTarget(), served_name="model")
    try:
        return evaluate_endpoint(
            base_url=server.base_url,
            model=server.served_name,
            sandbox_url=tools.sandbox_url,
            search_url=tools.search_url,
            tasks=tasks,
            max_turns=max_turns,
            max_tokens=max_tokens,
            concurrency=concurrency,
            run_id=run_id,
            prompt=prompt,
            samples=samples,
            sample_limit=sample_limit,
            on_done=on_done,
            on_sample_done=on_sample_done,
            serve_s=time.monotonic() - started if own else 0.0,
        )
    finally:
        if own:
            backend.remove(name)


def _eval_key(_ctx: Any, p: dict[str, Any]) -> str:
    suite = p["suite"]
    return cache_key(
        "eval",
        p["model_fingerprint"],
        p["suite_fingerprint"],
        EvalSuite.model_validate(suite).model_dump(),
        p.get("prompt", "deepeyesv2"),
    )


class PromptMismatch(FlowError):
    """A model is evaluated with another prompt than the one it was trained with."""


def check_prompt(model_uri: str, prompt: str, settings: StackSettings) -> None:
    reason = prompt_mismatch(model_uri, prompt, "evaluated", settings)
    if reason:
        raise PromptMismatch(reason)


def suite_uri(suite: EvalSuite, data_uri: str) -> str:
    return suite.data or join_uri(data_uri, "eval", "eval.parquet")


def _columns(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Rows as MLflow's table artifact wants them: column → values."""
    return {key: [row[key] for row in rows] for key in (rows[0] if rows else {})}


@task(name="run-eval", persist_result=True, cache_key_fn=_eval_key, retries=1, retry_delay_seconds=15)
def run_eval(
    *,
    label: str,
    model_uri: str,
    model_fingerprint: str,
    data_uri: str,
    suite: EvalSuite,
    suite_fingerprint: str,
    tools: ToolEndpoints | None,
    tools_spec: ToolsSpec,
    serving: ServingTarget,
    backend_kind: str,
    experiment: str,
    parent_run_id: str | None,
    baseline: bool,
    server: ModelServer | None = None,
    spec: PipelineSpec | None = None,
    prompt: Prompt = "deepeyesv2",
) -> EvalReport:
    log = get_run_logger()
    settings = stack_settings()
    backend = make_backend(backend_kind, settings, spec)
    tasks = read_rl_parquet(suite_uri(suite, data_uri))[: suite.limit]
    by_id = {t.id: t for t in tasks}
    name = artifact_key("eval", label, model_fingerprint[:8])
    import mlflow

    client = mlflow_client(settings)
    experiment_id = tracking.ensure_experiment(experiment, tracking.experiment_description(experiment))
    tags = {
        **flow_run_links(settings),
        tracking.TAG_EVAL_MODEL_FINGERPRINT: model_fingerprint,
        tracking.TAG_EVAL_BASELINE: str(baseline).lower(),
        tracking.TAG_PROMPT: prompt,
        tracking.TAG_CODE_VERSION: tracking.code_version(),
        tracking.TAG_NOTE: f"{label}: `{model_uri}` on suite `{suite.name}` ({len(tasks)} tasks), one trace per task",
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
    }
    # The run spans the evaluation: created before the model is served, ended when the traces are in.
    run = client.create_run(experiment_id, run_name=f"eval-{label}", tags=tags)
    run_id = run.info.run_id
    params = {"label": label, "model_uri": model_uri, "suite": suite.name, "prompt": prompt}
    params.update({"tasks": str(len(tasks)), "max_turns": str(suite.max_turns), "backend": backend_kind})
    client.log_batch(run_id, params=[mlflow.entities.Param(k, v) for k, v in params.items()])
    tracking.log_datasets(
        client, run_id, {f"{suite.name}-eval": (suite_uri(suite, data_uri), suite_fingerprint, "evaluation")}
    )
    trace_tags = {
        tracking.TRACE_TAG_SOURCE: "eval",
        tracking.TRACE_TAG_LABEL: label,
        tracking.TRACE_TAG_MODEL: model_uri,
    }
    traces = TraceWriter(experiment_id=experiment_id, run_id=run_id, tags=trace_tags)

    def done(traj: Trajectory) -> None:
        traces.add(traj, by_id[traj.task_id])  # written while the rest of the suite runs
        n = len(traces.pending)
        if n % 10 == 0 or n == len(tasks):
            log.info("%s: %d/%d tasks", label, n, len(tasks))

    try:
        try:
            endpoints = tools or backend.tools_up(f"{name}-tools", tools_spec, join_uri(data_uri, "search"))
            where = f"through {server.base_url}" if server else "on a vLLM server of its own"
            log.info("evaluating %s %s, %d tasks", model_uri, where, len(tasks))
            result = serve_and_evaluate(
                backend,
                name=name,
                model_uri=model_uri,
                tasks=tasks,
                tools=endpoints,
                target=serving,
                server=server,
                max_turns=suite.max_turns,
                max_tokens=suite.max_tokens,
                concurrency=suite.concurrency,
                run_id=name,
                prompt=prompt,
                samples=0 if baseline else suite.samples,  # the baseline's samples say nothing
                sample_limit=suite.sample_limit,
                on_done=done,
            )
        finally:
            backend.close()
        try:
            written = dict(zip((task.id for _f, _t, task in traces.pending), traces.finish(), strict=True))
            problems = traces.failures
        except Exception as exc:  # noqa: BLE001 - the figures stand without their traces; say so on the run
            written, problems = {}, [str(exc)]
        if problems:
            log.warning("%s: %d traces were not written: %s", label, len(problems), problems[0])
            client.set_tag(run_id, tracking.TAG_TRACES_ERROR, "; ".join(problems)[:500])
        trace_ids: list[str | None] = [written.get(t.id) for t in tasks]
        metrics = result.flat()
        metrics.update({"time/serve_s": result.serve_s, "time/eval_s": result.eval_s})
        now = int(time.time() * 1000)
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / f"eval-{label}.json"
            report.write_text(json.dumps(result.report(tasks, trace_ids), indent=1))
            client.log_batch(
                run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in sorted(metrics.items())]
            )
            client.log_artifact(run_id, str(report), "eval")
        per_task = result.per_task(tasks, trace_ids)
        client.log_table(run_id, data=_columns(per_task), artifact_file="eval/per_task.json")
    except BaseException:
        with contextlib.suppress(Exception):  # the episodes that finished are worth seeing
            traces.finish()
        client.set_terminated(run_id, "FAILED")
        raise
    client.set_terminated(run_id)
    columns, rows = metrics_table({label: result.summary})
    create_table_artifact(
        key=artifact_key("eval", label),
        table=[dict(zip(columns, row, strict=True)) for row in rows],
        description=f"{label}: {model_uri} on suite {suite.name} ({len(tasks)} tasks)",
    )
    overall = result.summary["overall"]
    log.info(
        "%s: accuracy %.3f [%.3f, %.3f], format rate %.3f%s",
        label,
        overall.accuracy,
        overall.accuracy_low,
        overall.accuracy_high,
        overall.format_rate,
        "".join(f", {k} {v:.3f}" for k, v in result.sampled.get("overall", {}).items() if k.startswith("pass_at_")),
    )
    return EvalReport(
        label=label,
        model_uri=model_uri,
        model_fingerprint=model_fingerprint,
        suite=suite.name,
        metrics=result.metrics(),
        slices=result.slice_metrics(),
        mlflow_run_id=run_id,
        mlflow_run_url=tracking.mlflow_run_url(settings, experiment_id, run_id),
        tasks=per_task,
        serve_s=result.serve_s,
        eval_s=result.eval_s,
    )


@flow(name="evaluate", flow_run_name="evaluate-{label}")
def evaluate(
    model_uri: str,
    data_uri: str,
    label: str = "model",
    suite: EvalSuite | None = None,
    tools: ToolEndpoints | None = None,
    tools_spec: ToolsSpec | None = None,
    serving: ServingTarget | None = None,
    backend_kind: str = "local",
    experiment: str = "argus-eval",
    parent_run_id: str | None = None,
    baseline: bool = False,
    server: ModelServer | None = None,
    spec: PipelineSpec | None = None,
    prompt: Prompt | None = None,
) -> EvalReport:
    """Evaluate `model_uri` (directory or s3:// prefix, Hugging Face layout) on the suite under
    `data_uri` (`eval/eval.parquet`, `search/index.sqlite`). `spec` is the pipeline spec the model comes
    from: the kubernetes backend places servers and tools by it (namespace, images, node pools)."""
    settings = stack_settings()
    suite = suite or EvalSuite(name="eval")
    prompt = prompt or (spec.prompt if spec is not None else "deepeyesv2")
    check_prompt(model_uri, prompt, settings)
    model_fp = fingerprint(model_uri, settings)
    suite_fp = fingerprint(suite_uri(suite, data_uri), settings)
    state = run_eval(
        label=label,
        model_uri=model_uri,
        model_fingerprint=model_fp,
        data_uri=data_uri,
        suite=suite,
        suite_fingerprint=suite_fp,
        tools=tools,
        tools_spec=tools_spec or ToolsSpec(),
        serving=serving or (spec.serving.staging if spec is not None else ServingTarget()),
        backend_kind=backend_kind,
        experiment=experiment,
        parent_run_id=parent_run_id,
        baseline=baseline,
        server=server,
        spec=spec,
        prompt=prompt,
        return_state=True,
    )
    report: EvalReport = state.result()
    return report.model_copy(update={"cached": state.name == "Cached"})


def run(ctx: RunContext, data: DataRef, tools: ToolEndpoints, models: dict[str, str]) -> dict[str, EvalReport]:
    """Evaluate each model (label → URI; the first is the baseline) on the spec's first suite. The last
    one is the candidate: when the spec promotes it, its evaluation server is kept as the staging one,
    and started while the model before it is evaluated (a vLLM server's start is ~20 s, mostly imports
    and loading, that the evaluation's waits on tools leave room for)."""
    spec = ctx.spec
    suite = spec.eval.suites[0]
    if not data.root:
        suite = suite.model_copy(update={"data": suite.data or data.eval})
    labels = list(models)
    candidate = labels[-1] if len(labels) > 1 and spec.serving.promote_to != "none" else None
    staging: Callable[[], ModelServer] | None = None
    reports: dict[str, EvalReport] = {}
    for i, (label, model_uri) in enumerate(models.items()):
        if candidate is not None and i == len(labels) - 2:
            name = deployment_name(spec.model.registered_name, models[candidate], ctx.settings)
            submitted = deploy.submit(
                ctx.backend, name, models[candidate], spec.serving.staging, spec.model.registered_name
            )
            staging = ctx.beside(f"deploy-{candidate}", submitted)
            ctx.kept.append(name)  # removed by `close` if the run fails before the promotion
        server = None
        if label == candidate and staging is not None:
            server = staging()
        with ctx.stage(f"evaluate-{label}") as clock:
            report = evaluate(
                model_uri,
                data.data_root,
                label=label,
                suite=suite,
                tools=tools,
                tools_spec=spec.tools,
                serving=spec.serving.staging,
                backend_kind=spec.backend,
                experiment=spec.name,
                parent_run_id=ctx.mlflow_run_id,
                baseline=i == 0,
                server=server,
                spec=spec,
            )
            clock.work_s = 0.0 if report.cached else report.serve_s + report.eval_s
            clock.cached = report.cached
        reports[label] = report
    return reports
