"""Multi-turn rollouts that are token-in, token-out: live agent episodes whose token ids are the ones the
policy sampled and the ones its observations were encoded to, never a re-tokenised transcript.

Each episode is an `argus.agent.env.AgentEnv` episode (its own sandbox session with the task image as
`image_1`, DeepEyesV2's observation strings, tool failures as observations, the DeepEyesV2 reward). The
policy the environment calls is a `TokenPolicy`, one per episode, which owns the episode's ids: on its
first turn it encodes the opening in the ChatML layout the SFT encoder trains on; on every later turn it
appends only the new observation, wrapped as verl's agent loop does
(`<|im_end|>\\n<|im_start|>user\\n…<|im_end|>\\n<|im_start|>assistant\\n`), with loss mask 0, then the
sampled tokens with mask 1 and the engine's log-probabilities. The text it hands back to the environment
is a decoding of the sampled ids, used to parse the action and to score; the ids stay authoritative.

Episodes advance in lockstep, as in verl (`agent_rollout_loop`): every live episode asks for its next
turn, and one batched `generate` serves them all, in episode order with a seed of (step, turn), so a
rollout is reproducible for a seed however long each tool takes. Tool calls of a turn run concurrently
(bounded by the executor's own admission), generation runs in a worker thread so the event loop keeps
serving tool responses, and each episode has a wall-clock limit past which it is cut and masked, so one
long-tail episode cannot hold a step for ever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from argus.agent.actions import TURN_STOPS
from argus.agent.env import AgentEnv, Message, ToolClients, Trajectory
from argus.agent.reward import Judge
from argus.agent.task import Task
from argus.config import Prompt, RewardSpec, RLJobConfig
from argus.models import chatml
from argus.models.chatml import Media, Vision

HTTP_MARGIN_S = 15.0
STOP_TOKENS = TURN_STOPS  # token ids here: each is one token of the policy's tokenizer


@dataclass
class Sample:
    ids: list[int]
    logprobs: list[float]
    stopped: bool  # ended on a stop token (else it ran out of its token budget)


class Engine(Protocol):
    """A rollout engine: samples continuations of many token sequences at once. `media`, for a
    vision-language policy, holds each prompt's images (None: a prompt without any)."""

    def generate(
        self, prompts: list[list[int]], max_new_tokens: list[int], seed: int, media: list[Media | None] | None = None
    ) -> list[Sample]: ...


class InProcessEngine:
    """Hugging Face `generate` on the trainer's own weights (CPU, small models): batched, left-padded,
    sampling at the job's temperature, stopping at the end of an action. The log-probabilities are
    those of the sampling distribution (logits / temperature), as the trainer recomputes them."""

    def __init__(self, model: Any, tokenizer: Any, *, temperature: float = 1.0):
        self.model = model
        self.tok = tokenizer
        self.temperature = temperature
        self.stop_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in STOP_TOKENS]
        self.pad = int(tokenizer.pad_token_id)

    def generate(
        self, prompts: list[list[int]], max_new_tokens: list[int], seed: int, media: list[Media | None] | None = None
    ) -> list[Sample]:
        import torch

        # The images of the batch, in row order, as Qwen2-VL's forward expects them; its multimodal rotary
        # positions skip the left padding by the attention mask.
        images = Media.join(media or [])
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        was_training = self.model.training
        self.model.eval()
        try:
            # A private RNG stream: the rollout of a step is a function of its seed, and the trainer's
            # own RNG (dropout, data order) is untouched by how many tokens were sampled.
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(seed)
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max(max_new_tokens),
                    do_sample=True,
                    temperature=self.temperature,
                    top_k=0,
                    top_p=1.0,
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.pad,
                    return_dict_in_generate=True,
                    output_scores=True,
                    **(images.inputs() if images is not None else {}),
                )
        finally:
            self.model.train(was_training)
        new = out.sequences[:, width:]
        logp = torch.stack([torch.log_softmax(s.float(), dim=-1) for s in out.scores], dim=1)
        chosen = logp.gather(-1, new[:, :, None]).squeeze(-1)
        samples = []
        stops = set(self.stop_ids)
        for i, budget in enumerate(max_new_tokens):
            row = new[i].tolist()
            n, stopped = min(budget, len(row)), False
            for j, token in enumerate(row[:n]):
                if token in stops:
                    n, stopped = j + 1, True
                    break
            samples.append(Sample(row[:n], chosen[i, :n].tolist(), stopped))
        return samples


class Lockstep:
    """Serves every live episode's turn with one `generate` call, in episode order."""

    def __init__(self, engine: Engine, episodes: int, seed: int):
        self.engine = engine
        self.live = episodes
        self.seed = seed
        self.turn = 0
        self.pending: dict[int, tuple[list[int], int, Media | None, asyncio.Future[Sample]]] = {}
        self.running = False
        self.generate_s = 0.0
        self.batches: list[int] = []
        self.error: BaseException | None = None
        # The event loop holds tasks only weakly: without this reference a running batch could be
        # garbage-collected and every episode waiting on it would wait for ever.
        self.task: asyncio.Task[None] | None = None

    async def request(self, index: int, ids: list[int], budget: int, media: Media | None = None) -> Sample:
        future: asyncio.Future[Sample] = asyncio.get_running_loop().create_future()
        self.pending[index] = (ids, budget, media, future)
        self._maybe_run()
        return await future

    def finish(self, index: int) -> None:
        self.live -= 1
        stale = self.pending.pop(index, None)
        if stale is not None and not stale[3].done():
            stale[3].cancel()
        self._maybe_run()

    def _maybe_run(self) -> None:
        if not self.running and self.pending and len(self.pending) >= self.live:
            self.running = True
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        order = sorted(self.pending)
        batch = [self.pending.pop(i) for i in order]
        seed = hash((self.seed, self.turn)) & 0x7FFFFFFF
        self.turn += 1
        started = time.perf_counter()
        try:
            media = [b[2] for b in batch]
            # A text policy's engines are called as they always were; images go only where there are some.
            extra = (media,) if any(m is not None for m in media) else ()
            samples = await asyncio.to_thread(
                self.engine.generate, [b[0] for b in batch], [b[1] for b in batch], seed, *extra
            )
        except BaseException as exc:  # noqa: BLE001 - the engine failing fails the rollout, loudly
            self.error = exc
            for _ids, _budget, _media, fut in batch:
                if not fut.done():
                    fut.cancel()
            return
        finally:
            self.generate_s += time.perf_counter() - started
            self.batches.append(len(batch))
            self.running = False
        for (_ids, _budget, _media, fut), sample in zip(batch, samples, strict=True):
            if not fut.done():
                fut.set_result(sample)
        self._maybe_run()


class Truncated(Exception):
    """The episode used its whole response-token budget."""


@dataclass
class Episode:
    index: int
    task: Task
    ids: list[int] = field(default_factory=list)
    mask: list[int] = field(default_factory=list)  # 1: sampled by the policy; 0: prompt or observation
    logprobs: list[float] = field(default_factory=list)  # the engine's, 0.0 off the mask
    media: Media | None = None  # a VL policy's: every image of the episode so far, in the order of its ids
    generated: int = 0
    truncated: bool = False
    timed_out: bool = False
    trajectory: Trajectory | None = None

    def extend(self, ids: list[int], sampled: bool, logprobs: list[float] | None = None) -> None:
        self.ids.extend(ids)
        self.mask.extend([1 if sampled else 0] * len(ids))
        self.logprobs.extend(logprobs if logprobs is not None else [0.0] * len(ids))

    @property
    def masked(self) -> bool:
        """Left out of the loss: cut by the token budget or the time limit, so its reward is not the
        reward of a finished answer."""
        return self.truncated or self.timed_out


class TokenPolicy:
    """The AgentEnv policy of one episode: it keeps the ids and hands the environment text."""

    def __init__(
        self,
        episode: Episode,
        lockstep: Lockstep,
        tokenizer: Any,
        *,
        turn_tokens: int,
        budget: int,
        vision: Vision | None = None,
    ):
        self.ep = episode
        self.lockstep = lockstep
        self.tok = tokenizer
        self.turn_tokens = turn_tokens
        self.budget = budget
        self.vision = vision
        self.seen = 0
        self.images_seen = 0
        self.end = int(tokenizer.convert_tokens_to_ids("<|im_end|>"))
        self.assistant = chatml.parts(tokenizer, "assistant", "")[0]
        self.newline = chatml.parts(tokenizer, "assistant", "")[2]

    def _encode(self, messages: list[Message], images: list[bytes]) -> list[int]:
        """New messages as ids; for a VL policy their images (those not seen yet) join the episode's media
        and each `<image>` becomes that image's vision tokens, as the SFT encoder lays them out."""
        if self.vision is None:
            return chatml.encode(self.tok, messages)
        new = images[self.images_seen :]
        self.images_seen = len(images)
        pads: list[int] = []
        if new:
            media, pads = self.vision.process(new)
            self.ep.media = Media.join([self.ep.media, media])
        return chatml.encode(self.tok, messages, iter(pads))

    async def __call__(self, messages: list[Message], images: list[bytes]) -> str:
        ep = self.ep
        if not ep.ids:
            ep.extend(self._encode(messages, images) + self.assistant, sampled=False)
        else:
            # The turn stopped at the end of an action (or its own <|im_end|>): close it as ChatML does,
            # then the observation and the next assistant header, none of it the policy's.
            closing = [] if ep.ids[-1] == self.end else [self.end]
            observed = closing + self.newline + self._encode(messages[self.seen :], images) + self.assistant
            ep.extend(observed, sampled=False)
        left = self.budget - ep.generated
        if left <= 0:
            ep.truncated = True
            raise Truncated(f"{ep.generated} response tokens")
        sample = await self.lockstep.request(ep.index, ep.ids, min(self.turn_tokens, left), ep.media)
        ep.extend(sample.ids, sampled=True, logprobs=sample.logprobs)
        ep.generated += len(sample.ids)
        if not sample.stopped and ep.generated >= self.budget:
            ep.truncated = True
        self.seen = len(messages) + 1  # the environment appends this turn next
        text: str = self.tok.decode(sample.ids, skip_special_tokens=False)
        return text.removesuffix("<|im_end|>")


@dataclass
class RolloutResult:
    episodes: list[Episode]
    seconds: float
    generate_s: float
    batches: list[int]


@dataclass(frozen=True)
class RolloutSettings:
    """How a step's episodes are played: the group size, the limits, the tools and the reward."""

    sandbox_url: str
    search_url: str
    prompt: Prompt
    group_size: int = 8
    max_turns: int = 9
    turn_tokens: int = 512
    response_tokens: int = 2048
    tool_timeout_s: float = 30.0
    episode_timeout_s: float = 600.0
    reward: RewardSpec = field(default_factory=RewardSpec)
    judge_url: str | None = None  # scores accuracy where `reward.judge` is set

    @classmethod
    def of(cls, job: RLJobConfig) -> RolloutSettings:
        rl = job.rl
        return cls(
            sandbox_url=job.sandbox_url,
            search_url=job.search_url,
            prompt=job.prompt,
            group_size=rl.rollouts_per_prompt,
            max_turns=rl.max_turns,
            turn_tokens=rl.max_turn_tokens,
            response_tokens=rl.max_response_tokens,
            tool_timeout_s=rl.tool_timeout_s,
            episode_timeout_s=rl.episode_timeout_s,
            reward=rl.reward,
            judge_url=job.judge_url,
        )

    def env(self, tools: ToolClients) -> AgentEnv:
        """The agent environment of the episodes, with the job's reward (weights, answer limit, judge)."""
        reward = self.reward
        if reward.judge and not self.judge_url:
            raise ValueError("rl.reward.judge is set but no judge endpoint was given")
        return AgentEnv(
            tools,
            max_turns=self.max_turns,
            code_timeout_s=self.tool_timeout_s,
            prompt=self.prompt,
            judge=Judge(self.judge_url) if reward.judge and self.judge_url else None,
            max_answer_chars=reward.max_answer_chars,
            accuracy_weight=reward.accuracy_weight,
            format_weight=reward.format_weight,
        )


async def rollout(
    tasks: list[Task],
    engine: Engine,
    tokenizer: Any,
    settings: RolloutSettings,
    *,
    seed: int,
    run_id: str,
    make_env: Callable[[ToolClients], AgentEnv] | None = None,
    vision: Vision | None = None,
) -> RolloutResult:
    """`settings.group_size` episodes of every task, in task order (a group's episodes are consecutive).
    `vision`: the policy is a vision-language model, and its episodes carry their images."""
    started = time.perf_counter()
    size = settings.group_size
    episodes = [Episode(i, task) for i, task in enumerate(t for t in tasks for _ in range(size))]
    lockstep = Lockstep(engine, len(episodes), seed)
    # The executor enforces the cell's limit and answers with its timeout text (an observation the model
    # learns from); the HTTP limit past it only catches an executor that does not answer at all.
    tools = ToolClients(
        settings.sandbox_url, settings.search_url, run_id=run_id, timeout_s=settings.tool_timeout_s + HTTP_MARGIN_S
    )
    env = make_env(tools) if make_env else settings.env(tools)

    async def play(ep: Episode) -> None:
        policy = TokenPolicy(
            ep, lockstep, tokenizer, turn_tokens=settings.turn_tokens, budget=settings.response_tokens, vision=vision
        )
        try:
            ep.trajectory = await asyncio.wait_for(env.run(ep.task, policy), settings.episode_timeout_s)
        except TimeoutError:
            ep.timed_out = True
        except asyncio.CancelledError:
            if lockstep.error is None:
                raise
        finally:
            lockstep.finish(ep.index)

    try:
        await asyncio.gather(*(play(ep) for ep in episodes))
    finally:
        await tools.aclose()
    if lockstep.error is not None:
        raise RuntimeError(f"rollout engine failed: {lockstep.error!r}") from lockstep.error
    return RolloutResult(episodes, time.perf_counter() - started, lockstep.generate_s, lockstep.batches)
