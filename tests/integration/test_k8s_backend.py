"""The Kubernetes backend against kmock's KubernetesEmulator (an in-memory API server over HTTP): it
creates the PyTorchJob and its ConfigMap, a test-side controller plays the training operator (moves the
job's conditions, provides the master pod and its log), and the backend reports each state. The same for
tool environments, model servers and the stable Service."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kmock
import pytest
from kubernetes import client as k8s

from argus import events
from argus.backends.base import JobState
from argus.backends.jobs import sft_job
from argus.backends.kubernetes.backend import KubernetesBackend
from argus.backends.kubernetes.render import CLUSTER_SETTINGS
from argus.config import PipelineSpec
from argus.specfile import load_spec

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
NS = "argus"
VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}
RESOURCES = {
    "v1/configmaps": "ConfigMap",
    "v1/pods": "Pod",
    "v1/services": "Service",
    "kubeflow.org/v1/pytorchjobs": "PyTorchJob",
    "argus.dev/v1alpha1/toolenvironments": "ToolEnvironment",
    "argus.dev/v1alpha1/modelservings": "ModelServing",
}


class Emulator:
    """kmock's emulator on its own event loop in a thread, so synchronous clients can talk to it."""

    def __init__(self, resources: dict[str, str] | None = None) -> None:
        self.resources = RESOURCES if resources is None else resources
        self.url = ""
        self.handler: Any = None
        self.operator_log: Path | None = None  # set where an operator runs against this emulator
        self._ready = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._ready.wait(30), "the emulator did not start"

    def _run(self) -> None:
        try:
            self._loop.run_until_complete(self._main())
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
            for key, kind in self.resources.items():
                emulator.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=True, verbs=VERBS)
            self.handler = emulator
            self.url = str(server.url).rstrip("/")
            self._ready.set()
            await self._stop.wait()

    def register(self, resources: dict[str, str], *, namespaced: bool = True) -> None:
        """Declare more resources ('group/version/plural': Kind) to the running emulator."""

        async def add() -> None:
            for key, kind in resources.items():
                self.handler.resources[key] = kmock.ResourceInfo(kind=kind, namespaced=namespaced, verbs=VERBS)

        asyncio.run_coroutine_threadsafe(add(), self._loop).result(timeout=10)

    def serve_log(self, pod: str, text: str) -> None:
        """The pod's log subresource (the emulator stores objects, not logs)."""
        self.serve(f"/api/v1/namespaces/{NS}/pods/{pod}/log", text.encode())

    def serve(self, path: str, payload: dict[str, Any] | bytes) -> None:
        """A fixed answer for GET `path`, in place before this returns (objects the emulator cannot
        store, such as namespaces, and subresources such as logs)."""

        async def add() -> None:
            self.handler[f"get {path}"] << payload

        asyncio.run_coroutine_threadsafe(add(), self._loop).result(timeout=10)

    def close(self) -> None:
        assert self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


@pytest.fixture
def emulator() -> Iterator[Emulator]:
    emu = Emulator()
    try:
        yield emu
    finally:
        emu.close()


@pytest.fixture
def spec() -> PipelineSpec:
    return load_spec(REPO / "examples" / "deepeyesv2-7b.yaml")


def clients(url: str) -> tuple[k8s.CustomObjectsApi, k8s.CoreV1Api]:
    api = k8s.ApiClient(k8s.Configuration(host=url))
    return k8s.CustomObjectsApi(api), k8s.CoreV1Api(api)


def backend(emu: Emulator, spec: PipelineSpec) -> KubernetesBackend:
    return KubernetesBackend(
        CLUSTER_SETTINGS, spec, client_configuration=k8s.Configuration(host=emu.url), poll_s=0.05, ready_timeout_s=30
    )


def wait_for(get: Callable[[], Any], timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            found = get()
            if found:
                return found
        except k8s.ApiException:
            pass
        time.sleep(0.02)
    raise AssertionError("timed out")


def operator(emu: Emulator, job: str, outcome: str, log: str) -> threading.Thread:
    """Plays the training operator for one job: Created, Running (master pod up), then `outcome`."""
    custom, core = clients(emu.url)

    def conditions(*steps: tuple[str, str, str]) -> dict[str, Any]:
        return {
            "status": {"conditions": [{"type": t, "status": "True", "reason": r, "message": m} for t, r, m in steps]}
        }

    def run() -> None:
        wait_for(lambda: custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", job))
        created = ("Created", "PyTorchJobCreated", f"PyTorchJob {job} is created.")
        custom.patch_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", job, conditions(created))
        time.sleep(0.3)
        labels = {"training.kubeflow.org/job-name": job, "training.kubeflow.org/replica-type": "master"}
        pod = k8s.V1Pod(metadata=k8s.V1ObjectMeta(name=f"{job}-master-0", labels=labels))
        core.create_namespaced_pod(NS, pod)
        emu.serve_log(f"{job}-master-0", log)
        running = ("Running", "PyTorchJobRunning", f"PyTorchJob {job} is running.")
        custom.patch_namespaced_custom_object(
            "kubeflow.org", "v1", NS, "pytorchjobs", job, conditions(created, running)
        )
        time.sleep(0.3)
        end = (
            ("Succeeded", "PyTorchJobSucceeded", f"PyTorchJob {job} is successfully completed.")
            if outcome == "Succeeded"
            else ("Failed", "PyTorchJobFailed", f"PyTorchJob {job} is failed because 1 Master replica(s) failed.")
        )
        custom.patch_namespaced_custom_object(
            "kubeflow.org", "v1", NS, "pytorchjobs", job, conditions(created, running, end)
        )

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _job(spec: PipelineSpec, name: str) -> Any:
    return sft_job(
        spec,
        CLUSTER_SETTINGS,
        name=name,
        dataset="s3://argus-data/x/sft.json",
        model="hf://Qwen/Qwen2.5-VL-7B-Instruct",
    )


def test_pytorchjob_created_running_succeeded(emulator: Emulator, spec: PipelineSpec) -> None:
    start = events.line(events.Start(step=0, total=1, mlflow_run_id="r1"))
    step = events.line(events.Step(step=1, total=1, loss=1.5))
    log = f"loading\n{start}\n[rank0]: {step}\n"
    controller = operator(emulator, "run1-sft", "Succeeded", log)
    seen: list[events.Event] = []
    result = backend(emulator, spec).run(_job(spec, "run1-sft"), seen.append)
    controller.join(timeout=10)
    assert result.state is JobState.SUCCEEDED and result.succeeded
    states = [e.type for e in seen if isinstance(e, events.Condition)]
    assert states == ["Created", "Running", "Succeeded"]
    assert [e.event for e in seen if e.event != "condition"] == ["start", "step"]
    custom, core = clients(emulator.url)
    job = custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", "run1-sft")
    assert job["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 3
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "train-h100"
    config = core.read_namespaced_config_map("run1-sft-config", NS).data
    assert json.loads(config["job.json"])["job_name"] == "run1-sft"


def test_pytorchjob_failed_reports_reason_and_log(emulator: Emulator, spec: PipelineSpec) -> None:
    controller = operator(emulator, "run2-sft", "Failed", "step 1\nRuntimeError: CUDA out of memory\n")
    result = backend(emulator, spec).run(_job(spec, "run2-sft"), lambda _e: None)
    controller.join(timeout=10)
    assert result.state is JobState.FAILED
    assert result.message.startswith("PyTorchJobFailed: ") and "Master replica(s) failed" in result.message
    assert "CUDA out of memory" in result.log_tail


def test_cancel_deletes_the_job(emulator: Emulator, spec: PipelineSpec) -> None:
    runner = backend(emulator, spec)
    runner.submit(_job(spec, "run3-sft"))
    custom, _core = clients(emulator.url)
    assert custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", "run3-sft")
    runner.cancel("run3-sft")
    with pytest.raises(k8s.ApiException) as gone:
        custom.get_namespaced_custom_object("kubeflow.org", "v1", NS, "pytorchjobs", "run3-sft")
    assert gone.value.status == 404


def test_tools_serving_and_production_revisions_wait_for_their_status(emulator: Emulator, spec: PipelineSpec) -> None:
    custom, _core = clients(emulator.url)

    def get(plural: str, name: str) -> dict[str, Any]:
        found: dict[str, Any] = custom.get_namespaced_custom_object("argus.dev", "v1alpha1", NS, plural, name)
        return found

    def set_status(plural: str, name: str, status: dict[str, Any]) -> None:
        custom.patch_namespaced_custom_object("argus.dev", "v1alpha1", NS, plural, name, {"status": status})

    def operators() -> None:  # what the Argus operators report once the children are ready
        wait_for(lambda: get("toolenvironments", "t1"))
        set_status(
            "toolenvironments",
            "t1",
            {"ready": True, "sandbox_url": "http://t1-sandbox:8080", "search_url": "http://t1-search:8000"},
        )
        for name in ("m-blue", "m-green"):
            wait_for(lambda n=name: get("modelservings", n))
            set_status(
                "modelservings",
                name,
                {"ready_replicas": 1, "endpoint": f"http://{name}:8000/v1", "active_revision": "r1"},
            )
        active = None
        for _ in range(2):  # production: each new revision becomes active once "ready"
            revision = wait_for(
                lambda a=active: (r := get("modelservings", "deepeyesv2-7b")["spec"]["revision"]) != a and r
            )
            set_status(
                "modelservings",
                "deepeyesv2-7b",
                {
                    "active_revision": revision,
                    "previous_revision": active,
                    "ready_replicas": 2,
                    "endpoint": "http://deepeyesv2-7b.argus.svc.cluster.local:8000/v1",
                },
            )
            active = revision

    thread = threading.Thread(target=operators, daemon=True)
    thread.start()
    runner = backend(emulator, spec)
    tools = runner.tools_up("t1", spec.tools, "s3://argus-data/x/search")
    assert tools.sandbox_url == "http://t1-sandbox:8080"
    body = get("toolenvironments", "t1")
    assert body["spec"]["sandbox"]["node_pool"] == "h100-train" and "h100-train" in body["spec"]["node_pools"]

    staging = spec.serving.staging
    blue = runner.deploy("m-blue", "s3://argus-models/x/v1", staging, "deepeyesv2-7b", keep=True)
    green = runner.deploy("m-green", "s3://argus-models/x/v2", staging, "deepeyesv2-7b", keep=True)
    assert blue.base_url == "http://m-blue:8000/v1"
    assert {d.name for d in runner.deployments()} == {"m-blue", "m-green"}
    first = runner.switch("deepeyesv2-7b", blue)
    assert first.active == "m-blue" and first.previous is None
    second = runner.switch("deepeyesv2-7b", green)
    thread.join(timeout=10)
    assert second.active == "m-green" and second.previous == "m-blue"
    production = get("modelservings", "deepeyesv2-7b")["spec"]
    assert production["model_uri"] == "s3://argus-models/x/v2" and production["replicas"] == 2  # the production target
    runner.remove("m-blue")
    runner.tools_down("t1")
    assert {d.name for d in runner.deployments()} == {"m-green", "deepeyesv2-7b"}
