"""`pipeline`: data → tool environment → cold-start SFT → RL → evaluation (base, SFT, RL) → registry → serving.

The candidate's staging server starts while the model before it is evaluated; everything else runs in order.

Each stage (`flows.stages`) is a Prefect task or subflow over the `Backend`, so the same flow runs on
this machine and on a cluster. Stage results are persisted under keys of their inputs (spec sections,
data hashes, model fingerprints, the run name): re-running a spec with the same run name skips what
finished and resumes training from its last checkpoint. A failing stage tears down what the run started.
The RL stage (when `rl.enabled`) goes between `sft` and `evaluate`: it starts from the SFT model, and
its model is evaluated beside base and SFT and registered as the candidate.
"""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from argus import tracking
from flows import summary
from flows.context import PipelineError, open_run
from flows.results import PipelineResult
from flows.stages import data, evaluate, register, rl, serve, sft, tools


def _flow_run_name() -> str:
    return str(flow_run.parameters.get("run_name") or "pipeline")


@flow(name="pipeline", flow_run_name=_flow_run_name, persist_result=True)
def pipeline(spec_uri: str, run_name: str | None = None) -> PipelineResult:
    """Run the pipeline spec at `spec_uri` (a file or an s3:// object) as run `run_name` (default: the
    spec's name). The same spec and run name resume: finished stages are skipped."""
    ctx = open_run(spec_uri, run_name)
    status, metrics = "FAILED", {}
    try:
        suite = data.run(ctx)
        summary.record_datasets(ctx, suite)
        with tools.running(ctx, suite) as endpoints:
            base = sft.base_model(ctx)
            trained = sft.run(ctx, suite, base, endpoints)
            refined = rl.run(ctx, suite, trained, endpoints) if ctx.spec.rl.enabled else None
            models = {"base": base[0], "sft": trained.model_uri, **({"rl": refined.model_uri} if refined else {})}
            reports = evaluate.run(ctx, suite, endpoints, models)
        summary.record_comparison(ctx, reports)
        registered = register.run(ctx, suite, trained, reports, refined)
        registered, serving = serve.run(ctx, registered)
        result = PipelineResult(
            spec=ctx.spec.name,
            run_name=ctx.run,
            flow_run_id=ctx.flow_run_id,
            flow_run_url=tracking.prefect_flow_run_url(ctx.settings, ctx.flow_run_id),
            mlflow_run_url=ctx.mlflow_run_url,
            data=suite,
            sft=trained,
            rl=refined,
            base_eval=reports["base"],
            sft_eval=reports["sft"],
            rl_eval=reports.get("rl"),
            registered=registered,
            serving=serving,
            stages=ctx.stages,
            wall_s=ctx.wall_s,
        )
        status, metrics = "FINISHED", result.final_metrics()
        summary.record_summary(ctx, result)
        get_run_logger().info(
            "done in %.0fs: %s v%s; orchestration overhead %.1fs (%.1f%%)",
            result.wall_s,
            registered.name,
            registered.version,
            result.overhead_s,
            100 * result.overhead_s / result.wall_s,
        )
        return result
    finally:
        ctx.close(status, metrics)


__all__ = ["PipelineError", "pipeline"]
