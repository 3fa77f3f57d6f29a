"""The live stage table of a pipeline run, read from the Prefect API: what a user sees in the terminal is
what the Prefect UI shows (task runs, subflow runs, the SFT progress artifact). Local and cluster runs
show the same view."""

from __future__ import annotations

import contextlib
import contextvars
import re
import threading
from collections.abc import Iterator
from typing import Any

from rich.live import Live
from rich.table import Table

from argus.cli._common import console
from argus.events import fmt_duration

TRAINING_STAGES = ("sft", "rl")  # the stages whose jobs report a share of optimizer steps

COLOURS = {"COMPLETED": "green", "RUNNING": "yellow", "FAILED": "red", "CRASHED": "red", "CANCELLED": "red"}


def stage_name(name: str) -> str:
    """A task run's stage: Prefect appends a three-hex-digit suffix to task run names."""
    return re.sub(r"-[0-9a-f]{3}$", "", name)


class StageView:
    """Polls the Prefect API for the flow run's task runs (and the SFT progress artifact)."""

    def __init__(self, flow_run_id: Any, run_name: str):
        self.flow_run_id = flow_run_id
        self.run_name = run_name
        self.rows: list[tuple[str, str, str, str]] = []
        self.flow_state = ""  # set by whoever watches the flow run itself (a run in a cluster)
        self.stop = threading.Event()

    def poll(self) -> None:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            ArtifactFilter,
            ArtifactFilterKey,
            FlowRunFilter,
            FlowRunFilterId,
            FlowRunFilterParentFlowRunId,
            TaskRunFilter,
        )
        from prefect.client.schemas.sorting import ArtifactSort, FlowRunSort, TaskRunSort

        from flows.runtime import artifact_key

        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[self.flow_run_id])),
                sort=TaskRunSort.EXPECTED_START_TIME_ASC,
                limit=200,
            )
            progress = {
                stage: client.read_artifacts(
                    artifact_filter=ArtifactFilter(
                        key=ArtifactFilterKey(any_=[artifact_key(self.run_name, f"{stage}-progress")])
                    ),
                    flow_run_filter=FlowRunFilter(),
                    task_run_filter=TaskRunFilter(),
                    sort=ArtifactSort.UPDATED_DESC,
                    limit=1,
                    offset=0,
                )
                for stage in TRAINING_STAGES
            }
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[self.flow_run_id])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                limit=50,
            )
        # A subflow appears as a task run in its parent; its own flow run carries the useful name.
        subflow_names = {fr.parent_task_run_id: fr.name for fr in children}
        rows = []
        for tr in task_runs:
            stage = subflow_names.get(tr.id) or stage_name(tr.name)
            if stage in ("load-spec", "mlflow-run"):
                continue
            state = (tr.state.name if tr.state else None) or "PENDING"
            detail = ""
            if progress.get(stage) and state.upper() == "RUNNING":
                detail = f"{float(progress[stage][0].data or 0):.0f}% of steps"  # type: ignore[arg-type]
            elapsed = tr.estimated_run_time.total_seconds() if tr.estimated_run_time else None
            rows.append((stage, state, fmt_duration(elapsed), detail))
        self.rows = rows

    def table(self) -> Table:
        title = f"pipeline {self.run_name}" + (f" · {self.flow_state}" if self.flow_state else "")
        table = Table(title=title, title_justify="left")
        progress = any(detail for *_, detail in self.rows)  # no column that would stay empty
        for col in ("stage", "state", "time", *(("progress",) if progress else ())):
            table.add_column(col, justify="right" if col == "time" else "left")
        for stage, state, elapsed, detail in self.rows:
            colour = COLOURS.get(state.upper(), "cyan" if state == "Cached" else "white")
            table.add_row(stage, f"[{colour}]{state}[/]", elapsed, *((detail,) if progress else ()))
        return table

    def follow(self, live: Live) -> None:
        while not self.stop.is_set():
            try:
                self.poll()
                live.update(self.table())
            except Exception:  # noqa: BLE001 - a missed refresh is not worth stopping the run for
                pass
            self.stop.wait(3.0)  # each poll is three API calls; the Prefect server shares the cores

    @contextlib.contextmanager
    def shown(self, transient: bool = False) -> Iterator[None]:
        """The table, live, refreshed from a thread while the block runs, and once more at its end. The
        thread runs in this context, so it talks to the Prefect API this context is set to. `transient`:
        the live table goes at the end (the caller prints the final one)."""
        with Live(self.table(), console=console, refresh_per_second=2, transient=transient) as live:
            watcher = threading.Thread(target=contextvars.copy_context().run, args=(self.follow, live), daemon=True)
            watcher.start()
            try:
                yield
            finally:
                self.stop.set()
                watcher.join(timeout=5)
                try:
                    self.poll()
                    live.update(self.table())
                except Exception:  # noqa: BLE001 - the last refresh is cosmetic
                    pass
