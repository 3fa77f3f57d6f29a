"""Trajectories as MLflow traces: one trace per episode, written after the episode with its real timings.

The trace follows MLflow 3's conventions so that its UI shows it as an agent run: an `AGENT` root span
whose inputs are the opening messages (with the task image) and whose outputs are the agent's turns and
the tools' answers in OpenAI's chat format (the UI renders both as a chat, every image inline: MLflow
moves each `data:` URI into a trace attachment in the artifact store), a `CHAT_MODEL` span per model
turn and a `TOOL` span per tool call (the code or query, stdout/stderr or results, the images it
returned, its latency, and ERROR status when it failed). The question, gold answer, finish reason and
reward breakdown are on the root span; the gold answer is also an expectation and the reward and
accuracy are feedback, so the Traces tab shows them as assessment columns. Tags (`argus.task_id`,
`argus.family`, `argus.accuracy`, `argus.reward`, ...) make traces searchable, and each trace is linked
to the run it belongs to.

Spans are created detached (`start_span_no_context`) with the recorded start and end times, so writing
traces never sits inside the episode's own timing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from argus import tracking
from argus.agent.env import Trajectory, image_part, with_images
from argus.agent.task import Task

LINK_BATCH = 100  # MlflowClient.link_traces_to_run takes at most 100 trace ids a call
ASSESS_THREADS = 8


def log_trajectory(
    traj: Trajectory,
    task: Task,
    *,
    experiment_id: str,
    run_id: str | None,
    tags: dict[str, str],
) -> str:
    """Write one episode as a trace in `experiment_id`, linked to `run_id`; returns the trace id."""
    import mlflow
    from mlflow.entities import SpanType

    reward = traj.reward
    conversation = with_images(traj.messages, traj.images)
    trace_tags = {
        tracking.TRACE_TAG_TASK: traj.task_id,
        tracking.TRACE_TAG_FAMILY: traj.family,
        tracking.TRACE_TAG_FINISH: traj.finish,
        tracking.TRACE_TAG_ACCURACY: str(int(bool(reward and reward.accuracy >= 1.0))),
        tracking.TRACE_TAG_REWARD: f"{reward.score:.2f}" if reward else "",
        **tags,
    }
    start = traj.start_ns or None
    root = mlflow.start_span_no_context(
        f"episode {traj.task_id}",
        span_type=SpanType.AGENT,
        inputs={"messages": conversation[:2]},
        attributes={"task_id": traj.task_id, "family": traj.family, "question": task.question, "gold": task.answer},
        tags=trace_tags,
        metadata={"mlflow.sourceRun": run_id} if run_id else None,
        experiment_id=experiment_id,
        start_time_ns=start,
    )
    calls = iter(traj.tool_calls)
    for n, turn in enumerate(traj.timeline, 1):
        span = mlflow.start_span_no_context(
            f"turn {n}",
            span_type=SpanType.CHAT_MODEL,
            parent_span=root,
            inputs={"messages": conversation[turn.message_index - 1 : turn.message_index]},
            attributes={"message_index": str(turn.message_index)},
            start_time_ns=turn.start_ns,
        )
        text = traj.messages[turn.message_index]["content"]
        span.end(
            outputs={"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]},
            end_time_ns=turn.end_ns,
        )
        # The call this turn made, if any, starts after it (a turn with an answer makes none).
        if turn.message_index + 1 < len(traj.messages):
            call = next(calls, None)
            if call is not None:
                _tool_span(root, call, traj.images)
    outputs = {
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": traj.messages[-1]["content"]},
                "finish_reason": traj.finish,
            }
        ],
        "messages": conversation[2:],  # what the agent did: its turns and what the tools answered
        "answer": reward.answer if reward else None,
        "gold": task.answer,
        "finish": traj.finish,
        "reward": {"score": reward.score, "accuracy": reward.accuracy, "format": reward.format} if reward else None,
    }
    root.end(
        outputs=outputs,
        status="OK" if traj.finish in ("answer", "max_turns") else "ERROR",
        end_time_ns=traj.end_ns or None,
    )
    return str(root.trace_id)


def _tool_span(root: Any, call: Any, images: Sequence[bytes]) -> None:
    import mlflow
    from mlflow.entities import SpanType

    key = "code" if call.tool == "python" else "query"
    span = mlflow.start_span_no_context(
        call.tool,
        span_type=SpanType.TOOL,
        parent_span=root,
        inputs={key: call.request},
        attributes={"latency_s": round(call.latency_s, 4), "ok": call.ok, "error": call.detail},
        start_time_ns=call.start_ns or None,
    )
    outputs: dict[str, Any] = {"stdout": call.stdout, "stderr": call.stderr} if call.tool == "python" else {}
    if call.tool != "python":
        outputs["results"] = call.stdout
    if call.images:
        outputs["images"] = [image_part(images[i]) for i in call.images if i < len(images)]
    if call.detail:
        outputs["error"] = call.detail
    span.end(outputs=outputs, status="OK" if call.ok else "ERROR", end_time_ns=call.end_ns or None)


class TraceWriter:
    """Writes episodes as traces from one worker thread while the run goes on (`add` as each episode
    ends), then `finish` flushes them, links them to the run and records the assessments: trace writing
    is mostly waiting on the server and the artifact store, which an evaluation need not wait for."""

    def __init__(self, *, experiment_id: str, run_id: str | None, tags: dict[str, str], assess: bool = True):
        self.experiment_id = experiment_id
        self.run_id = run_id
        self.tags = tags
        self.assess = assess
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="argus-traces")
        self.pending: list[tuple[Future[str], Trajectory, Task]] = []
        self.failures: list[str] = []  # episodes whose trace could not be written, and why

    def add(self, traj: Trajectory, task: Task) -> None:
        future = self.pool.submit(
            log_trajectory, traj, task, experiment_id=self.experiment_id, run_id=self.run_id, tags=self.tags
        )
        self.pending.append((future, traj, task))

    def finish(self) -> list[str | None]:
        """The trace ids, in the order the episodes were added; None where that episode's trace could not
        be written (`failures` says why). Linking and assessments raise: they fail for all or none."""
        import mlflow

        try:
            results: list[str | None] = []
            for future, _traj, task in self.pending:
                try:
                    results.append(future.result())
                except Exception as exc:  # noqa: BLE001 - one bad episode does not hide the others
                    results.append(None)
                    self.failures.append(f"{task.id}: {exc}")
        finally:
            self.pool.shutdown(wait=True)
        mlflow.flush_trace_async_logging()
        written = [(i, t, task) for i, (_f, t, task) in zip(results, self.pending, strict=True) if i is not None]
        ids = [trace_id for trace_id, _t, _task in written]
        if self.run_id:
            client = mlflow.MlflowClient()
            for n in range(0, len(ids), LINK_BATCH):
                client.link_traces_to_run(ids[n : n + LINK_BATCH], self.run_id)
        if self.assess:
            _assess(written)
        return results


def _assess(written: list[tuple[str, Trajectory, Task]]) -> None:
    """The gold answer as an expectation, the reward and accuracy as feedback, on each trace."""
    import mlflow
    from mlflow.entities import AssessmentSource, AssessmentSourceType

    source = AssessmentSource(source_type=AssessmentSourceType.CODE, source_id="argus.agent.reward")

    def assess_one(trace_id: str, traj: Trajectory, task: Task) -> None:
        mlflow.log_expectation(trace_id=trace_id, name="expected_answer", value=task.answer, source=source)
        if traj.reward is None:
            return
        r = traj.reward
        mlflow.log_feedback(
            trace_id=trace_id,
            name="accuracy",
            value=r.accuracy >= 1.0,
            source=source,
            rationale=f"answer {r.answer!r}, gold {task.answer!r}",
        )
        mlflow.log_feedback(
            trace_id=trace_id,
            name="reward",
            value=round(r.score, 4),
            source=source,
            rationale=f"DeepEyesV2 reward from accuracy {r.accuracy:g} and format {r.format:g}",
        )

    # One HTTP call per assessment: in parallel, they cost a suite of 60 about a second, not ten.
    with ThreadPoolExecutor(max_workers=ASSESS_THREADS) as pool:
        for done in [pool.submit(assess_one, *w) for w in written]:
            done.result()


def log_trajectories(
    episodes: Iterable[tuple[Trajectory, Task]],
    *,
    experiment_id: str,
    run_id: str | None,
    tags: dict[str, str],
    assess: bool = True,
) -> list[str | None]:
    """Write each (trajectory, task) as a trace, link them to `run_id`, and record the assessments;
    returns the trace ids in order (None where one could not be written)."""
    writer = TraceWriter(experiment_id=experiment_id, run_id=run_id, tags=tags, assess=assess)
    for traj, task in episodes:
        writer.add(traj, task)
    return writer.finish()
