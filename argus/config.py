"""Every configuration model Argus has: the pipeline spec (YAML) and the platform settings (env).

The pipeline spec is what a user writes (`examples/*.yaml`); `argus.specfile` loads it and turns
validation errors into `file:line: field.path: message`. Unknown keys are errors everywhere: a typo'd
key silently falling back to a default is the worst kind of config bug in a training platform.
The same models are the source of the Kubernetes CRD schemas, so keep them plain and serialisable.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# Kubernetes object names are built from spec names, so they must be DNS-1123 labels.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
# Kubernetes resource quantities ("8", "500m", "64Gi", "1.5G").
QUANTITY = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$"
URI = r"^(s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?|hf://[^\s]+|[^\s:]+|/[^\s]*)$"

Quantity = Annotated[str, Field(pattern=QUANTITY)]
Uri = Annotated[str, Field(pattern=URI, description="local path, s3://bucket/prefix or hf://org/name")]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------------
# Cluster placement
# --------------------------------------------------------------------------------------------------


class Toleration(StrictModel):
    key: str
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class NodePool(StrictModel):
    """A named group of nodes; jobs and services reference pools by name."""

    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    gpu_resource: str = "nvidia.com/gpu"
    gpus_per_node: int = Field(0, ge=0)
    queue: str | None = Field(None, description="Kueue LocalQueue that jobs on this pool join")


class Resources(StrictModel):
    """Per-replica requests (and limits, for GPUs)."""

    gpus: int = Field(0, ge=0)
    cpu: Quantity | None = None
    memory: Quantity | None = None
    shm: Quantity | None = Field(None, description="size of the /dev/shm volume (NCCL needs it)")


class KubernetesSettings(StrictModel):
    context: str | None = Field(None, description="kube context; the current one when unset")
    namespace: str = Field("argus", pattern=DNS_LABEL)
    image_registry: str = "ghcr.io/argus-platform"
    image_tag: str = "latest"


# --------------------------------------------------------------------------------------------------
# Model and data
# --------------------------------------------------------------------------------------------------


class ModelSource(StrictModel):
    """Where the base model comes from: a URI, or a tiny model built from a config (no download)."""

    uri: Uri | None = None
    init_tiny: Literal["qwen2", "qwen2_5_vl"] | None = None
    tiny_size: Literal["nano", "mini", "small"] = Field(
        "nano", description="with init_tiny: nano (tests), mini (the quickstart: pre-trained to copy) or small"
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSource:
        if (self.uri is None) == (self.init_tiny is None):
            raise ValueError("set exactly one of 'uri' or 'init_tiny'")
        if self.uri is not None and self.tiny_size != "nano":
            raise ValueError("'tiny_size' goes with 'init_tiny', not 'uri'")
        return self


class ModelSpec(StrictModel):
    base: ModelSource
    registered_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


# The miniature's scripted teachers (argus.data.tasks.TEACHERS): ada counts cells, bo labels blobs and
# checks its searches, cy counts cells and checks, dee labels blobs.
TeacherName = Literal["ada", "bo", "cy", "dee"]


class GenerateData(StrictModel):
    """Generate the miniature DeepEyesV2 task suite instead of reading datasets."""

    seed: int = 0
    sft_size: int = Field(200, ge=1)
    rl_size: int = Field(200, ge=1)
    eval_size: int = Field(60, ge=1)
    dev_size: int | None = Field(
        None, ge=1, description="the dev split (target distribution, its own entities; default: eval_size)"
    )
    teachers: dict[TeacherName, Annotated[float, Field(ge=0)]] | None = Field(
        None,
        description="each teacher's share of the demonstrations (unset: the suite's mix, argus.data.tasks."
        "DEMO_WEIGHTS); {ada: 1, bo: 1, cy: 1, dee: 1} is the even mix of benchmarks/rl_lift.py's sensitivity check",
    )

    @field_validator("teachers")
    @classmethod
    def _some_teacher(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None and sum(weights.values()) <= 0:
            raise ValueError("at least one teacher needs a positive share")
        return weights


class DataSpec(StrictModel):
    generate: GenerateData | None = None
    sft: Uri | None = Field(None, description="LLaMA-Factory sharegpt json")
    rl: Uri | None = Field(None, description="verl parquet")
    eval: Uri | None = Field(None, description="verl parquet (held out)")
    search_corpus: Uri | None = Field(None, description="offline search corpus (jsonl + images)")

    @model_validator(mode="after")
    def _one_source(self) -> DataSpec:
        given = [n for n in ("sft", "rl", "eval", "search_corpus") if getattr(self, n) is not None]
        if self.generate is not None and given:
            raise ValueError(f"'generate' and dataset URIs ({', '.join(given)}) are exclusive")
        if self.generate is None and not given:
            raise ValueError("set 'generate' or at least one dataset URI")
        return self


# --------------------------------------------------------------------------------------------------
# Training jobs
# --------------------------------------------------------------------------------------------------


class DeepSpeedSpec(StrictModel):
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    config: Uri | None = Field(None, description="a full DeepSpeed json that replaces the generated one")

    @model_validator(mode="after")
    def _offload_needs_zero3(self) -> DeepSpeedSpec:
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("offload_params needs zero_stage 3")
        return self


class OptimSpec(StrictModel):
    lr: float = Field(1e-5, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: Fraction = 0.03
    scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float = Field(1.0, gt=0)
    adam_beta1: float = Field(0.9, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="0.95 is the usual choice for small models and RL")


class CheckpointSpec(StrictModel):
    every_steps: int = Field(50, ge=1)
    keep_last: int = Field(2, ge=1)
    uri: Uri | None = Field(None, description="object-store prefix; s3://argus-checkpoints/<run> if unset")


class TrainingJobSpec(StrictModel):
    """What every training job shares; maps 1:1 onto a PyTorchJob (Master + Workers)."""

    enabled: bool = True
    nodes: int = Field(1, ge=1, description="PyTorchJob replicas (1 Master + nodes-1 Workers)")
    nproc_per_node: int = Field(1, ge=1)
    node_pool: str | None = None
    resources: Resources = Field(default_factory=Resources)
    image: str | None = Field(None, description="trainer image; the Argus trainer image if unset")
    precision: Literal["bf16", "fp16", "fp32"] = "bf16"
    seed: int = 0
    gradient_checkpointing: bool = Field(
        False,
        description="recompute each decoder layer's activations in backward instead of keeping them: "
        "the activations of a 16K-token 7B sequence shrink from ~50 GB to the layers' inputs, for ~1/3 more compute",
    )
    deepspeed: DeepSpeedSpec = Field(default_factory=DeepSpeedSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    backoff_limit: int = Field(3, ge=0, description="pod restarts before the job fails")
    active_deadline_seconds: int | None = Field(None, ge=1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.nproc_per_node


class CurveSpec(StrictModel):
    """A learning curve: every `every_steps` the trainer plays the first `tasks` held-out eval tasks with
    the model it is training (in-process generation, the real tools) and logs accuracy and format rate
    by family to its MLflow run. Off at 0; it needs the run's tool environment (the pipeline gives it)."""

    every_steps: int = Field(0, ge=0)
    tasks: int = Field(24, ge=1)
    max_turns: int = Field(6, ge=1)


class SFTSpec(TrainingJobSpec):
    epochs: float = Field(1.0, gt=0)
    micro_batch_size: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    max_seq_len: int = Field(4096, ge=16)
    length_buckets: bool = Field(False, description="micro-batches of similar length (less padding)")
    curve: CurveSpec = Field(default_factory=CurveSpec)

    def micro_batches_per_step(self, world_size: int) -> int:
        return self.grad_accum

    def deepspeed_config(self, *, cuda: bool, bf16_ok: bool, world_size: int = 1) -> dict[str, Any]:
        """The generated DeepSpeed config of this job: the trainer builds it for the device it finds, the
        Kubernetes renderer for GPU pods (it becomes the job's ConfigMap). `deepspeed.config` replaces it."""
        return _deepspeed_config(self, self.micro_batch_size, self.micro_batches_per_step(world_size), cuda, bf16_ok)


def _deepspeed_config(
    job: TrainingJobSpec, micro_batch_size: int, grad_accum: int, cuda: bool, bf16_ok: bool
) -> dict[str, Any]:
    """DeepSpeed json of a training job: ZeRO, precision and clipping from the spec."""
    zero: dict[str, Any] = {"stage": job.deepspeed.zero_stage}
    if job.deepspeed.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": cuda}
    if job.deepspeed.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": cuda}
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": job.optim.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": job.precision == "bf16" and bf16_ok},
        "fp16": {"enabled": job.precision == "fp16" and cuda},
        # AdamW from torch: the same optimizer with or without DeepSpeed, which the benchmark relies on.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class RewardSpec(StrictModel):
    """DeepEyesV2 reward: accuracy_weight * accuracy + format_weight * format."""

    accuracy_weight: Fraction = 0.8
    format_weight: Fraction = 0.2
    max_answer_chars: int = Field(300, ge=1)
    judge: bool = Field(False, description="score accuracy with the LLM judge instead of rules")

    @model_validator(mode="after")
    def _weights_sum_to_one(self) -> RewardSpec:
        if abs(self.accuracy_weight + self.format_weight - 1.0) > 1e-6:
            raise ValueError("accuracy_weight + format_weight must be 1.0")
        return self


# vLLM's CPU build takes its KV cache as a share of the machine's whole memory and writes all of it at
# start-up: 0.2 of 24 GiB is 4.7 GiB per server, of which a tiny model uses well under 1%. Four such
# servers on one machine (an evaluation beside a staging deployment, in two pipelines) were killed by the
# kernel's OOM killer. vLLM's --kv-cache-memory-bytes sizes it outright.
_KV_CACHE_WHY = "Set it where several servers share one machine's memory (vLLM's CPU build)."


def kv_cache_args(size: int) -> list[str]:
    """vLLM's server arguments for a KV cache of `size` bytes (the cluster's Deployment and a local server)."""
    return ["--kv-cache-memory-bytes", str(size)]


class VLLMRolloutSpec(StrictModel):
    """The vLLM rollout engine (`rl.engine: vllm`): where its servers are and how far they may disagree
    with the trainer. Unset `urls`: every rank starts its own colocated server from the vLLM virtualenv
    (`ARGUS_VLLM_PYTHON`) on the model it trains."""

    urls: list[str] = Field(
        default_factory=list,
        description="running vLLM servers (OpenAI API, VLLM_SERVER_DEV_MODE=1, --logprobs-mode processed_logprobs, "
        "a filesystem shared with the trainer); rank r uses urls[r % len(urls)]; empty: one colocated server per rank",
    )
    memory_fraction: float = Field(
        0.2, gt=0, le=1, description="a colocated server's --gpu-memory-utilization (on CPU: its KV-cache share)"
    )
    kv_cache_memory: ByteSize | None = Field(
        None, gt=0, description=f"a colocated server's KV cache ('1GiB'); overrides memory_fraction. {_KV_CACHE_WHY}"
    )
    max_model_len: int = Field(4096, ge=64, description="a colocated server's context length")
    startup_timeout_s: float = Field(600.0, gt=0, description="for a colocated server to become ready")
    request_timeout_s: float = Field(600.0, gt=0, description="per generation request")
    concurrency: int = Field(64, ge=1, description="generation requests in flight per rank")
    probe_tolerance: float = Field(
        0.02,
        gt=0,
        description="largest mean |engine - trainer| log-probability on the probe sequence after a weight sync",
    )

    @field_validator("urls")
    @classmethod
    def _http_urls(cls, urls: list[str]) -> list[str]:
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s):// URL of a vLLM server")
        return urls


class FilterGroupsSpec(StrictModel):
    """DAPO's dynamic sampling (verl's `algorithm.filter_groups`): a group whose rollouts all earn the same
    reward has zero advantage and teaches nothing, so a rank that finds fewer than its share of groups
    with differing rewards rolls out more prompts, up to `max_batches` batches, and trains on the groups
    with signal first. Without it a step trains on whatever its prompts gave (the quickstart's SFT model
    solves most of its prompts every time: half to seven eighths of its groups were all-equal)."""

    enabled: bool = False
    max_batches: int = Field(
        3, ge=1, description="rollout batches a rank may play a step to find mixed groups (verl: max_num_gen_batches)"
    )


class RLSpec(TrainingJobSpec):
    """GRPO with multi-turn tool rollouts, DeepEyesV2's settings where it has them (verl's agent loop)."""

    enabled: bool = False
    algorithm: Literal["grpo"] = "grpo"
    rollouts_per_prompt: int = Field(16, ge=2, description="GRPO group size (n)")
    max_turns: int = Field(9, ge=1)
    prompts_per_step: int = Field(64, ge=1, description="prompts rolled out per step, over all ranks")
    mini_batch_prompts: int | None = Field(
        None,
        ge=1,
        description="prompts per optimizer update (verl's ppo_mini_batch_size): a step's rollouts give "
        "prompts_per_step / mini_batch_prompts updates; unset: one update per step",
    )
    epochs: float = Field(1.0, gt=0, description="passes over the RL split (max_steps overrides)")
    micro_batch_size: int = Field(1, ge=1, description="episodes per forward/backward pass")
    kl_coef: float = Field(0.0, ge=0, description="KL to the frozen start model; 0 (DeepEyesV2) loads none")
    clip_ratio: float = Field(0.2, gt=0, lt=1)
    temperature: float = Field(1.0, gt=0)
    max_turn_tokens: int = Field(512, ge=8, description="tokens one turn may generate")
    max_response_tokens: int = Field(2048, ge=16, description="generated tokens per episode; beyond: masked")
    engine: Literal["in-process", "vllm"] = Field("in-process", description="rollout engine")
    vllm: VLLMRolloutSpec = Field(default_factory=VLLMRolloutSpec, description="the vLLM engine's servers")
    tool_timeout_s: float = Field(30.0, gt=0, description="per tool call")
    episode_timeout_s: float = Field(300.0, gt=0, description="per episode; past it the episode is masked")
    filter_groups: FilterGroupsSpec = Field(
        default_factory=FilterGroupsSpec,
        description="dynamic sampling: roll out more prompts to fill a step with groups that carry signal",
    )
    trajectories_every: int = Field(10, ge=0, description="log sampled trajectories every N steps (0: never)")
    reward: RewardSpec = Field(default_factory=RewardSpec)

    @model_validator(mode="after")
    def _mini_batches_divide_the_step(self) -> RLSpec:
        if self.mini_batch_prompts is not None and self.prompts_per_step % self.mini_batch_prompts:
            raise ValueError(
                f"mini_batch_prompts {self.mini_batch_prompts} does not divide prompts_per_step {self.prompts_per_step}"
            )
        return self

    @property
    def updates_per_step(self) -> int:
        """Optimizer updates made from one step's rollouts (DeepEyesV2: 256 / 32 = 8)."""
        return self.prompts_per_step // (self.mini_batch_prompts or self.prompts_per_step)

    def episodes_per_rank(self, world_size: int) -> int:
        if self.prompts_per_step % world_size:
            raise ValueError(f"prompts_per_step {self.prompts_per_step} is not a multiple of {world_size} ranks")
        return self.prompts_per_step // world_size * self.rollouts_per_prompt

    def episodes_per_update(self, world_size: int) -> int:
        """Episodes of one rank that go into one optimizer update."""
        mini = self.mini_batch_prompts or self.prompts_per_step
        if mini % world_size:
            raise ValueError(f"mini_batch_prompts {mini} is not a multiple of {world_size} ranks")
        return mini // world_size * self.rollouts_per_prompt

    def micro_batches_per_step(self, world_size: int) -> int:
        """Micro-batches accumulated into one optimizer update (DeepSpeed's gradient_accumulation_steps)."""
        return -(-self.episodes_per_update(world_size) // self.micro_batch_size)

    def deepspeed_config(self, *, cuda: bool, bf16_ok: bool, world_size: int = 1) -> dict[str, Any]:
        """As SFT's: each optimizer update accumulates its mini-batch's micro-batches."""
        return _deepspeed_config(self, self.micro_batch_size, self.micro_batches_per_step(world_size), cuda, bf16_ok)


# --------------------------------------------------------------------------------------------------
# Tool environment
# --------------------------------------------------------------------------------------------------


DEFAULT_KERNEL_PROFILE = "default"


def kernel_profiles_dir() -> Path:
    return repo_root() / "services" / "sandbox" / "profiles"


def kernel_profiles() -> list[str]:
    """Names of the kernel library profiles: one requirements file each."""
    return sorted(p.stem for p in kernel_profiles_dir().glob("*.txt"))


def kernel_env_dir(profile: str) -> Path:
    """Where scripts/setup.sh installs a profile's virtualenv."""
    suffix = "" if profile == DEFAULT_KERNEL_PROFILE else f"-{profile}"
    return repo_root() / f".venv-sandbox{suffix}"


DEFAULT_WARM_POOL = 4


def check_kernel_profile(name: str) -> str:
    known = kernel_profiles()
    if name not in known:
        raise ValueError(f"unknown kernel profile {name!r} (known: {', '.join(known)})")
    return name


class SandboxSpec(StrictModel):
    runner: Literal["gvisor", "process"] = "gvisor"
    profile: str = Field(DEFAULT_KERNEL_PROFILE, description="kernel library profile (services/sandbox/profiles)")
    timeout_s: float = Field(30.0, gt=0)
    memory_mb: int = Field(1024, ge=64)
    cpus: float = Field(1.0, gt=0)
    pids: int = Field(128, ge=8)
    max_sessions: int = Field(64, ge=1)
    warm_pool: int | None = Field(
        None,
        ge=0,
        description=f"booted sandboxes kept ready; default: the RL group size when RL runs, else {DEFAULT_WARM_POOL}",
    )
    warm_parallel: int = Field(4, ge=1, description="sandboxes booted at once while the warm pool refills")
    admission_timeout_s: float = Field(20.0, ge=0, description="at capacity, how long a call waits for a session")
    oneshot_pool: int = Field(4, ge=0, description="pre-booted sandboxes serving /run_code")
    idle_ttl_s: float = Field(600.0, gt=0)
    preload: list[str] | None = Field(
        None,
        description="modules warm sandboxes import ahead of time (default: the service's, numpy and PIL.Image); "
        "name what the policy's code imports in every episode, so no episode pays for the import",
    )
    node_pool: str | None = None

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str) -> str:
        return check_kernel_profile(name)

    @field_validator("preload")
    @classmethod
    def _module_names(cls, modules: list[str] | None) -> list[str] | None:
        for name in modules or []:
            if not all(part.isidentifier() for part in name.split(".")):
                raise ValueError(f"{name!r} is not a module name")
        return modules

    def service_env(self) -> dict[str, str]:
        """The code executor's settings (`SandboxSettings`, read from `ARGUS_SANDBOX_*`) for this spec: the
        local backend and the ToolEnvironment operator start the service with exactly these."""
        return {
            "ARGUS_SANDBOX_RUNNER": self.runner,
            "ARGUS_SANDBOX_PROFILE": self.profile,
            "ARGUS_SANDBOX_TIMEOUT_S": str(self.timeout_s),
            "ARGUS_SANDBOX_MEMORY_MB": str(self.memory_mb),
            "ARGUS_SANDBOX_CPUS": str(self.cpus),
            "ARGUS_SANDBOX_PIDS": str(self.pids),
            "ARGUS_SANDBOX_MAX_SESSIONS": str(self.max_sessions),
            "ARGUS_SANDBOX_WARM_POOL": str(DEFAULT_WARM_POOL if self.warm_pool is None else self.warm_pool),
            "ARGUS_SANDBOX_WARM_PARALLEL": str(self.warm_parallel),
            "ARGUS_SANDBOX_ADMISSION_TIMEOUT_S": str(self.admission_timeout_s),
            "ARGUS_SANDBOX_ONESHOT_POOL": str(self.oneshot_pool),
            "ARGUS_SANDBOX_IDLE_TTL_S": str(self.idle_ttl_s),
            **({"ARGUS_SANDBOX_PRELOAD": ",".join(self.preload)} if self.preload is not None else {}),
        }


class SearchSpec(StrictModel):
    provider: Literal["offline", "serpapi", "brave"] = Field("offline", description="where search results come from")
    cache_mode: Literal["live", "record", "replay", "cache-first"] = "cache-first"
    cache: Uri | None = Field(None, description="cache snapshot to import at start")
    budget_per_run: int | None = Field(None, ge=1, description="max upstream calls per run id")
    rate_limit_per_s: float = Field(5.0, gt=0)
    api_key_secret: str | None = Field(None, description="Secret (cluster) or file (local) with the API key")
    replicas: int = Field(1, ge=1)
    node_pool: str | None = None

    @model_validator(mode="after")
    def _live_providers_need_keys(self) -> SearchSpec:
        if self.provider != "offline" and self.cache_mode != "replay" and not self.api_key_secret:
            raise ValueError(f"provider '{self.provider}' needs 'api_key_secret' unless cache_mode is replay")
        return self

    def service_env(self) -> dict[str, str]:
        """The search proxy's settings (`SearchSettings`, read from `ARGUS_SEARCH_*`) for this spec, as the
        local backend and the ToolEnvironment operator start it. Where the cache and the index live, and
        the API key file, are the starter's business (a local file, Redis and a mounted Secret)."""
        env = {
            "ARGUS_SEARCH_PROVIDER": self.provider,
            "ARGUS_SEARCH_CACHE_MODE": self.cache_mode,
            "ARGUS_SEARCH_RATE_LIMIT_PER_S": str(self.rate_limit_per_s),
        }
        if self.budget_per_run:
            env["ARGUS_SEARCH_BUDGET_PER_RUN"] = str(self.budget_per_run)
        return env


class JudgeSpec(StrictModel):
    model: ModelSource
    node_pool: str | None = None
    resources: Resources = Field(default_factory=Resources)


class ToolsSpec(StrictModel):
    sandbox: SandboxSpec = Field(default_factory=SandboxSpec)
    search: SearchSpec = Field(default_factory=SearchSpec)
    judge: JudgeSpec | None = None


# --------------------------------------------------------------------------------------------------
# Evaluation, promotion, serving
# --------------------------------------------------------------------------------------------------


class EvalSuite(StrictModel):
    name: str = Field(pattern=DNS_LABEL)
    data: Uri | None = Field(None, description="eval parquet; the pipeline's eval split if unset")
    max_turns: int = Field(9, ge=1)
    limit: int | None = Field(None, ge=1, description="evaluate only the first N tasks")
    samples: int = Field(0, ge=0, le=64, description="pass@k: also sample each task k times at temperature 1")
    sample_limit: int | None = Field(None, ge=1, description="sample only the first N tasks (bounds the cost)")
    concurrency: int = Field(8, ge=1, description="episodes in flight against the server (greedy and sampled)")
    max_tokens: int = Field(256, ge=8, description="tokens one turn may generate")


class PromotionGate(StrictModel):
    """Staging metrics must clear this before production moves."""

    metric: Literal["accuracy", "format_rate"] = "accuracy"
    tolerance: float = Field(0.0, ge=0, description="allowed drop below production's value")
    min_accuracy: Fraction = 0.0
    min_format_rate: Fraction = 0.0


class EvalSpec(StrictModel):
    suites: list[EvalSuite] = Field(min_length=1)
    gate: PromotionGate = Field(default_factory=PromotionGate)

    @field_validator("suites")
    @classmethod
    def _unique_names(cls, suites: list[EvalSuite]) -> list[EvalSuite]:
        names = [s.name for s in suites]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate suite names: {', '.join(dupes)}")
        return suites


class ServingTarget(StrictModel):
    replicas: int = Field(1, ge=1)
    node_pool: str | None = None
    resources: Resources = Field(default_factory=Resources)
    max_model_len: int | None = Field(None, ge=16)
    kv_cache_memory: ByteSize | None = Field(
        None,
        gt=0,
        description=f"KV cache per server ('1GiB'); unset: vLLM sizes it from its memory share. {_KV_CACHE_WHY}",
    )
    extra_args: list[str] = Field(default_factory=list, description="extra vLLM server arguments")

    def server_args(self) -> list[str]:
        """The vLLM server arguments this target adds to the model and its name, as the cluster's vLLM
        Deployment takes them (the local server takes the KV cache as a field, in place of its share)."""
        return [*(kv_cache_args(self.kv_cache_memory) if self.kv_cache_memory else []), *self.extra_args]


class ServingSpec(StrictModel):
    engine: Literal["vllm"] = "vllm"
    promote_to: Literal["none", "staging", "production"] = Field(
        "none", description="how far the pipeline promotes its candidate"
    )
    staging: ServingTarget = Field(default_factory=ServingTarget)
    production: ServingTarget = Field(default_factory=ServingTarget)


# --------------------------------------------------------------------------------------------------
# The pipeline spec
# --------------------------------------------------------------------------------------------------


Prompt = Literal["deepeyesv2", "compact"]


class PipelineSpec(StrictModel):
    version: Literal[1] = 1
    name: str = Field(pattern=DNS_LABEL)
    backend: Literal["local", "kubernetes"] = "local"
    prompt: Prompt = Field(
        "deepeyesv2",
        description="the prompt of training, evaluation and RL: DeepEyesV2's verbatim, or compact (miniatures)",
    )
    kubernetes: KubernetesSettings = Field(default_factory=KubernetesSettings)
    node_pools: dict[Annotated[str, Field(pattern=DNS_LABEL)], NodePool] = Field(default_factory=dict)
    model: ModelSpec
    data: DataSpec
    sft: SFTSpec = Field(default_factory=SFTSpec)
    rl: RLSpec = Field(default_factory=RLSpec)
    tools: ToolsSpec = Field(default_factory=ToolsSpec)
    eval: EvalSpec
    serving: ServingSpec = Field(default_factory=ServingSpec)

    @model_validator(mode="after")
    def _warm_pool_fits_a_rollout_group(self) -> PipelineSpec:
        # An RL step's reset opens one session per rollout of a group at once: keep that many ready.
        if self.tools.sandbox.warm_pool is not None:
            return self
        pool = self.rl.rollouts_per_prompt if self.rl.enabled else DEFAULT_WARM_POOL
        sandbox = self.tools.sandbox.model_copy(update={"warm_pool": pool})
        return self.model_copy(update={"tools": self.tools.model_copy(update={"sandbox": sandbox})})

    def placement_refs(self) -> list[tuple[tuple[str | int, ...], str | None, int]]:
        """(field path, node pool name, GPUs per replica) for everything that is scheduled."""
        refs: list[tuple[tuple[str | int, ...], str | None, int]] = [
            (("sft",), self.sft.node_pool, self.sft.resources.gpus),
            (("rl",), self.rl.node_pool, self.rl.resources.gpus),
            (("tools", "sandbox"), self.tools.sandbox.node_pool, 0),
            (("tools", "search"), self.tools.search.node_pool, 0),
            (("serving", "staging"), self.serving.staging.node_pool, self.serving.staging.resources.gpus),
            (("serving", "production"), self.serving.production.node_pool, self.serving.production.resources.gpus),
        ]
        if self.tools.judge is not None:
            refs.append((("tools", "judge"), self.tools.judge.node_pool, self.tools.judge.resources.gpus))
        return refs


def semantic_errors(spec: PipelineSpec) -> list[tuple[tuple[str | int, ...], str]]:
    """Cross-field checks that no single model can make; each error names the field it is about."""
    errors: list[tuple[tuple[str | int, ...], str]] = []
    enabled: dict[tuple[str | int, ...], bool] = {("sft",): spec.sft.enabled, ("rl",): spec.rl.enabled}
    for path, pool_name, gpus in spec.placement_refs():
        if not enabled.get(path, True):
            continue
        if pool_name is None:
            if spec.backend == "kubernetes" and path in (("sft",), ("rl",)):
                errors.append(((*path, "node_pool"), "a training job on the kubernetes backend needs a node pool"))
            continue
        pool = spec.node_pools.get(pool_name)
        if pool is None:
            known = ", ".join(sorted(spec.node_pools)) or "none defined"
            errors.append(((*path, "node_pool"), f"unknown node pool '{pool_name}' (node_pools: {known})"))
        elif gpus > pool.gpus_per_node:
            msg = f"asks for {gpus} GPUs but pool '{pool_name}' has {pool.gpus_per_node} per node"
            errors.append(((*path, "resources", "gpus"), msg))
    for path, job in ((("sft",), spec.sft), (("rl",), spec.rl)):
        if job.enabled and job.resources.gpus and job.nproc_per_node != job.resources.gpus:
            msg = (
                f"is {job.nproc_per_node} but the job asks for {job.resources.gpus} GPUs per node (one process per GPU)"
            )
            errors.append(((*path, "nproc_per_node"), msg))
    if spec.rl.enabled and spec.rl.reward.judge and spec.tools.judge is None:
        errors.append((("rl", "reward", "judge"), "is true but tools.judge is not configured"))
    if not spec.sft.enabled and not spec.rl.enabled:
        errors.append((("sft", "enabled"), "both sft and rl are disabled: the pipeline would train nothing"))
    elif not spec.sft.enabled:
        # DeepEyesV2's RL needs a cold-start model that already samples tool use: the pipeline's RL stage
        # starts from the SFT export.
        errors.append((("sft", "enabled"), "is false but rl is enabled: the RL stage starts from the SFT model"))
    if spec.backend == "kubernetes" and spec.data.generate is not None:
        # Generation plays gold trajectories through a local code executor and search proxy; the flows
        # image that runs the pipeline in the cluster carries neither (it drives the cluster, it computes
        # nothing), so the suite is generated once from a workstation and read from the object store.
        errors.append(
            (
                ("data", "generate"),
                "is not run in the cluster: generate the suite once with `argus data generate --out "
                "s3://<bucket>/<prefix>` and set data.sft/rl/eval/search_corpus to its sft/sft.json, "
                "rl/train.parquet, eval/eval.parquet and search/",
            )
        )
    if spec.backend == "kubernetes":
        errors += [
            (path, f"{uri!r} is a local path, which pods cannot read: use s3:// or hf://")
            for path, uri in _local_uris(spec)
        ]
    return errors


def _local_uris(spec: PipelineSpec) -> list[tuple[tuple[str | int, ...], str]]:
    uris: list[tuple[tuple[str | int, ...], str | None]] = [
        (("model", "base", "uri"), spec.model.base.uri),
        *((("data", name), getattr(spec.data, name)) for name in ("sft", "rl", "eval", "search_corpus")),
        *((("eval", "suites", i, "data"), suite.data) for i, suite in enumerate(spec.eval.suites)),
    ]
    return [(path, uri) for path, uri in uris if uri and "://" not in uri]


# --------------------------------------------------------------------------------------------------
# Platform settings (environment), not part of a pipeline spec
# --------------------------------------------------------------------------------------------------


class StackSettings(BaseSettings):
    """Where the platform services are. Unset endpoints mean 'run it locally with `argus stack up`'.

    Every field reads `ARGUS_<FIELD>` from the environment, e.g. `ARGUS_MLFLOW_PORT=5001`,
    `ARGUS_S3_ENDPOINT=http://minio.internal:9000`.
    """

    model_config = SettingsConfigDict(env_prefix="ARGUS_", extra="ignore")

    home: Path = Field(Path(".argus"), description="project-local state: stack data, logs, runs")
    host: str = "127.0.0.1"
    s3_port: int = Field(9000, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    prefect_port: int = Field(4200, ge=1, le=65535)
    worker_port: int = Field(4201, ge=1, le=65535, description="health endpoint of the local Prefect worker")
    work_pool: str = Field("argus-local", description="process work pool the local worker serves")
    serving_port: int = Field(8000, ge=1, le=65535, description="first port of the stable serving endpoints")

    s3_endpoint: str | None = Field(None, description="external S3/MinIO endpoint; local moto server if unset")
    s3_access_key: str = "argus"
    s3_secret_key: str = "argus-secret-key"
    s3_region: str = "us-east-1"
    mlflow_tracking_uri: str | None = Field(None, description="external MLflow; local server if unset")
    prefect_api_url: str | None = Field(None, description="external Prefect API; local server if unset")

    bucket_mlflow: str = "argus-mlflow"
    bucket_data: str = "argus-data"
    bucket_checkpoints: str = "argus-checkpoints"
    bucket_models: str = "argus-models"
    bucket_cache: str = "argus-cache"

    startup_timeout_s: float = Field(90.0, gt=0)
    tiny_model_cache: Path | None = Field(
        None, description="where built tiny base models are kept; <home>/models if unset (homes may share one)"
    )

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, home: Path) -> Path:
        return home.expanduser().absolute()

    @field_validator("s3_endpoint", "mlflow_tracking_uri", "prefect_api_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^\s/]+", value):
            raise ValueError(f"must be an http(s) URL, got {value!r}")
        return value.rstrip("/") if value else value

    @property
    def models_dir(self) -> Path:
        return (self.tiny_model_cache or self.home / "models").expanduser().absolute()

    @property
    def buckets(self) -> list[str]:
        return [self.bucket_mlflow, self.bucket_data, self.bucket_checkpoints, self.bucket_models, self.bucket_cache]

    @property
    def s3_url(self) -> str:
        return self.s3_endpoint or f"http://{self.host}:{self.s3_port}"

    @property
    def mlflow_url(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def prefect_url(self) -> str:
        return self.prefect_api_url or f"http://{self.host}:{self.prefect_port}/api"

    @classmethod
    def for_workload(cls) -> StackSettings:
        """Settings inside a job or service pod: the standard client variables win over ARGUS_* ones.

        Pods get the object store and MLflow the way every S3/MLflow client expects them
        (`AWS_ENDPOINT_URL_S3`, `AWS_ACCESS_KEY_ID`, ..., `MLFLOW_TRACKING_URI`), from a Secret and env.
        """
        import os

        standard: dict[str, Any] = {
            "s3_endpoint": os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("MLFLOW_S3_ENDPOINT_URL"),
            "s3_access_key": os.environ.get("AWS_ACCESS_KEY_ID"),
            "s3_secret_key": os.environ.get("AWS_SECRET_ACCESS_KEY"),
            "s3_region": os.environ.get("AWS_DEFAULT_REGION"),
            "mlflow_tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
        }
        return cls(**{k: v for k, v in standard.items() if v})

    def argus_env(self) -> dict[str, str]:
        """`ARGUS_*` variables that reproduce these settings in a child process (flows, workers)."""
        return {f"ARGUS_{k.upper()}": str(v) for k, v in self.model_dump().items() if v is not None}

    def client_env(self) -> dict[str, str]:
        """Environment a client (trainer, flow, user shell) needs to reach this stack."""
        return {
            "MLFLOW_TRACKING_URI": self.mlflow_url,
            "PREFECT_API_URL": self.prefect_url,
            "AWS_ENDPOINT_URL_S3": self.s3_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_url,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_DEFAULT_REGION": self.s3_region,
        }


def repo_root() -> Path:
    """The checkout (or installed tree) Argus runs from: the virtualenvs and prefect.yaml live there."""
    return Path(__file__).resolve().parents[1]


class SandboxSettings(BaseSettings):
    """The code-executor service (`argus sandbox serve`). Every field reads `ARGUS_SANDBOX_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="ARGUS_SANDBOX_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8080, ge=0, le=65535)
    runner: Literal["gvisor", "process"] = "gvisor"

    timeout_s: float = Field(30.0, gt=0, description="default per-call wall timeout")
    max_timeout_s: float = Field(300.0, gt=0, description="largest timeout a request may ask for")
    interrupt_grace_s: float = Field(2.0, gt=0, description="after an interrupt, wait this long before killing")
    memory_mb: int = Field(1024, ge=64)
    cpus: float = Field(1.0, gt=0)
    pids: int = Field(128, ge=8)
    scratch_mb: int = Field(256, ge=8, description="size of the session's tmpfs working directory")

    max_sessions: int = Field(64, ge=1)
    warm_pool: int = Field(
        DEFAULT_WARM_POOL, ge=0, description="booted, pre-imported sandboxes kept ready; size it to the burst"
    )
    warm_parallel: int = Field(4, ge=1, description="sandboxes booted at once while the warm pool refills")
    idle_ttl_s: float = Field(600.0, gt=0)
    after_cell: Literal["leave", "kill"] = Field(
        "leave",
        description="processes a cell leaves running: leave them (a Jupyter kernel and the reference sandbox do) "
        "or kill them when the cell returns; the native API may ask per call",
    )
    admission_timeout_s: float = Field(
        20.0, ge=0, description="at capacity, how long a call waits for a free session before 429/504"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429 at capacity")
    oneshot_pool: int = Field(
        4, ge=0, description="pre-booted sandboxes that serve /run_code, one forked run at a time (0: boot per run)"
    )
    # Measured per idle session (benchmarks/sandbox_bench.py, 2 cores): numpy + PIL 31 MB and a first
    # plt.show() of 1.1 s; adding matplotlib.pyplot 45 MB and 0.3 s. The default keeps the memory target.
    preload: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["numpy", "PIL.Image"],
        description="modules warm session sandboxes import ahead of time (comma-separated in the environment)",
    )

    max_output_chars: int = Field(65536, ge=256, description="stdout/stderr kept per call; the rest is cut")
    max_images: int = Field(10, ge=0, description="images kept per call, in order (DeepEyesV2 keeps up to 10)")
    max_image_bytes: int = Field(4 << 20, ge=1024)
    max_body_bytes: int = Field(64 << 20, ge=1024)
    max_code_chars: int = Field(
        32 << 20, ge=1, description="DeepEyesV2 clients inline the task image as base64 in the code"
    )

    state_dir: Path = Field(Path(".argus/sandbox"), description="runsc state, bundles, scratch of the process runner")
    runsc: str = "runsc"
    runsc_platform: str | None = Field(None, description="runsc --platform (default: runsc's own)")
    profile: str = Field(
        DEFAULT_KERNEL_PROFILE, description="kernel library profile: services/sandbox/profiles/<profile>.txt"
    )
    kernel_env: Path | None = Field(
        None, description="virtualenv kernels run in (default: the profile's, made by scripts/setup.sh)"
    )

    @field_validator("state_dir", "kernel_env")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        return path.expanduser().absolute() if path is not None else None

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, name: str) -> str:
        return check_kernel_profile(name)

    @field_validator("preload", mode="before")
    @classmethod
    def _module_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [m.strip() for m in value.split(",") if m.strip()]
        return value

    @property
    def kernel_env_path(self) -> Path:
        return self.kernel_env or kernel_env_dir(self.profile)

    @model_validator(mode="after")
    def _timeouts(self) -> SandboxSettings:
        if self.timeout_s > self.max_timeout_s:
            raise ValueError("timeout_s must not exceed max_timeout_s")
        return self


class SearchSettings(BaseSettings):
    """The search proxy (`argus search serve`). Every field reads `ARGUS_SEARCH_<FIELD>`."""

    model_config = SettingsConfigDict(env_prefix="ARGUS_SEARCH_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8090, ge=0, le=65535)
    provider: Literal["offline", "serpapi", "brave"] = "offline"
    cache_mode: Literal["live", "record", "replay", "cache-first"] = "cache-first"
    cache_store: Literal["sqlite", "redis"] = "sqlite"
    cache_path: Path = Field(Path(".argus/search/cache.sqlite"), description="sqlite cache file")
    redis_url: str = "redis://127.0.0.1:6379/0"
    index_path: Path = Field(Path(".argus/search/index.sqlite"), description="offline index (argus search index)")

    api_key: SecretStr | None = Field(None, description="upstream API key (prefer api_key_file)")
    api_key_file: Path | None = Field(None, description="file holding the API key, e.g. a mounted Secret")
    serpapi_url: str = "https://serpapi.com/search.json"
    brave_url: str = "https://api.search.brave.com/res/v1/web/search"
    image_bucket: str | None = Field(
        None, description="bucket for presigned image URLs (SerpAPI reverse image search needs a URL)"
    )

    rate_limit_per_s: float = Field(5.0, gt=0, description="upstream calls per second (token bucket)")
    rate_burst: int = Field(10, ge=1)
    max_concurrency: int = Field(16, ge=1, description="upstream calls in flight")
    retries: int = Field(3, ge=0, description="retries on upstream 429/5xx and transport errors")
    backoff_s: float = Field(0.5, ge=0)
    upstream_timeout_s: float = Field(20.0, gt=0)
    budget_per_run: int | None = Field(None, ge=1, description="upstream calls per run id (X-Argus-Run-Id)")

    max_query_chars: int = Field(2048, ge=1)
    max_top_k: int = Field(50, ge=1)
    max_image_bytes: int = Field(10 << 20, ge=1024)
    max_image_pixels: int = Field(
        25_000_000, ge=1, description="width x height an image may have; checked before it is decoded"
    )
    max_body_bytes: int = Field(16 << 20, ge=1024, description="request body limit, chunked bodies included")
    max_retrieve_queries: int = Field(256, ge=1, description="queries one /retrieve request may carry")
    client_concurrency: int = Field(
        4, ge=1, description="searches one client (X-Argus-Run-Id, else its address) has in flight at once"
    )

    @field_validator("cache_path", "index_path")
    @classmethod
    def _absolute(cls, path: Path) -> Path:
        return path.expanduser().absolute()

    def read_api_key(self) -> str | None:
        if self.api_key_file is not None:
            try:
                return self.api_key_file.read_text().strip() or None
            except OSError as exc:
                raise ValueError(f"cannot read api_key_file {self.api_key_file}: {exc.strerror}") from exc
        return self.api_key.get_secret_value() if self.api_key else None


class SFTJobConfig(StrictModel):
    """Everything one SFT job needs; a PyTorchJob pod reads it from a mounted file or ARGUS_JOB_CONFIG."""

    job_name: str = Field(pattern=DNS_LABEL)
    prompt: Prompt = Field("deepeyesv2", description="the prompt the dataset's conversations must start with")
    dataset: Uri = Field(description="sharegpt json")
    model: Uri = Field(description="base model directory (local or s3://)")
    checkpoint_uri: Uri = Field(description="prefix that receives step-N/ checkpoints")
    output_uri: Uri = Field(description="where the final Hugging Face model is exported")
    sft: SFTSpec = Field(default_factory=SFTSpec)
    mlflow_experiment: str = "argus"
    node_pool: str | None = None
    lineage: dict[str, str] = Field(default_factory=dict, description="extra tags for the MLflow run")
    curve_data: Uri | None = Field(None, description="eval parquet of the learning curve (sft.curve)")
    sandbox_url: str | None = Field(None, description="the run's code executor, for the learning curve")
    search_url: str | None = Field(None, description="the run's search proxy, for the learning curve")


class RLJobConfig(StrictModel):
    """Everything one RL job needs: the same contract as SFTJobConfig (file or ARGUS_JOB_CONFIG)."""

    job_name: str = Field(pattern=DNS_LABEL)
    prompt: Prompt = Field("deepeyesv2", description="the prompt the start model was trained with")
    dataset: Uri = Field(description="verl parquet of RL tasks")
    model: Uri = Field(description="start model directory, the SFT export (local or s3://)")
    checkpoint_uri: Uri = Field(description="prefix that receives step-N/ checkpoints")
    output_uri: Uri = Field(description="where the final Hugging Face model is exported")
    rl: RLSpec = Field(default_factory=lambda: RLSpec(enabled=True))
    mlflow_experiment: str = "argus"
    node_pool: str | None = None
    lineage: dict[str, str] = Field(default_factory=dict, description="extra tags for the MLflow run")
    sandbox_url: str = Field(description="the run's code executor (DeepEyesV2 v1 protocol)")
    search_url: str = Field(description="the run's search proxy")
    judge_url: str | None = Field(
        None, description="the LLM judge (OpenAI API serving model `judge`) that rl.reward.judge scores with"
    )

    @model_validator(mode="after")
    def _judge_reachable(self) -> RLJobConfig:
        if self.rl.reward.judge and not self.judge_url:
            raise ValueError("rl.reward.judge is true but the job has no judge_url (the tool environment serves none)")
        return self
