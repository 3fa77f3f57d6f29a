"""Cluster manifests and images stay consistent with the code they deploy (no API server here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

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
