"""Evaluation with tools: a suite through the agent environment against a model's OpenAI endpoint.

Metrics per task family and overall, as the paper's behaviour analysis reports them: accuracy, format
rate, tool-call rate (share of trajectories that called any tool), tool mix (share of tool calls per
tool), mean turns, mean reward.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from argus.agent.env import AgentEnv, OpenAIPolicy, ToolClients, Trajectory
from argus.agent.task import Task
from argus.backends.base import Backend, ServingEndpoint, ToolEndpoints
from argus.config import ServingTarget

TOOLS = ("python", "search", "image_search")


@dataclass
class Metrics:
    n: int
    accuracy: float
    format_rate: float
    tool_call_rate: float
    mean_turns: float
    mean_reward: float
    tool_mix: dict[str, float] = field(default_factory=dict)

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{k}": float(v) for k, v in asdict(self).items() if k != "tool_mix"}
        out.update({f"{prefix}/tool_mix/{k}": v for k, v in self.tool_mix.items()})
        return out


def summarize(trajectories: list[Trajectory]) -> dict[str, Metrics]:
    """Metrics per family, and `overall`."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(t.family, []).append(t)
    groups["overall"] = list(trajectories)
    out = {}
    for name, group in sorted(groups.items()):
        n = len(group)
        rewards = [t.reward for t in group if t.reward is not None]
        calls: Counter[str] = Counter(c.tool for t in group for c in t.tool_calls if c.tool in TOOLS)
        total_calls = sum(calls.values())
        out[name] = Metrics(
            n=n,
            accuracy=sum(r.accuracy for r in rewards) / n if n else 0.0,
            format_rate=sum(r.format for r in rewards) / n if n else 0.0,
            tool_call_rate=sum(1 for t in group if any(c.tool in TOOLS for c in t.tool_calls)) / n if n else 0.0,
            mean_turns=sum(t.turns for t in group) / n if n else 0.0,
            mean_reward=sum(r.score for r in rewards) / n if n else 0.0,
            tool_mix={tool: calls[tool] / total_calls if total_calls else 0.0 for tool in TOOLS},
        )
    return out


async def evaluate(
    tasks: list[Task],
    *,
    base_url: str,
    model: str,
    sandbox_url: str,
    search_url: str,
    max_turns: int = 9,
    concurrency: int = 4,
    max_tokens: int = 512,
    code_timeout_s: float = 30.0,
    vision: bool = False,
    run_id: str = "eval",
    on_done: Callable[[Trajectory], None] = lambda _t: None,
) -> list[Trajectory]:
    policy = OpenAIPolicy(base_url, model, max_tokens=max_tokens, vision=vision)
    tools = ToolClients(sandbox_url, search_url, run_id=run_id)
    env = AgentEnv(tools, max_turns=max_turns, code_timeout_s=code_timeout_s)
    limit = asyncio.Semaphore(concurrency)

    async def one(task: Task) -> Trajectory:
        async with limit:
            traj = await env.run(task, policy)
        on_done(traj)
        return traj

    try:
        return list(await asyncio.gather(*(one(t) for t in tasks)))
    finally:
        await tools.aclose()
        await policy.aclose()


def metrics_table_rows(summary: dict[str, Metrics]) -> list[list[Any]]:
    return [
        [
            name,
            m.n,
            f"{m.accuracy:.3f}",
            f"{m.format_rate:.3f}",
            f"{m.tool_call_rate:.3f}",
            " ".join(f"{k} {v:.2f}" for k, v in m.tool_mix.items()),
            f"{m.mean_turns:.2f}",
        ]
        for name, m in summary.items()
    ]


@dataclass
class EvalRun:
    trajectories: list[Trajectory]
    summary: dict[str, Metrics]
    serve_s: float
    eval_s: float

    def report(self) -> dict[str, Any]:
        """Metrics and every trajectory as JSON (the MLflow artifact and `argus eval --out`)."""
        return {
            "metrics": {k: asdict(v) for k, v in self.summary.items()},
            "trajectories": [
                {
                    "task": t.task_id,
                    "family": t.family,
                    "finish": t.finish,
                    "reward": asdict(t.reward) if t.reward else None,
                    "turns": [m["content"] for m in t.messages[2:]],
                }
                for t in self.trajectories
            ],
        }


def evaluate_endpoint(
    endpoint: ServingEndpoint,
    *,
    tasks: list[Task],
    tools: ToolEndpoints,
    max_turns: int = 9,
    max_tokens: int = 256,
    concurrency: int = 8,
    run_id: str = "eval",
    on_done: Callable[[Trajectory], None] = lambda _t: None,
    serve_s: float = 0.0,
) -> EvalRun:
    """Run the suite against a model server that is already up (a staging deployment, say)."""
    import time

    started = time.monotonic()
    trajectories = asyncio.run(
        evaluate(
            tasks,
            base_url=endpoint.base_url,
            model=endpoint.served_name,
            sandbox_url=tools.sandbox_url,
            search_url=tools.search_url,
            max_turns=max_turns,
            max_tokens=max_tokens,
            concurrency=concurrency,
            run_id=run_id,
            on_done=on_done,
        )
    )
    return EvalRun(trajectories, summarize(trajectories), serve_s, time.monotonic() - started)


def evaluate_served(
    backend: Backend,
    *,
    name: str,
    model_uri: str,
    tasks: list[Task],
    tools: ToolEndpoints,
    target: ServingTarget | None = None,
    max_turns: int = 9,
    max_tokens: int = 256,
    concurrency: int = 8,
    run_id: str = "eval",
    on_done: Callable[[Trajectory], None] = lambda _t: None,
) -> EvalRun:
    """Serve the model through the backend (vLLM), run the suite against it with the tools live, and
    remove the server again."""
    import time

    started = time.monotonic()
    endpoint = backend.deploy(name, model_uri, target or ServingTarget(), served_name="model")
    try:
        return evaluate_endpoint(
            endpoint,
            tasks=tasks,
            tools=tools,
            max_turns=max_turns,
            max_tokens=max_tokens,
            concurrency=concurrency,
            run_id=run_id,
            on_done=on_done,
            serve_s=time.monotonic() - started,
        )
    finally:
        backend.remove(name)
