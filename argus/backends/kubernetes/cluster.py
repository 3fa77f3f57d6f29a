"""Reaching a cluster from a user's machine: the kube context, what must be installed before a run, and
the platform services (Prefect, MLflow, the object store) behind it.

`argus run` with `backend: kubernetes` uses this to check the cluster, upload the spec and trigger the
`pipeline-kubernetes` deployment; the flow itself runs in the cluster (its evaluation talks to Services
only reachable there). Endpoints given in `ARGUS_PREFECT_API_URL`, `ARGUS_MLFLOW_TRACKING_URI` and
`ARGUS_S3_ENDPOINT` (an ingress, a VPN) are used as they are; the others are port-forwarded with
`kubectl port-forward` through the same context, which honours every kubeconfig auth plugin.
"""

from __future__ import annotations

import base64
import contextlib
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from argus.config import KubernetesSettings, PipelineSpec, StackSettings

# The Services of manifests/base/stack and the secret with the object store's keys.
OBJECT_STORE_SECRET = "argus-object-store"


@dataclass(frozen=True)
class PlatformService:
    field: str  # the StackSettings field that, when set, names an endpoint reachable from here
    service: str
    port: int
    path: str = ""


PLATFORM_SERVICES = (
    PlatformService("prefect_api_url", "prefect", 4200, "/api"),
    PlatformService("mlflow_tracking_uri", "mlflow", 5000),
    PlatformService("s3_endpoint", "minio", 9000),
)

# (group, version, plural, what installs it) of every resource a pipeline run creates.
REQUIRED_RESOURCES = (
    ("kubeflow.org", "v1", "pytorchjobs", "Kubeflow's training operator"),
    ("argus.dev", "v1alpha1", "toolenvironments", "Argus's CRDs (manifests/base/crds)"),
    ("argus.dev", "v1alpha1", "modelservings", "Argus's CRDs (manifests/base/crds)"),
)
KUEUE = ("kueue.x-k8s.io", "v1beta1", "localqueues")
FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+)")


class ClusterError(RuntimeError):
    """The cluster is unreachable or lacks something a run needs; the message says what and how to fix it."""


def api_client(settings: KubernetesSettings, configuration: k8s.Configuration | None = None) -> k8s.ApiClient:
    """An API client for the spec's kube context (the current one when unset); inside a pod, the pod's
    service account. An explicit configuration wins (tests point it at an emulator)."""
    if configuration is None:
        import os

        from kubernetes import config

        try:
            configuration = k8s.Configuration()
            # $KUBECONFIG as it is now (the client library reads it once, when it is imported).
            config.load_kube_config(
                config_file=os.environ.get("KUBECONFIG"), context=settings.context, client_configuration=configuration
            )
        except config.ConfigException as exc:
            if settings.context is not None:
                raise ClusterError(f"kube context {settings.context!r}: {exc}") from None
            try:
                configuration = k8s.Configuration()
                config.load_incluster_config(client_configuration=configuration)
            except config.ConfigException:
                raise ClusterError(f"no kube context and not inside a cluster: {exc}") from None
    return k8s.ApiClient(configuration)


def _reason(exc: ApiException) -> str:
    return f"{exc.status} {exc.reason}".strip()


class Cluster:
    """One cluster as the spec's `kubernetes` section names it."""

    def __init__(self, settings: KubernetesSettings, configuration: k8s.Configuration | None = None):
        self.settings = settings
        self.namespace = settings.namespace
        self.api = api_client(settings, configuration)
        self.core = k8s.CoreV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    @property
    def where(self) -> str:
        context = self.settings.context or "the current kube context"
        return f"{context} ({self.api.configuration.host}), namespace {self.namespace}"

    def preflight(self, spec: PipelineSpec) -> list[str]:
        """What is missing for a run of `spec`, one line each (empty when the cluster is ready)."""
        problems: list[str] = []
        try:
            self.core.read_namespace(self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                problems.append(f"namespace {self.namespace!r} does not exist (apply manifests/overlays/<env>)")
            elif exc.status != 403:  # a namespace-scoped user may not read namespaces; the lists below tell
                return [f"the API server answered {_reason(exc)} for namespace {self.namespace!r}"]
        except Exception as exc:  # noqa: BLE001 - connection refused, TLS, DNS: all mean unreachable
            return [f"cannot reach the API server: {exc}"]
        for group, version, plural, installer in REQUIRED_RESOURCES:
            try:
                self.custom.list_namespaced_custom_object(group, version, self.namespace, plural, limit=1)
            except ApiException as exc:
                if exc.status == 404:
                    problems.append(f"{plural}.{group}/{version} is not served: install {installer}")
                else:
                    problems.append(f"cannot list {plural}.{group} in {self.namespace}: {_reason(exc)}")
        queues = sorted(
            {
                pool.queue
                for path, name, _gpus in spec.placement_refs()
                if path in (("sft",), ("rl",)) and name and (pool := spec.node_pools.get(name)) and pool.queue
            }
        )
        if queues:
            problems += self._missing_queues(queues)
        return problems

    def _missing_queues(self, queues: list[str]) -> list[str]:
        # Without Kueue the queue label is inert and jobs start at once; with Kueue a job naming a queue
        # that does not exist stays suspended for ever, so that is an error before anything is created.
        group, version, plural = KUEUE
        try:
            found = self.custom.list_namespaced_custom_object(group, version, self.namespace, plural)
        except ApiException as exc:
            if exc.status == 404:
                return []
            return [f"cannot list Kueue LocalQueues in {self.namespace}: {_reason(exc)}"]
        present = {item["metadata"]["name"] for item in found.get("items", [])}
        return [
            f"Kueue LocalQueue {q!r} does not exist in {self.namespace} (manifests/base/kueue)"
            for q in queues
            if q not in present
        ]

    def object_store_keys(self) -> tuple[str, str] | None:
        """The object store's access and secret key from the cluster's Secret, if this user may read it."""
        try:
            secret = self.core.read_namespaced_secret(OBJECT_STORE_SECRET, self.namespace)
        except ApiException:
            return None
        data = secret.data or {}
        try:
            return (
                base64.b64decode(data["AWS_ACCESS_KEY_ID"]).decode(),
                base64.b64decode(data["AWS_SECRET_ACCESS_KEY"]).decode(),
            )
        except (KeyError, ValueError):
            return None

    @contextlib.contextmanager
    def endpoints(self, settings: StackSettings) -> Iterator[StackSettings]:
        """`settings` with every platform endpoint reachable from here: the ones given explicitly as they
        are, the others port-forwarded for the duration of the block."""
        updates: dict[str, Any] = {}
        if "s3_access_key" not in settings.model_fields_set:
            keys = self.object_store_keys()
            if keys is not None:
                updates["s3_access_key"], updates["s3_secret_key"] = keys
        with contextlib.ExitStack() as stack:
            for svc in PLATFORM_SERVICES:
                if getattr(settings, svc.field) is None:
                    port = stack.enter_context(self.port_forward(svc.service, svc.port))
                    updates[svc.field] = f"http://127.0.0.1:{port}{svc.path}"
            yield settings.model_copy(update=updates)

    @contextlib.contextmanager
    def port_forward(self, service: str, port: int, timeout_s: float = 30.0) -> Iterator[int]:
        """`kubectl port-forward svc/SERVICE :PORT` through this context; yields the local port."""
        kubectl = shutil.which("kubectl")
        if kubectl is None:
            raise ClusterError(
                f"kubectl is needed to reach svc/{service} (or set its endpoint, e.g. ARGUS_PREFECT_API_URL)"
            )
        cmd = [kubectl, "port-forward", "--namespace", self.namespace, f"svc/{service}", f":{port}"]
        if self.settings.context:
            cmd[1:1] = ["--context", self.settings.context]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            yield self._forwarded_port(proc, service, timeout_s)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    @staticmethod
    def _forwarded_port(proc: subprocess.Popen[str], service: str, timeout_s: float) -> int:
        found: list[int] = []

        def read() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                match = FORWARDING.search(line)
                if match:
                    found.append(int(match.group(1)))
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(timeout_s)
        if found:
            # kubectl keeps printing "Handling connection for ..." lines; drain both pipes so it never blocks.
            for pipe in (proc.stdout, proc.stderr):
                threading.Thread(target=pipe.read if pipe else lambda: None, daemon=True).start()
            return found[0]
        proc.terminate()
        _, err = proc.communicate(timeout=10)
        reason = (err or "").strip() or f"no local port after {timeout_s:.0f}s"
        raise ClusterError(f"kubectl port-forward svc/{service}: {reason}")
