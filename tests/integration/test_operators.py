"""The kopf operators, run for real against kmock's KubernetesEmulator: they create the children of a
ToolEnvironment and a ModelServing, keep status level with the children's readiness (the test plays the
kubelet and the Deployment controller by patching the children's status), and move the serving Service's
selector only once the new revision is ready."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s

from argus.backends.kubernetes.render import model_serving, tool_environment
from argus.specfile import load_spec
from tests.integration.test_k8s_backend import NS, Emulator, clients, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CHILD_RESOURCES = {
    "apps/v1/daemonsets": "DaemonSet",
    "apps/v1/deployments": "Deployment",
    "networking.k8s.io/v1/networkpolicies": "NetworkPolicy",
    "v1/events": "Event",
}


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Emulator]:
    """The emulator with the operators running against it as they run in their pod: `kopf run` in a
    process of its own (its log is in the failure message of a test that times out)."""
    import httpx

    from argus.supervision import free_port, wait_until

    emu = Emulator()
    emu.register(CHILD_RESOURCES)
    emu.register({"v1/namespaces": "Namespace"}, namespaced=False)  # kopf looks at namespaces first
    health = free_port()
    log = tmp_path / "operator.log"
    env = {**os.environ, "ARGUS_OPERATOR_API_URL": emu.url, "ARGUS_OPERATOR_INTERVAL_S": "0.3"}
    cmd = [sys.executable, "-m", "kopf", "run", "--standalone", "--all-namespaces", "-m", "operators.handlers"]
    with open(log, "wb") as out:
        operator = subprocess.Popen(
            [*cmd, f"--liveness=http://127.0.0.1:{health}/healthz"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def live() -> bool:
        assert operator.poll() is None, log.read_text()[-3000:]
        try:
            return httpx.get(f"http://127.0.0.1:{health}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        assert wait_until(live, timeout_s=90, interval_s=0.2), "the operator did not start:\n" + log.read_text()[-3000:]
        emu.operator_log = log
        yield emu
    finally:
        operator.terminate()
        try:
            operator.wait(timeout=30)
        except subprocess.TimeoutExpired:
            operator.kill()
        emu.close()


def wait(emu: Emulator, get: Any, timeout_s: float = 60) -> Any:
    """`wait_for`, with the operator's log when it times out."""
    try:
        return wait_for(get, timeout_s)
    except AssertionError:
        tail = emu.operator_log.read_text()[-4000:] if emu.operator_log else ""
        raise AssertionError(f"timed out; operator log:\n{tail}") from None


def _as_stored(body: dict[str, Any]) -> dict[str, Any]:
    """What a real API server adds on create and the emulator does not: a uid (owner references point at
    it) and a resourceVersion (kopf's patches test it)."""
    import uuid

    body["metadata"].update(uid=str(uuid.uuid4()), resourceVersion="1")
    return body


def _get(custom: k8s.CustomObjectsApi, plural: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = custom.get_namespaced_custom_object("argus.dev", "v1alpha1", NS, plural, name)
    return found


def test_tool_environment_children_and_status(cluster: Emulator) -> None:
    spec = load_spec(REPO / "examples" / "deepeyesv2-7b.yaml")
    custom, core = clients(cluster.url)
    apps = k8s.AppsV1Api(core.api_client)
    body = _as_stored(tool_environment(spec, "run1-tools", NS, "run1"))
    custom.create_namespaced_custom_object("argus.dev", "v1alpha1", NS, "toolenvironments", body)

    daemonset = wait(cluster, lambda: apps.read_namespaced_daemon_set("run1-tools-sandbox", NS))
    pod = daemonset.spec.template.spec
    assert pod.runtime_class_name == "gvisor" and pod.node_selector["argus.dev/pool"] == "train"
    assert daemonset.metadata.owner_references[0].kind == "ToolEnvironment"
    # The operator applies the children one after another: the Service may land after the DaemonSet.
    service = wait(cluster, lambda: core.read_namespaced_service("run1-tools-sandbox", NS))
    assert service.spec.internal_traffic_policy == "Local"
    search = wait(cluster, lambda: apps.read_namespaced_deployment("run1-tools-search", NS))
    assert search.spec.replicas == 3
    assert search.spec.template.spec.volumes[0].secret.secret_name == "serpapi-api-key"
    judge = wait(cluster, lambda: apps.read_namespaced_deployment("run1-tools-judge", NS))
    assert "judge" in judge.spec.template.spec.containers[0].args
    policies = k8s.NetworkingV1Api(core.api_client).list_namespaced_network_policy(NS).items
    sandbox_policy = next(p for p in policies if p.metadata.name == "run1-tools-sandbox")
    assert sandbox_policy.spec.egress == [] and sandbox_policy.spec.policy_types == ["Ingress", "Egress"]

    # Not ready until the children are: then status carries the endpoints.
    waiting = wait(
        cluster, lambda: (_get(custom, "toolenvironments", "run1-tools").get("status") or {}).get("conditions")
    )
    assert waiting[0]["status"] == "False" and "sandbox" in waiting[0]["message"]
    apps.patch_namespaced_daemon_set(
        "run1-tools-sandbox",
        NS,
        {
            "status": {
                "currentNumberScheduled": 4,
                "desiredNumberScheduled": 4,
                "numberMisscheduled": 0,
                "numberReady": 4,
            }
        },
    )
    apps.patch_namespaced_deployment("run1-tools-search", NS, {"status": {"readyReplicas": 3}})
    apps.patch_namespaced_deployment("run1-tools-judge", NS, {"status": {"readyReplicas": 1}})
    status = wait(
        cluster, lambda: (s := _get(custom, "toolenvironments", "run1-tools").get("status") or {}).get("ready") and s
    )
    assert status["sandbox_url"] == "http://run1-tools-sandbox.argus.svc.cluster.local:8080"
    assert status["judge_url"].endswith(":8000/v1") and status["conditions"][0]["status"] == "True"


def test_model_serving_switches_only_to_a_ready_revision(cluster: Emulator) -> None:
    spec = load_spec(REPO / "examples" / "deepeyesv2-7b.yaml")
    custom, core = clients(cluster.url)
    apps = k8s.AppsV1Api(core.api_client)
    body = _as_stored(model_serving(spec, "production", "s3://argus-models/x/v1", "blue", NS))
    name = body["metadata"]["name"]
    custom.create_namespaced_custom_object("argus.dev", "v1alpha1", NS, "modelservings", body)

    blue = wait(cluster, lambda: apps.read_namespaced_deployment(f"{name}-blue", NS))
    args = blue.spec.template.spec.containers[0].args
    assert args[:4] == ["--model", "s3://argus-models/x/v1", "--served-model-name", "deepeyesv2-7b"]
    assert blue.spec.template.spec.containers[0].resources.limits["nvidia.com/gpu"] == "1"
    # No ready pod yet: no Service, no active revision.
    assert not (_get(custom, "modelservings", name).get("status") or {}).get("active_revision")
    apps.patch_namespaced_deployment(f"{name}-blue", NS, {"status": {"readyReplicas": 2}})
    wait(cluster, lambda: (_get(custom, "modelservings", name).get("status") or {}).get("active_revision") == "blue")
    assert core.read_namespaced_service(name, NS).spec.selector["argus.dev/revision"] == "blue"

    # A new revision: started beside blue, the Service stays on blue while green is not ready.
    custom.patch_namespaced_custom_object(
        "argus.dev",
        "v1alpha1",
        NS,
        "modelservings",
        name,
        {"spec": {"revision": "green", "model_uri": "s3://argus-models/x/v2"}},
    )
    wait(cluster, lambda: apps.read_namespaced_deployment(f"{name}-green", NS))
    status = wait(
        cluster,
        lambda: (s := _get(custom, "modelservings", name)["status"])["conditions"][0]["reason"] == "RollingOut" and s,
    )
    assert status["active_revision"] == "blue" and "green: 0/2 ready" in status["conditions"][0]["message"]
    assert core.read_namespaced_service(name, NS).spec.selector["argus.dev/revision"] == "blue"
    apps.patch_namespaced_deployment(f"{name}-green", NS, {"status": {"readyReplicas": 2}})
    status = wait(
        cluster, lambda: (s := _get(custom, "modelservings", name)["status"])["active_revision"] == "green" and s
    )
    assert status["previous_revision"] == "blue"
    assert core.read_namespaced_service(name, NS).spec.selector["argus.dev/revision"] == "green"
    with pytest.raises(k8s.ApiException):  # the old revision is gone once traffic left it
        apps.read_namespaced_deployment(f"{name}-blue", NS)
