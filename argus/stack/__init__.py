"""The local platform stack (`argus stack up`): S3 endpoint, MLflow, Prefect server and worker, supervised.

`components` says what each component is; `supervisor` starts, watches and stops them; `s3server` is
the local S3 endpoint. The names below are what the CLI and the flows use.
"""

from argus.stack.components import Component, StackError, flow_env, worker_env
from argus.stack.supervisor import (
    ComponentStatus,
    StackState,
    down,
    effective_settings,
    read_state,
    status,
    up,
)

__all__ = [
    "Component",
    "ComponentStatus",
    "StackError",
    "StackState",
    "down",
    "effective_settings",
    "flow_env",
    "read_state",
    "status",
    "up",
    "worker_env",
]
