"""`evaluate`: a model through the eval suite with live tools, served by vLLM through the backend.

Usable on its own (`evaluate(model_uri, data_uri)`: brings up its own tool environment) and as the
pipeline's evaluation stage (given the pipeline's tool endpoints). Results are persisted under a key of
the model's content fingerprint and the suite, so a model is evaluated once per suite: the base
model's numbers become the baseline every later run compares against, without re-running it.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact

from argus import tracking
from argus.backends.base import ServingEndpoint, ToolEndpoints
from argus.config import EvalSuite, PipelineSpec, ServingTarget, ToolsSpec
from argus.data.formats import read_rl_parquet
from argus.evaluation import TOOLS, evaluate_endpoint, evaluate_served
from argus.storage import fingerprint, join_uri
from flows.results import EvalReport, cache_key
from flows.runtime import artifact_key, backend, flow_run_links, mlflow_client, stack_settings

TAG_BASELINE = "argus.eval.baseline"
TAG_MODEL_URI = "argus.eval.model_uri"
TAG_MODEL_FINGERPRINT = "argus.eval.model_fingerprint"
TAG_SUITE = "argus.eval.suite"


def _eval_key(_ctx: Any, p: dict[str, Any]) -> str:
    suite = p["suite"]
    return cache_key(
        "eval", p["model_fingerprint"], p["suite_fingerprint"], EvalSuite.model_validate(suite).model_dump()
    )


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
    endpoint: ServingEndpoint | None = None,
    spec: PipelineSpec | None = None,
) -> EvalReport:
    log = get_run_logger()
    settings = stack_settings()
    runner = backend(backend_kind, settings, spec)
    tasks = read_rl_parquet(suite.data or join_uri(data_uri, "eval", "eval.parquet"))[: suite.limit]
    name = artifact_key("eval", label, model_fingerprint[:8])
    done = 0

    def tick(_t: object) -> None:
        nonlocal done
        done += 1
        if done % 10 == 0 or done == len(tasks):
            log.info("%s: %d/%d tasks", label, done, len(tasks))

    try:
        endpoints = tools or runner.tools_up(f"{name}-tools", tools_spec, join_uri(data_uri, "search"))
        if endpoint is not None:
            log.info("evaluating %s through %s, %d tasks", model_uri, endpoint.base_url, len(tasks))
            result = evaluate_endpoint(
                endpoint, tasks=tasks, tools=endpoints, max_turns=suite.max_turns, run_id=name, on_done=tick
            )
        else:
            log.info("serving %s with vLLM (%s backend), %d tasks", model_uri, backend_kind, len(tasks))
            result = evaluate_served(
                runner,
                name=name,
                model_uri=model_uri,
                tasks=tasks,
                tools=endpoints,
                target=serving,
                max_turns=suite.max_turns,
                concurrency=8,
                run_id=name,
                on_done=tick,
            )
    finally:
        runner.close()

    client = mlflow_client(settings)
    import mlflow

    experiment_id = mlflow.set_experiment(experiment).experiment_id
    tags = {
        **flow_run_links(settings),
        TAG_MODEL_URI: model_uri,
        TAG_MODEL_FINGERPRINT: model_fingerprint,
        TAG_SUITE: suite.name,
        TAG_BASELINE: str(baseline).lower(),
        "argus.code_version": tracking.code_version(),
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
    }
    run = client.create_run(experiment_id, run_name=f"eval-{label}", tags=tags)
    metrics = {k: v for name_, m in result.summary.items() for k, v in m.flat(name_).items()}
    metrics.update({"serve_s": result.serve_s, "eval_s": result.eval_s})
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / f"eval-{label}.json"
        report.write_text(json.dumps(result.report(), indent=1))
        client.log_batch(
            run.info.run_id,
            metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in sorted(metrics.items())],
            params=[
                mlflow.entities.Param("max_turns", str(suite.max_turns)),
                mlflow.entities.Param("tasks", str(len(tasks))),
            ],
        )
        client.log_artifact(run.info.run_id, str(report), "eval")
    client.set_terminated(run.info.run_id)
    create_table_artifact(
        key=artifact_key("eval", label),
        table=[
            {
                "family": family,
                "n": m.n,
                "accuracy": round(m.accuracy, 3),
                "format_rate": round(m.format_rate, 3),
                "tool_call_rate": round(m.tool_call_rate, 3),
                **{f"mix_{t}": round(m.tool_mix.get(t, 0.0), 2) for t in TOOLS},
                "mean_turns": round(m.mean_turns, 2),
            }
            for family, m in result.summary.items()
        ],
        description=f"{label}: {model_uri} on suite {suite.name} ({len(tasks)} tasks)",
    )
    overall = result.summary["overall"]
    log.info("%s: accuracy %.3f, format rate %.3f", label, overall.accuracy, overall.format_rate)
    return EvalReport(
        label=label,
        model_uri=model_uri,
        model_fingerprint=model_fingerprint,
        suite=suite.name,
        metrics={k: m.__dict__ for k, m in result.summary.items()},
        mlflow_run_id=run.info.run_id,
        mlflow_run_url=tracking.mlflow_run_url(settings, experiment_id, run.info.run_id),
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
    endpoint: ServingEndpoint | None = None,
    spec: PipelineSpec | None = None,
) -> EvalReport:
    """Evaluate `model_uri` (directory or s3:// prefix, Hugging Face layout) on the suite under
    `data_uri` (`eval/eval.parquet`, `search/index.sqlite`). `spec` is the pipeline spec the model comes
    from: the kubernetes backend places servers and tools by it (namespace, images, node pools)."""
    settings = stack_settings()
    suite = suite or EvalSuite(name="eval")
    model_fp = fingerprint(model_uri, settings)
    suite_fp = fingerprint(suite.data or join_uri(data_uri, "eval", "eval.parquet"), settings)
    state = run_eval(
        label=label,
        model_uri=model_uri,
        model_fingerprint=model_fp,
        data_uri=data_uri,
        suite=suite,
        suite_fingerprint=suite_fp,
        tools=tools,
        tools_spec=tools_spec or ToolsSpec(),
        serving=serving or ServingTarget(),
        backend_kind=backend_kind,
        experiment=experiment,
        parent_run_id=parent_run_id,
        baseline=baseline,
        endpoint=endpoint,
        spec=spec,
        return_state=True,
    )
    report: EvalReport = state.result()
    return report.model_copy(update={"cached": state.name == "Cached"})
