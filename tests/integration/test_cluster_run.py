"""`argus run SPEC` with `backend: kubernetes`, as a user runs it: a separate process with a kubeconfig
whose current context is kmock's emulator (the API server) and the platform services given as explicit
endpoints (the local stack's Prefect, MLflow and S3 endpoint stand in for the cluster's). It checks the
cluster, uploads the spec, submits a flow run of `pipeline/pipeline-kubernetes` with the spec's image and
namespace, and follows it to its end. No Kubernetes worker runs here, so the test moves the flow run's
state through the Prefect API the way the worker and the flow would."""

from __future__ import annotations

import base64
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client as k8s

from argus.backends.kubernetes.cluster import Cluster, ClusterError
from argus.config import StackSettings
from argus.specfile import load_spec
from tests.conftest import REPO, Cli
from tests.integration.test_k8s_backend import NS, RESOURCES, Emulator

pytestmark = pytest.mark.integration

SPEC = REPO / "examples" / "deepeyesv2-7b.yaml"
QUEUES = "kueue.x-k8s.io/v1beta1/localqueues"


def kubeconfig(path: Path, server: str, context: str = "emulator") -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": context,
                "clusters": [{"name": "emulator", "cluster": {"server": server}}],
                "users": [{"name": "tester", "user": {}}],
                "contexts": [{"name": context, "context": {"cluster": "emulator", "user": "tester"}}],
            }
        )
    )
    return path


def prepare(emu: Emulator, queues: list[str], keys: tuple[str, str]) -> None:
    """What the manifests install: the namespace, the CRDs (registered by the emulator), Kueue's queues and
    the object store's Secret."""
    emu.serve(f"/api/v1/namespaces/{NS}", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS}})
    custom = k8s.CustomObjectsApi(k8s.ApiClient(k8s.Configuration(host=emu.url)))
    for queue in queues:
        body = {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue", "metadata": {"name": queue}}
        custom.create_namespaced_custom_object("kueue.x-k8s.io", "v1beta1", NS, "localqueues", body)
    secret = {
        "metadata": {"name": "argus-object-store"},
        "data": {
            "AWS_ACCESS_KEY_ID": base64.b64encode(keys[0].encode()).decode(),
            "AWS_SECRET_ACCESS_KEY": base64.b64encode(keys[1].encode()).decode(),
        },
    }
    k8s.CoreV1Api(k8s.ApiClient(k8s.Configuration(host=emu.url))).create_namespaced_secret(NS, secret)


@pytest.fixture
def bare(tmp_path: Path, stack_env: dict[str, str]) -> Iterator[tuple[Emulator, dict[str, str]]]:
    """An API server with neither the training operator nor Argus installed, nor the namespace."""
    emu = Emulator({"v1/configmaps": "ConfigMap", QUEUES: "LocalQueue"})
    env = {**stack_env, "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", emu.url))}
    try:
        yield emu, env
    finally:
        emu.close()


def argus(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "argus.cli", *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
    )


def test_a_cluster_without_argus_is_refused_with_what_it_lacks(bare: tuple[Emulator, dict[str, str]]) -> None:
    _emu, env = bare
    proc = argus(env, "run", str(SPEC))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    err = " ".join(proc.stderr.split())
    assert "the cluster is not ready" in err and "namespace argus" in err, err
    assert "namespace 'argus' does not exist" in err
    assert "pytorchjobs.kubeflow.org/v1 is not served: install Kubeflow's training operator" in err
    assert "toolenvironments.argus.dev/v1alpha1 is not served" in err and "modelservings.argus.dev" in err
    # Kueue is installed here, so a job naming a queue that does not exist would wait for ever.
    assert "Kueue LocalQueue 'train-h100' does not exist" in err
    assert "Traceback" not in proc.stderr


def test_a_context_that_does_not_exist_is_named(bare: tuple[Emulator, dict[str, str]], tmp_path: Path) -> None:
    _emu, env = bare
    doc = yaml.safe_load(SPEC.read_text())
    doc["kubernetes"]["context"] = "prod-eu"
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    proc = argus(env, "run", str(spec))
    assert proc.returncode == 1
    assert "kube context 'prod-eu'" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_port_forward_failures_carry_kubectls_reason(
    bare: tuple[Emulator, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Endpoints not given explicitly are port-forwarded with kubectl through the same context; the
    emulator serves no discovery, so kubectl refuses, and its reason reaches the user."""
    emu, env = bare
    monkeypatch.setenv("KUBECONFIG", env["KUBECONFIG"])
    cluster = Cluster(load_spec(SPEC).kubernetes)
    assert cluster.api.configuration.host == emu.url  # the current context of $KUBECONFIG
    with (
        pytest.raises(ClusterError, match=r"kubectl port-forward svc/prefect: .*\S"),
        cluster.port_forward("prefect", 4200, timeout_s=20),
    ):
        pass


@contextlib.contextmanager
def _prefect(settings: StackSettings) -> Iterator[Any]:
    """A Prefect client for the stack's API (this process may have read other Prefect settings already)."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: settings.prefect_url}), get_client(sync_client=True) as client:
        yield client


def _flow_run(settings: StackSettings, name: str, timeout_s: float = 120) -> Any:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with _prefect(settings) as client:
            found = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])), limit=5)
        if found:
            return found[0]
        time.sleep(1)
    raise AssertionError(f"no flow run {name} after {timeout_s}s")


def _set_state(settings: StackSettings, flow_run_id: Any, state: Any) -> None:
    with _prefect(settings) as client:
        client.set_flow_run_state(flow_run_id, state, force=True)


def _follower(env: dict[str, str], run: str, started: list[subprocess.Popen[str]]) -> subprocess.Popen[str]:
    """`argus run` without --detach, in the background: it follows the flow run until it ends."""
    cmd = [sys.executable, "-m", "argus.cli", "run", str(SPEC), "--run-name", run]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started.append(proc)
    return proc


def test_run_submits_to_the_clusters_prefect_and_follows_it(
    cli: Cli, stack_env: dict[str, str], tmp_path: Path
) -> None:
    from prefect.states import Completed, Failed, Running

    from argus.stack import effective_settings

    emu = Emulator({**RESOURCES, QUEUES: "LocalQueue", "v1/secrets": "Secret"})
    followers: list[subprocess.Popen[str]] = []
    try:
        cli("stack", "up")
        stack = effective_settings(StackSettings(home=Path(stack_env["ARGUS_HOME"])))
        prepare(emu, ["train-h100"], (stack.s3_access_key, stack.s3_secret_key))
        # A user's shell: the cluster's services behind explicit endpoints (an ingress), the object
        # store's keys read from the cluster's Secret, the API server from the current kube context.
        env = {
            **{k: v for k, v in stack_env.items() if not k.startswith("ARGUS_")},
            "ARGUS_HOME": str(tmp_path / "elsewhere"),
            "ARGUS_PREFECT_API_URL": stack.prefect_url,
            "ARGUS_MLFLOW_TRACKING_URI": stack.mlflow_url,
            "ARGUS_S3_ENDPOINT": stack.s3_url,
            "KUBECONFIG": str(kubeconfig(tmp_path / "kubeconfig", emu.url)),
        }
        spec = load_spec(SPEC)

        # --detach: submitted, registered on the way (the cluster's Prefect had no deployment yet).
        proc = argus(env, "run", str(SPEC), "--run-name", "r1", "--detach", timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "pipeline/pipeline-kubernetes" in proc.stdout and "detached" in proc.stdout, proc.stdout
        fr = _flow_run(stack, "r1")
        with _prefect(stack) as client:
            deployment = client.read_deployment(fr.deployment_id)
            pool = client.read_work_pool("argus-kubernetes")
        assert deployment.name == "pipeline-kubernetes"
        assert fr.parameters == {"spec_uri": "s3://argus-data/specs/r1/deepeyesv2-7b.yaml", "run_name": "r1"}
        assert fr.job_variables == {"image": "ghcr.io/argus-platform/argus-flows:0.1.0", "namespace": "argus"}
        container = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
        assert {"secretRef": {"name": "argus-object-store"}} in container["containers"][0]["envFrom"]
        from argus.storage import read_uri

        assert read_uri(fr.parameters["spec_uri"], stack) == SPEC.read_bytes()

        # The same run name while it is still queued: refused, and the queued run keeps its spec object.
        edited = tmp_path / SPEC.name
        edited.write_text(SPEC.read_text() + "# edited\n")
        again = argus(env, "run", str(edited), "--run-name", "r1", "--detach", timeout=300)
        # Scheduled, or Late once Prefect's late-run service has passed over it (no worker takes it here).
        queued = any(f"already {state}" in again.stderr for state in ("scheduled", "late"))
        assert again.returncode == 1 and queued, again.stdout + again.stderr
        assert read_uri(fr.parameters["spec_uri"], stack) == SPEC.read_bytes()

        # Followed to a failure: the flow's message, and how to resume.
        follow = _follower(env, "r2", followers)
        r2 = _flow_run(stack, "r2")
        _set_state(stack, r2.id, Running())
        _set_state(stack, r2.id, Failed(message="PyTorchJob r2-sft failed: BackoffLimitExceeded"))
        out, err = follow.communicate(timeout=120)
        assert follow.returncode == 1, out + err
        assert "pipeline r2 failed: PyTorchJob r2-sft failed: BackoffLimitExceeded" in " ".join(err.split()), err
        assert "resumes" in err

        # Followed to completion: the pipeline's MLflow run, as the flow in the cluster recorded it.
        import mlflow

        client = mlflow.MlflowClient(stack.mlflow_url)
        experiment = client.get_experiment_by_name(spec.name)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(spec.name)
        tags = {"argus.pipeline.run": "r3", "argus.pipeline.root": "true"}
        mlflow_run = client.create_run(experiment_id, run_name="pipeline-r3", tags=tags)
        client.log_metric(mlflow_run.info.run_id, "sft/overall/accuracy", 0.25)
        follow = _follower(env, "r3", followers)
        r3 = _flow_run(stack, "r3")
        _set_state(stack, r3.id, Running())
        _set_state(stack, r3.id, Completed())
        out, err = follow.communicate(timeout=120)
        assert follow.returncode == 0, out + err
        assert "pipeline r3 completed" in out and mlflow_run.info.run_id in out, out
        assert "sft/overall/accuracy" in out and "0.25" in out
    finally:
        for proc in followers:
            proc.kill()
            proc.communicate()
        emu.close()
        cli("stack", "down", check=False)
