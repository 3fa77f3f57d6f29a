"""kopf operators for `ToolEnvironment` and `ModelServing` (run: `kopf run -m operators.handlers -A`).

Reconciliation is level-based: every create, update and timer tick computes the children from the spec
(`operators.children`), applies them (create, else patch: idempotent), reads their status and writes the
resource's status. Errors land in a `Ready=False` condition with the reason, and kopf retries. For a
`ModelServing`, the stable Service's selector moves to a new revision only once that revision's
Deployment reports all replicas ready; the old revision is deleted after the switch.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from typing import Any

import kopf
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from argus.backends.kubernetes.crds import GROUP, VERSION, ModelServingSpec, ToolEnvironmentSpec
from argus.backends.kubernetes.render import VLLM_PORT, tool_urls
from operators.children import (
    revision_deployment,
    stable_service,
    tool_environment_children,
)

INTERVAL_S = float(os.environ.get("ARGUS_OPERATOR_INTERVAL_S", "10"))


def _api_url() -> str | None:
    """Tests (and clusters reached through a proxy) give the API server's URL directly."""
    return os.environ.get("ARGUS_OPERATOR_API_URL")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    # Progress in annotations, not in `status`: the CRDs' structural schemas would prune unknown status.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="argus.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="argus.dev")
    settings.posting.level = logging.WARNING
    if _api_url():
        k8s.Configuration.set_default(k8s.Configuration(host=_api_url()))
    else:
        try:
            k8s_config.load_incluster_config()
        except k8s_config.ConfigException:
            k8s_config.load_kube_config()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    url = _api_url()
    if url:
        return kopf.ConnectionInfo(server=url, insecure=True)
    return kopf.login_via_client(**kwargs)


# -- applying children -------------------------------------------------------------------------------

_APIS: dict[str, tuple[type[Any], str]] = {
    "DaemonSet": (k8s.AppsV1Api, "daemon_set"),
    "Deployment": (k8s.AppsV1Api, "deployment"),
    "Service": (k8s.CoreV1Api, "service"),
    "NetworkPolicy": (k8s.NetworkingV1Api, "network_policy"),
}


def _call(kind: str, verb: str, *args: Any) -> Any:
    api_class, noun = _APIS[kind]
    return getattr(api_class(), f"{verb}_namespaced_{noun}")(*args)


def apply(obj: dict[str, Any], owner: kopf.Body) -> None:
    """Create the child, or patch it to the desired state (the same call whatever state it was in)."""
    kopf.adopt(obj, owner=owner)  # namespace and ownerReferences: deleting the resource deletes its children
    ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
    try:
        _call(obj["kind"], "create", ns, obj)
    except ApiException as exc:
        if exc.status != 409:
            raise
        _call(obj["kind"], "patch", name, ns, obj)


def read(kind: str, name: str, ns: str) -> Any | None:
    try:
        return _call(kind, "read", name, ns)
    except ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _condition(ready: bool, reason: str, message: str = "") -> list[dict[str, Any]]:
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = "True" if ready else "False"
    return [{"type": "Ready", "status": status, "reason": reason, "message": message, "last_transition_time": now}]


def _fail(patch: kopf.Patch, exc: Exception) -> None:
    patch.status["conditions"] = _condition(False, type(exc).__name__, str(exc)[:1000])


# -- ToolEnvironment ------------------------------------------------------------------------------------


def reconcile_tools(name: str, namespace: str, spec: dict[str, Any], body: kopf.Body, patch: kopf.Patch) -> None:
    try:
        parsed = ToolEnvironmentSpec.model_validate(dict(spec))
    except ValidationError as exc:
        _fail(patch, exc)
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    try:
        for child in tool_environment_children(name, parsed):
            apply(child, body)
        sandbox = read("DaemonSet", f"{name}-sandbox", namespace)
        search = read("Deployment", f"{name}-search", namespace)
        judge = read("Deployment", f"{name}-judge", namespace) if parsed.judge else None
    except ApiException as exc:
        _fail(patch, exc)
        raise kopf.TemporaryError(f"applying children: {exc.reason}", delay=INTERVAL_S) from exc
    desired = (sandbox.status.desired_number_scheduled or 0) if sandbox and sandbox.status else 0
    sandbox_ready = desired > 0 and sandbox is not None and (sandbox.status.number_ready or 0) >= desired
    search_ready = bool(search and search.status and (search.status.ready_replicas or 0) >= parsed.search.replicas)
    judge_ready = parsed.judge is None or bool(judge and judge.status and (judge.status.ready_replicas or 0) >= 1)
    ready = sandbox_ready and search_ready and judge_ready
    urls = tool_urls(name, namespace, judge=parsed.judge is not None)
    patch.status["ready"] = ready
    patch.status["sandbox_url"] = urls.sandbox_url
    patch.status["search_url"] = urls.search_url
    if urls.judge_url:
        patch.status["judge_url"] = urls.judge_url
    waiting = [n for n, ok in (("sandbox", sandbox_ready), ("search", search_ready), ("judge", judge_ready)) if not ok]
    patch.status["conditions"] = _condition(ready, "ChildrenReady" if ready else "Waiting", ", ".join(waiting))


@kopf.on.create(GROUP, VERSION, "toolenvironments")
@kopf.on.update(GROUP, VERSION, "toolenvironments")
@kopf.on.resume(GROUP, VERSION, "toolenvironments")
def tool_environment_changed(
    *, name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch, **_: Any
) -> None:
    reconcile_tools(name, namespace or "default", dict(spec), body, patch)


@kopf.timer(GROUP, VERSION, "toolenvironments", interval=INTERVAL_S)
def tool_environment_tick(
    *, name: str, namespace: str | None, spec: kopf.Spec, body: kopf.Body, patch: kopf.Patch, **_: Any
) -> None:
    """Children's readiness changes without the resource changing: the timer keeps status level."""
    reconcile_tools(name, namespace or "default", dict(spec), body, patch)


# -- ModelServing ----------------------------------------------------------------------------------------


def reconcile_serving(
    name: str, namespace: str, spec: dict[str, Any], status: dict[str, Any], body: kopf.Body, patch: kopf.Patch
) -> None:
    try:
        parsed = ModelServingSpec.model_validate(dict(spec))
    except ValidationError as exc:
        _fail(patch, exc)
        raise kopf.PermanentError(f"invalid spec: {exc}") from exc
    active = status.get("active_revision")
    try:
        apply(revision_deployment(name, parsed), body)
        new = read("Deployment", f"{name}-{parsed.revision}", namespace)
        new_ready = (new.status.ready_replicas or 0) if new and new.status else 0
        if new_ready >= parsed.replicas and active != parsed.revision:
            # Blue-green: only a revision whose pods are all ready gets the traffic.
            apply(stable_service(name, parsed.revision), body)
            if active:
                _call("Deployment", "delete", f"{name}-{active}", namespace)
            patch.status["previous_revision"] = active
            patch.status["active_revision"] = active = parsed.revision
        elif active:
            apply(stable_service(name, active), body)  # level-based: the Service is what status says
        current = read("Deployment", f"{name}-{active}", namespace) if active else None
    except ApiException as exc:
        _fail(patch, exc)
        raise kopf.TemporaryError(f"applying children: {exc.reason}", delay=INTERVAL_S) from exc
    ready_replicas = (current.status.ready_replicas or 0) if current and current.status else 0
    patch.status["ready_replicas"] = ready_replicas
    if active:
        patch.status["endpoint"] = f"http://{name}.{namespace}.svc.cluster.local:{VLLM_PORT}/v1"
    switched = active == parsed.revision
    message = "" if switched else f"revision {parsed.revision}: {new_ready}/{parsed.replicas} ready"
    patch.status["conditions"] = _condition(
        switched and ready_replicas > 0, "Serving" if switched else "RollingOut", message
    )


@kopf.on.create(GROUP, VERSION, "modelservings")
@kopf.on.update(GROUP, VERSION, "modelservings")
@kopf.on.resume(GROUP, VERSION, "modelservings")
def model_serving_changed(
    *,
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    status: kopf.Status,
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    reconcile_serving(name, namespace or "default", dict(spec), dict(status), body, patch)


@kopf.timer(GROUP, VERSION, "modelservings", interval=INTERVAL_S)
def model_serving_tick(
    *,
    name: str,
    namespace: str | None,
    spec: kopf.Spec,
    status: kopf.Status,
    body: kopf.Body,
    patch: kopf.Patch,
    **_: Any,
) -> None:
    """A new revision becoming ready changes no field of the resource: the timer notices it."""
    reconcile_serving(name, namespace or "default", dict(spec), dict(status), body, patch)
