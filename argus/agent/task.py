"""One task of an RL or evaluation split: what the agent is asked and how its answer is checked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

AnswerType = Literal["exact", "number"]


@dataclass
class Task:
    id: str
    family: str
    question: str
    answer: str
    image: bytes  # PNG; preloaded into the sandbox as image_1
    answer_type: AnswerType = "exact"
    tolerance: float = 0.0
    # Key of cached image-search results (MMSearch-R1 cache), when the task has them.
    image_search_key: str | None = None
    # A finer group than the family: the question template, and for a decision the cue that says which
    # strategy is right (`count-grid`, `count-picture`, ...). Metrics are reported per slice too.
    slice: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
