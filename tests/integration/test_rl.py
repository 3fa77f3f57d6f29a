"""RL rollouts against the real tools: token-in/token-out episodes, tool failures, time limits, and the
in-process engine's sampling and log-probabilities."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from argus.backends.local.tools import LocalToolEnvironment, ToolEndpoints
from argus.config import SandboxSpec
from argus.data.formats import SFTExample
from argus.data.generate import write_search_corpus
from argus.data.tasks import MiniTask, Suite, build_suite
from argus.models import chatml
from trainers.rl.grpo import token_logprobs
from trainers.rl.rollout import Episode, InProcessEngine, RolloutResult, RolloutSettings, Sample, rollout
from trainers.sft.data import Encoder

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def suite() -> Suite:
    return build_suite(seed=13, sft_size=24, rl_size=24, eval_size=4)


@pytest.fixture(scope="module")
def tools_env(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolEndpoints]:
    root = tmp_path_factory.mktemp("rl-tools")
    index = write_search_corpus(suite, root / "search")
    with LocalToolEnvironment(
        root / "tools", index_path=index, sandbox=SandboxSpec(runner="gvisor", warm_pool=4)
    ) as endpoints:
        yield endpoints


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    from argus.models.tiny import build

    model, tokenizer, _ = build("qwen2", seed=0)
    return model, tokenizer


def opening_ids(tok: Any, question: str) -> list[int]:
    from argus.agent import prompts

    return chatml.encode(tok, prompts.opening("compact", question))


class ScriptedEngine:
    """Plays fixed assistant turns as token ids, each turn ending with `<|im_end|>` or cut at the
    action's end tag (as a stop string leaves it). The script is found by the episode's opening and the
    turn by how many ChatML turns the ids hold, so episodes of one group play the same script."""

    def __init__(self, tok: Any, scripts: list[tuple[list[int], list[str]]], cut_at_action_end: bool):
        self.tok = tok
        self.scripts = scripts
        self.cut = cut_at_action_end
        self.start = int(tok.convert_tokens_to_ids("<|im_start|>"))
        self.sampled: dict[int, list[list[int]]] = {}
        self.prompts: list[list[int]] = []

    def generate(
        self, prompts: list[list[int]], max_new_tokens: list[int], seed: int, media: list[Any] | None = None
    ) -> list[Sample]:
        self.media = media
        out = []
        for ids in prompts:
            self.prompts.append(list(ids))
            script = next(i for i, (opening, _t) in enumerate(self.scripts) if ids[: len(opening)] == opening)
            turn = (ids.count(self.start) - 3) // 2  # system, user, assistant; then user + assistant a turn
            text = self.scripts[script][1][turn]
            end = "" if self.cut and not text.endswith("</answer>") else "<|im_end|>"
            body = list(self.tok(text + end, add_special_tokens=False)["input_ids"])
            self.sampled.setdefault(script, []).append(body)
            out.append(Sample(body, [-1.0] * len(body), stopped=True))
        return out


def play(tools: ToolEndpoints, tasks: list[MiniTask], engine: Any, tokenizer: Any, **kw: Any) -> RolloutResult:
    args: dict[str, Any] = dict(
        group_size=1,
        sandbox_url=tools.sandbox_url,
        search_url=tools.search_url,
        prompt="compact",
        max_turns=6,
        turn_tokens=256,
        response_tokens=2048,
        tool_timeout_s=20.0,
        episode_timeout_s=120.0,
    )
    run: dict[str, Any] = {
        "seed": kw.pop("seed", 0),
        "run_id": "rl-test",
        "make_env": kw.pop("make_env", None),
        "vision": kw.pop("vision", None),
    }
    args.update(kw)
    return asyncio.run(rollout([m.task for m in tasks], engine, tokenizer, RolloutSettings(**args), **run))


def segments(ep: Episode) -> list[tuple[int, list[int]]]:
    out: list[tuple[int, list[int]]] = []
    for token, m in zip(ep.ids, ep.mask, strict=True):
        if out and out[-1][0] == m:
            out[-1][1].append(token)
        else:
            out.append((m, [token]))
    return out


@pytest.mark.parametrize("cut", [False, True], ids=["ends-with-im_end", "cut-at-action-end"])
def test_episode_ids_are_what_was_sampled_and_observed(
    cut: bool, suite: Suite, tools_env: ToolEndpoints, tiny: tuple[Any, Any]
) -> None:
    _model, tok = tiny
    # Multi-turn gold trajectories: code, then search, then code, then the answer; and image search.
    minis = [next(m for m in suite.rl if m.task.family == f) for f in ("integrated", "reasoning", "search")]
    openings = [opening_ids(tok, m.task.question) for m in minis]
    engine = ScriptedEngine(tok, [(o, list(m.gold)) for o, m in zip(openings, minis, strict=True)], cut)
    result = play(tools_env, minis, engine, tok)
    for i, ep in enumerate(result.episodes):
        traj = ep.trajectory
        assert traj is not None and traj.reward is not None
        assert traj.reward.accuracy == 1.0, traj.messages  # the gold answer, read back from the ids
        assert traj.turns == len(minis[i].gold)
        # The mask-1 runs are exactly the sampled turns, in order; nothing else is marked as the policy's.
        sampled = [ids for m, ids in segments(ep) if m == 1]
        assert sampled == engine.sampled[i]
        assert ep.logprobs == [(-1.0 if m else 0.0) for m in ep.mask]
        # Every generate call saw the episode's ids so far: no re-tokenised prefix between turns.
        seen = [p for p in engine.prompts if p[: len(openings[i])] == openings[i]]
        for prefix in seen:
            assert ep.ids[: len(prefix)] == prefix
        # Re-rendering the finished conversation as SFT encodes it gives the same ids (plus its final "\n").
        messages = [{"role": m["role"], "content": m["content"]} for m in traj.messages]
        encoded = Encoder(tok, None, 1 << 16).encode(SFTExample(messages=messages, images=[]), "episode")
        assert encoded is not None and encoded.input_ids[:-1] == ep.ids


def test_a_multimodal_episode_carries_its_images_as_sft_encodes_them_and_the_trainer_scores_them(
    suite: Suite, tools_env: ToolEndpoints, tmp_path: Path
) -> None:
    """The task image and the crops that code returns are in the episode: the ids hold their vision tokens
    as the SFT encoder lays them out, and the trainer's log-probabilities see the pixels."""
    from argus.agent import prompts
    from argus.models.tiny import build

    model, tok, processor = build("qwen2_5_vl", seed=0)
    vision = chatml.Vision(processor)
    mini = next(m for m in suite.rl if m.task.family == "perception")
    _media, task_pads = vision.process([mini.task.image])
    opening = chatml.encode(tok, prompts.opening("compact", mini.task.question), iter(task_pads))
    crop = "<think>look closer</think>\n<code>\n```python\nimage_1.crop(({}))\n```\n</code>"
    turns = [crop.format("0, 0, 40, 40"), crop.format("8, 8, 72, 40"), "<think>seen</think>\n<answer>1</answer>"]
    engine = ScriptedEngine(tok, [(opening, turns)], cut_at_action_end=True)
    ep = play(tools_env, [mini], engine, tok, vision=vision).episodes[0]
    traj = ep.trajectory
    assert traj is not None and traj.finish == "answer" and len(traj.images) == 3  # the task image, two crops
    assert [c.images for c in traj.tool_calls] == [(1,), (2,)]
    assert ep.media is not None and ep.media.image_grid_thw.shape[0] == 3
    assert engine.media is not None and engine.media[0] is ep.media  # the last turn was sampled seeing all three
    # The SFT encoder, given the finished conversation and its images as files, gives the same ids.
    paths = []
    for i, image in enumerate(traj.images):
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(image)
    messages = [{"role": m["role"], "content": m["content"]} for m in traj.messages]
    encoded = Encoder(tok, processor, 1 << 16).encode(SFTExample(messages, [str(x) for x in paths]), "episode")
    assert encoded is not None and encoded.input_ids[:-1] == ep.ids
    assert encoded.image_grid_thw is not None and torch.equal(encoded.image_grid_thw, ep.media.image_grid_thw)
    torch.testing.assert_close(encoded.pixel_values, ep.media.pixel_values)
    pad = tok.convert_tokens_to_ids(chatml.IMAGE_PAD)
    assert all(m == 0 for t, m in zip(ep.ids, ep.mask, strict=True) if t == pad)  # vision tokens are never trained
    # The trainer's log-probabilities are the Hugging Face model's own on the SFT encoding, pixels included.
    ids = torch.tensor([ep.ids])
    with torch.no_grad():
        ours, _ = token_logprobs(model, ids, torch.ones_like(ids), media=ep.media.inputs())
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), **ep.media.inputs()).logits[:, :-1]
        blind, _ = token_logprobs(model, ids, torch.ones_like(ids))
    theirs = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(ours, blind, atol=1e-3)  # without the pixels the model scores other inputs


def test_tool_failures_are_observations_and_counted_and_time_limits_cut_episodes(
    suite: Suite, tools_env: ToolEndpoints, tiny: tuple[Any, Any]
) -> None:
    _model, tok = tiny
    mini = next(m for m in suite.rl if m.task.family == "reasoning")
    loop = "<think>spin</think>\n<code>\n```python\nwhile True:\n    pass\n```\n</code>"
    answer = "<think>done</think>\n<answer>1</answer>"
    script = [(opening_ids(tok, mini.task.question), [loop, answer])]
    engine = ScriptedEngine(tok, script, cut_at_action_end=True)
    # The sandbox's cell timeout (2 s) answers in time: a failed call, an observation, the episode goes on.
    result = play(tools_env, [mini], engine, tok, tool_timeout_s=2.0)
    ep = result.episodes[0]
    assert ep.trajectory is not None and not ep.masked
    call = ep.trajectory.tool_calls[0]
    assert call.tool == "python" and not call.ok
    assert "Timed out" in ep.trajectory.messages[3]["content"]
    assert ep.trajectory.finish == "answer"
    # An episode past its own time limit is cut, masked and counted; the others of the step finish.
    engine2 = ScriptedEngine(tok, script, cut_at_action_end=True)
    result = play(tools_env, [mini], engine2, tok, tool_timeout_s=5.0, episode_timeout_s=1.0, group_size=2)
    assert all(ep.timed_out and ep.masked for ep in result.episodes)
    assert result.seconds < 30


def test_in_process_engine_is_seeded_batched_and_agrees_with_the_trainer(tiny: tuple[Any, Any]) -> None:
    model, tok = tiny
    engine = InProcessEngine(model, tok, temperature=1.0)
    prompts = [
        list(
            tok("<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)[
                "input_ids"
            ]
        ),
        list(tok("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]),
    ]
    a = engine.generate(prompts, [24, 12], seed=7)
    b = engine.generate(prompts, [24, 12], seed=7)
    c = engine.generate(prompts, [24, 12], seed=8)
    assert [s.ids for s in a] == [s.ids for s in b] and [s.ids for s in a] != [s.ids for s in c]
    assert len(a[0].ids) <= 24 and len(a[1].ids) <= 12
    state = torch.get_rng_state()
    engine.generate(prompts, [4, 4], seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the trainer's RNG is untouched by sampling
    # The engine's log-probabilities of what it sampled are the trainer's, recomputed unpadded.
    for prompt, sample in zip(prompts, a, strict=True):
        ids = torch.tensor([prompt + sample.ids])
        logp, _entropy = token_logprobs(model, ids, torch.ones_like(ids), 1.0)
        recomputed = logp[0, len(prompt) - 1 :]
        assert torch.allclose(recomputed, torch.tensor(sample.logprobs), atol=1e-4)


def test_a_failing_engine_fails_the_rollout_loudly(
    suite: Suite, tools_env: ToolEndpoints, tiny: tuple[Any, Any]
) -> None:
    _model, tok = tiny

    class Broken:
        def generate(self, prompts: list[list[int]], max_new_tokens: list[int], seed: int) -> list[Sample]:
            raise RuntimeError("CUDA error: device-side assert")

    with pytest.raises(RuntimeError, match=r"rollout engine failed.*device-side assert"):
        play(tools_env, suite.rl[:2], Broken(), tok, group_size=2)
