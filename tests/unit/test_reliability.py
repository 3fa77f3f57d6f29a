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


def test_a_process_stays_itself_when_the_wall_clock_steps(tmp_path: Path) -> None:
    """After a VM pause the kernel's boot time (and so psutil's create_time) moves with the clock: a
    record made before must still find its process, and must not find a pid reused by another one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        record = supervision.ProcessRecord(
            pid=proc.pid,
            pgid=proc.pid,
            create_time=time.time() - 3600.0,  # as psutil reports it once the clock has stepped an hour
            cmd=["sleep"],
            ticks=supervision.start_ticks(proc.pid),
        )
        assert record.ticks is not None and record.alive()
        assert [p.pid for p in record.group_members()] == [proc.pid]
        stranger = record.model_copy(update={"ticks": record.ticks - 1})  # the same pid, started earlier
        assert not stranger.alive()
    finally:
        proc.kill()
        proc.wait()
    assert supervision.start_ticks(proc.pid) is None and not record.alive()


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


@pytest.mark.reliability
def test_a_tiny_model_build_killed_half_way_is_not_taken_for_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from argus.backends.jobs import base_model_uri
    from argus.models import tiny
    from argus.specfile import load_spec

    spec = load_spec(Path(__file__).parents[2] / "examples" / "quickstart.yaml")
    settings = StackSettings(home=tmp_path)
    builds: list[str] = []

    def crashes_after_the_config(arch: str, out: str, **_kw: object) -> list[str]:
        builds.append(out)
        Path(out).mkdir(parents=True)
        (Path(out) / "config.json").write_text("{}")  # the first file written, before the weights
        raise KeyboardInterrupt

    monkeypatch.setattr(tiny, "init_tiny", crashes_after_the_config)
    with pytest.raises(KeyboardInterrupt):
        base_model_uri(spec, settings)
    # Only the partial build is there: nothing under the name the next run would take as built.
    built_names = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert [name.endswith(".partial") for name in built_names] == [True]

    def builds_whole(arch: str, out: str, **_kw: object) -> list[str]:
        builds.append(out)
        Path(out).mkdir(parents=True)
        for name in ("config.json", "model.safetensors"):
            (Path(out) / name).write_text("x")
        return []

    monkeypatch.setattr(tiny, "init_tiny", builds_whole)
    built = Path(base_model_uri(spec, settings))
    assert sorted(p.name for p in built.iterdir()) == ["config.json", "model.safetensors"]
    left = [p.name for p in (tmp_path / "models").iterdir() if not p.name.endswith(".lock")]
    assert left == [built.name]  # no .partial left
    assert base_model_uri(spec, settings) == str(built) and len(builds) == 2  # built once, then reused
