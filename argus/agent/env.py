"""The agent environment: run one task through a policy with live tools, record and score it.

Each trajectory gets its own sandbox session, cleared at the end, with the task image loaded as
`image_1` by DeepEyesV2's initialisation code. The session is opened on the trajectory's first code
action, which runs after the initialisation code, so the code sees what DeepEyesV2's eager preload gives
it; a trajectory that never runs code (it answers, or only searches) never boots a sandbox, which on a
busy machine is most of what an RL step's tools cost. Tool results come back as a user turn in DeepEyesV2's
exact strings. A failing tool becomes an observation the policy can react to; a turn with no parsable
action ends the episode (as in DeepEyesV2), and so does the turn limit.
"""

from __future__ import annotations

import base64
import contextlib
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from argus.agent import prompts
from argus.agent.actions import TURN_STOPS, Action, parse
from argus.agent.reward import Judge, Reward, score
from argus.agent.task import Task
from argus.config import Prompt

MAX_OBSERVATION_IMAGES = 10  # DeepEyesV2 keeps at most 10 images per tool result

Message = dict[str, Any]
# A policy sees the conversation and every image in it (in order) and returns the next assistant turn.
Policy = Callable[[list[Message], list[bytes]], Awaitable[str]]


class ToolError(Exception):
    pass


@dataclass
class ToolCall:
    """One tool call as it happened: what was asked, what came back, when (wall clock, for the trace)."""

    tool: Literal["python", "search", "image_search", "invalid"]
    latency_s: float
    ok: bool
    detail: str = ""  # why it failed
    request: str = ""  # the code, the query, or the malformed call
    stdout: str = ""  # the code's output, or the search results as the model saw them
    stderr: str = ""
    images: tuple[int, ...] = ()  # indices into `Trajectory.images` of the images it returned
    start_ns: int = 0
    end_ns: int = 0


@dataclass
class Turn:
    """When the policy produced the assistant message at `message_index` (wall clock, nanoseconds)."""

    message_index: int
    start_ns: int
    end_ns: int


@dataclass
class Trajectory:
    task_id: str
    family: str
    messages: list[Message]
    images: list[bytes]  # the task image, then every observation image, in order
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish: Literal["answer", "max_turns", "invalid_action", "policy_error"] = "answer"
    reward: Reward | None = None
    policy_latency_s: float = 0.0
    timeline: list[Turn] = field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0
    slice: str = ""  # the task's slice (`Task.slice`), or its family where it has none

    @property
    def response(self) -> str:
        """What the model generated, turn by turn: the text the reward is computed on."""
        return "\n".join(m["content"] for m in self.messages if m["role"] == "assistant")

    @property
    def turns(self) -> int:
        return sum(1 for m in self.messages if m["role"] == "assistant")

    def calls(self) -> list[tuple[str, str]]:
        """(tool, request) of every tool call, in order: what `argus.agent.behaviour` counts repeats of."""
        return [(c.tool, c.request) for c in self.tool_calls]

    def to_sharegpt(self) -> tuple[list[dict[str, str]], list[bytes]]:
        return [{"role": m["role"], "content": m["content"]} for m in self.messages], list(self.images)


class ToolClients:
    """HTTP clients for the code executor (DeepEyesV2 v1 protocol) and the search proxy."""

    def __init__(self, sandbox_url: str, search_url: str, *, run_id: str = "default", timeout_s: float = 120.0):
        self.sandbox_url = sandbox_url.rstrip("/")
        self.search_url = search_url.rstrip("/")
        self.client = httpx.AsyncClient(
            timeout=timeout_s,
            headers={"X-Argus-Run-Id": run_id},
            limits=httpx.Limits(max_connections=64, max_keepalive_connections=64),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def run_code(self, session: str, code: str, timeout_s: float) -> dict[str, Any]:
        try:
            resp = await self.client.post(
                f"{self.sandbox_url}/jupyter_sandbox", json={"session_id": session, "code": code, "timeout": timeout_s}
            )
        except httpx.HTTPError as exc:
            raise ToolError(f"code executor unreachable: {type(exc).__name__}") from exc
        if resp.status_code != 200:
            raise ToolError(f"code executor answered {resp.status_code}: {resp.text[:300]}")
        out: dict[str, Any] = resp.json()["output"]
        return out

    async def close_session(self, session: str) -> None:
        with contextlib.suppress(httpx.HTTPError):  # the executor's idle TTL reclaims it otherwise
            await self.client.post(f"{self.sandbox_url}/clear_session", json={"session_id": session})

    async def search(self, query: str) -> str:
        return str((await self._search("/v1/search", {"query": query, "top_k": 5}))["rendered"])

    async def image_search(self, image: bytes, key: str | None) -> tuple[str, list[bytes]]:
        body: dict[str, Any] = {"key": key} if key else {"image": base64.b64encode(image).decode()}
        data = await self._search("/v1/image_search", {**body, "top_k": 5})
        images = [base64.b64decode(r["image"]) for r in data["results"] if r.get("image")]
        return str(data["rendered"]), images

    async def _search(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        try:
            resp = await self.client.post(f"{self.search_url}{path}", json=body)
        except httpx.HTTPError as exc:
            raise ToolError(f"search proxy unreachable: {type(exc).__name__}") from exc
        if resp.status_code != 200:
            raise ToolError(f"search answered {resp.status_code}: {resp.text[:300]}")
        data: dict[str, Any] = resp.json()
        return data


@dataclass
class _Session:
    id: str
    opened: bool = False  # a sandbox session exists (it was asked to load the image)


class AgentEnv:
    def __init__(
        self,
        tools: ToolClients,
        *,
        max_turns: int = 9,
        code_timeout_s: float = 30.0,
        judge: Judge | None = None,
        max_answer_chars: int = 300,
        accuracy_weight: float = 0.8,
        format_weight: float = 0.2,
        prompt: Prompt = "deepeyesv2",
    ):
        self.tools = tools
        self.prompt = prompt
        self.max_turns = max_turns
        self.code_timeout_s = code_timeout_s
        self.judge = judge
        self.max_answer_chars = max_answer_chars
        self.weights = (accuracy_weight, format_weight)

    async def run(self, task: Task, policy: Policy) -> Trajectory:
        session = _Session(f"traj-{task.id}-{uuid.uuid4().hex[:8]}")
        traj = Trajectory(
            task_id=task.id,
            family=task.family,
            messages=list(prompts.opening(self.prompt, task.question)),
            images=[task.image],
            start_ns=time.time_ns(),
            slice=task.slice or task.family,
        )
        try:
            traj.finish = "max_turns"
            for _ in range(self.max_turns):
                started, start_ns = time.perf_counter(), time.time_ns()
                try:
                    turn = await policy(traj.messages, traj.images)
                except Exception:  # noqa: BLE001 - a broken policy ends its episode, not the run
                    traj.finish = "policy_error"
                    break
                finally:
                    traj.policy_latency_s += time.perf_counter() - started
                traj.timeline.append(Turn(len(traj.messages), start_ns, time.time_ns()))
                traj.messages.append({"role": "assistant", "content": turn})
                action = parse(turn)
                if action.kind == "answer":
                    traj.finish = "answer"
                    break
                if action.kind == "invalid":
                    traj.finish = "invalid_action"
                    break
                text, images = await self._observe(session, task, action, traj)
                traj.messages.append({"role": "user", "content": text})
                traj.images.extend(images)
        finally:
            if session.opened:
                await self.tools.close_session(session.id)
            traj.end_ns = time.time_ns()
        traj.reward = await score(
            traj.response,
            task,
            judge=self.judge,
            accuracy_weight=self.weights[0],
            format_weight=self.weights[1],
            max_answer_chars=self.max_answer_chars,
        )
        return traj

    async def _open(self, session: _Session, task: Task) -> None:
        """Open the session with the task image as `image_1` (once, before the first code action)."""
        if session.opened:
            return
        session.opened = True
        if not task.image:
            return
        code = prompts.INITIALIZATION_CODE_TEMPLATE.format(base64_image=base64.b64encode(task.image).decode())
        with contextlib.suppress(ToolError):  # the code action that follows reports the executor's state
            await self.tools.run_code(session.id, code, self.code_timeout_s)

    async def _observe(
        self, session: _Session, task: Task, action: Action, traj: Trajectory
    ) -> tuple[str, list[bytes]]:
        if action.kind == "code" and action.error is None:
            await self._open(session, task)  # before the clock: the call's latency is the model's code
        started, start_ns = time.perf_counter(), time.time_ns()

        def record(tool: Any, ok: bool, request: str, **out: Any) -> None:
            latency = time.perf_counter() - started
            call = ToolCall(tool, latency, ok, request=request, start_ns=start_ns, end_ns=time.time_ns(), **out)
            traj.tool_calls.append(call)

        def indices(images: list[bytes]) -> tuple[int, ...]:
            return tuple(range(len(traj.images), len(traj.images) + len(images)))  # appended by the caller

        if action.error is not None:  # a malformed tool call: DeepEyesV2's error text is the observation
            record("invalid", False, "", detail=action.error)
            return action.error, []
        if action.kind == "code":
            assert action.code is not None
            try:
                out = await self.tools.run_code(session.id, action.code, self.code_timeout_s)
            except ToolError as exc:
                record("python", False, action.code, detail=str(exc))
                return prompts.code_observation("", f"SandboxError: {exc}", 0), []
            images = [base64.b64decode(i) for i in out.get("images", [])][:MAX_OBSERVATION_IMAGES]
            stdout, stderr = out.get("stdout", ""), out.get("stderr", "")
            record("python", not stderr, action.code, stdout=stdout, stderr=stderr, images=indices(images))
            return prompts.code_observation(stdout, stderr, len(images)), images
        tool = action.tool or "search"
        request = action.arguments.get("query", "") if action.arguments else ""
        try:
            if tool == "search":
                assert action.arguments is not None
                text, images = await self.tools.search(action.arguments["query"]), []
            else:
                request = task.image_search_key or "<task image>"
                text, images = await self.tools.image_search(task.image, task.image_search_key)
                images = images[:MAX_OBSERVATION_IMAGES]
                # One <image> placeholder per image actually attached (a result may come without one).
                while text.count("<image>") > len(images):
                    text = "".join(text.rsplit("<image>", 1))
        except ToolError as exc:
            record(tool, False, request, detail=str(exc))
            return "Search error", []
        record(tool, True, request, stdout=text, images=indices(images))
        return prompts.search_observation(text), images


def image_part(image: bytes) -> dict[str, Any]:
    """A PNG as an OpenAI `image_url` content part with a data URI."""
    return {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(image).decode()}}


def with_images(messages: list[Message], images: list[bytes]) -> list[Message]:
    """The conversation in OpenAI's multimodal chat format: each `<image>` placeholder, in order, becomes
    an `image_url` part with the next image as a PNG data URI (what a vision model is sent, and what
    MLflow's trace view renders inline)."""
    out, k = [], 0
    for m in messages:
        parts: list[dict[str, Any]] = []
        for i, piece in enumerate(m["content"].split("<image>")):
            if i > 0 and k < len(images):
                parts.append(image_part(images[k]))
                k += 1
            if piece:
                parts.append({"type": "text", "text": piece})
        out.append({"role": m["role"], "content": parts})
    return out


# In a scripted turn, stands for what the last code cell printed: a scripted teacher answers with its own
# code's output, so a strategy that counts wrongly answers wrongly (the oracle table is of the strategies,
# not of an answer key).
LAST_OUTPUT = "{last_output}"
_STDOUT = re.compile(r"^Code execution result:\nstdout:\n```\n(.*?)\n```", re.DOTALL)


def last_output(messages: Sequence[Message]) -> str:
    """The stdout of the last code observation in `messages`, stripped ("" if there is none)."""
    for m in reversed(messages):
        if m["role"] == "user" and (match := _STDOUT.match(str(m["content"]))):
            return match.group(1).strip()
    return ""


class ScriptedPolicy:
    """Plays fixed assistant turns in order: gold trajectories, the oracle's teachers, and tests of the
    environment. `LAST_OUTPUT` in a turn becomes what the last code cell printed."""

    def __init__(self, turns: Sequence[str]):
        self.turns = list(turns)
        self.index = 0

    async def __call__(self, messages: list[Message], images: list[bytes]) -> str:
        if self.index >= len(self.turns):
            raise RuntimeError("scripted policy ran out of turns")
        turn = self.turns[self.index]
        self.index += 1
        return turn.replace(LAST_OUTPUT, last_output(messages)) if LAST_OUTPUT in turn else turn


class OpenAIPolicy:
    """A model behind an OpenAI-compatible chat endpoint (vLLM): what evaluation uses."""

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        max_tokens: int = 512,
        temperature: float = 0.0,
        seed: int | None = None,
        vision: bool = False,
        timeout_s: float = 300.0,
    ):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.seed = seed  # sampled runs are repeatable: the server draws from this seed per request
        self.vision = vision
        self.client = httpx.AsyncClient(timeout=timeout_s)

    def _content(self, messages: list[Message], images: list[bytes]) -> list[Message]:
        if not self.vision:  # text models see the <image> placeholders as text, exactly as in their SFT data
            return [{"role": m["role"], "content": m["content"]} for m in messages]
        return with_images(messages, images)

    async def __call__(self, messages: list[Message], images: list[bytes]) -> str:
        resp = await self.client.post(
            self.url,
            json={
                "model": self.model,
                "messages": self._content(messages, images),
                "max_tokens": self.max_tokens,
                "temperature": self.temperature,
                # The turn ends with its action, as in RL rollouts; vLLM keeps the closing tag in the text.
                "stop": list(TURN_STOPS),
                "include_stop_str_in_output": True,
                **({"seed": self.seed} if self.seed is not None else {}),
            },
        )
        resp.raise_for_status()
        return str(resp.json()["choices"][0]["message"]["content"] or "").removesuffix("<|im_end|>")

    async def aclose(self) -> None:
        await self.client.aclose()
