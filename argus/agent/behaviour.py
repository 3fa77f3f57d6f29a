"""What an agent did, not only whether it was right: the strategy it took at each decision, how many tool
calls it made, and how many of them repeated an earlier call.

DeepEyesV2's claim is that RL changes how tools are used (which tool, which arguments, fewer unnecessary
calls). The miniature's cold start therefore shows several ways to do a task, each opening its turn with
its own words (`MARKERS`), so that a strategy is a choice the policy makes in the first tokens of a turn
and can be read back off any trajectory: scripted, sampled in an RL rollout, or greedy in an evaluation.
Evaluation and the RL run report these figures per slice beside the accuracy.

The two decisions of the miniature:
- `count`: how to count the shapes of a colour. `cells` samples the centre of every cell of the 4x4 grid
  (right only when the shapes sit in the cells); `blobs` labels the connected regions of the colour (right
  wherever the shapes lie, as long as they do not touch).
- `check`: after a search, `check` runs the same search again before using it; `once` does not. A
  repeated call costs a turn, which a task that needs all of its turns does not have.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

# The words that name a strategy in a turn's thought: the teachers write them, the classifier reads them.
# A counting thought names its strategy in its second word ("Counting cell by cell: ..."); a check opens
# its thought. None is a word of the questions, so no option is a copy of the question.
MARKERS: dict[str, dict[str, str]] = {
    "count": {"cells": "cell by cell", "blobs": "blob by blob"},
    "check": {"check": "Check again"},
}
DECISIONS: dict[str, tuple[str, ...]] = {"count": ("cells", "blobs"), "check": ("once", "check")}


def _thought(turn: str) -> str:
    return turn.removeprefix("<think>").lstrip()


def choices(messages: Sequence[dict[str, Any]]) -> dict[str, str]:
    """The option taken at each decision the trajectory reached: `count` from the first turn whose thought
    names a counting strategy; `check` for a trajectory that searched (`check` if any thought opens with
    the check marker, else `once`). A decision the trajectory never reached is absent."""
    turns = [str(m["content"]) for m in messages if m["role"] == "assistant"]
    out: dict[str, str] = {}
    for turn in turns:
        thought = _thought(turn).split("</think>", 1)[0]
        option = next((o for o, marker in MARKERS["count"].items() if marker in thought), None)
        if option is not None:
            out["count"] = option
            break
    searched = any('"name": "search"' in turn or '"name":"search"' in turn for turn in turns)
    checked = any(_thought(turn).startswith(MARKERS["check"]["check"]) for turn in turns)
    if searched or checked:
        out["check"] = "check" if checked else "once"
    return out


def repeated_calls(requests: Iterable[tuple[str, str]]) -> int:
    """How many calls repeat an earlier call of the episode exactly (same tool, same code or query)."""
    seen: set[tuple[str, str]] = set()
    repeats = 0
    for call in requests:
        if call in seen:
            repeats += 1
        seen.add(call)
    return repeats


@dataclass
class Behaviour:
    """Behaviour of a group of episodes (a slice): tool calls per episode, the share of calls that
    repeated an earlier one, and per decision the share of the episodes that reached it taking each
    option, with the accuracy of the episodes that took it."""

    episodes: int = 0
    tool_calls: int = 0
    repeats: int = 0
    taken: dict[str, Counter[str]] = field(default_factory=dict)
    solved: dict[str, Counter[str]] = field(default_factory=dict)

    def add(self, messages: Sequence[dict[str, Any]], calls: Sequence[tuple[str, str]], accuracy: float) -> None:
        self.episodes += 1
        self.tool_calls += len(calls)
        self.repeats += repeated_calls(calls)
        for decision, option in choices(messages).items():
            self.taken.setdefault(decision, Counter())[option] += 1
            self.solved.setdefault(decision, Counter())[option] += int(accuracy >= 1.0)

    def figures(self) -> dict[str, float]:
        """Flat figures: `tool_calls_per_episode`, `repeat_call_rate`, and for each decision reached
        `strategy/<decision>/<option>` (share of the episodes that reached it) and
        `strategy/<decision>/<option>/accuracy` (where any episode took the option)."""
        out = {
            "tool_calls_per_episode": self.tool_calls / self.episodes if self.episodes else 0.0,
            "repeat_call_rate": self.repeats / self.tool_calls if self.tool_calls else 0.0,
        }
        for decision, taken in sorted(self.taken.items()):
            reached = sum(taken.values())
            for option in DECISIONS.get(decision, tuple(sorted(taken))):
                out[f"strategy/{decision}/{option}"] = taken[option] / reached if reached else 0.0
                if taken[option]:
                    out[f"strategy/{decision}/{option}/accuracy"] = self.solved[decision][option] / taken[option]
        return out


def behaviour_by(
    rows: Iterable[tuple[str, Sequence[dict[str, Any]], Sequence[tuple[str, str]], float]],
) -> dict[str, dict[str, float]]:
    """Figures per group and `overall`, from (group, messages, (tool, request) per call, accuracy) rows."""
    groups: dict[str, Behaviour] = {"overall": Behaviour()}
    for group, messages, calls, accuracy in rows:
        for name in (group, "overall"):
            groups.setdefault(name, Behaviour()).add(messages, calls, accuracy)
    return {name: b.figures() for name, b in sorted(groups.items())}
