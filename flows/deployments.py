"""Prefect deployments of the Argus flows: work pools and what `prefect.yaml` registered."""

from __future__ import annotations

import asyncio
import copy
import os
import re
from pathlib import Path
from typing import Any

import yaml

# Pool name → worker type. The process pool is served by the local stack's worker; the Kubernetes
# pool by a Prefect Kubernetes worker in the cluster (manifests/base/prefect).
KUBERNETES_POOL = "argus-kubernetes"
POOL_TYPES = {"argus-local": "process", KUBERNETES_POOL: "kubernetes"}
# Flow-run pods keep stage results on a shared volume: a re-run (another pod) finds them and resumes.
FLOW_RESULTS_CLAIM = "argus-flow-results"
FLOW_RESULTS_PATH = "/var/lib/argus/results"


def pools_in(prefect_file: Path) -> list[str]:
    doc = yaml.safe_load(prefect_file.read_text())
    names = {d["work_pool"]["name"] for d in doc.get("deployments", []) if d.get("work_pool")}
    unknown = names - POOL_TYPES.keys()
    if unknown:
        raise ValueError(f"{prefect_file}: unknown work pool(s) {sorted(unknown)}; known: {sorted(POOL_TYPES)}")
    return sorted(names)


def base_job_template(kind: str, default: dict[str, Any]) -> dict[str, Any]:
    """The worker type's default template; flow-run pods on Kubernetes also get the stack's ConfigMap and
    the object store's Secret as environment, and the results volume."""
    if kind != "kubernetes":
        return default
    template = copy.deepcopy(default)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    container["envFrom"] = [
        {"configMapRef": {"name": "argus-stack"}},
        {"secretRef": {"name": "argus-object-store"}},
    ]
    container["volumeMounts"] = [{"name": "flow-results", "mountPath": FLOW_RESULTS_PATH}]
    pod["volumes"] = [{"name": "flow-results", "persistentVolumeClaim": {"claimName": FLOW_RESULTS_CLAIM}}]
    return template


async def _ensure(pools: list[str]) -> list[tuple[str, str]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.utilities import get_default_base_job_template_for_infrastructure_type

    out = []
    async with get_client() as client:
        for name in pools:
            kind = POOL_TYPES[name]
            template = base_job_template(kind, await get_default_base_job_template_for_infrastructure_type(kind) or {})
            try:
                pool = await client.read_work_pool(name)
            except ObjectNotFound:
                try:
                    await client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template))
                    out.append((name, "created"))
                except ObjectAlreadyExists:
                    out.append((name, "exists"))
                continue
            # A Kubernetes worker that starts first creates its pool with the plain default template.
            if pool.base_job_template != template:
                await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template))
                out.append((name, "updated"))
            else:
                out.append((name, "exists"))
    return out


def ensure_work_pools(prefect_file: Path, only: set[str] | None = None) -> list[tuple[str, str]]:
    """Create the pools the deployments name (the worker type decides the base job template), or bring
    an existing pool's template up to date."""
    return asyncio.run(_ensure([p for p in pools_in(prefect_file) if only is None or p in only]))


_ENV_REF = re.compile(r"\{\{\s*\$([A-Z_][A-Z0-9_]*)\s*\}\}")


def _resolve_env(value: Any) -> Any:
    """`{{ $NAME }}` references in prefect.yaml, filled from the environment at deploy time."""
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: os.environ.get(m.group(1), m.group(0)), value)
    if isinstance(value, dict):
        return {k: _resolve_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve_env(v) for v in value]
    return value


async def _apply(prefect_file: Path, version: str, only: set[str] | None) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.flows import load_flow_from_entrypoint
    from prefect.utilities.callables import parameter_schema

    doc = yaml.safe_load(prefect_file.read_text())
    names = []
    async with get_client() as client:
        for dep in doc.get("deployments", []):
            if only is not None and (dep.get("work_pool") or {}).get("name") not in only:
                continue
            entrypoint = str(prefect_file.parent / dep["entrypoint"])
            flow: Any = load_flow_from_entrypoint(entrypoint)
            flow_id = await client.create_flow_from_name(flow.name)
            pool = dep.get("work_pool") or {}
            await client.create_deployment(
                flow_id=flow_id,
                name=dep["name"],
                version=version,
                description=dep.get("description") or flow.description,
                entrypoint=dep["entrypoint"],
                work_pool_name=pool.get("name"),
                job_variables=_resolve_env(pool.get("job_variables") or {}),
                parameters=dep.get("parameters") or {},
                parameter_openapi_schema=parameter_schema(flow).model_dump_for_openapi(),
                enforce_parameter_schema=True,
                pull_steps=_resolve_env(dep.get("pull", doc.get("pull"))),
                tags=list(dep.get("tags") or []),
            )
            names.append(f"{flow.name}/{dep['name']}")
    return names


def register_flow_deployments(prefect_file: Path, version: str, only: set[str] | None = None) -> list[str]:
    """Register (create or update) every deployment of `prefect_file` (of the pools in `only`, if given),
    as `prefect deploy --all` would for deployments without build or push steps."""
    return asyncio.run(_apply(prefect_file, version, only))


def list_flow_deployments() -> list[dict[str, Any]]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.sorting import DeploymentSort, FlowSort

    with get_client(sync_client=True) as client:
        # Explicit limit and sort: this Prefect server rejects the client's null defaults.
        deployments = client.read_deployments(sort=DeploymentSort.NAME_ASC, limit=200)
        flows = {f.id: f.name for f in client.read_flows(sort=FlowSort.NAME_ASC, limit=200)}
    return [
        {
            "name": f"{flows.get(d.flow_id, '?')}/{d.name}",
            "pool": d.work_pool_name or "",
            "parameters": ", ".join(f"{k}={v}" for k, v in sorted(d.parameters.items())),
        }
        for d in sorted(deployments, key=lambda d: (flows.get(d.flow_id, ""), d.name))
    ]
