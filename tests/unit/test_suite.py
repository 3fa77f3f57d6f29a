"""The miniature suite's design: teachers, mixes, disjoint splits, and the decisions read back off
trajectories (`argus.agent.behaviour`)."""

from __future__ import annotations

import io
import re
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from argus.agent.behaviour import MARKERS, behaviour_by, choices, repeated_calls
from argus.agent.env import Trajectory
from argus.agent.evaluation import behaviour_table, eval_run
from argus.agent.reward import Reward
from argus.data.tasks import (
    DECISION_SLICES,
    DEMO_WEIGHTS,
    MIXES,
    SLICES,
    TEACHERS,
    build_suite,
    colour_asked,
    mix_of,
    teacher_mix,
)


@pytest.fixture(scope="module")
def suite():  # type: ignore[no-untyped-def]
    return build_suite(0, sft_size=400, rl_size=120, eval_size=90, dev_size=60)


def test_every_split_has_its_own_entities_and_asks_only_about_them(suite) -> None:  # type: ignore[no-untyped-def]
    names = {split: {e.name for e in pool} for split, pool in suite.pools.items()}
    splits = list(names)
    for i, a in enumerate(splits):
        for b in splits[i + 1 :]:
            assert not names[a] & names[b], f"{a} and {b} share entities"
    for split in splits:
        others = set().union(*(names[s] for s in splits if s != split))
        for mini in suite.split(split):
            asked = {w.rstrip(".?") for w in mini.task.question.split()} | {
                q for turn in mini.gold for q in re.findall(r"history of (\w+)", turn)
            }
            assert not asked & others, f"{mini.task.id} asks about another split's entity"
    # the task ids name their split; no question is repeated across eval and the training splits with its image
    train = {(m.task.question, m.task.image) for s in ("sft", "rl") for m in suite.split(s)}
    assert not train & {(m.task.question, m.task.image) for m in suite.eval}


@pytest.mark.parametrize("weights", [None, {"ada": 1, "bo": 1, "cy": 1, "dee": 1}])
def test_the_demonstrations_follow_the_teachers_shares_per_slice_and_wording(weights) -> None:  # type: ignore[no-untyped-def]
    suite = build_suite(0, sft_size=400, rl_size=20, eval_size=20, teachers=weights)
    shares = weights or DEMO_WEIGHTS
    total = sum(shares.values())
    mix = teacher_mix(suite.sft)
    assert set(mix) == set(SLICES)
    for name, per_teacher in mix.items():
        n = sum(per_teacher.values())
        for t in TEACHERS:
            assert abs(per_teacher[t.name] - n * shares[t.name] / total) <= 1, (name, per_teacher)
    # each wording of a counting question gets each counting habit at its share too
    cells = sum(shares[t.name] for t in TEACHERS if t.count == "cells") / total
    for name in ("count", "chain"):
        per_colour: dict[str, Counter[str]] = {}
        for mini in suite.sft:
            if mini.task.slice == name:
                colour = colour_asked(mini.task.question)
                habit = next(t.count for t in TEACHERS if t.name == mini.teacher)
                per_colour.setdefault(colour, Counter())[habit] += 1
        for colour, habits in per_colour.items():
            n = habits["cells"] + habits["blobs"]
            assert abs(habits["cells"] - cells * n) <= 1.5, (name, colour, habits)


def test_each_split_follows_its_mix(suite) -> None:  # type: ignore[no-untyped-def]
    for split in ("sft", "rl", "dev", "eval"):
        tasks = suite.split(split)
        counts = Counter(m.task.slice for m in tasks)
        for template, share in mix_of(split):
            assert abs(counts[template] - share * len(tasks)) <= 1 + (len(mix_of(split)) if template == "count" else 0)
    rl = suite.split("rl")
    assert sum(m.task.slice in DECISION_SLICES for m in rl) / len(rl) >= 0.7  # most RL prompts carry a decision
    assert set(MIXES) == {"sft", "rl", "target"}


def test_target_counting_images_leave_every_cell_centre_empty() -> None:
    suite = build_suite(3, sft_size=8, rl_size=40, eval_size=8)
    for mini in suite.rl:
        if mini.task.slice in ("count", "chain"):
            a = np.array(Image.open(io.BytesIO(mini.task.image)).convert("RGB")).astype(int)
            centres = a[20::40, 20::40]
            assert (centres == 255).all()  # nothing sits on a cell centre: sampling them counts nothing


def _assistant(*turns: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}] + [
        {"role": "assistant", "content": t} for t in turns
    ]


def test_choices_read_the_strategy_off_the_first_words_of_a_thought() -> None:
    code = "\n<code>\n```python\nprint(1)\n```\n</code>"
    call = '\n<tool_call>\n{"name": "search", "arguments": {"query": "history of X"}}\n</tool_call>'
    cells = f"<think>Counting {MARKERS['count']['cells']}: I read the centres.</think>{code}"
    blobs = f"<think>{MARKERS['count']['blobs']}: mask.</think>{code}"
    search = f"<think>Look.</think>{call}"
    check = f"<think>{MARKERS['check']['check']}: again.</think>{call}"
    answer = "<think>Done.</think>\n<answer>3</answer>"
    assert choices(_assistant(cells, answer)) == {"count": "cells"}
    assert choices(_assistant(blobs, search, check, answer)) == {"count": "blobs", "check": "check"}
    assert choices(_assistant(search, answer)) == {"check": "once"}
    assert choices(_assistant(answer)) == {}
    assert repeated_calls([("search", "a"), ("python", "x"), ("search", "a"), ("search", "a")]) == 2


def test_behaviour_rates_and_the_per_slice_table() -> None:
    cells = f"<think>{MARKERS['count']['cells']}: c.</think>"
    blobs = f"<think>{MARKERS['count']['blobs']}: b.</think>"
    rows = [
        ("count", _assistant(cells), [("python", "a")], 1.0),
        ("count", _assistant(cells), [("python", "a")], 1.0),
        ("count", _assistant(blobs), [("python", "b"), ("python", "b")], 0.0),
        ("arith", _assistant("<think>x</think>"), [("python", "p")], 1.0),
    ]
    figures = behaviour_by(rows)
    grid = figures["count"]
    assert grid["strategy/count/cells"] == pytest.approx(2 / 3)
    assert grid["strategy/count/blobs"] == pytest.approx(1 / 3)
    assert grid["strategy/count/cells/accuracy"] == 1.0 and grid["strategy/count/blobs/accuracy"] == 0.0
    assert grid["tool_calls_per_episode"] == pytest.approx(4 / 3)
    assert grid["repeat_call_rate"] == pytest.approx(1 / 4)
    assert "strategy/count/cells" not in figures["arith"]  # no decision in that slice

    def traj(slice_: str, messages: list[dict[str, str]], correct: bool) -> Trajectory:
        reward = Reward(score=1.0 if correct else 0.2, accuracy=float(correct), format=1.0, answer="x")
        return Trajectory(task_id="t", family="perception", messages=messages, images=[], reward=reward, slice=slice_)

    greedy = [traj("count", _assistant(blobs), False), traj("chain", _assistant(blobs), True)]
    samples = [
        [traj("count", _assistant(cells), True), traj("chain", _assistant(cells), False)],
        [traj("count", _assistant(blobs), False), traj("chain", _assistant(blobs), True)],
    ]
    run = eval_run(greedy, samples)
    sliced = run.slice_metrics()
    assert sliced["count"]["accuracy"] == 0.0
    assert sliced["count"]["sampled/strategy/count/cells"] == 0.5
    assert sliced["count"]["sampled/strategy/count/cells/accuracy"] == 1.0
    assert run.flat()["slice/count/strategy/count/blobs"] == 1.0
    assert run.flat()["slice/count/sampled/strategy/count/cells"] == 0.5
    columns, table = behaviour_table({"sft": sliced})
    assert columns[:5] == ["slice", "n", "sft acc", "sft strategy", "sft calls (repeats)"]
    assert "sft sampled strategy (acc)" in columns
    by_slice = {row[0]: row for row in table}
    assert table[0][0] == "overall"
    assert by_slice["count"][3] == "blobs 1.00"
    assert by_slice["count"][columns.index("sft sampled strategy (acc)")] == "cells 0.50 (1.00)"
