"""The `Backend`: where training jobs, tool environments and serving endpoints run.

Flows describe *what* runs (a `TrainingJob`, a tool environment from the spec's `tools`, a model to
serve) and call a backend; the backend decides *how*: local processes on this machine, or Kubeflow
PyTorchJobs, Argus custom resources and Services on a cluster. Both speak the same models below, so a
flow never knows which one it drives (the pattern of kubeflow/sdk's `backends/{kubernetes,localprocess}`).
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from argus.config import DNS_LABEL, Resources, ServingTarget, ToolsSpec
from argus.events import Event


class JobState(StrEnum):
    """PyTorchJob's condition types; the local backend reports the same ones."""

    CREATED = "Created"
    RUNNING = "Running"
    RESTARTING = "Restarting"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


class TrainingJob(BaseModel):
    """One distributed training job: a PyTorchJob on a cluster, a torchrun process tree locally."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=DNS_LABEL)
    module: str = Field(description="trainer program, run as `torchrun -m MODULE --config FILE`")
    config: dict[str, Any] = Field(description="the program's job config (SFTJobConfig, ...) as JSON")
    nodes: int = Field(1, ge=1)
    nproc_per_node: int = Field(1, ge=1)
    image: str | None = None
    node_pool: str | None = None
    resources: Resources = Field(default_factory=Resources)
    env: dict[str, str] = Field(default_factory=dict)
    backoff_limit: int = Field(0, ge=0, description="restarts after a failure; the trainer resumes each time")
    active_deadline_seconds: int | None = Field(None, ge=1)
    labels: dict[str, str] = Field(default_factory=dict)


class JobResult(BaseModel):
    name: str
    state: JobState
    restarts: int = 0
    message: str = ""
    log_tail: str = ""
    events: list[Event] = Field(default_factory=list, description="the last event of each kind seen")

    @property
    def succeeded(self) -> bool:
        return self.state is JobState.SUCCEEDED


class ToolEndpoints(BaseModel):
    sandbox_url: str
    search_url: str
    judge_url: str | None = None  # the LLM judge (OpenAI API, model `judge`), where the environment serves one


class ModelServer(BaseModel):
    """One model server, a *deployment* (a vLLM process locally, a ModelServing on a cluster). Clients of
    a served model use its `StableEndpoint`; evaluations and smoke tests talk to a server directly."""

    name: str
    model_uri: str
    served_name: str
    base_url: str = Field(description="OpenAI-compatible base URL, ending in /v1")


class StableEndpoint(BaseModel):
    """The address clients use; it points at one deployment at a time (nginx locally, a Service whose
    selector moves on a cluster)."""

    name: str
    url: str = Field(description="OpenAI-compatible base URL, ending in /v1")
    active: str | None = Field(None, description="the deployment it routes to")
    previous: str | None = None
    switched_at: float | None = None


class BackendError(RuntimeError):
    pass


class ToolsUnavailable(RuntimeError):
    """A tool service did not come up (it exited, or was not healthy in time): a retry may fix it."""


class Backend(ABC):
    """Training jobs, tool environments and serving endpoints, on one kind of infrastructure."""

    kind: str

    # -- training jobs ----------------------------------------------------------------------------

    @abstractmethod
    def submit(self, job: TrainingJob) -> None:
        """Start the job (a job of that name that already finished is replaced)."""

    @abstractmethod
    def follow(self, name: str, on_event: Callable[[Event], None]) -> JobResult:
        """Block until the job reaches Succeeded or Failed, passing each progress event on."""

    @abstractmethod
    def cancel(self, name: str) -> None:
        """Stop the job and everything it started."""

    @abstractmethod
    def logs(self, name: str, lines: int = 50) -> str: ...

    @abstractmethod
    def log_location(self, name: str) -> str:
        """Where a person reads the job's whole log (a file here, a `kubectl logs` command on a cluster)."""

    def run(self, job: TrainingJob, on_event: Callable[[Event], None] = lambda _e: None) -> JobResult:
        """Submit and follow; an interrupted follow (a cancelled flow, Ctrl-C) cancels the job."""
        self.submit(job)
        try:
            return self.follow(job.name, on_event)
        except BaseException:
            self.cancel(job.name)
            raise

    # -- tool environments ------------------------------------------------------------------------

    @abstractmethod
    def tools_up(self, name: str, tools: ToolsSpec, search_data_uri: str) -> ToolEndpoints:
        """Code executor + search proxy for rollouts and evaluation; `search_data_uri` holds
        `index.sqlite` (and the image-search cache) for the offline backend."""

    @abstractmethod
    def tools_down(self, name: str) -> None: ...

    @contextlib.contextmanager
    def tool_environment(self, name: str, tools: ToolsSpec, search_data_uri: str) -> Iterator[ToolEndpoints]:
        """`tools_up` for as long as the block runs, then `tools_down`, whatever the block raised."""
        endpoints = self.tools_up(name, tools, search_data_uri)
        try:
            yield endpoints
        finally:
            self.tools_down(name)

    # -- serving ----------------------------------------------------------------------------------

    @abstractmethod
    def deploy(
        self, name: str, model_uri: str, target: ServingTarget, served_name: str, *, keep: bool = False
    ) -> ModelServer:
        """Start a vLLM server for the model and return once `/health` and `/v1/models` answer.
        `keep`: the server outlives this backend object (serving), else `close()` stops it."""

    @abstractmethod
    def remove(self, name: str) -> None: ...

    @abstractmethod
    def deployments(self) -> list[ModelServer]:
        """Kept serving deployments that exist now."""

    @abstractmethod
    def switch(self, endpoint: str, to: ModelServer, model_version: str = "") -> StableEndpoint:
        """Route the stable endpoint to `to` without dropping a request; returns once new requests reach
        `to` and every request in flight on the old route has finished (the old deployment may go).
        `model_version` (`name/version`) is the registered version `to` serves, which the endpoint
        names in its answers where its router can add a header."""

    @abstractmethod
    def endpoint(self, name: str) -> StableEndpoint | None: ...

    @abstractmethod
    def endpoints(self) -> list[StableEndpoint]:
        """Every stable endpoint that exists now."""

    @abstractmethod
    def stop_serving(self) -> list[str]:
        """Stop every stable endpoint and kept deployment (`argus serving down`); returns what it stopped."""

    # -- lifecycle --------------------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Stop whatever this backend object started and still runs (jobs, tools, servers)."""
