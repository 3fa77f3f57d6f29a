"""`register`: an exported model becomes a version of a registered model, with lineage and an alias."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_link_artifact

from argus import registry, tracking
from argus.tracking import ALIAS_CANDIDATE
from flows.context import RunContext
from flows.results import DataRef, EvalReport, RegisteredVersion, RLResult, SFTResult, cache_key
from flows.runtime import artifact_key, flow_run_links, stack_settings
from flows.summary import lineage_card


@task(name="register-version", retries=3, retry_delay_seconds=[2, 5, 10])
def register_version(
    model_uri: str, name: str, key: str, run_id: str | None, tags: dict[str, str], alias: str, description: str
) -> RegisteredVersion:
    settings = stack_settings()
    mv = registry.register_version(
        settings,
        name=name,
        source=model_uri,
        key=key,
        run_id=run_id,
        tags=tags,
        description=description or (f"{model_uri} (run {run_id})" if run_id else model_uri),
    )
    registry.set_alias(settings, name, alias, mv.version)
    url = registry.version_url(settings, name, mv.version)
    get_run_logger().info("registered %s version %s (alias %s): %s", name, mv.version, alias, url)
    return RegisteredVersion(
        name=name,
        version=str(mv.version),
        source=model_uri,
        aliases=registry.aliases(settings, name, mv.version),
        url=url,
    )


@flow(name="register", flow_run_name="register-{name}")
def register(
    model_uri: str,
    name: str,
    run_id: str | None = None,
    tags: dict[str, Any] | None = None,
    alias: str = ALIAS_CANDIDATE,
    description: str = "",
) -> RegisteredVersion:
    """Register `model_uri` (its object-store URI becomes the version's `source`) as a version of `name`
    linked to the MLflow run that produced it; a re-run with the same inputs finds the same version.
    `tags` win over this flow's own links: a pipeline's version points at the pipeline's flow run."""
    settings = stack_settings()
    all_tags = {
        **flow_run_links(settings),
        tracking.TAG_CODE_VERSION: tracking.code_version(),
        **{k: str(v) for k, v in (tags or {}).items()},
    }
    key = cache_key("register", model_uri, run_id)
    version = register_version(model_uri, name, key, run_id, all_tags, alias, description)
    create_link_artifact(version.url, link_text=f"{name} v{version.version}", key=artifact_key("model", name))
    return version


def run(
    ctx: RunContext,
    data: DataRef,
    trained: SFTResult,
    reports: dict[str, EvalReport],
    refined: RLResult | None = None,
) -> RegisteredVersion:
    """The last trained model (RL's when it ran, else SFT's) becomes the candidate version, with the
    run's lineage (the SFT run, and the RL run with the SFT model it started from) and every evaluation."""
    candidate = refined or trained
    tags = {
        **ctx.lineage,
        tracking.TAG_PIPELINE_FLOW_RUN_ID: ctx.flow_run_id,
        tracking.TAG_SPEC_URI: ctx.spec_uri,
        tracking.TAG_DATA_ROOT: data.data_root,
        tracking.TAG_SFT_RUN_ID: trained.mlflow_run_id or "",
        **(
            {tracking.TAG_RL_RUN_ID: refined.mlflow_run_id or "", tracking.TAG_RL_START_MODEL: trained.model_uri}
            if refined
            else {}
        ),
        tracking.TAG_PROMPT: ctx.spec.prompt,
        tracking.TAG_CODE_VERSION: tracking.code_version(),
        **{tracking.eval_run_tag(label): report.mlflow_run_id for label, report in reports.items()},
    }
    card = lineage_card(
        settings=ctx.settings,
        experiment_id=ctx.experiment_id,
        model_uri=candidate.model_uri,
        data=data,
        trained=trained,
        refined=refined,
        reports=reports,
        flow_run_url=ctx.lineage[tracking.TAG_PREFECT_FLOW_RUN_URL],
        pipeline_run_url=ctx.mlflow_run_url,
        code_version=tracking.code_version(),
        repository=tracking.repository_url(),
    )
    with ctx.stage("register"):
        return register(
            candidate.model_uri,
            ctx.spec.model.registered_name,
            run_id=candidate.mlflow_run_id,
            tags=tags,
            description=card,
        )
