"""Serving: registered versions move through staging to production on vLLM (`promote`, `rollback`), and
the pipeline's `promote-staging` / `promote-production` stages, which run the same `promote` flow a
person runs with `argus promote`, as far as the spec's `serving.promote_to` asks (the gate included).

- staging: the version is deployed (vLLM through the backend), health-checked and smoke-tested, the
  spec's eval suite runs through it, and the metrics are recorded on the model version (a model whose
  exact bytes were already evaluated on that suite reuses the recorded evaluation).
- production: only if the version's staging metrics pass the spec's gate against production's; then
  blue-green: the new deployment starts beside the old one, is health-checked and smoke-tested, the
  stable endpoint switches to it (in-flight requests finish on the old one), and only then do the
  aliases move (`production`, `previous-production`) and the old deployment stop. Any failure before
  the switch leaves production and its aliases as they were.
- rollback: the same switch back to `previous-production`.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from argus import registry, tracking
from argus.backends.base import Backend
from argus.config import PipelineSpec, PromotionGate, StackSettings
from argus.specfile import SpecError, load_spec
from argus.tracking import ALIAS_PREVIOUS, ALIAS_PRODUCTION, ALIAS_STAGING, TAG_DATA_ROOT, TAG_SPEC_URI, stage_tag
from flows.context import RunContext
from flows.results import PromotionResult, RegisteredVersion
from flows.runtime import flow_run_links, make_backend, stack_settings
from flows.serving import PromotionError, deploy, deployment_name, endpoint_name, slug, smoke_test
from flows.stages.evaluate import evaluate

METRICS = ("accuracy", "format_rate", "tool_call_rate")


def _spec_for(settings: StackSettings, mv: Any, spec_uri: str | None) -> PipelineSpec:
    uri = spec_uri or mv.tags.get(TAG_SPEC_URI)
    if not uri:
        raise PromotionError(f"version {mv.version} of {mv.name} names no spec ({TAG_SPEC_URI}); pass spec_uri")
    try:
        return load_spec(uri)
    except SpecError as exc:
        raise PromotionError("invalid spec:\n" + "\n".join(map(str, exc.issues))) from None


def _staging_metrics(mv: Any) -> dict[str, float]:
    prefix = stage_tag("staging", "")
    return {k.removeprefix(prefix): float(v) for k, v in mv.tags.items() if k.startswith(f"{prefix}overall.")}


def _gate(gate: PromotionGate, staging: dict[str, float], production: dict[str, float] | None) -> list[str]:
    """Reasons the gate refuses the version (empty: it passes)."""
    reasons = []
    key = f"overall.{gate.metric}"
    if key not in staging:
        return [f"no staging {gate.metric} recorded"]
    if production and key in production and staging[key] < production[key] - gate.tolerance:
        reasons.append(
            f"{gate.metric} {staging[key]:.3f} < production's {production[key]:.3f} - tolerance {gate.tolerance}"
        )
    if staging.get("overall.accuracy", 0.0) < gate.min_accuracy:
        reasons.append(f"accuracy {staging.get('overall.accuracy', 0.0):.3f} < min_accuracy {gate.min_accuracy}")
    if staging.get("overall.format_rate", 0.0) < gate.min_format_rate:
        reasons.append(
            f"format rate {staging.get('overall.format_rate', 0.0):.3f} < min_format_rate {gate.min_format_rate}"
        )
    return reasons


def _to_staging(
    settings: StackSettings, backend: Backend, spec: PipelineSpec, mv: Any, spec_uri: str | None
) -> PromotionResult:
    log = get_run_logger()
    name = mv.name
    dep_name = deployment_name(name, mv.source, settings)
    server = deploy(backend, dep_name, mv.source, spec.serving.staging, name)
    smoke_test(server)
    stable = backend.endpoint(endpoint_name(name))
    old = registry.version_by_alias(settings, name, ALIAS_STAGING)
    if old is not None and old.version != mv.version and old.source != mv.source:
        old_dep = deployment_name(name, old.source, settings)
        if stable is None or stable.active != old_dep:  # never stop what production serves
            backend.remove(old_dep)
    data_root = mv.tags.get(TAG_DATA_ROOT)
    if not data_root:
        raise PromotionError(f"version {mv.version} names no eval data ({TAG_DATA_ROOT})")
    report = evaluate(
        mv.source,
        data_root,
        label=f"staging-v{mv.version}",
        suite=spec.eval.suites[0],
        tools_spec=spec.tools,
        backend_kind=spec.backend,
        experiment=spec.name,
        server=server,
        spec=spec,
    )
    metrics = {f"overall.{m}": report.value(m) for m in METRICS}
    registry.set_tags(
        settings,
        name,
        mv.version,
        {
            **{stage_tag("staging", k): f"{v:.4f}" for k, v in metrics.items()},
            stage_tag("staging", "eval_run_id"): report.mlflow_run_id,
            stage_tag("staging", "deployed_at"): time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            stage_tag("staging", "deployment"): f"{spec.backend}:{dep_name} {server.base_url}",
            **{stage_tag("staging", k.rsplit(".", 1)[-1]): v for k, v in flow_run_links(settings).items()},
        },
    )
    registry.set_alias(settings, name, ALIAS_STAGING, mv.version)
    log.info("%s v%s on staging (%s): %s", name, mv.version, server.base_url, metrics)
    return PromotionResult(
        name=name,
        version=mv.version,
        to="staging",
        deployment=dep_name,
        endpoint_url=server.base_url,
        metrics=metrics,
    )


def _switch_production(
    settings: StackSettings, backend: Backend, spec: PipelineSpec, mv: Any, *, why: str
) -> PromotionResult:
    """Blue-green to `mv`; aliases move only after the stable endpoint serves it."""
    log = get_run_logger()
    name = mv.name
    current = registry.version_by_alias(settings, name, ALIAS_PRODUCTION)
    stable_name = endpoint_name(name)
    stable_before = backend.endpoint(stable_name)
    new_name = deployment_name(name, mv.source, settings)
    if stable_before is not None and stable_before.active == new_name:
        if current is None or current.version != mv.version:
            raise PromotionError(f"{name} v{mv.version} is already the production deployment")
        # Promoting what production serves already (a pipeline run re-run to its end): nothing to switch.
        log.info("%s v%s serves production at %s already", name, mv.version, stable_before.url)
        return PromotionResult(
            name=name,
            version=mv.version,
            to="production",
            deployment=new_name,
            endpoint_url=stable_before.url,
            metrics=_staging_metrics(mv),
            previous_version=None,
            switch_s=0.0,
        )
    server = deploy(backend, new_name, mv.source, spec.serving.production, name)
    try:
        smoke_test(server)
    except Exception:
        backend.remove(new_name)
        raise
    started = time.monotonic()
    stable = backend.switch(stable_name, server, model_version=f"{name}/{mv.version}")
    switch_s = time.monotonic() - started
    if stable.previous and stable.previous != new_name:
        backend.remove(stable.previous)  # drained: the switch returned after its last request finished
    if current is not None and current.version != mv.version:
        registry.set_alias(settings, name, ALIAS_PREVIOUS, current.version)
    registry.set_alias(settings, name, ALIAS_PRODUCTION, mv.version)
    registry.set_tags(
        settings,
        name,
        mv.version,
        {
            stage_tag("production", "deployed_at"): time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            stage_tag("production", "deployment"): f"{spec.backend}:{new_name}",
            stage_tag("production", "endpoint"): stable.url,
            stage_tag("production", "reason"): why,
            **{stage_tag("production", k.rsplit(".", 1)[-1]): v for k, v in flow_run_links(settings).items()},
        },
    )
    create_markdown_artifact(
        f"**{name} v{mv.version}** serves production at `{stable.url}` ({why}); previous: "
        f"{'v' + current.version if current else 'none'}; switch {switch_s:.1f}s",
        key=f"production-{stable_name}",
    )
    log.info("%s v%s serves production at %s (switch %.1fs)", name, mv.version, stable.url, switch_s)
    return PromotionResult(
        name=name,
        version=mv.version,
        to="production",
        deployment=new_name,
        endpoint_url=stable.url,
        metrics=_staging_metrics(mv),
        previous_version=current.version if current else None,
        switch_s=switch_s,
    )


@flow(name="promote", flow_run_name="promote-{name}-v{version}-{to}")
def promote(
    name: str, version: str, to: Literal["staging", "production"], spec_uri: str | None = None
) -> PromotionResult:
    """Move version `version` of registered model `name` to staging or production (gated)."""
    settings = stack_settings()
    mv = registry.get_version(settings, name, version)
    spec = _spec_for(settings, mv, spec_uri)
    backend = make_backend(spec.backend, settings, spec)
    try:
        if to == "staging":
            return _to_staging(settings, backend, spec, mv, spec_uri)
        if not _staging_metrics(mv):
            _to_staging(settings, backend, spec, mv, spec_uri)
            mv = registry.get_version(settings, name, version)
        current = registry.version_by_alias(settings, name, ALIAS_PRODUCTION)
        reasons = _gate(spec.eval.gate, _staging_metrics(mv), _staging_metrics(current) if current else None)
        if reasons:
            report = f"{name} v{version} was not promoted to production: " + "; ".join(reasons)
            registry.set_tags(settings, name, version, {tracking.TAG_PRODUCTION_REJECTED: "; ".join(reasons)})
            create_markdown_artifact(report, key=f"gate-{slug(name)}")
            raise PromotionError(report)
        return _switch_production(settings, backend, spec, mv, why="promoted")
    finally:
        backend.close()


@flow(name="rollback", flow_run_name="rollback-{name}")
def rollback(name: str, spec_uri: str | None = None) -> PromotionResult:
    """Serve `previous-production` again, by the same blue-green switch."""
    settings = stack_settings()
    previous = registry.version_by_alias(settings, name, ALIAS_PREVIOUS)
    if previous is None:
        raise PromotionError(f"{name} has no {ALIAS_PREVIOUS} version to roll back to")
    spec = _spec_for(settings, previous, spec_uri)
    backend = make_backend(spec.backend, settings, spec)
    try:
        return _switch_production(settings, backend, spec, previous, why="rollback")
    finally:
        backend.close()


def run(ctx: RunContext, registered: RegisteredVersion) -> tuple[RegisteredVersion, PromotionResult | None]:
    """The version (with the aliases it has now) and where it serves, if the spec promotes it."""
    target = ctx.spec.serving.promote_to
    if target == "none":
        return registered, None
    serving = None
    steps: list[Literal["staging", "production"]] = ["staging", "production"] if target == "production" else ["staging"]
    for to in steps:
        with ctx.stage(f"promote-{to}"):
            serving = promote(registered.name, registered.version, to, ctx.spec_uri)
    aliases = registry.aliases(ctx.settings, registered.name, registered.version)
    return registered.model_copy(update={"aliases": aliases}), serving
