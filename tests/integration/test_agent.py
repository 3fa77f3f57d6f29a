"""The agent environment against the real tools (sandbox under gVisor, offline search proxy)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request

from argus.agent import prompts
from argus.agent.env import AgentEnv, ScriptedPolicy, ToolClients, Trajectory
from argus.agent.reward import Judge, format_check, score
from argus.agent.task import Task
from argus.backends.local.tools import LocalToolEnvironment, ToolEndpoints
from argus.config import SandboxSpec
from argus.data.generate import run_gold, write_search_corpus
from argus.data.tasks import MiniTask, Suite, build_suite
from tests.conftest import serve_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def suite() -> Suite:
    return build_suite(seed=11, sft_size=24, rl_size=4, eval_size=4)


@pytest.fixture(scope="module")
def tools_env(suite: Suite, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ToolEndpoints]:
    root = tmp_path_factory.mktemp("agent")
    index = write_search_corpus(suite, root / "search")
    with LocalToolEnvironment(
        root / "tools", index_path=index, sandbox=SandboxSpec(runner="gvisor", warm_pool=4)
    ) as endpoints:
        yield endpoints


def run(coro: Any) -> Any:
    return asyncio.run(coro)


async def episode(endpoints: ToolEndpoints, task: Task, turns: list[str], **env_kw: Any) -> Trajectory:
    tools = ToolClients(endpoints.sandbox_url, endpoints.search_url)
    try:
        return await AgentEnv(tools, **env_kw).run(task, ScriptedPolicy(turns))
    finally:
        await tools.aclose()


def first(suite: Suite, family: str, needle: str = "") -> MiniTask:
    return next(m for m in suite.sft if m.task.family == family and needle in "".join(m.gold))


# -- gold trajectories -----------------------------------------------------------------------------------


def test_every_gold_trajectory_scores_one(suite: Suite, tools_env: ToolEndpoints) -> None:
    async def go() -> list[Trajectory]:
        tools = ToolClients(tools_env.sandbox_url, tools_env.search_url)
        try:
            return await run_gold(suite.sft, tools, concurrency=6)
        finally:
            await tools.aclose()

    trajectories = run(go())  # run_gold raises on any gold trajectory below 1.0
    assert {t.family for t in trajectories} == {"perception", "reasoning", "search", "integrated"}
    assert all(t.reward is not None and t.reward.score == 1.0 for t in trajectories)
    used = {c.tool for t in trajectories for c in t.tool_calls}
    assert used == {"python", "search", "image_search"}
    for traj in trajectories:  # one <image> placeholder per image, in order, like the sharegpt files
        assert sum(m["content"].count("<image>") for m in traj.messages) == len(traj.images)


def test_observations_are_deepeyesv2_strings(suite: Suite, tools_env: ToolEndpoints) -> None:
    mini = first(suite, "perception", "display(crop)")
    traj = run(episode(tools_env, mini.task, mini.gold))
    obs = traj.messages[3]
    assert obs["role"] == "user"
    assert obs["content"] == (
        f"Code execution result:\nstdout:\n```\n{mini.task.answer}\n\n```\n\nstderr:\n```\n\n```\n\nImages:\n<image>"
    )
    assert len(traj.images) == 2  # the task image and the crop
    search = first(suite, "search")
    straj = run(episode(tools_env, search.task, search.gold))
    text = straj.messages[3]["content"]
    assert text.startswith("<tool_response>\nA Google search for '") and text.endswith("\n</tool_response>")
    assert f"It was founded in {search.task.answer}." in text
    assert traj.messages[0]["content"] == prompts.SYSTEM_PROMPT


def test_each_trajectory_has_its_own_session(suite: Suite, tools_env: ToolEndpoints) -> None:
    task = suite.sft[0].task
    leak = "<think>a</think>\n<code>\n```python\nsecret = 42\nprint('set')\n```\n</code>"
    peek = (
        "<think>b</think>\n<code>\n```python\ntry:\n    print(secret)\nexcept NameError:\n"
        "    print('isolated')\n```\n</code>"
    )
    run(episode(tools_env, task, [leak, "<think>done</think><answer>x</answer>"]))
    traj = run(episode(tools_env, task, [peek, "<think>done</think><answer>x</answer>"]))
    assert "isolated" in traj.messages[3]["content"]


def test_a_sandbox_is_opened_by_the_first_code_action_only(suite: Suite, tools_env: ToolEndpoints) -> None:
    import httpx

    def starts() -> float:
        text = httpx.get(f"{tools_env.sandbox_url}/metrics", timeout=10).text
        lines = [line for line in text.splitlines() if line.startswith("argus_sandbox_session_starts_total")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in lines)

    search = first(suite, "search")
    before = starts()
    traj = run(episode(tools_env, search.task, search.gold))  # searches, then answers: no code
    assert traj.reward is not None and traj.reward.accuracy == 1.0
    assert starts() == before
    # A code action finds the task image loaded, as DeepEyesV2's eager preload would leave it.
    code = "<think>a</think>\n<code>\n```python\nprint(image_1.size)\n```\n</code>"
    task = first(suite, "perception").task
    traj = run(episode(tools_env, task, [code, "<think>done</think><answer>x</answer>"]))
    assert starts() == before + 1
    assert "stdout:\n```\n(" in traj.messages[3]["content"] and "Error" not in traj.messages[3]["content"]


# -- malformed actions and failing tools -----------------------------------------------------------------


def test_format_rules(suite: Suite, tools_env: ToolEndpoints) -> None:
    task = first(suite, "reasoning").task
    right = task.answer
    cases = {
        "balanced": (f"<think>ok</think>\n<answer>{right}</answer>", 1.0, 1.0),
        "unbalanced think": (f"<think>a<think>b</think>\n<answer>{right}</answer>", 0.0, 1.0),
        "no think at all": (f"<answer>{right}</answer>", 0.0, 1.0),
        "two answers": (f"<think>a</think><answer>{right}</answer><answer>{right}</answer>", 1.0, 1.0),
        "unclosed answer": (f"<think>a</think><answer>{right}</answer><answer>", 0.0, 1.0),
        "empty answer": ("<think>a</think><answer> </answer>", 0.0, 0.0),
        "300-char answer": (f"<think>a</think><answer>{right}{'x' * 300}</answer>", 0.0, 0.0),
        "wrong answer": ("<think>a</think><answer>12</answer>", 1.0, 0.0),
    }
    for name, (turn, fmt, acc) in cases.items():
        reward = run(score(turn, task))
        assert (reward.format, reward.accuracy) == (fmt, acc), name
        assert reward.score == pytest.approx(0.8 * acc + 0.2 * fmt), name
    assert format_check("<think>x</think><code>a</code><code>b<answer>1</answer>")[0] is True  # unbalanced code


def test_malformed_tool_calls_become_observations(suite: Suite, tools_env: ToolEndpoints) -> None:
    task = first(suite, "search").task
    answer = f"<think>found</think>\n<answer>{task.answer}</answer>"
    turns = [
        "<think>x</think>\n<tool_call>\n{not json}\n</tool_call>",
        '<think>x</think>\n<tool_call>\n{"name": "browse", "arguments": {}}\n</tool_call>',
        '<think>x</think>\n<tool_call>\n{"name": "image_search", "arguments": {"query": "q"}}\n</tool_call>',
        answer,
    ]
    traj = run(episode(tools_env, task, turns))
    observations = [m["content"] for m in traj.messages if m["role"] == "user"][1:]
    assert observations[0].startswith("Invalid tool call format: {not json}. Error: ")
    assert observations[1] == 'Invalid tool call name: {"name": "browse", "arguments": {}}.'
    assert observations[2].startswith("Invalid tool call parameters for image search")
    assert traj.finish == "answer" and traj.reward is not None and traj.reward.score == 1.0


def test_no_action_or_missing_answer_ends_the_episode(suite: Suite, tools_env: ToolEndpoints) -> None:
    task = suite.sft[0].task
    traj = run(episode(tools_env, task, ["<think>I will just think.</think>", "never reached"]))
    assert traj.finish == "invalid_action" and traj.turns == 1
    assert traj.reward is not None and (traj.reward.format, traj.reward.score) == (0.0, 0.0)
    unclosed = run(episode(tools_env, task, ["<think>a</think>\n<code>\n```python\nprint(1)\n```"]))
    assert unclosed.finish == "invalid_action"
    looping = "<think>again</think>\n<code>\n```python\nprint(1)\n```\n</code>"
    capped = run(episode(tools_env, task, [looping] * 3, max_turns=3))
    assert capped.finish == "max_turns" and capped.turns == 3 and capped.reward.score == 0.0  # type: ignore[union-attr]


def test_sandbox_errors_and_timeouts_are_observations(suite: Suite, tools_env: ToolEndpoints) -> None:
    task = suite.sft[0].task
    end = "<think>ok</think><answer>x</answer>"
    crash = "<think>a</think>\n<code>\n```python\n1 / 0\n```\n</code>"
    slow = "<think>b</think>\n<code>\n```python\nwhile True:\n    pass\n```\n</code>"
    traj = run(episode(tools_env, task, [crash, slow, end], code_timeout_s=1))
    crash_obs, slow_obs = (m["content"] for m in traj.messages[3:6:2])
    assert "ZeroDivisionError: division by zero" in crash_obs and crash_obs.startswith("Code execution result:")
    assert ", line 1\n----> 1 1 / 0" in crash_obs  # the traceback as IPython prints it
    assert "Timed out waiting for Jupyter kernel output." in slow_obs  # the reference sandbox's text
    assert traj.finish == "answer"
    down = ToolEndpoints(sandbox_url="http://127.0.0.1:9", search_url=tools_env.search_url)  # nothing on port 9
    dead = run(episode(down, task, [crash, end]))
    assert "SandboxError: code executor unreachable" in dead.messages[3]["content"] and dead.finish == "answer"
    nosearch = ToolEndpoints(sandbox_url=tools_env.sandbox_url, search_url="http://127.0.0.1:9")
    lost = run(
        episode(
            nosearch,
            task,
            ['<think>s</think><tool_call>{"name": "search", "arguments": {"query": "q"}}</tool_call>', end],
        )
    )
    assert lost.messages[3]["content"] == "Search error"


def test_llm_judge_over_an_openai_compatible_endpoint(suite: Suite) -> None:
    seen: list[dict[str, Any]] = []
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def completions(request: Request) -> dict[str, Any]:
        body = await request.json()
        seen.append(body)
        verdict = "TRUE" if "fourteen hundred" in body["messages"][0]["content"] else "FALSE"
        return {"choices": [{"message": {"role": "assistant", "content": f"## Equivalence Judgement\n{verdict}"}}]}

    task = Task(id="j", family="search", question="When was it founded?", answer="1400", image=b"")
    with serve_app(app) as url:
        judge = Judge(f"{url}/v1")
        good = run(score("<think>a</think><answer>fourteen hundred</answer>", task, judge=judge))
        bad = run(score("<think>a</think><answer>1500</answer>", task, judge=judge))
    assert (good.accuracy, bad.accuracy) == (1.0, 0.0)
    assert seen[0]["model"] == "judge" and "**Reference Answer**\n1400" in seen[0]["messages"][0]["content"]


def test_trajectory_exports_to_sharegpt(suite: Suite, tools_env: ToolEndpoints) -> None:
    mini = first(suite, "integrated", "image_search")
    traj = run(episode(tools_env, mini.task, mini.gold))
    messages, images = traj.to_sharegpt()
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user", "assistant"]
    assert sum(m["content"].count("<image>") for m in messages) == len(images) > 1
    assert json.loads(json.dumps(messages)) == messages


def test_unparseable_search_query_argument(suite: Suite, tools_env: ToolEndpoints) -> None:
    task = suite.sft[0].task
    call = '<think>s</think><tool_call>{"name": "search", "arguments": {"q": "x"}}</tool_call>'
    traj = run(episode(tools_env, task, [call, "<think>ok</think><answer>x</answer>"]))
    assert traj.messages[3]["content"].startswith("Tool call execution error: 'query' is required")


# -- trajectories as MLflow traces ----------------------------------------------------------------------


def test_trajectories_become_mlflow_traces_with_their_images(
    suite: Suite, tools_env: ToolEndpoints, training_stack: Any
) -> None:
    """Episodes through the real tools, written as traces to the stack's MLflow server, read back with the
    client and through the route MLflow's UI loads trace images from."""
    import re
    from urllib.parse import parse_qs, urlparse

    import httpx
    import mlflow

    from argus import tracking
    from argus.agent.traces import log_trajectories

    mlflow.set_tracking_uri(training_stack.mlflow_url)
    crop = first(suite, "perception", "display(crop)")
    lens = first(suite, "integrated", "image_search")
    failing = (
        "<think>x</think>\n<code>\n```python\nraise ValueError('no')\n```\n</code>",
        "<think>y</think><answer>none</answer>",
    )
    episodes = [
        (run(episode(tools_env, crop.task, crop.gold)), crop.task),
        (run(episode(tools_env, lens.task, lens.gold)), lens.task),
        (run(episode(tools_env, crop.task, list(failing))), crop.task),
    ]
    experiment_id = tracking.ensure_experiment("trace-test")
    client = mlflow.MlflowClient(training_stack.mlflow_url)
    run_id = client.create_run(experiment_id, run_name="eval-trace-test").info.run_id
    ids = log_trajectories(episodes, experiment_id=experiment_id, run_id=run_id, tags={"argus.trace.label": "t"})

    traces = {t.info.trace_id: t for t in client.search_traces(locations=[experiment_id], run_id=run_id)}
    assert set(traces) == set(ids)  # one trace per episode, linked to the run
    for trace_id, (traj, task) in zip(ids, episodes, strict=True):
        trace = traces[trace_id]
        tags = trace.info.tags
        assert tags["argus.task_id"] == task.id and tags["argus.family"] == task.family
        assert tags["argus.reward"] == f"{traj.reward.score:.2f}" and tags["argus.finish"] == traj.finish
        root = next(s for s in trace.data.spans if s.parent_id is None)
        assert root.span_type == "AGENT"
        assert root.attributes["question"] == task.question and root.attributes["gold"] == task.answer
        assert root.outputs["reward"]["accuracy"] == traj.reward.accuracy and root.outputs["gold"] == task.answer
        turns = [s for s in trace.data.spans if s.span_type == "CHAT_MODEL"]
        calls = [s for s in trace.data.spans if s.span_type == "TOOL"]
        assert len(turns) == traj.turns and len(calls) == len(traj.tool_calls)
        assert all(root.start_time_ns <= s.start_time_ns <= s.end_time_ns <= root.end_time_ns for s in turns + calls)
        assessments = {a.name: a for a in trace.info.assessments}
        assert assessments["expected_answer"].value == task.answer
        assert assessments["reward"].value == round(traj.reward.score, 4)
        # Every image of the episode is an attachment the UI can load, the task image first
        # (the opening messages are the inputs, what the agent did the outputs).
        refs = re.findall(r"mlflow-attachment://[^'\"]+", str(root.inputs["messages"]) + str(root.outputs["messages"]))
        assert len(refs) == len(traj.images)
        first_ref = urlparse(refs[0])
        served = httpx.get(
            f"{training_stack.mlflow_url}/ajax-api/3.0/mlflow/get-trace-artifact",
            params={"request_id": parse_qs(first_ref.query)["trace_id"][0], "path": first_ref.hostname},
            timeout=30,
        )
        assert served.status_code == 200 and served.content == task.image
    crop_trace, lens_trace, failed = (traces[i] for i in ids)
    code = next(s for s in crop_trace.data.spans if s.span_type == "TOOL")
    assert code.name == "python" and "crop" in code.inputs["code"] and crop.task.answer in code.outputs["stdout"]
    assert code.outputs["images"] and float(code.attributes["latency_s"]) > 0
    lens_call = next(s for s in lens_trace.data.spans if s.name == "image_search")
    assert lens_call.outputs["results"] and lens_call.outputs["images"]
    bad = next(s for s in failed.data.spans if s.span_type == "TOOL")
    assert bad.status.status_code == "ERROR" and "ValueError" in bad.outputs["stderr"]
    # Searchable by family and outcome, as a user filters the Traces tab.
    hits = client.search_traces(
        locations=[experiment_id],
        filter_string=f"tags.`argus.task_id` = '{crop.task.id}' and tags.`argus.accuracy` = '1'",
    )
    assert [t.info.trace_id for t in hits] == [ids[0]]
