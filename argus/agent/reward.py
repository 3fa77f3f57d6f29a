"""The DeepEyesV2 reward: `0.8 * accuracy + 0.2 * format`, with DeepEyesV2's format rules.

Format is wrong when (as in DeepEyesV2's `compute_score`, after prefixing `<think>` if the response
does not start with it): `<think>`/`</think>` counts differ or either is zero; `<code>`/`</code>`
counts differ; after the last `</think>`, `<answer>`/`</answer>` counts differ or either is zero;
the answer is empty; or the answer is 300 characters or longer (which also zeroes accuracy: long
answers are how a policy games an LLM judge). Accuracy is by rule (exact after normalisation, or
numeric within a tolerance) or by an LLM judge over an OpenAI-compatible endpoint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import httpx

from argus.agent.actions import extract_answer
from argus.agent.task import Task

# DeepEyesV2's generative_verify prompt (reinforcement_learning/verl/utils/reward_score/deepeyesv2.py).
JUDGE_PROMPT = """# CONTEXT #
I am a teacher, and I have some high-level reasoning problems. I am tasked with evaluating the correctness of a student's answer. 
Below, I am provided with a problem and a reference answer. Additionally, a student's answer is provided. My job is to assess whether the student's answer captures the same meaning as the reference answer, even when expressed with different wording or format.

# OBJECTIVE #
I need you to judge whether the student's answer is correct given the ground truth answer.

Your tasks include:
1. Identify Semantic Equivalence: Carefully examine the expression in both answers. Confirm whether the semantic meaning of student's final answer is equivalent to the reference answer, even when expressed with different wording or format.

# TONE #
Professional, scientific.

# RESPONSE: MARKDOWN REPORT #
## Equivalence Judgement
[Whether the student's answer share the same meaning with the reference answer. (TRUE or FALSE)]

# ATTENTION #
 - The reference answer is ALWAYS correct. You should carefully judge whether the student gives the same answer as reference answer.
 - The Equivalence Judgement is only TRUE or FALSE. The answer is FALSE even if the student's final answer almost correct with a minor mistakes.
 - Don't give extra explanation.

**Question**:
{query}

**Reference Answer**
{gold_ans}

## Student Final Answer
{pred_ans}"""

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Reward:
    score: float
    accuracy: float
    format: float
    answer: str | None


def format_check(response: str, max_answer_chars: int = 300) -> tuple[bool, str | None]:
    """(is_format_error, answer_text) by DeepEyesV2's rules."""
    if not response.startswith("<think>"):
        response = "<think>" + response
    error = False
    opened, closed = response.count("<think>"), response.count("</think>")
    if opened != closed or opened == 0 or closed == 0:
        error = True
    if response.count("<code>") != response.count("</code>"):
        error = True
    after_think = response.split("</think>")[-1].strip()
    a_open, a_close = after_think.count("<answer>"), after_think.count("</answer>")
    if a_open != a_close or a_open == 0 or a_close == 0:
        error = True
    answer = extract_answer(after_think)
    if not answer:
        error = True
    if answer and len(answer) >= max_answer_chars:
        error = True
    return error, answer


def _normalise(text: str) -> str:
    return " ".join(text.strip().strip(".").casefold().replace(",", "").split())


def rule_accuracy(answer: str, task: Task) -> float:
    if task.answer_type == "number":
        found = _NUMBER.findall(answer.replace(",", ""))
        try:
            expected = float(task.answer.replace(",", ""))
        except ValueError:
            return 0.0
        if len(found) != 1:  # "3 or 4" is not an answer
            return 0.0
        return 1.0 if abs(float(found[0]) - expected) <= task.tolerance + 1e-9 else 0.0
    return 1.0 if _normalise(answer) == _normalise(task.answer) else 0.0


class Judge:
    """An LLM judge behind an OpenAI-compatible endpoint, served as model `judge` (DeepEyesV2)."""

    def __init__(self, base_url: str, model: str = "judge", timeout_s: float = 60.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.timeout_s = timeout_s

    async def __call__(self, task: Task, answer: str) -> float:
        prompt = JUDGE_PROMPT.format(query=task.question, gold_ans=task.answer, pred_ans=answer)
        async with httpx.AsyncClient(timeout=self.timeout_s) as client:
            resp = await client.post(
                self.url,
                json={"model": self.model, "temperature": 0.0, "messages": [{"role": "user", "content": prompt}]},
            )
            resp.raise_for_status()
            text = resp.json()["choices"][0]["message"]["content"]
        judgement = text.split("## Equivalence Judgement")[-1].lower()
        if "true" in judgement and "false" not in judgement:
            return 1.0
        return 0.0


async def score(
    response: str,
    task: Task,
    *,
    judge: Judge | None = None,
    accuracy_weight: float = 0.8,
    format_weight: float = 0.2,
    max_answer_chars: int = 300,
) -> Reward:
    """`response` is everything the model generated in the episode, turns joined in order."""
    format_error, answer = format_check(response, max_answer_chars)
    accuracy = 0.0
    if answer and len(answer) < max_answer_chars:
        accuracy = await judge(task, answer) if judge is not None else rule_accuracy(answer, task)
    fmt = 0.0 if format_error else 1.0
    return Reward(score=accuracy_weight * accuracy + format_weight * fmt, accuracy=accuracy, format=fmt, answer=answer)
