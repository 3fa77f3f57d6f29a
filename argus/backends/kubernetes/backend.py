"""The Kubernetes backend: training jobs as Kubeflow PyTorchJobs, tool environments and model servers as
Argus custom resources (reconciled by the operators in `operators/`). A deployment (an evaluation or
staging server) is a ModelServing of its own; production is the ModelServing named after the stable
endpoint, whose operator runs blue-green revisions behind one Service.

Objects come from `argus.backends.kubernetes.render`, so what `argus k8s render` prints is what this submits. The API is
reached through the current kube context (or the spec's `kubernetes.context`, or an explicit client
configuration: tests point it at kmock's emulator).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from argus import events
from argus.backends.base import (
    Backend,
    BackendError,
    JobResult,
    JobState,
    ModelServer,
    StableEndpoint,
    ToolEndpoints,
    TrainingJob,
)
from argus.backends.kubernetes import crds, render
from argus.backends.kubernetes.cluster import ClusterError, api_client
from argus.config import PipelineSpec, ServingTarget, StackSettings, ToolsSpec


def job_state(job: dict[str, Any]) -> tuple[JobState, str, str]:
    """(state, reason, message) of a PyTorchJob from its conditions: the newest condition that is True."""
    conditions = [c for c in (job.get("status") or {}).get("conditions") or [] if c.get("status") == "True"]
    if not conditions:
        return JobState.CREATED, "", ""
    last = conditions[-1]
    try:
        state = JobState(last["type"])
    except ValueError:
        state = JobState.CREATED
    return state, str(last.get("reason", "")), str(last.get("message", ""))


class KubernetesBackend(Backend):
    kind = "kubernetes"

    def __init__(
        self,
        settings: StackSettings,
        spec: PipelineSpec,
        *,
        client_configuration: k8s.Configuration | None = None,
        poll_s: float = 5.0,
        ready_timeout_s: float = 1800.0,
    ):
        from kubeflow.training import TrainingClient

        self.settings = settings
        self.spec = spec
        self.namespace = spec.kubernetes.namespace
        self.poll_s = poll_s
        self.ready_timeout_s = ready_timeout_s
        try:
            api = api_client(spec.kubernetes, client_configuration)
        except ClusterError as exc:
            raise BackendError(str(exc)) from None
        self.training = TrainingClient(client_configuration=api.configuration)
        self.core = k8s.CoreV1Api(api)
        self.custom = k8s.CustomObjectsApi(api)
        self._tools: set[str] = set()
        self._servers: set[str] = set()

    # -- training jobs ----------------------------------------------------------------------------

    def submit(self, job: TrainingJob) -> None:
        configmap = render.job_configmap(job, self.namespace)
        try:
            self.core.create_namespaced_config_map(self.namespace, configmap)
        except ApiException as exc:
            if exc.status != 409:
                raise BackendError(f"ConfigMap {job.name}-config: {exc.reason}") from exc
            self.core.replace_namespaced_config_map(f"{job.name}-config", self.namespace, configmap)
        existing = self._get_job(job.name)
        if existing is not None:
            if not job_state(existing)[0].terminal:
                raise BackendError(f"PyTorchJob {job.name} is already running")
            self.training.delete_job(job.name, self.namespace)
        self.training.create_job(job=render.pytorchjob(job, self.spec, self.namespace), namespace=self.namespace)

    def _get_job(self, name: str) -> dict[str, Any] | None:
        try:
            found: dict[str, Any] = self.custom.get_namespaced_custom_object(
                "kubeflow.org", "v1", self.namespace, "pytorchjobs", name
            )
            return found
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"PyTorchJob {name}: {exc.reason}") from exc

    def follow(self, name: str, on_event: Callable[[events.Event], None]) -> JobResult:
        seen_conditions = 0
        seen_lines = 0
        seen: dict[str, events.Event] = {}
        restarts = 0
        while True:
            job = self._get_job(name)
            if job is None:
                raise BackendError(f"PyTorchJob {name} was deleted while it ran")
            conditions = (job.get("status") or {}).get("conditions") or []
            for cond in conditions[seen_conditions:]:
                if cond.get("type") == JobState.RESTARTING and cond.get("status") == "True":
                    restarts += 1
                on_event(events.Condition(**{k: cond.get(k) for k in ("type", "status", "reason", "message")}))
            seen_conditions = len(conditions)
            lines = self._master_log(name).splitlines()
            for line in lines[seen_lines:]:
                event = events.parse(line)
                if event is not None:
                    seen[event.event] = event
                    on_event(event)
            seen_lines = len(lines)
            state, reason, message = job_state(job)
            if state.terminal:
                return JobResult(
                    name=name,
                    state=state,
                    restarts=restarts,
                    message=f"{reason}: {message}" if reason else message,
                    log_tail="" if state is JobState.SUCCEEDED else self.logs(name, 30),
                    events=list(seen.values()),
                )
            time.sleep(self.poll_s)

    def _master_log(self, name: str, lines: int | None = None) -> str:
        """The master pod's log (the training operator labels pods by job and replica type)."""
        selector = f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
        try:
            pods = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        except ApiException:
            return ""
        if not pods:
            return ""
        pod = pods[0].metadata.name
        try:
            text: str = self.core.read_namespaced_pod_log(pod, self.namespace, container="pytorch", tail_lines=lines)
            return text
        except ApiException:
            return ""

    def cancel(self, name: str) -> None:
        if self._get_job(name) is not None:
            self.training.delete_job(name, self.namespace)

    def logs(self, name: str, lines: int = 50) -> str:
        return self._master_log(name, lines)

    def log_location(self, name: str) -> str:
        selector = f"training.kubeflow.org/job-name={name},training.kubeflow.org/replica-type=master"
        return f"kubectl logs -n {self.namespace} -l {selector} -c pytorch -f"

    # -- tool environments ------------------------------------------------------------------------

    def _wait_status(self, plural: str, name: str, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            obj = self.custom.get_namespaced_custom_object(crds.GROUP, crds.VERSION, self.namespace, plural, name)
            status = obj.get("status") or {}
            if ready(status):
                return dict(status)
            failed = [
                c for c in status.get("conditions") or [] if c.get("type") == "Failed" and c.get("status") == "True"
            ]
            if failed:
                raise BackendError(f"{plural}/{name}: {failed[-1].get('reason')}: {failed[-1].get('message')}")
            if time.monotonic() > deadline:
                raise BackendError(f"{plural}/{name} was not ready after {self.ready_timeout_s:.0f}s: {status}")
            time.sleep(self.poll_s)

    def tools_up(self, name: str, tools: ToolsSpec, search_data_uri: str) -> ToolEndpoints:
        spec = self.spec.model_copy(update={"tools": tools})
        body = render.tool_environment(spec, name, self.namespace, run_id=name)
        self._create_or_replace("toolenvironments", name, body)
        self._tools.add(name)
        status = self._wait_status("toolenvironments", name, lambda s: bool(s.get("ready")))
        return ToolEndpoints(
            sandbox_url=status["sandbox_url"], search_url=status["search_url"], judge_url=status.get("judge_url")
        )

    def _create_or_replace(self, plural: str, name: str, body: dict[str, Any]) -> None:
        try:
            self.custom.create_namespaced_custom_object(crds.GROUP, crds.VERSION, self.namespace, plural, body)
        except ApiException as exc:
            if exc.status != 409:
                raise BackendError(f"{plural}/{name}: {exc.reason}: {exc.body}") from exc
            self.custom.patch_namespaced_custom_object(
                crds.GROUP, crds.VERSION, self.namespace, plural, name, {"spec": body["spec"]}
            )

    def _delete(self, plural: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(crds.GROUP, crds.VERSION, self.namespace, plural, name)
        except ApiException as exc:
            if exc.status != 404:
                raise BackendError(f"{plural}/{name}: {exc.reason}") from exc

    def tools_down(self, name: str) -> None:
        self._delete("toolenvironments", name)
        self._tools.discard(name)

    # -- serving ----------------------------------------------------------------------------------

    def deploy(
        self, name: str, model_uri: str, target: ServingTarget, served_name: str, *, keep: bool = False
    ) -> ModelServer:
        body = self._serving_body(name, model_uri, target, served_name, revision="r1", keep=keep)
        self._create_or_replace("modelservings", name, body)
        if not keep:
            self._servers.add(name)
        status = self._wait_status(
            "modelservings", name, lambda s: s.get("ready_replicas", 0) >= target.replicas and bool(s.get("endpoint"))
        )
        return ModelServer(name=name, model_uri=model_uri, served_name=served_name, base_url=status["endpoint"])

    def remove(self, name: str) -> None:
        self._delete("modelservings", name)
        self._servers.discard(name)

    def deployments(self) -> list[ModelServer]:
        items = self.custom.list_namespaced_custom_object(
            crds.GROUP, crds.VERSION, self.namespace, "modelservings", label_selector="argus.dev/keep=true"
        ).get("items", [])
        return [
            ModelServer(
                name=i["metadata"]["name"],
                model_uri=i["spec"]["model_uri"],
                served_name=i["spec"]["served_name"],
                base_url=(i.get("status") or {}).get("endpoint") or "",
            )
            for i in items
        ]

    def _serving_body(
        self, name: str, model_uri: str, target: ServingTarget, served_name: str, revision: str, keep: bool
    ) -> dict[str, Any]:
        labels = {"argus.dev/keep": str(keep).lower()}
        return render.serving_resource(
            self.spec, name, self.namespace, target, model_uri, served_name, revision, labels
        )

    def switch(self, endpoint: str, to: ModelServer, model_version: str = "") -> StableEndpoint:
        """Production is one ModelServing named after the endpoint: its new revision serves `to`'s model
        with the production target; the operator starts it beside the running one and moves the stable
        Service's selector only once it is ready (requests in flight finish on the old pods). The stable
        Service routes to the pods directly, so no header names the version: the ModelServing carries
        it as the label `argus.dev/model-version`."""
        body = self._serving_body(
            endpoint, to.model_uri, self.spec.serving.production, to.served_name, revision=to.name, keep=True
        )
        if model_version:
            body["metadata"].setdefault("labels", {})["argus.dev/model-version"] = model_version.rsplit("/", 1)[-1]
        self._create_or_replace("modelservings", endpoint, body)
        self._wait_status("modelservings", endpoint, lambda s: s.get("active_revision") == to.name)
        stable = self.endpoint(endpoint)
        assert stable is not None
        return stable

    def endpoint(self, name: str) -> StableEndpoint | None:
        try:
            obj = self.custom.get_namespaced_custom_object(
                crds.GROUP, crds.VERSION, self.namespace, "modelservings", name
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise BackendError(f"modelservings/{name}: {exc.reason}") from exc
        status = obj.get("status") or {}
        if not status.get("endpoint"):
            return None
        return StableEndpoint(
            name=name,
            url=status["endpoint"],
            active=status.get("active_revision"),
            previous=status.get("previous_revision"),
        )

    def endpoints(self) -> list[StableEndpoint]:
        """The ModelServings that route a stable Service (production), as the operator reports them."""
        items = self.custom.list_namespaced_custom_object(
            crds.GROUP, crds.VERSION, self.namespace, "modelservings", label_selector="argus.dev/keep=true"
        ).get("items", [])
        out = []
        for item in items:
            status = item.get("status") or {}
            if status.get("endpoint") and status.get("active_revision"):
                out.append(
                    StableEndpoint(
                        name=item["metadata"]["name"],
                        url=status["endpoint"],
                        active=status.get("active_revision"),
                        previous=status.get("previous_revision"),
                    )
                )
        return out

    def stop_serving(self) -> list[str]:
        stopped = []
        for server in self.deployments():
            self.remove(server.name)
            stopped.append(f"modelserving {server.name}")
        return stopped

    # -- lifecycle --------------------------------------------------------------------------------

    def close(self) -> None:
        for name in list(self._tools):
            self.tools_down(name)
        for name in list(self._servers):
            self.remove(name)
