"""The tiny text model under the vLLM CPU build, evaluated through the agent environment (slow)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from argus.agent.env import AgentEnv, OpenAIPolicy, ToolClients
from argus.data.generate import write_search_corpus
from argus.data.tasks import build_suite
from argus.models.tiny import init_tiny
from argus.toolenv import LocalToolEnvironment
from argus.vllm import LocalVLLM

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_vllm_serves_the_tiny_model_and_a_random_model_scores_zero(tmp_path: Path) -> None:
    model_dir = tmp_path / "tiny-qwen2"
    init_tiny("qwen2", str(model_dir), seed=0)
    suite = build_suite(seed=0, sft_size=4, rl_size=4, eval_size=12)
    index = write_search_corpus(suite, tmp_path / "search")
    with (
        LocalVLLM(str(model_dir), served_name="tiny", log_path=tmp_path / "vllm.log") as base_url,
        LocalToolEnvironment(tmp_path / "tools", index_path=index, runner="gvisor", warm_pool=2) as tools_at,
    ):
        models = httpx.get(f"{base_url}/models").json()
        assert [m["id"] for m in models["data"]] == ["tiny"]

        async def evaluate() -> list[float]:
            policy = OpenAIPolicy(base_url, "tiny", max_tokens=48)
            tools = ToolClients(tools_at.sandbox_url, tools_at.search_url)
            env = AgentEnv(tools, max_turns=2, code_timeout_s=5)
            try:
                trajs = [await env.run(m.task, policy) for m in suite.eval]
            finally:
                await tools.aclose()
                await policy.aclose()
            return [t.reward.accuracy for t in trajs if t.reward is not None]

        accuracies = asyncio.run(evaluate())
    assert len(accuracies) == 12
    # The baseline row: an untrained model cannot answer (nor, mostly, even format an answer).
    print(f"baseline: random-init tiny qwen2, eval accuracy {sum(accuracies) / len(accuracies):.3f} on 12 tasks")
    assert sum(accuracies) / len(accuracies) <= 0.1
