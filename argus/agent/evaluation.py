"""Evaluation with tools: a suite through the agent environment against a model's OpenAI endpoint.

Metrics per task family and overall, as the paper's behaviour analysis reports them: accuracy, format
rate, tool-call rate (share of trajectories that called any tool), tool mix (share of tool calls per
tool), mean turns, mean reward; and the same per slice (a task's template and cue), with how the tools
were used (`argus.agent.behaviour`): tool calls per episode, the repeat-call rate and the rate of each
strategy at each decision, greedy and, where the run samples, over the samples.
"""

from __future__ import annotations

import asyncio
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from argus.agent.behaviour import DECISIONS, behaviour_by, choices
from argus.agent.env import AgentEnv, OpenAIPolicy, ToolClients, Trajectory
from argus.agent.task import Task
from argus.config import Prompt

TOOLS = ("python", "search", "image_search")


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % by default): unlike the normal approximation it
    stays inside [0, 1] and is honest at 0 and n successes, which a small suite hits often."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mcnemar(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int, float]:
    """The exact McNemar test of two evaluations of the same tasks (paired by position): the tasks only
    the first solved, those only the second solved, and the two-sided p-value of a difference that large
    if neither were better (a binomial test on the discordant tasks, exact at the small counts a suite of
    150 gives)."""
    only_first = sum(1 for a, b in zip(first, second, strict=True) if a and not b)
    only_second = sum(1 for a, b in zip(first, second, strict=True) if b and not a)
    n, k = only_first + only_second, min(only_first, only_second)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n if n else 1.0
    return only_first, only_second, min(1.0, 2 * tail)


def with_interval(value: float, low: float, high: float) -> str:
    return f"{value:.3f} [{low:.2f}, {high:.2f}]"


@dataclass
class Metrics:
    n: int
    accuracy: float
    format_rate: float
    tool_call_rate: float
    mean_turns: float
    mean_reward: float
    tool_mix: dict[str, float] = field(default_factory=dict)
    accuracy_low: float = 0.0  # the 95 % Wilson interval of accuracy
    accuracy_high: float = 1.0
    tool_error_rate: float = 0.0  # the share of tool calls that failed (an error observation)
    # `argus.agent.behaviour` figures: tool calls per episode, repeat-call rate, strategy rates
    behaviour: dict[str, float] = field(default_factory=dict)

    def flat(self, prefix: str) -> dict[str, float]:
        out = {f"{prefix}/{k}": float(v) for k, v in asdict(self).items() if k not in ("tool_mix", "behaviour")}
        out.update({f"{prefix}/tool_mix/{k}": v for k, v in self.tool_mix.items()})
        out.update({f"{prefix}/{k}": v for k, v in self.behaviour.items()})
        return out


def by_family(t: Trajectory) -> str:
    return t.family


def by_slice(t: Trajectory) -> str:
    return t.slice or t.family


def _accuracy(t: Trajectory) -> float:
    return t.reward.accuracy if t.reward else 0.0


def behaviour_of(trajectories: Sequence[Trajectory], by: Callable[[Trajectory], str]) -> dict[str, dict[str, float]]:
    """`argus.agent.behaviour` figures per group (`by`) and overall."""
    return behaviour_by((by(t), t.messages, t.calls(), _accuracy(t)) for t in trajectories)


def summarize(trajectories: list[Trajectory], by: Callable[[Trajectory], str] = by_family) -> dict[str, Metrics]:
    """Metrics per group (family, or `by_slice`), and `overall`."""
    groups: dict[str, list[Trajectory]] = {}
    for t in trajectories:
        groups.setdefault(by(t), []).append(t)
    groups["overall"] = list(trajectories)
    behaviour = behaviour_of(trajectories, by)
    out = {}
    for name, group in sorted(groups.items()):
        n = len(group)
        rewards = [t.reward for t in group if t.reward is not None]
        calls: Counter[str] = Counter(c.tool for t in group for c in t.tool_calls if c.tool in TOOLS)
        total_calls = sum(calls.values())
        failed = sum(1 for t in group for c in t.tool_calls if c.tool in TOOLS and not c.ok)
        correct = sum(r.accuracy for r in rewards)
        low, high = wilson(correct, n)
        out[name] = Metrics(
            n=n,
            accuracy=correct / n if n else 0.0,
            accuracy_low=low,
            accuracy_high=high,
            format_rate=sum(r.format for r in rewards) / n if n else 0.0,
            tool_call_rate=sum(1 for t in group if any(c.tool in TOOLS for c in t.tool_calls)) / n if n else 0.0,
            mean_turns=sum(t.turns for t in group) / n if n else 0.0,
            mean_reward=sum(r.score for r in rewards) / n if n else 0.0,
            tool_mix={tool: calls[tool] / total_calls if total_calls else 0.0 for tool in TOOLS},
            tool_error_rate=failed / total_calls if total_calls else 0.0,
            behaviour=behaviour[name],
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
    prompt: Prompt = "deepeyesv2",
    temperature: float = 0.0,
    seed: int | None = None,
    on_done: Callable[[Trajectory], None] = lambda _t: None,
    limit: asyncio.Semaphore | None = None,
) -> list[Trajectory]:
    """Every task as one episode against the server. `limit` bounds the episodes in flight; several
    evaluations that share one (the greedy pass and the samples) keep the server busy together."""
    policy = OpenAIPolicy(base_url, model, max_tokens=max_tokens, vision=vision, temperature=temperature, seed=seed)
    tools = ToolClients(sandbox_url, search_url, run_id=run_id)
    env = AgentEnv(tools, max_turns=max_turns, code_timeout_s=code_timeout_s, prompt=prompt)
    in_flight = limit or asyncio.Semaphore(concurrency)

    async def one(task: Task) -> Trajectory:
        async with in_flight:
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
    """Evaluations of one suite as (columns, rows), `overall` first and then the task families: the CLI tables
    and the Prefect table artifacts are all this. One evaluation (label → metrics per family) shows every
    metric; several, in order, compare accuracy and format rate, with the last one's tool use."""

    def get(m: Metrics | Mapping[str, Any], key: str) -> Any:
        return m[key] if isinstance(m, Mapping) else getattr(m, key)

    def _accuracy(m: Metrics | Mapping[str, Any]) -> str:
        if get_or(m, "accuracy_low") is None:  # recorded before intervals were
            return f"{get(m, 'accuracy'):.3f}"
        return with_interval(get(m, "accuracy"), get(m, "accuracy_low"), get(m, "accuracy_high"))

    def get_or(m: Metrics | Mapping[str, Any], key: str) -> Any:
        return m.get(key) if isinstance(m, Mapping) else getattr(m, key, None)

    labels = list(results)
    last = results[labels[-1]]
    families = sorted(last, key=lambda f: (f != "overall", f))
    passes = sorted(
        {k for m in last.values() for k in (m if isinstance(m, Mapping) else {}) if k.startswith("pass_at_")},
        key=lambda k: int(k.rsplit("_", 1)[1]),
    )

    def pass_cells(m: Metrics | Mapping[str, Any]) -> list[str]:
        return [f"{get(m, k):.3f}" if get_or(m, k) is not None else "-" for k in passes]

    if len(labels) == 1:
        columns = ["family", "n", "accuracy", "format rate", "tool-call rate", "tool mix", "mean turns"]
        columns += [f"pass@{k.rsplit('_', 1)[1]}" for k in passes]
        rows = [
            [
                family,
                str(get(m, "n")),
                _accuracy(m),
                f"{get(m, 'format_rate'):.3f}",
                f"{get(m, 'tool_call_rate'):.3f}",
                " ".join(f"{k} {v:.2f}" for k, v in get(m, "tool_mix").items()),
                f"{get(m, 'mean_turns'):.2f}",
                *pass_cells(m),
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
        *(f"{final} pass@{k.rsplit('_', 1)[1]}" for k in passes),
    ]
    rows = [
        [
            family,
            str(get(last[family], "n")),
            *(_accuracy(results[label][family]) for label in labels),
            *(f"{get(results[label][family], 'format_rate'):.3f}" for label in labels),
            f"{get(last[family], 'tool_call_rate'):.3f}",
            f"{get(last[family], 'mean_turns'):.2f}",
            *pass_cells(last[family]),
        ]
        for family in families
    ]
    return columns, rows


def strategy_cell(m: Mapping[str, Any], prefix: str = "", with_accuracy: bool = False) -> str:
    """The strategy rates of a slice in one cell, the option most taken at each decision with its share:
    `cells 1.00 · check 0.80` (the other option has the rest), with what the option earned in brackets
    when asked; `-` for a slice with no decision."""
    parts = []
    for decision, options in DECISIONS.items():
        shares = [(o, m.get(f"{prefix}strategy/{decision}/{o}")) for o in options]
        taken = [(o, v) for o, v in shares if v is not None]
        if not taken:
            continue
        option, share = max(taken, key=lambda ov: ov[1])
        acc = m.get(f"{prefix}strategy/{decision}/{option}/accuracy")
        parts.append(f"{option} {share:.2f}" + (f" ({acc:.2f})" if with_accuracy and acc is not None else ""))
    return " · ".join(parts) or "-"


def behaviour_table(results: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> tuple[list[str], list[list[str]]]:
    """Evaluations of one suite per slice (label → slice metrics) as (columns, rows), `overall` first:
    each label's accuracy with its interval, its strategy rates, and its tool calls per episode with the
    repeat-call rate; and, where the last evaluation sampled, its sampled strategy rates with what each
    option earned when taken, and pass@1."""
    labels = list(results)
    last = results[labels[-1]]
    names = sorted(last, key=lambda n: (n != "overall", n))
    sampled = any("sampled/tool_calls_per_episode" in m for m in last.values())
    columns = ["slice", "n"]
    for label in labels:
        columns += [f"{label} acc", f"{label} strategy", f"{label} calls (repeats)"]
    if sampled:
        columns += [f"{labels[-1]} sampled strategy (acc)", f"{labels[-1]} pass@1"]
    rows = []
    for name in names:
        row = [name, str(last[name].get("n", ""))]
        for label in labels:
            m = results[label].get(name, {})
            if not m:
                row += ["-"] * 3
                continue
            acted = m.get("behaviour", m)
            row += [
                with_interval(m["accuracy"], m["accuracy_low"], m["accuracy_high"]),
                strategy_cell(acted),
                f"{acted.get('tool_calls_per_episode', 0.0):.2f} ({acted.get('repeat_call_rate', 0.0):.2f})",
            ]
        if sampled:
            m = last[name]
            row += [
                strategy_cell(m, "sampled/", with_accuracy=True),
                f"{m['pass_at_1']:.3f}" if "pass_at_1" in m else "-",
            ]
        rows.append(row)
    return columns, rows


def _solved(t: Trajectory) -> bool:
    return bool(t.reward and t.reward.accuracy >= 1.0)


def pass_rates(
    samples: list[list[Trajectory]], by: Callable[[Trajectory], str] = by_family
) -> dict[str, dict[str, float]]:
    """pass@1 (accuracy over every sample) and pass@k (the share of tasks that some sample solved), per
    group (family, or `by_slice`) and overall; `samples[i]` is the i-th sampled run over the same tasks,
    in the same order."""
    k = len(samples)
    groups: dict[str, list[list[Trajectory]]] = {}
    for per_task in zip(*samples, strict=True):
        groups.setdefault(by(per_task[0]), []).append(list(per_task))
    groups["overall"] = [list(t) for t in zip(*samples, strict=True)]
    out = {}
    for family, tasks in sorted(groups.items()):
        solved = [[_solved(t) for t in task] for task in tasks]
        # `pass_at_k`, not `pass@k`: MLflow metric names allow no `@`.
        out[family] = {
            "pass_at_1": sum(sum(s) for s in solved) / (k * len(solved)) if solved else 0.0,
            f"pass_at_{k}": sum(any(s) for s in solved) / len(solved) if solved else 0.0,
            "sampled_tasks": float(len(solved)),
        }
    return out


def solved_counts(samples: list[list[Trajectory]]) -> list[int]:
    """Per task, how many of the k sampled runs solved it (same layout as `pass_rates` takes)."""
    return [sum(_solved(t) for t in per_task) for per_task in zip(*samples, strict=True)]


@dataclass
class EvalRun:
    trajectories: list[Trajectory]
    summary: dict[str, Metrics]
    serve_s: float
    eval_s: float
    sampled: dict[str, dict[str, float]] = field(default_factory=dict)  # pass@1 / pass@k per family
    # Per sampled task (the first `sample_limit`, in order): how many of the k samples solved it, which
    # says whether a greedy failure is one sampling can reach at all (what RL can sharpen onto).
    solved_by_samples: list[int] = field(default_factory=list)
    slices: dict[str, Metrics] = field(default_factory=dict)  # greedy metrics per slice
    # Per slice, over every sample: pass rates and the behaviour figures (`sampled/strategy/...`): the
    # rate at which the model *samples* each strategy, which greedy decoding hides.
    sampled_slices: dict[str, dict[str, float]] = field(default_factory=dict)

    def metrics(self) -> dict[str, dict[str, Any]]:
        """Per family, the greedy metrics with the pass rates beside them (where the run sampled)."""
        return {family: {**asdict(m), **self.sampled.get(family, {})} for family, m in self.summary.items()}

    def slice_metrics(self) -> dict[str, dict[str, Any]]:
        """Per slice, the greedy metrics with the samples' pass rates and behaviour beside them."""
        return {name: {**asdict(m), **self.sampled_slices.get(name, {})} for name, m in self.slices.items()}

    def flat(self) -> dict[str, float]:
        """Every figure as an MLflow metric: `<family>/<metric>`, and `slice/<slice>/<metric>`."""
        out = {k: v for name, m in self.summary.items() for k, v in m.flat(name).items()}
        out.update({f"{family}/{k}": v for family, rates in self.sampled.items() for k, v in rates.items()})
        for name, m in self.slices.items():
            if name != "overall":
                out.update(m.flat(f"slice/{name}"))
                out.update({f"slice/{name}/{k}": v for k, v in self.sampled_slices.get(name, {}).items()})
        return out

    def report(self, tasks: list[Task], trace_ids: Sequence[str | None] | None = None) -> dict[str, Any]:
        """Metrics and every trajectory as JSON (the MLflow artifact and `argus eval --out`): per task the
        question, gold answer, finish reason, reward, each message with its role, and each tool call with
        what it was asked, what it answered and its latency; images are in the task's trace."""
        ids: list[str | None] = list(trace_ids) if trace_ids else [None] * len(self.trajectories)
        solved = self._solved_by_samples()
        return {
            "metrics": {k: asdict(v) for k, v in self.summary.items()},
            "sampled": self.sampled,
            "slices": self.slice_metrics(),
            "trajectories": [
                {
                    "task": t.task_id,
                    "family": t.family,
                    "slice": t.slice,
                    "strategy": choices(t.messages),
                    "question": task.question,
                    "gold": task.answer,
                    "finish": t.finish,
                    "reward": asdict(t.reward) if t.reward else None,
                    "solved_by_samples": n,
                    "trace_id": trace_id,
                    "messages": [{"role": m["role"], "content": m["content"]} for m in t.messages],
                    "tool_calls": [
                        {k: v for k, v in asdict(c).items() if k not in ("start_ns", "end_ns")} for c in t.tool_calls
                    ],
                    "images": len(t.images),
                }
                for t, task, trace_id, n in zip(self.trajectories, tasks, ids, solved, strict=True)
            ],
        }

    def _solved_by_samples(self) -> list[int | None]:
        """`solved_by_samples` padded with None to one entry per task (None: the task was not sampled)."""
        return [*self.solved_by_samples, *[None] * (len(self.trajectories) - len(self.solved_by_samples))]

    def per_task(self, tasks: list[Task], trace_ids: Sequence[str | None] | None = None) -> list[dict[str, Any]]:
        """One row per task: the evaluation's side of the pipeline's per-task comparison."""
        ids: list[str | None] = list(trace_ids) if trace_ids else [None] * len(self.trajectories)
        return [
            {
                "task": t.task_id,
                "family": t.family,
                "slice": t.slice,
                "gold": task.answer,
                "answer": t.reward.answer if t.reward else None,
                "strategy": " ".join(f"{d}={o}" for d, o in sorted(choices(t.messages).items())),
                "reward": t.reward.score if t.reward else 0.0,
                "accuracy": t.reward.accuracy if t.reward else 0.0,
                "finish": t.finish,
                "turns": t.turns,
                "tools": " ".join(c.tool for c in t.tool_calls),
                "trace_id": trace_id,
                "solved_by_samples": n,
            }
            for t, task, trace_id, n in zip(self.trajectories, tasks, ids, self._solved_by_samples(), strict=True)
        ]


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
    prompt: Prompt = "deepeyesv2",
    samples: int = 0,
    sample_limit: int | None = None,
    on_done: Callable[[Trajectory], None] = lambda _t: None,
    on_sample_done: Callable[[Trajectory], None] = lambda _t: None,
    serve_s: float = 0.0,
) -> EvalRun:
    """Run the suite against a model server that is up (OpenAI API at `base_url`, serving `model`), with
    the code executor and the search proxy at their URLs. Serving the model is the caller's business
    (`serve_s` is how long that took, for the report). Greedy decoding gives the headline metrics;
    `samples` > 0 also samples the first `sample_limit` tasks that many times at temperature 1 (seeded
    0..k-1) for pass@1 and pass@k. `on_done` sees each greedy episode as it ends, `on_sample_done` each
    sampled one."""
    import time

    started = time.monotonic()

    async def run_all() -> list[list[Trajectory]]:
        # One event loop and one bound for the greedy pass and every sample: a tiny model's server is
        # latency-bound per episode (tool calls between turns), so its throughput is the episodes in flight.
        limit = asyncio.Semaphore(concurrency)

        def run(subset: list[Task], temperature: float, seed: int | None, done: Callable[[Trajectory], None]) -> Any:
            return evaluate(
                subset,
                base_url=base_url,
                model=model,
                sandbox_url=sandbox_url,
                search_url=search_url,
                max_turns=max_turns,
                max_tokens=max_tokens,
                concurrency=concurrency,
                run_id=run_id,
                prompt=prompt,
                temperature=temperature,
                seed=seed,
                on_done=done,
                limit=limit,
            )

        subset = tasks[:sample_limit]
        sampled = [run(subset, 1.0, i, on_sample_done) for i in range(samples)]
        return list(await asyncio.gather(run(tasks, 0.0, None, on_done), *sampled))

    trajectories, *samples_runs = asyncio.run(run_all())
    return eval_run(trajectories, samples_runs, serve_s, time.monotonic() - started)


def eval_run(
    trajectories: list[Trajectory], samples: list[list[Trajectory]], serve_s: float = 0.0, eval_s: float = 0.0
) -> EvalRun:
    """The figures of a greedy pass and its sampled runs (each over the same first tasks, in order)."""
    sampled_slices: dict[str, dict[str, float]] = {}
    if samples:
        for name, rates in pass_rates(samples, by_slice).items():
            sampled_slices[name] = dict(rates)
        flat = [t for run in samples for t in run]
        for name, figures in behaviour_of(flat, by_slice).items():
            sampled_slices.setdefault(name, {}).update({f"sampled/{k}": v for k, v in figures.items()})
    return EvalRun(
        trajectories,
        summarize(trajectories),
        serve_s,
        eval_s,
        pass_rates(samples) if samples else {},
        solved_counts(samples),
        summarize(trajectories, by_slice),
        sampled_slices,
    )
