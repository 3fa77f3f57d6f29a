"""The objects an Argus custom resource owns, as pure functions of its spec (the operators apply them).

`ToolEnvironment` → sandbox executors (a DaemonSet on the sandbox's node pool under `runtimeClassName:
gvisor`, the `process` runner inside, a node-local Service), the search proxy (Deployment + Service, its
cache in Redis, the API key from a Secret), an optional LLM judge (vLLM serving model `judge`), and
default-deny NetworkPolicies. `ModelServing` → one vLLM Deployment per revision and a stable Service
whose selector names the active revision. Shapes follow `manifests/base/sandbox` and `.../search`.
"""

from __future__ import annotations

from typing import Any

from argus.backends.kubernetes.crds import ModelServingSpec, ToolEnvironmentSpec
from argus.backends.kubernetes.render import SANDBOX_PORT, SEARCH_PORT, VLLM_PORT, resource_requirements
from argus.config import NodePool, Resources

TOOLS_LABEL = "argus.dev/toolenv"
SERVING_LABEL = "argus.dev/modelserving"
REVISION_LABEL = "argus.dev/revision"
USES_TOOLS_LABEL = "argus.dev/uses-tools"  # trainer and evaluation pods carry it

_RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def _meta(name: str, labels: dict[str, str]) -> dict[str, Any]:
    return {"name": name, "labels": {**labels, "app.kubernetes.io/part-of": "argus"}}


def _placement(pool: NodePool | None) -> dict[str, Any]:
    if pool is None:
        return {}
    out: dict[str, Any] = {}
    if pool.node_selector:
        out["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        out["tolerations"] = [t.model_dump(exclude_none=True) for t in pool.tolerations]
    return out


def _probe(port: str, path: str) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": 5}


def _service(name: str, selector: dict[str, str], port: int, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(name, selector),
        "spec": {"selector": selector, "ports": [{"name": "http", "port": port, "targetPort": "http"}], **spec},
    }


def _env(values: dict[str, str | None]) -> list[dict[str, Any]]:
    return [{"name": k, "value": v} for k, v in values.items() if v is not None]


def tool_environment_children(name: str, spec: ToolEnvironmentSpec) -> list[dict[str, Any]]:
    sb, se = spec.sandbox, spec.search
    sandbox_labels = {TOOLS_LABEL: name, "app.kubernetes.io/name": "argus-sandbox"}
    search_labels = {TOOLS_LABEL: name, "app.kubernetes.io/name": "argus-search"}
    redis_labels = {TOOLS_LABEL: name, "app.kubernetes.io/name": "argus-search-redis"}
    nonroot = {
        "runAsNonRoot": True,
        "runAsUser": 65534,
        "runAsGroup": 65534,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    sandbox_pod = {
        "runtimeClassName": "gvisor",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": nonroot,
        **_placement(spec.node_pools.get(sb.node_pool) if sb.node_pool else None),
        "containers": [
            {
                "name": "sandbox",
                "image": spec.images.sandbox,
                # The pod is the gVisor sandbox: inside it, sessions are plain processes.
                "args": ["--runner", "process"],
                "ports": [{"name": "http", "containerPort": SANDBOX_PORT}],
                "env": _env({**sb.service_env(), "ARGUS_SANDBOX_RUNNER": "process"}),
                "readinessProbe": _probe("http", "/healthz"),
                "livenessProbe": {**_probe("http", "/healthz"), "periodSeconds": 20},
                "securityContext": _RESTRICTED,
                "volumeMounts": [
                    {"name": "state", "mountPath": "/var/lib/argus-sandbox"},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "state", "emptyDir": {"sizeLimit": "20Gi"}},
            {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
        ],
    }
    search_env: dict[str, str | None] = {
        **se.service_env(),
        "ARGUS_SEARCH_CACHE_STORE": "redis",
        "ARGUS_SEARCH_REDIS_URL": f"redis://{name}-search-redis:6379/0",
        "ARGUS_SEARCH_API_KEY_FILE": "/var/run/secrets/argus-search/api-key" if se.api_key_secret else None,
    }
    search_container: dict[str, Any] = {
        "name": "search",
        "image": spec.images.search,
        "ports": [{"name": "http", "containerPort": SEARCH_PORT}],
        "env": _env(search_env),
        "readinessProbe": _probe("http", "/healthz"),
        "securityContext": _RESTRICTED,
    }
    search_pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "securityContext": nonroot,
        **_placement(spec.node_pools.get(se.node_pool) if se.node_pool else None),
        "containers": [search_container],
    }
    if se.api_key_secret:
        search_container["volumeMounts"] = [
            {"name": "api-key", "mountPath": "/var/run/secrets/argus-search", "readOnly": True}
        ]
        search_pod["volumes"] = [
            {
                "name": "api-key",
                "secret": {"secretName": se.api_key_secret, "items": [{"key": "api-key", "path": "api-key"}]},
            }
        ]
    children: list[dict[str, Any]] = [
        {
            "apiVersion": "apps/v1",
            "kind": "DaemonSet",
            "metadata": _meta(f"{name}-sandbox", sandbox_labels),
            "spec": {
                "selector": {"matchLabels": sandbox_labels},
                "updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}},
                "template": {"metadata": {"labels": sandbox_labels}, "spec": sandbox_pod},
            },
        },
        # Node-local: a trainer reaches the executor of its own node, rollout images stay on the node.
        _service(f"{name}-sandbox", sandbox_labels, SANDBOX_PORT, internalTrafficPolicy="Local"),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(f"{name}-search-redis", redis_labels),
            "spec": {
                "replicas": 1,
                "selector": {"matchLabels": redis_labels},
                "template": {
                    "metadata": {"labels": redis_labels},
                    "spec": {
                        "automountServiceAccountToken": False,
                        "containers": [
                            {
                                "name": "redis",
                                "image": spec.images.redis,
                                "args": ["--appendonly", "yes"],
                                "ports": [{"name": "http", "containerPort": 6379}],
                            }
                        ],
                    },
                },
            },
        },
        _service(f"{name}-search-redis", redis_labels, 6379),
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": _meta(f"{name}-search", search_labels),
            "spec": {
                "replicas": se.replicas,
                "selector": {"matchLabels": search_labels},
                "template": {"metadata": {"labels": search_labels}, "spec": search_pod},
            },
        },
        _service(f"{name}-search", search_labels, SEARCH_PORT),
        *_network_policies(name, sandbox_labels, search_labels, redis_labels),
    ]
    if spec.judge is not None:
        judge_labels = {TOOLS_LABEL: name, "app.kubernetes.io/name": "argus-judge"}
        pool = spec.node_pools.get(spec.judge.node_pool) if spec.judge.node_pool else None
        model = spec.judge.model.uri or ""
        children += [
            _vllm_deployment(
                f"{name}-judge", judge_labels, spec.images.vllm, model, "judge", 1, pool, spec.judge.resources, []
            ),
            _service(f"{name}-judge", judge_labels, VLLM_PORT),
        ]
    return children


def _network_policies(
    name: str, sandbox: dict[str, str], search: dict[str, str], redis: dict[str, str]
) -> list[dict[str, Any]]:
    def policy(
        suffix: str, pods: dict[str, str], ingress: list[dict[str, Any]], egress: list[dict[str, Any]]
    ) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(f"{name}-{suffix}", {TOOLS_LABEL: name}),
            "spec": {
                "podSelector": {"matchLabels": pods},
                "policyTypes": ["Ingress", "Egress"],
                "ingress": ingress,
                "egress": egress,
            },
        }

    from_tool_users = [{"podSelector": {"matchLabels": {USES_TOOLS_LABEL: "true"}}}]
    dns = {
        "to": [{"namespaceSelector": {}}],
        "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
    }
    return [
        # Model-written code reaches nothing: the executors have no egress at all.
        policy(
            "sandbox", sandbox, [{"from": from_tool_users, "ports": [{"protocol": "TCP", "port": SANDBOX_PORT}]}], []
        ),
        policy(
            "search",
            search,
            [{"from": from_tool_users, "ports": [{"protocol": "TCP", "port": SEARCH_PORT}]}],
            [dns, {"to": [{"podSelector": {"matchLabels": redis}}]}, {"ports": [{"protocol": "TCP", "port": 443}]}],
        ),
        policy("search-redis", redis, [{"from": [{"podSelector": {"matchLabels": search}}]}], []),
    ]


def _vllm_deployment(
    name: str,
    labels: dict[str, str],
    image: str,
    model: str,
    served_name: str,
    replicas: int,
    pool: NodePool | None,
    resources: Resources,
    extra_args: list[str],
    max_model_len: int | None = None,
) -> dict[str, Any]:
    args = ["--model", model, "--served-model-name", served_name, "--port", str(VLLM_PORT)]
    if max_model_len:
        args += ["--max-model-len", str(max_model_len)]
    container: dict[str, Any] = {
        "name": "vllm",
        "image": image,
        "args": [*args, *extra_args],
        "ports": [{"name": "http", "containerPort": VLLM_PORT}],
        "envFrom": [{"configMapRef": {"name": "argus-stack"}}, {"secretRef": {"name": "argus-object-store"}}],
        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 5},
        "startupProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10, "failureThreshold": 180},
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    res = resource_requirements(resources, pool)
    if res:
        container["resources"] = res
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(name, labels),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    **_placement(pool),
                    "serviceAccountName": "argus-workload",
                    "automountServiceAccountToken": False,
                    "containers": [container],
                    "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}],
                },
            },
        },
    }


def revision_deployment(name: str, spec: ModelServingSpec) -> dict[str, Any]:
    labels = {SERVING_LABEL: name, REVISION_LABEL: spec.revision}
    return _vllm_deployment(
        f"{name}-{spec.revision}",
        labels,
        spec.image,
        spec.model_uri,
        spec.served_name,
        spec.replicas,
        spec.node_pool,
        spec.resources,
        list(spec.extra_args),
        spec.max_model_len,
    )


def stable_service(name: str, revision: str) -> dict[str, Any]:
    return _service(name, {SERVING_LABEL: name, REVISION_LABEL: revision}, VLLM_PORT)
