"""The local backend runs a training job the way the training operator runs a PyTorchJob pod."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from argus import events
from argus.backends.base import JobState, TrainingJob
from argus.backends.local.backend import LocalBackend
from argus.config import StackSettings

pytestmark = pytest.mark.integration


@pytest.fixture
def backend(tmp_path: Path) -> LocalBackend:
    return LocalBackend(StackSettings(home=tmp_path / "home"))


def job(name: str, **config: object) -> TrainingJob:
    return TrainingJob(name=name, module="tests.programs.env_probe", config=dict(config), nproc_per_node=2)


def test_job_gets_the_pytorchjob_env_and_succeeds(backend: LocalBackend, tmp_path: Path) -> None:
    seen: list[events.Event] = []
    result = backend.run(job("probe", report=str(tmp_path / "env.json")), seen.append)
    assert result.state is JobState.SUCCEEDED and result.restarts == 0
    assert [e.event for e in seen] == ["start", "exported"]
    env = json.loads((tmp_path / "env.json").read_text())
    assert isinstance(env, dict)
    assert env["WORLD_SIZE"] == "2" and env["PET_NPROC_PER_NODE"] == "2" and env["RANK"] == "0"
    assert env["MASTER_ADDR"] == "127.0.0.1" and env["LOCAL_RANK"] == "0"
    assert (backend.job_dir("probe") / "job.json").exists()
    assert "exported" in backend.logs("probe")


def test_failed_job_restarts_up_to_its_backoff_limit(backend: LocalBackend, tmp_path: Path) -> None:
    flaky = job("flaky", marker=str(tmp_path / "marker")).model_copy(update={"backoff_limit": 1})
    seen: list[events.Event] = []
    result = backend.run(flaky, seen.append)
    assert result.state is JobState.SUCCEEDED and result.restarts == 1
    assert [e.event for e in seen if e.event == "restarting"] == ["restarting"]

    failing = job("failing", exit_code=5)
    result = backend.run(failing)
    assert result.state is JobState.FAILED and "exited with" in result.message
    assert result.log_tail  # the end of the log comes with a failure


def test_deadline_stops_the_job(backend: LocalBackend) -> None:
    slow = job("slow", sleep_s=60).model_copy(update={"active_deadline_seconds": 3})
    result = backend.run(slow)
    assert result.state is JobState.FAILED and result.message.startswith("DeadlineExceeded")


def test_progress_lines_parse() -> None:
    line = 'rank0: ARGUS {"event": "step", "step": 3, "total": 10, "loss": 0.5, "time": 1.0}'
    assert events.parse(line) == events.Step(step=3, total=10, loss=0.5, time=1.0)
    assert events.parse(events.line(events.Exported(uri="s3://m/x", step=4, time=2.0))) == events.Exported(
        uri="s3://m/x", step=4, time=2.0
    )
    assert events.parse("ARGUS {not json") is None
    assert events.parse('ARGUS {"no_event": 1}') is None
    assert events.parse('ARGUS {"event": "step", "step": "three"}') is None  # a malformed event is no event
    assert events.parse("plain log line") is None


def test_job_names_are_dns_labels() -> None:
    with pytest.raises(ValueError):
        TrainingJob(name="Bad_Name", module="m", config={})


def test_sigkilled_owner_leaves_no_job_behind(tmp_path: Path) -> None:
    """`kill -9` of the process running a flow: its training job (a torchrun tree in sessions of its
    own) is stopped by the owner's watcher; a process started as not owned (a kept deployment) lives."""
    import json
    import os
    import signal
    import subprocess
    import sys

    import psutil

    from argus import supervision
    from tests.conftest import REPO

    owner = subprocess.Popen(
        [sys.executable, "-m", "tests.programs.owner", str(tmp_path / "home")],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if k != supervision.OWNER_ENV},
    )
    kept = None
    try:
        assert owner.stdout is not None
        kept = psutil.Process(json.loads(owner.stdout.readline())["kept"])
        token = supervision.token_of(owner.pid)
        trainers = supervision.owned_by(token)
        assert {"torch.distributed.run", "tests.programs.env_probe"} <= {
            part for p in trainers for part in p.cmdline()
        }, [p.cmdline() for p in trainers]
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        assert supervision.wait_until(lambda: not supervision.owned_by(token), timeout_s=60), [
            p.cmdline() for p in supervision.owned_by(token)
        ]
        assert kept.is_running()
    finally:
        owner.kill()
        if kept is not None and kept.is_running():
            kept.kill()
