"""`tool-environment`: the code executor and the search proxy the run's evaluations (and rollouts) call.

They are up for the block of `running(ctx, data)` and torn down when it ends, however it ends; a failed
run tears them down too, through the backend's `close`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from argus.backends.base import Backend, ToolEndpoints
from argus.config import PipelineSpec
from flows.context import RunContext
from flows.results import DataRef
from flows.runtime import transient


@task(name="tool-environment", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=5, retry_condition_fn=transient)
def tool_environment(backend: Backend, name: str, spec: PipelineSpec, data: DataRef) -> ToolEndpoints:
    endpoints = backend.tools_up(name, spec.tools, data.search)
    get_run_logger().info("code executor %s, search proxy %s", endpoints.sandbox_url, endpoints.search_url)
    return endpoints


@contextlib.contextmanager
def running(ctx: RunContext, data: DataRef) -> Iterator[ToolEndpoints]:
    name = f"{ctx.run}-tools"
    with ctx.stage("tool-environment"):
        endpoints = tool_environment(ctx.backend, name, ctx.spec, data)
    try:
        yield endpoints
    finally:
        ctx.backend.tools_down(name)
