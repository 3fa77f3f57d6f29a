"""Reliability arithmetic that needs no server: the stack's restart backoff, surrogate-safe text."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from argus import supervision
from argus.config import StackSettings
from argus.stack import supervisor as sup
from services.asgi import safe_text


def test_restart_backoff_grows_then_caps() -> None:
    assert [sup.restart_delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def _dead(started_ago_s: float) -> supervision.ProcessRecord:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return supervision.ProcessRecord(pid=proc.pid, pgid=proc.pid, create_time=time.time() - started_ago_s, cmd=["x"])


@pytest.mark.reliability
def test_backoff_resets_after_a_healthy_period(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path)
    (tmp_path / "stack").mkdir()
    daemon = sup.Supervisor(settings)
    comp = daemon.components[0]

    def dies(started_ago_s: float) -> float:
        daemon.state.components[comp.name] = sup.ComponentState(
            process=_dead(started_ago_s),
            restarts=daemon.state.components.get(comp.name, sup.ComponentState()).restarts,
            streak=daemon.state.components.get(comp.name, sup.ComponentState()).streak,
        )
        daemon.next_start.pop(comp.name, None)
        before = time.monotonic()
        daemon._reap_and_restart()
        return round(daemon.next_start[comp.name] - before)

    assert [dies(1), dies(1), dies(1)] == [1, 2, 4]  # crash-looping: the backoff doubles
    assert dies(sup.HEALTHY_RESET_S + 5) == 1  # it ran a minute first: a new failure, a fresh backoff
    state = json.loads((tmp_path / "stack" / "state.json").read_text())["components"][comp.name]
    assert state["restarts"] == 4 and state["streak"] == 1


def test_safe_text_replaces_only_unpaired_surrogates() -> None:
    assert safe_text("a\ud800b") == ("a\ufffdb", True)
    assert safe_text("emoji 😀 and ü") == ("emoji 😀 and ü", False)
    json.dumps(safe_text("\udfff")[0], ensure_ascii=False).encode()  # encodes now
