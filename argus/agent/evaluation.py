"""Evaluation with tools: a suite through the agent environment against a model's OpenAI endpoint.

Metrics per task family and overall, as the paper's behaviour analysis reports them: accuracy, format
rate, tool-call rate (share of trajectories that called any tool), tool mix (share of tool calls per
tool), mean turns, mean reward.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from argus.agent.env import AgentEnv, OpenAIPolicy, ToolClients, Trajectory
from argus.agent.task import Task

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


def metrics_table(
    results: Mapping[str, Mapping[str, Metrics | Mapping[str, Any]]],
) -> tuple[list[str], list[list[str]]]:
    """Evaluations of one suite as (columns, rows), task families first and `overall` last: the CLI tables
    and the Prefect table artifacts are all this. One evaluation (label → metrics per family) shows every
    metric; several, in order, compare accuracy and format rate, with the last one's tool use."""

    def get(m: Metrics | Mapping[str, Any], key: str) -> Any:
        return m[key] if isinstance(m, Mapping) else getattr(m, key)

    labels = list(results)
    last = results[labels[-1]]
    families = sorted(last, key=lambda f: (f == "overall", f))
    if len(labels) == 1:
        columns = ["family", "n", "accuracy", "format rate", "tool-call rate", "tool mix", "mean turns"]
        rows = [
            [
                family,
                str(get(m, "n")),
                f"{get(m, 'accuracy'):.3f}",
                f"{get(m, 'format_rate'):.3f}",
                f"{get(m, 'tool_call_rate'):.3f}",
                " ".join(f"{k} {v:.2f}" for k, v in get(m, "tool_mix").items()),
                f"{get(m, 'mean_turns'):.2f}",
            ]
            for family, m in ((f, last[f]) for f in families)
        ]
        return columns, rows
    final = labels[-1]
    columns = [
        "family",
        "n",
        *(f"{label} acc" for label in labels),
        *(f"{label} fmt" for label in labels),
        f"{final} tools",
        f"{final} turns",
    ]
    rows = [
        [
            family,
            str(get(last[family], "n")),
            *(f"{get(results[label][family], 'accuracy'):.3f}" for label in labels),
            *(f"{get(results[label][family], 'format_rate'):.3f}" for label in labels),
            f"{get(last[family], 'tool_call_rate'):.3f}",
            f"{get(last[family], 'mean_turns'):.2f}",
        ]
        for family in families
    ]
    return columns, rows


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
    *,
    base_url: str,
    model: str,
    sandbox_url: str,
    search_url: str,
    tasks: list[Task],
    max_turns: int = 9,
    max_tokens: int = 256,
    concurrency: int = 8,
    run_id: str = "eval",
    on_done: Callable[[Trajectory], None] = lambda _t: None,
    serve_s: float = 0.0,
) -> EvalRun:
    """Run the suite against a model server that is up (OpenAI API at `base_url`, serving `model`), with
    the code executor and the search proxy at their URLs. Serving the model is the caller's business
    (`serve_s` is how long that took, for the report)."""
    import time

    started = time.monotonic()
    trajectories = asyncio.run(
        evaluate(
            tasks,
            base_url=base_url,
            model=model,
            sandbox_url=sandbox_url,
            search_url=search_url,
            max_turns=max_turns,
            max_tokens=max_tokens,
            concurrency=concurrency,
            run_id=run_id,
            on_done=on_done,
        )
    )
    return EvalRun(trajectories, summarize(trajectories), serve_s, time.monotonic() - started)
