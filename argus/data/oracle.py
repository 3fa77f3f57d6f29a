"""The oracle table: each scripted teacher's accuracy per slice on each split of the miniature, played
through the real code executor and search proxy.

It is the check that the suite's decisions are real before any model is trained: on the demonstration
distribution (the SFT split, played with the turns the demonstrations were generated with) every teacher
is right; on the target distribution (RL, dev and eval, played with the evaluation's turn budget) a
teacher is right on a decision slice only when its habit is the one the slice's cue calls for, and every
teacher is right on the slices with no decision. `argus data oracle` prints it.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argus.agent.env import AgentEnv, ScriptedPolicy, ToolClients
from argus.config import Prompt, SandboxSpec, ToolsSpec
from argus.data.generate import DEMO_TURNS, ToolsUp, write_search_corpus
from argus.data.tasks import SLICES, SPLITS, TEACHERS, MiniTask, build_suite


@dataclass
class OracleTable:
    """`cells[split][slice][teacher]` = (solved, played); `turns[split]` = the turn budget played with."""

    cells: dict[str, dict[str, dict[str, tuple[int, int]]]] = field(default_factory=dict)
    turns: dict[str, int] = field(default_factory=dict)

    def accuracy(self, split: str, slice_: str, teacher: str) -> float:
        solved, n = self.cells[split][slice_][teacher]
        return solved / n if n else 0.0

    def rows(self) -> tuple[list[str], list[list[str]]]:
        columns = [
            "split",
            "turns",
            "slice",
            "right on target",
            *(f"{t.name} ({t.count}, {t.check})" for t in TEACHERS),
        ]
        rows = []
        for split, per_slice in self.cells.items():
            for name in SLICES:
                if name not in per_slice:
                    continue
                right = ", ".join(f"{d}={o}" for d, o in SLICES[name].right.items()) or "-"
                n = per_slice[name][TEACHERS[0].name][1]
                rows.append(
                    [
                        split,
                        str(self.turns[split]),
                        f"{name} ({n})",
                        right,
                        *(f"{self.accuracy(split, name, t.name):.2f}" for t in TEACHERS),
                    ]
                )
        return columns, rows


def oracle(
    *,
    tools: ToolsUp,
    seed: int = 0,
    sft_size: int = 200,
    rl_size: int = 200,
    eval_size: int = 60,
    dev_size: int | None = None,
    max_turns: int = 4,
    per_slice: int | None = 12,
    prompt: Prompt = "compact",
    concurrency: int = 8,
    on_progress: Callable[[int, int], None] = lambda _d, _n: None,
) -> OracleTable:
    """Play every teacher's turns on the first `per_slice` tasks of each slice of each split (all of them
    with None). A script several teachers share (a slice where their habits do not differ) is played once."""
    suite = build_suite(seed, sft_size, rl_size, eval_size, dev_size)
    chosen: list[tuple[str, MiniTask]] = []
    for split in SPLITS:
        seen: dict[str, int] = {}
        for mini in suite.split(split):
            if per_slice is None or seen.get(mini.task.slice, 0) < per_slice:
                seen[mini.task.slice] = seen.get(mini.task.slice, 0) + 1
                chosen.append((split, mini))
    turns = {split: DEMO_TURNS if split == "sft" else max_turns for split in SPLITS}
    plays = {(split, i, tuple(script)) for i, (split, mini) in enumerate(chosen) for script in mini.scripts.values()}
    with tempfile.TemporaryDirectory(prefix="argus-oracle-") as tmp:
        index = write_search_corpus(suite, Path(tmp) / "search")
        with tools(ToolsSpec(sandbox=SandboxSpec(runner="process", warm_pool=6)), str(index.parent)) as endpoints:

            async def go() -> dict[tuple[str, int, tuple[str, ...]], bool]:
                clients = ToolClients(endpoints.sandbox_url, endpoints.search_url, run_id=f"oracle-{seed}")
                limit = asyncio.Semaphore(concurrency)
                envs = {n: AgentEnv(clients, max_turns=n, prompt=prompt) for n in set(turns.values())}
                done = 0

                async def play(key: tuple[str, int, tuple[str, ...]]) -> bool:
                    nonlocal done
                    split, i, script = key
                    async with limit:
                        traj = await envs[turns[split]].run(chosen[i][1].task, ScriptedPolicy(script))
                    done += 1
                    on_progress(done, len(plays))
                    return bool(traj.reward and traj.reward.accuracy >= 1.0)

                try:
                    keys = sorted(plays)
                    return dict(zip(keys, await asyncio.gather(*(play(k) for k in keys)), strict=True))
                finally:
                    await clients.aclose()

            solved = asyncio.run(go())
    table = OracleTable(turns=turns)
    for i, (split, mini) in enumerate(chosen):
        per_slice_cells = table.cells.setdefault(split, {}).setdefault(mini.task.slice, {})
        for teacher in TEACHERS:
            ok = solved[(split, i, tuple(mini.scripts[teacher.name]))]
            right, n = per_slice_cells.get(teacher.name, (0, 0))
            per_slice_cells[teacher.name] = (right + int(ok), n + 1)
    return table
