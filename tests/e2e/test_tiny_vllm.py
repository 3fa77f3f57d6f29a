"""The tiny text model under the vLLM CPU build, evaluated through the agent environment (slow)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from argus.data.generate import write_search_corpus
from argus.data.tasks import build_suite
from argus.evaluation import evaluate, summarize
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

        trajectories = asyncio.run(
            evaluate(
                [m.task for m in suite.eval],
                base_url=base_url,
                model="tiny",
                sandbox_url=tools_at.sandbox_url,
                search_url=tools_at.search_url,
                max_turns=2,
                max_tokens=48,
                code_timeout_s=5,
            )
        )
    summary = summarize(trajectories)
    accuracies = [t.reward.accuracy for t in trajectories if t.reward is not None]
    assert summary["overall"].n == 12 and set(summary) == {"overall", *{m.task.family for m in suite.eval}}
    assert len(accuracies) == 12
    # The baseline row: an untrained model cannot answer (nor, mostly, even format an answer).
    print(
        f"baseline: random-init tiny qwen2, eval accuracy {summary['overall'].accuracy:.3f}, "
        f"format rate {summary['overall'].format_rate:.3f} on 12 tasks"
    )
    assert summary["overall"].accuracy <= 0.1
