"""Cluster manifests and images stay consistent with the code they deploy (no API server here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from argus.config import SandboxSettings, SearchSettings

REPO = Path(__file__).resolve().parents[2]
SANDBOX = REPO / "manifests" / "base" / "sandbox"
SEARCH = REPO / "manifests" / "base" / "search"


def docs(directory: Path) -> dict[str, dict[str, Any]]:
    """Objects of a kustomization, by kind, and by 'Kind/name' when a kind appears more than once."""
    out: dict[str, dict[str, Any]] = {}
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    for name in kustomization["resources"]:
        for doc in yaml.safe_load_all((directory / name).read_text()):
            assert {"apiVersion", "kind", "metadata"} <= set(doc), name
            out.setdefault(doc["kind"], doc)
            out[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return out


def test_every_yaml_file_parses() -> None:
    for path in (REPO / "manifests").rglob("*.yaml"):
        assert list(yaml.safe_load_all(path.read_text())), path


def test_sandbox_objects_reference_each_other() -> None:
    objs = docs(SANDBOX)
    ds, svc, netpol, rc = objs["DaemonSet"], objs["Service"], objs["NetworkPolicy"], objs["RuntimeClass"]
    pod = ds["spec"]["template"]
    labels = pod["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert svc["spec"]["selector"].items() <= labels.items()
    assert netpol["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    assert pod["spec"]["runtimeClassName"] == rc["metadata"]["name"] == "gvisor" and rc["handler"] == "runsc"
    assert svc["spec"]["internalTrafficPolicy"] == "Local"
    assert netpol["spec"]["egress"] == [] and set(netpol["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    (container,) = pod["spec"]["containers"]
    port_names = {p["name"] for p in container["ports"]}
    assert svc["spec"]["ports"][0]["targetPort"] in port_names
    assert container["args"][container["args"].index("--runner") + 1] == "process"  # gVisor does not nest


def test_sandbox_env_names_are_real_settings() -> None:
    fields = set(SandboxSettings.model_fields)
    container = docs(SANDBOX)["DaemonSet"]["spec"]["template"]["spec"]["containers"][0]
    dockerfile = (REPO / "images" / "sandbox" / "Dockerfile").read_text()
    names = [e["name"] for e in container["env"]] + re.findall(r"(ARGUS_SANDBOX_[A-Z_]+)=", dockerfile)
    assert names
    for name in names:
        assert name.removeprefix("ARGUS_SANDBOX_").lower() in fields, name


def test_search_objects_reference_each_other() -> None:
    objs = docs(SEARCH)
    deploy, redis_deploy = objs["Deployment/argus-search"], objs["Deployment/argus-search-redis"]
    for svc_name, dep in (("argus-search", deploy), ("argus-search-redis", redis_deploy)):
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert objs[f"Service/{svc_name}"]["spec"]["selector"].items() <= labels.items()
    pod = deploy["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    fields = set(SearchSettings.model_fields)
    dockerfile = (REPO / "images" / "search" / "Dockerfile").read_text()
    for name in [*env, *re.findall(r"(ARGUS_SEARCH_[A-Z_]+)=", dockerfile)]:
        assert name.removeprefix("ARGUS_SEARCH_").lower() in fields, name
    settings = SearchSettings(**{k.removeprefix("ARGUS_SEARCH_").lower(): v for k, v in env.items()})
    assert settings.redis_url.startswith("redis://argus-search-redis:6379")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    (volume,) = [v for v in pod["volumes"] if v["name"] == "api-key"]
    assert str(settings.api_key_file) == f"{mounts['api-key']}/{volume['secret']['items'][0]['path']}"


K8S_VERSION = "1.35.0"  # kubernetes<36: the API the client speaks
KUEUE_KINDS = {"ResourceFlavor", "ClusterQueue", "LocalQueue"}  # Kueue's CRDs are not installed here


def _validate_all(objects: list[dict[str, Any]]) -> list[str]:
    """Every object against the pinned Kubernetes OpenAPI schema (strict: unknown fields fail); returns
    the kinds that have no schema here."""
    import kubernetes_validate

    unchecked = []
    for obj in objects:
        if obj["kind"] in KUEUE_KINDS:
            assert obj["apiVersion"] == "kueue.x-k8s.io/v1beta1" and obj.get("spec") is not None, obj
            unchecked.append(obj["kind"])
            continue
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    return unchecked


@pytest.mark.parametrize("overlay", ["staging", "production"])
def test_overlays_build_and_validate(overlay: str) -> None:
    import subprocess

    built = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "manifests" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    objects = [d for d in yaml.safe_load_all(built) if d]
    kinds = {o["kind"] for o in objects}
    assert {"Namespace", "CustomResourceDefinition", "RuntimeClass", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    assert {"StatefulSet", "Deployment", "DaemonSet", "Service", "NetworkPolicy", "ConfigMap", "Job"} <= kinds
    assert set(_validate_all(objects)) == KUEUE_KINDS
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {("Deployment", "argus-operator"), ("Deployment", "prefect-worker"), ("Deployment", "mlflow")} <= names
    assert all(o["metadata"].get("namespace") in (None, "argus") for o in objects)
    worker = next(o for o in objects if o["metadata"]["name"] == "prefect-worker")
    assert worker["spec"]["replicas"] == (2 if overlay == "production" else 1)
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert bool(secrets) == (overlay == "staging")  # production's credentials are created out of band


def test_crds_file_is_the_generated_output() -> None:
    from argus.backends.kubernetes.crds import KINDS, crd

    committed = [d for d in yaml.safe_load_all((REPO / "manifests" / "base" / "crds" / "crds.yaml").read_text()) if d]
    assert committed == [crd(kind) for kind in KINDS], "run: argus k8s crds > manifests/base/crds/crds.yaml"


def test_operator_children_are_valid_and_use_real_settings() -> None:
    from argus.backends.kubernetes.crds import ModelServingSpec, ToolEnvironmentSpec
    from argus.backends.kubernetes.render import model_serving, tool_environment
    from argus.specfile import load_spec
    from operators.children import revision_deployment, stable_service, tool_environment_children

    spec = load_spec(REPO / "examples" / "deepeyesv2-7b.yaml")
    tools = ToolEnvironmentSpec.model_validate(tool_environment(spec, "r1-tools", "argus", "r1")["spec"])
    children = tool_environment_children("r1-tools", tools)
    serving = ModelServingSpec.model_validate(model_serving(spec, "production", "s3://m/v1", "r1", "argus")["spec"])
    children += [revision_deployment("p", serving), stable_service("p", "r1")]
    assert _validate_all(children) == []
    for child in children:
        for container in child.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
            for var in container.get("env", []):
                for prefix, settings in (("ARGUS_SANDBOX_", SandboxSettings), ("ARGUS_SEARCH_", SearchSettings)):
                    if var["name"].startswith(prefix):
                        assert var["name"].removeprefix(prefix).lower() in settings.model_fields, var["name"]


def test_dockerfiles_copy_what_exists_and_start_real_modules() -> None:
    import importlib.util

    for dockerfile in sorted((REPO / "images").glob("*/Dockerfile")):
        text = dockerfile.read_text()
        for line in re.findall(r"^COPY (.+)$", text, flags=re.MULTILINE):
            for source in line.split()[:-1]:
                assert (REPO / source).exists(), f"{dockerfile}: COPY {source}"
        for module in re.findall(r"-m\", \"([a-z_.]+)\"|import ([a-z_.]+)", text):
            name = next(m for m in module if m)
            if name.startswith(("operators", "trainers", "flows", "argus")):
                assert importlib.util.find_spec(name) is not None, f"{dockerfile}: {name}"
    assert {p.parent.name for p in (REPO / "images").glob("*/Dockerfile")} == {
        "trainer", "sandbox", "search", "operator", "flows"
    }  # fmt: skip


def test_a_kv_cache_size_reaches_the_vllm_server_in_place_of_the_memory_share() -> None:
    from argus.backends.kubernetes.crds import ModelServingSpec
    from argus.backends.kubernetes.render import model_serving
    from argus.config import PipelineSpec
    from argus.vllm_server import LocalVLLM
    from operators.children import revision_deployment

    doc = yaml.safe_load((REPO / "examples" / "deepeyesv2-7b.yaml").read_text())
    doc["serving"]["production"]["kv_cache_memory"] = "2GiB"
    spec = PipelineSpec.model_validate(doc)
    serving = ModelServingSpec.model_validate(model_serving(spec, "production", "s3://m/v1", "r1", "argus")["spec"])
    args = revision_deployment("p", serving)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--kv-cache-memory-bytes") + 1] == str(2 << 30)

    share = LocalVLLM("m", "m", Path("log")).command()
    sized = LocalVLLM("m", "m", Path("log"), kv_cache_bytes=512 << 20).command()
    assert share[share.index("--gpu-memory-utilization") + 1] == "0.2" and "--kv-cache-memory-bytes" not in share
    assert sized[sized.index("--kv-cache-memory-bytes") + 1] == str(512 << 20)
    assert "--gpu-memory-utilization" not in sized
