"""Parsing a model turn into an action, the way DeepEyesV2's rollout does it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

_CODE = re.compile(r"<code>(.*?)</code>", re.DOTALL)
_PYTHON = re.compile(r"```python\s*\n(.*?)\n```", re.DOTALL)
_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
TOOLS = ("search", "image_search")
# A model turn ends at the end of its action, as DeepEyesV2's rollout stops generation at `</code>` and
# `</tool_call>` (or the turn's own `<|im_end|>`): one rule for RL rollouts, evaluation and the SFT learning
# curve, so a policy is never scored on text it would not have been allowed to write in training.
TURN_STOPS = ("<|im_end|>", "</code>", "</tool_call>")


@dataclass
class Action:
    kind: Literal["answer", "code", "tool_call", "invalid"]
    code: str | None = None
    tool: str | None = None
    arguments: dict[str, Any] | None = None
    answer: str | None = None
    # For a malformed tool call: the observation DeepEyesV2 gives back instead of a result.
    error: str | None = None


def extract_answer(text: str) -> str | None:
    match = _ANSWER.search(text)
    return match.group(1).strip() if match else None


def parse(turn: str) -> Action:
    """Answer if the turn closes one; else the last code block; else the last tool call."""
    if "</answer>" in turn:
        return Action(kind="answer", answer=extract_answer(turn.split("</think>")[-1]))
    if "<code>" in turn:
        blocks = _CODE.findall(turn)
        code = _PYTHON.findall(blocks[-1]) if blocks else []
        if not code:
            return Action(kind="invalid", error="no ```python block inside <code></code>")
        return Action(kind="code", code=code[-1])
    if "<tool_call>" in turn:
        calls = _TOOL_CALL.findall(turn)
        if not calls:
            return Action(kind="invalid", error="unclosed <tool_call>")
        raw = calls[-1].strip()
        try:
            call = json.loads(raw)
        except ValueError as exc:
            return Action(kind="tool_call", error=f"Invalid tool call format: {raw}. Error: {exc}")
        if not isinstance(call, dict) or call.get("name") not in TOOLS:
            return Action(kind="tool_call", error=f"Invalid tool call name: {raw}.")
        args = call.get("arguments")
        if call["name"] == "image_search" and args is not None:
            return Action(kind="tool_call", error=f"Invalid tool call parameters for image search: {raw}.")
        if call["name"] == "search" and not (isinstance(args, dict) and isinstance(args.get("query"), str)):
            return Action(kind="tool_call", error=f"Tool call execution error: 'query' is required: {raw}")
        return Action(kind="tool_call", tool=call["name"], arguments=args)
    return Action(kind="invalid", error="no <code>, <tool_call> or <answer> in the turn")
