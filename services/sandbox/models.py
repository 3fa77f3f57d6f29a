"""Request and response models of every protocol the code-executor speaks (schemas: design notes §2)."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

SessionId = Annotated[str, Field(min_length=1, max_length=256)]
Timeout = Annotated[float, Field(gt=0)]

ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")


class _Request(BaseModel):
    # Real clients send extra fields we do not use; accept and ignore them rather than break a rollout.
    model_config = ConfigDict(extra="ignore")


# -- DeepEyesV2 / MultiModal-Jupyter-Sandbox v1 and v2 ---------------------------------------------


class JupyterRequest(_Request):
    session_id: SessionId
    code: str
    timeout: Timeout | None = None


class V1Output(BaseModel):
    result: str
    stdout: str
    stderr: str
    images: list[str] = Field(description="raw base64 PNG, no data: prefix")


class V1Response(BaseModel):
    status: Literal["success", "error"]
    execution_time: float
    output: V1Output


class V2Output(BaseModel):
    stdout: str
    stderr: str
    stdout_raw: str
    stderr_raw: str
    images: list[str] = Field(description="data:image/png;base64,... URIs")


class V2Response(BaseModel):
    status: Literal["success", "error"]
    execution_time: float
    output: V2Output


class ClearSessionRequest(_Request):
    session_id: SessionId


class ClearSessionResponse(BaseModel):
    status: Literal["success"] = "success"
    cleared: bool


# -- SandboxFusion ---------------------------------------------------------------------------------


class RunCodeRequest(_Request):
    code: str
    language: str = "python"
    compile_timeout: Timeout = 10.0
    run_timeout: Timeout = 10.0
    memory_limit_MB: int = -1  # SandboxFusion's field name
    stdin: str | None = None
    files: dict[str, str | None] = Field(default_factory=dict, description="path -> base64 content")
    fetch_files: list[str] = Field(default_factory=list)


class CommandRunResult(BaseModel):
    status: Literal["Finished", "Error", "TimeLimitExceeded"]
    execution_time: float | None
    return_code: int | None
    stdout: str | None
    stderr: str | None


class RunCodeResponse(BaseModel):
    status: Literal["Success", "Failed", "SandboxError"]
    message: str
    compile_result: CommandRunResult | None = None
    run_result: CommandRunResult | None
    executor_pod_name: str | None = None
    files: dict[str, str] = Field(default_factory=dict)


# -- Argus native ------------------------------------------------------------------------------------


class CreateSessionRequest(_Request):
    session_id: SessionId | None = None


class BackgroundProcess(BaseModel):
    """A process a cell started that was still running after the cell returned."""

    pid: int
    cmd: str
    cpu_s: float = Field(description="CPU seconds it has used, idle time of its session included")


class SessionInfo(BaseModel):
    session_id: str
    runner: str
    executions: int
    age_s: float
    idle_s: float
    background: list[BackgroundProcess] = Field(
        default_factory=list, description="processes its cells left running, as last seen"
    )


class ExecuteRequest(_Request):
    code: str
    timeout: Timeout | None = None
    background: Literal["leave", "kill"] | None = Field(
        None,
        description="processes the cell leaves running: leave them, or kill them when it returns "
        "(default: the service's after_cell setting)",
    )


class ExecuteError(BaseModel):
    ename: str
    evalue: str


class ExecuteResponse(BaseModel):
    status: Literal["ok", "error", "timeout", "died"]
    stdout: str
    stderr: str
    result: str | None
    images: list[str] = Field(description="raw base64 PNG")
    error: ExecuteError | None
    execution_time: float
    state_lost: bool
    background: list[BackgroundProcess] = Field(default_factory=list, description="left running by this cell")


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    runner: str
    sessions: int
    warm: int
    warming: int
    max_sessions: int
    queued: int = Field(description="calls waiting at capacity for a session slot")
    oneshot_ready: int = Field(description="pre-booted one-shot sandboxes idle for /run_code")
