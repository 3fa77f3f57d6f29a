"""What `argus k8s render` emits is valid Kubernetes: built-in kinds against the OpenAPI schema of a pinned
Kubernetes version (kubernetes-validate), Argus' custom resources against their generated CRDs, and the
PyTorchJob through the kubeflow-training model classes. No API server can run here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from argus.backends.kubernetes.crds import KINDS, crd
from argus.backends.kubernetes.render import QUEUE_LABEL, render
from argus.specfile import load_spec

REPO = Path(__file__).resolve().parents[2]
K8S_VERSION = "1.35.0"  # kubernetes<36: the API the client speaks


def _validate_builtin(obj: dict[str, Any]) -> None:
    kubernetes_validate.validate(obj, K8S_VERSION, strict=True)


def _crd_schema(kind: str) -> dict[str, Any]:
    schema: dict[str, Any] = crd(kind)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def _validate(obj: dict[str, Any]) -> None:
    if obj["apiVersion"].startswith("argus.dev/"):
        # CRD schemas are OpenAPI v3.0: boolean exclusiveMinimum, as in JSON Schema draft 4.
        jsonschema.Draft4Validator(_crd_schema(obj["kind"])).validate(obj)
    elif obj["kind"] == "PyTorchJob":
        for role, replica in obj["spec"]["pytorchReplicaSpecs"].items():
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role.lower()}}
            _validate_builtin({**template, "template": replica["template"]})
    else:
        _validate_builtin(obj)


@pytest.fixture(scope="module")
def gpu_objects() -> list[dict[str, Any]]:
    return render(load_spec(REPO / "examples" / "deepeyesv2-7b.yaml"))


def test_crds_are_valid_customresourcedefinitions() -> None:
    for kind in KINDS:
        definition = crd(kind)
        _validate_builtin(definition)
        text = json.dumps(definition)
        assert "$ref" not in text and "anyOf" not in text  # structural: what the API server accepts


@pytest.mark.parametrize("stage", ["sft", "rl"])
def test_the_7b_spec_renders_4x8_gpu_pytorchjobs_on_their_pool_and_queue(
    stage: str, gpu_objects: list[dict[str, Any]]
) -> None:
    kinds = [o["kind"] for o in gpu_objects]
    assert kinds == ["ToolEnvironment", "ConfigMap", "PyTorchJob", "ConfigMap", "PyTorchJob", "ModelServing"]
    for obj in gpu_objects:
        _validate(obj)
    job = next(o for o in gpu_objects if o["kind"] == "PyTorchJob" and o["metadata"]["name"].endswith(f"-{stage}"))
    assert job["metadata"]["labels"][QUEUE_LABEL] == "train-h100"
    assert job["metadata"]["labels"]["argus.dev/stage"] == stage
    assert job["spec"]["nprocPerNode"] == "8"
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert replicas["Master"]["replicas"] == 1 and replicas["Worker"]["replicas"] == 3  # 4 nodes
    pod = replicas["Worker"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["name"] == "pytorch" and container["command"][:3] == ["torchrun", "-m", f"trainers.{stage}"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod["nodeSelector"]["argus.dev/pool"] == "train"
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "64Gi"}} in pod["volumes"]
    assert all(r["restartPolicy"] == "ExitCode" for r in replicas.values())
    # The job config the pods mount reads DeepSpeed's config from the same ConfigMap.
    config = next(
        o
        for o in gpu_objects
        if o["kind"] == "ConfigMap" and o["metadata"]["name"] == f"{job['metadata']['name']}-config"
    )["data"]
    ds = json.loads(config["deepspeed.json"])
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"] is True
    job_config = json.loads(config["job.json"])
    assert job_config[stage]["deepspeed"]["config"] == "/etc/argus/job/deepspeed.json"
    if stage == "sft":
        assert job["spec"]["runPolicy"]["backoffLimit"] == 10
        assert job["spec"]["runPolicy"]["activeDeadlineSeconds"] == 259200
    else:
        # Mini-batches of 32 prompts x 16 rollouts over 32 ranks, one episode per micro-batch: each of the
        # step's 8 updates accumulates 16 passes.
        assert ds["gradient_accumulation_steps"] == 16 and ds["train_micro_batch_size_per_gpu"] == 1
        # It starts from the SFT export and rolls out against the run's ToolEnvironment Services.
        assert job_config["model"].endswith("/deepeyesv2-7b-sft")
        assert job_config["sandbox_url"] == "http://deepeyesv2-7b-tools-sandbox.argus.svc.cluster.local:8080"
        assert job_config["search_url"] == "http://deepeyesv2-7b-tools-search.argus.svc.cluster.local:8090"
        assert job_config["rl"]["engine"] == "vllm" and job_config["rl"]["rollouts_per_prompt"] == 16
    tools = gpu_objects[0]["spec"]
    assert set(tools["node_pools"]) == {"h100-train", "cpu-tools", "h100-serve"}
    serving = gpu_objects[-1]
    assert serving["metadata"]["name"] == "deepeyesv2-7b-staging"
    assert serving["spec"]["node_pool"]["queue"] == "serve-h100"
    assert serving["spec"]["model_uri"].endswith("/deepeyesv2-7b-rl")  # the RL model is the candidate


def test_pytorchjob_round_trips_through_the_kubeflow_models(gpu_objects: list[dict[str, Any]]) -> None:
    from kubeflow.training import ApiClient, models

    job = next(o for o in gpu_objects if o["kind"] == "PyTorchJob" and o["metadata"]["name"].endswith("-rl"))

    class Response:  # what ApiClient.deserialize reads: the body as text
        data = json.dumps(job)

    parsed = ApiClient().deserialize(Response(), "KubeflowOrgV1PyTorchJob")
    assert isinstance(parsed, models.KubeflowOrgV1PyTorchJob)
    assert ApiClient().sanitize_for_serialization(parsed) == job


def test_invalid_objects_are_caught() -> None:
    """The checks above can fail: a bad field in each kind of object is reported."""
    tools = render(load_spec(REPO / "examples" / "deepeyesv2-7b.yaml"))[0]
    tools["spec"]["sandbox"]["runner"] = "docker"
    with pytest.raises(jsonschema.ValidationError):
        _validate(tools)
    with pytest.raises(kubernetes_validate.ValidationError):
        _validate_builtin({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "x"}, "dataa": {}})


def test_k8s_render_cli_prints_yaml_documents() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "argus.cli", "k8s", "render", str(REPO / "examples" / "deepeyesv2-7b.yaml")],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    assert [d["kind"] for d in yaml.safe_load_all(out)] == [
        "ToolEnvironment",
        "ConfigMap",
        "PyTorchJob",
        "ConfigMap",
        "PyTorchJob",
        "ModelServing",
    ]
    bad = subprocess.run(
        [sys.executable, "-m", "argus.cli", "k8s", "render", str(REPO / "README.md")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
