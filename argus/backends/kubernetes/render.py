"""Every Kubernetes object a pipeline run creates, built from the spec (`argus k8s render`, and what the
Kubernetes backend submits).

Training jobs are Kubeflow `PyTorchJob`s built with `kubeflow-training`'s model classes: a Master and
`nodes - 1` Workers, `nprocPerNode` processes per pod started by `torchrun` (which reads the `PET_*`
variables the training operator sets), the spec's node pool as nodeSelector + tolerations, the pool's
Kueue queue as a label, restart policy `ExitCode` (a preempted pod exits with a retryable code, is
restarted and resumes from its newest checkpoint), and the job config plus its DeepSpeed config in a
ConfigMap. Object-store and MLflow settings come from the `argus-stack` ConfigMap and the
`argus-object-store` Secret that `manifests/base` creates.
"""

from __future__ import annotations

import json
from typing import Any

from kubeflow.training import models as km
from kubernetes import client as k8s

from argus import tracking
from argus.backends.base import ToolEndpoints, TrainingJob
from argus.backends.jobs import rl_job, sft_job
from argus.backends.kubernetes.crds import Images, ModelServingSpec, ToolEnvironmentSpec, custom_resource
from argus.config import NodePool, PipelineSpec, Resources, RLJobConfig, ServingTarget, SFTJobConfig, StackSettings

STACK_CONFIGMAP = "argus-stack"
OBJECT_STORE_SECRET = "argus-object-store"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
CONFIG_DIR = "/etc/argus/job"
# The stack's in-cluster addresses (manifests/base): what pods and the flows' worker use.
CLUSTER_SETTINGS = StackSettings.model_validate(
    {
        "s3_endpoint": "http://minio.argus.svc.cluster.local:9000",
        "mlflow_tracking_uri": "http://mlflow.argus.svc.cluster.local:5000",
        "prefect_api_url": "http://prefect.argus.svc.cluster.local:4200/api",
    }
)

_api = k8s.ApiClient()


def to_dict(obj: Any) -> dict[str, Any]:
    """A kubernetes / kubeflow model object as the JSON the API server receives."""
    out: dict[str, Any] = _api.sanitize_for_serialization(obj)
    return out


def image(spec: PipelineSpec, name: str) -> str:
    return f"{spec.kubernetes.image_registry}/argus-{name}:{spec.kubernetes.image_tag}"


def _pool(spec: PipelineSpec, name: str | None) -> NodePool | None:
    return spec.node_pools[name] if name else None


def _placement(pool: NodePool | None) -> dict[str, Any]:
    if pool is None:
        return {}
    return {
        "node_selector": dict(pool.node_selector) or None,
        "tolerations": [k8s.V1Toleration(**t.model_dump(exclude_none=True)) for t in pool.tolerations] or None,
    }


def resource_requirements(res: Resources, pool: NodePool | None) -> dict[str, dict[str, str]]:
    """`resources` of a container for one replica (JSON): also what the operators put on vLLM pods."""
    requests: dict[str, str] = {}
    limits: dict[str, str] = {}
    if res.cpu:
        requests["cpu"] = res.cpu
    if res.memory:
        requests["memory"] = limits["memory"] = res.memory
    if res.gpus:
        gpu = pool.gpu_resource if pool else "nvidia.com/gpu"
        requests[gpu] = limits[gpu] = str(res.gpus)  # extended resources: requests must equal limits
    return {k: v for k, v in (("requests", requests), ("limits", limits)) if v}


def _job_model(config: dict[str, Any]) -> SFTJobConfig | RLJobConfig:
    return RLJobConfig.model_validate(config) if "rl" in config else SFTJobConfig.model_validate(config)


def cluster_job_config(config: dict[str, Any]) -> dict[str, Any]:
    """The job config as the pods read it: DeepSpeed's config from the mounted ConfigMap."""
    job = _job_model(config)
    section_name = "rl" if isinstance(job, RLJobConfig) else "sft"
    section = getattr(job, section_name)
    if section.deepspeed.config is not None:
        return job.model_dump(mode="json")
    deepspeed = section.deepspeed.model_copy(update={"config": f"{CONFIG_DIR}/deepspeed.json"})
    return job.model_copy(update={section_name: section.model_copy(update={"deepspeed": deepspeed})}).model_dump(
        mode="json"
    )


def job_configmap(job: TrainingJob, namespace: str) -> k8s.V1ConfigMap:
    data = {"job.json": json.dumps(cluster_job_config(job.config), indent=1, sort_keys=True)}
    parsed = _job_model(job.config)
    section = parsed.rl if isinstance(parsed, RLJobConfig) else parsed.sft
    if section.deepspeed.config is None:
        world = job.nodes * job.nproc_per_node
        data["deepspeed.json"] = json.dumps(
            section.deepspeed_config(cuda=True, bf16_ok=True, world_size=world), indent=1
        )
    return k8s.V1ConfigMap(
        api_version="v1",
        kind="ConfigMap",
        metadata=k8s.V1ObjectMeta(name=f"{job.name}-config", namespace=namespace, labels=job.labels or None),
        data=data,
    )


def _pod_template(job: TrainingJob, spec: PipelineSpec, image_ref: str) -> k8s.V1PodTemplateSpec:
    pool = _pool(spec, job.node_pool)
    volumes = [
        k8s.V1Volume(name="job-config", config_map=k8s.V1ConfigMapVolumeSource(name=f"{job.name}-config")),
    ]
    mounts = [k8s.V1VolumeMount(name="job-config", mount_path=CONFIG_DIR, read_only=True)]
    if job.resources.shm:
        # NCCL and the data loaders share memory through /dev/shm; the container default is 64 MiB.
        volumes.append(
            k8s.V1Volume(
                name="dshm", empty_dir=k8s.V1EmptyDirVolumeSource(medium="Memory", size_limit=job.resources.shm)
            )
        )
        mounts.append(k8s.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    container = k8s.V1Container(
        name="pytorch",  # the training operator's default container name
        image=image_ref,
        image_pull_policy="IfNotPresent",
        command=["torchrun", "-m", job.module, "--config", f"{CONFIG_DIR}/job.json"],
        env=[k8s.V1EnvVar(name="PYTHONUNBUFFERED", value="1")]
        + [k8s.V1EnvVar(name=k, value=v) for k, v in sorted(job.env.items())],
        env_from=[
            k8s.V1EnvFromSource(config_map_ref=k8s.V1ConfigMapEnvSource(name=STACK_CONFIGMAP)),
            k8s.V1EnvFromSource(secret_ref=k8s.V1SecretEnvSource(name=OBJECT_STORE_SECRET)),
        ],
        ports=[k8s.V1ContainerPort(name="pytorchjob-port", container_port=23456)],
        resources=k8s.V1ResourceRequirements(**resource_requirements(job.resources, pool)),
        volume_mounts=mounts,
    )
    return k8s.V1PodTemplateSpec(
        metadata=k8s.V1ObjectMeta(labels={**job.labels, "argus.dev/job": job.name}),
        spec=k8s.V1PodSpec(
            containers=[container],
            volumes=volumes,
            # Trainers reach the object store and MLflow, never the Kubernetes API.
            service_account_name="argus-workload",
            automount_service_account_token=False,
            **_placement(pool),
        ),
    )


def pytorchjob(job: TrainingJob, spec: PipelineSpec, namespace: str) -> km.KubeflowOrgV1PyTorchJob:
    pool = _pool(spec, job.node_pool)
    labels = dict(job.labels)
    if pool is not None and pool.queue:
        labels[QUEUE_LABEL] = pool.queue
    template = _pod_template(job, spec, job.image or image(spec, "trainer"))
    replicas = {"Master": km.KubeflowOrgV1ReplicaSpec(replicas=1, restart_policy="ExitCode", template=template)}
    if job.nodes > 1:
        replicas["Worker"] = km.KubeflowOrgV1ReplicaSpec(
            replicas=job.nodes - 1, restart_policy="ExitCode", template=template
        )
    return km.KubeflowOrgV1PyTorchJob(
        api_version="kubeflow.org/v1",
        kind="PyTorchJob",
        metadata=k8s.V1ObjectMeta(name=job.name, namespace=namespace, labels=labels),
        spec=km.KubeflowOrgV1PyTorchJobSpec(
            nproc_per_node=str(job.nproc_per_node),
            pytorch_replica_specs=replicas,
            run_policy=km.KubeflowOrgV1RunPolicy(
                backoff_limit=job.backoff_limit,
                clean_pod_policy="Running",
                ttl_seconds_after_finished=7 * 24 * 3600,
                active_deadline_seconds=job.active_deadline_seconds,
            ),
        ),
    )


SANDBOX_PORT = 8080
SEARCH_PORT = 8090
VLLM_PORT = 8000


def tool_urls(name: str, namespace: str, judge: bool = False) -> ToolEndpoints:
    """Where the pods of a namespace reach ToolEnvironment `name`: its sandbox Service routes to the
    executor on the caller's own node (internalTrafficPolicy Local), its search Service to the proxy, its
    judge Service (where it has a judge) to vLLM serving model `judge`."""
    svc = f"{namespace}.svc.cluster.local"
    return ToolEndpoints(
        sandbox_url=f"http://{name}-sandbox.{svc}:{SANDBOX_PORT}",
        search_url=f"http://{name}-search.{svc}:{SEARCH_PORT}",
        judge_url=f"http://{name}-judge.{svc}:{VLLM_PORT}/v1" if judge else None,
    )


def tool_environment(spec: PipelineSpec, name: str, namespace: str, run_id: str) -> dict[str, Any]:
    pools = {p for p in (spec.tools.sandbox.node_pool, spec.tools.search.node_pool) if p}
    if spec.tools.judge and spec.tools.judge.node_pool:
        pools.add(spec.tools.judge.node_pool)
    body = ToolEnvironmentSpec(
        sandbox=spec.tools.sandbox,
        search=spec.tools.search,
        judge=spec.tools.judge,
        node_pools={p: spec.node_pools[p] for p in sorted(pools)},
        images=Images(sandbox=image(spec, "sandbox"), search=image(spec, "search")),
        run_id=run_id,
    )
    return custom_resource("ToolEnvironment", name, namespace, body, {"argus.dev/spec": spec.name})


def serving_resource(
    spec: PipelineSpec,
    name: str,
    namespace: str,
    target: ServingTarget,
    model_uri: str,
    served_name: str,
    revision: str,
    labels: dict[str, str],
) -> dict[str, Any]:
    """A ModelServing for `target` (the one place a serving target becomes a resource)."""
    body = ModelServingSpec(
        model_uri=model_uri,
        served_name=served_name,
        revision=revision,
        replicas=target.replicas,
        node_pool=_pool(spec, target.node_pool),
        resources=target.resources,
        max_model_len=target.max_model_len,
        extra_args=target.server_args(),
    )
    return custom_resource("ModelServing", name, namespace, body, {"argus.dev/spec": spec.name, **labels})


def model_serving(spec: PipelineSpec, stage: str, model_uri: str, revision: str, namespace: str) -> dict[str, Any]:
    target = spec.serving.staging if stage == "staging" else spec.serving.production
    name = f"{spec.name}-{stage}"
    served = spec.model.registered_name
    return serving_resource(spec, name, namespace, target, model_uri, served, revision, {"argus.dev/stage": stage})


def render(spec: PipelineSpec, run_name: str | None = None) -> list[dict[str, Any]]:
    """The objects of one pipeline run, in the order they are created."""
    ns = spec.kubernetes.namespace
    run = run_name or spec.name
    settings = CLUSTER_SETTINGS
    data_root = f"s3://{settings.bucket_data}/{spec.name}"
    model = spec.model.base.uri or f"s3://{settings.bucket_models}/{spec.name}/base"
    objects: list[dict[str, Any]] = [tool_environment(spec, f"{run}-tools", ns, run)]
    if spec.sft.enabled:
        job = sft_job(
            spec,
            settings,
            name=f"{run}-sft",
            dataset=spec.data.sft or f"{data_root}/sft/sft.json",
            model=model,
            lineage={tracking.TAG_PIPELINE_RUN: run},
        )
        objects += [to_dict(job_configmap(job, ns)), to_dict(pytorchjob(job, spec, ns))]
    export = f"s3://{settings.bucket_models}/{spec.name}/{run}-sft"
    if spec.rl.enabled:
        # From the SFT export (or the base model when SFT is off), rolling out against the run's
        # ToolEnvironment: its node-local code executor and its search proxy.
        start = export if spec.sft.enabled else model
        job = rl_job(
            spec,
            settings,
            name=f"{run}-rl",
            dataset=spec.data.rl or f"{data_root}/rl/train.parquet",
            model=start,
            tools=tool_urls(f"{run}-tools", ns, judge=spec.tools.judge is not None),
            lineage={tracking.TAG_PIPELINE_RUN: run},
        )
        objects += [to_dict(job_configmap(job, ns)), to_dict(pytorchjob(job, spec, ns))]
        export = f"s3://{settings.bucket_models}/{spec.name}/{run}-rl"
    if spec.serving.promote_to != "none":
        objects.append(model_serving(spec, "staging", export, "r1", ns))
    if spec.serving.promote_to == "production":
        objects.append(model_serving(spec, "production", export, "r1", ns))
    return objects
