"""Argus custom resources: `ToolEnvironment` and `ModelServing` (group argus.dev, version v1alpha1).

Their specs embed the pipeline spec's own models (`SandboxSpec`, `SearchSpec`, `JudgeSpec`,
`NodePool`, `Resources`), so a field means the same in `pipeline.yaml`, in a custom resource and in the
operator that reconciles it; the CRDs' OpenAPI schemas are generated from these models (`crd()`), and
`manifests/base/crds/` holds that output.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from argus.config import DNS_LABEL, JudgeSpec, NodePool, Resources, SandboxSpec, SearchSpec

GROUP = "argus.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"


class _CR(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Condition(_CR):
    """A Kubernetes-style status condition."""

    type: str
    status: str = Field(pattern=r"^(True|False|Unknown)$")
    reason: str = ""
    message: str = ""
    last_transition_time: str | None = None


class Images(_CR):
    sandbox: str
    search: str
    vllm: str = "vllm/vllm-openai:v0.11.0"
    redis: str = "redis:7-alpine"


class ToolEnvironmentSpec(_CR):
    """The rollouts' tools on a cluster: sandbox executors on the training nodes, the search proxy, an
    optional LLM judge."""

    sandbox: SandboxSpec
    search: SearchSpec
    judge: JudgeSpec | None = None
    node_pools: dict[str, NodePool] = Field(default_factory=dict, description="the pools named above")
    images: Images
    run_id: str = Field(description="the pipeline run the tools serve (search budget, cache keys)")


class ToolEnvironmentStatus(_CR):
    ready: bool = False
    sandbox_url: str | None = None
    search_url: str | None = None
    judge_url: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


class ModelServingSpec(_CR):
    """One served model: a stable Service in front of blue-green revisions of a vLLM Deployment."""

    model_uri: str = Field(description="the model version's source (s3:// or hf://)")
    served_name: str
    revision: str = Field(pattern=DNS_LABEL, description="changing it starts a new revision beside the old")
    replicas: int = Field(1, ge=1)
    node_pool: NodePool | None = None
    resources: Resources = Field(default_factory=Resources)
    max_model_len: int | None = Field(None, ge=16)
    extra_args: list[str] = Field(default_factory=list)
    image: str = "vllm/vllm-openai:v0.11.0"


class ModelServingStatus(_CR):
    active_revision: str | None = None
    previous_revision: str | None = None
    ready_replicas: int = 0
    endpoint: str | None = None
    conditions: list[Condition] = Field(default_factory=list)


KINDS: dict[str, tuple[str, type[BaseModel], type[BaseModel], list[str]]] = {
    # kind: (plural, spec model, status model, short names)
    "ToolEnvironment": ("toolenvironments", ToolEnvironmentSpec, ToolEnvironmentStatus, ["toolenv"]),
    "ModelServing": ("modelservings", ModelServingSpec, ModelServingStatus, ["ms"]),
}


def custom_resource(kind: str, name: str, namespace: str, spec: BaseModel, labels: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": spec.model_dump(mode="json", exclude_none=True),
    }


# -- OpenAPI v3 structural schemas from pydantic's JSON schema -------------------------------------

_DROP = {"title", "$defs", "examples"}


def structural(schema: dict[str, Any], defs: dict[str, Any] | None = None) -> dict[str, Any]:
    """pydantic JSON schema → a Kubernetes structural schema: `$ref`s inlined, `X | None` as `nullable`,
    `Literal`s as `enum`s, no keywords the API server rejects."""
    defs = defs if defs is not None else schema.get("$defs", {})
    if "$ref" in schema:
        target = copy.deepcopy(defs[schema["$ref"].rsplit("/", 1)[-1]])
        extra = {k: v for k, v in schema.items() if k != "$ref"}
        return structural({**target, **extra}, defs)
    out: dict[str, Any] = {}
    any_of = schema.get("anyOf")
    if any_of is not None:
        options = [o for o in any_of if o.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"a union of {options} has no structural schema")
        out = structural(options[0], defs)
        if len(options) != len(any_of):
            out["nullable"] = True
        for key in ("description", "default"):
            if key in schema and schema[key] is not None:
                out[key] = schema[key]
        return out
    for key, value in schema.items():
        if key in _DROP or (key == "default" and value is None):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            # OpenAPI v3.0 (what CRDs speak): a bound plus a boolean, not JSON Schema 2020's number.
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "properties":
            out["properties"] = {k: structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out["items"] = structural(value, defs)
        elif key == "additionalProperties":
            if value is False:
                continue  # unknown fields are pruned by the API server (and refused by the operator)
            out["additionalProperties"] = structural(value, defs) if isinstance(value, dict) else value
        else:
            out[key] = value
    if "enum" in out and "type" not in out:
        out["type"] = "string" if all(isinstance(v, str) for v in out["enum"]) else "integer"
    if "properties" in out:
        out["type"] = "object"
    return out


def crd(kind: str) -> dict[str, Any]:
    plural, spec_model, status_model, short = KINDS[kind]
    spec_schema = structural(spec_model.model_json_schema(mode="serialization"))
    status_schema = structural(status_model.model_json_schema(mode="serialization"))
    columns = (
        [
            {"name": "Ready", "type": "boolean", "jsonPath": ".status.ready"},
            {"name": "Sandbox", "type": "string", "jsonPath": ".status.sandbox_url"},
        ]
        if kind == "ToolEnvironment"
        else [
            {"name": "Revision", "type": "string", "jsonPath": ".status.active_revision"},
            {"name": "Ready", "type": "integer", "jsonPath": ".status.ready_replicas"},
            {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint"},
        ]
    )
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {"kind": kind, "plural": plural, "singular": kind.lower(), "shortNames": short},
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": [
                        *columns,
                        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
                    ],
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema,
                                "status": status_schema,
                            },
                        }
                    },
                }
            ],
        },
    }
