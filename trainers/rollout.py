"""The model being trained as the agent's policy, in this process: generation with Hugging Face
`generate` on the trainer's own weights, stopped at the end of a turn.

The SFT trainer uses it for its learning curve (a small held-out evaluation every N steps, with the real
tools); it is the in-process rollout engine for CPU and small models. The conversation is rendered with
the same ChatML the SFT encoder trains on (`argus.models.chatml`), so the policy sees exactly the token
layout it learned.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from argus.agent.actions import TURN_STOPS
from argus.agent.env import AgentEnv, Message, ToolClients, Trajectory
from argus.agent.evaluation import Metrics, summarize
from argus.agent.task import Task
from argus.config import Prompt
from argus.models import chatml


class LocalPolicy:
    """Greedy by default; `temperature` > 0 samples (seeded by the caller's torch generator state)."""

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens: int = 256, temperature: float = 0.0):
        self.model = model
        self.tok = tokenizer
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.stops = [int(tokenizer.convert_tokens_to_ids(t)) for t in TURN_STOPS]

    def render(self, messages: list[Message]) -> str:
        return chatml.render(messages)

    def generate(self, messages: list[Message]) -> str:
        import torch

        ids = torch.tensor([self.tok(self.render(messages), add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            out = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=self.max_new_tokens,
                do_sample=self.temperature > 0,
                temperature=self.temperature if self.temperature > 0 else None,
                top_p=None,
                top_k=None,
                eos_token_id=self.stops,
                pad_token_id=self.tok.pad_token_id,
            )
        text: str = self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=False)
        return text.split("<|im_end|>")[0]

    async def __call__(self, messages: list[Message], images: list[bytes]) -> str:
        return self.generate(messages)  # one process, one model: episodes take turns


def evaluate_in_process(
    policy: LocalPolicy,
    tasks: list[Task],
    *,
    sandbox_url: str,
    search_url: str,
    prompt: Prompt,
    max_turns: int = 6,
    run_id: str = "curve",
    on_done: Callable[[Trajectory], None] = lambda _t: None,
) -> dict[str, Metrics]:
    """Episodes of `tasks` with the in-process policy and the live tools; metrics per family."""

    async def go() -> list[Trajectory]:
        tools = ToolClients(sandbox_url, search_url, run_id=run_id)
        env = AgentEnv(tools, max_turns=max_turns, prompt=prompt)
        try:
            done = []
            for task in tasks:
                traj = await env.run(task, policy)
                on_done(traj)
                done.append(traj)
            return done
        finally:
            await tools.aclose()

    return summarize(asyncio.run(go()))
