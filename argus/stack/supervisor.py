"""The local platform stack's supervisor: `up`, `status`, `down`, and the daemon that owns the components.

`argus stack up` starts a small supervisor daemon that owns the components: it starts them in order
(S3 first: MLflow stores its artifacts there), restarts one that dies (with backoff), and on SIGTERM
stops them all. Its state (pids with start times, so recycled pids are never mistaken for ours) lives
in `<home>/stack/state.json`, which is how `status` and `down` find it from another process, and how
`up` notices a supervisor that was killed and cleans up after it.

A component whose endpoint is configured (ARGUS_S3_ENDPOINT, ARGUS_MLFLOW_TRACKING_URI,
ARGUS_PREFECT_API_URL) is external: never started or stopped here, only health-checked.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from argus import supervision
from argus.config import StackSettings
from argus.stack.components import COMPONENTS, Component, StackError
from argus.storage import ensure_buckets, s3_healthy

log = logging.getLogger("argus.stack")


class ComponentState(BaseModel):
    process: supervision.ProcessRecord | None = None
    restarts: int = 0  # since the stack started (shown by `argus stack status`)
    streak: int = 0  # restarts in a row without a healthy period between them: what the backoff grows on
    last_exit: int | None = None


RESTART_BASE_S = 1.0
RESTART_MAX_S = 30.0
HEALTHY_RESET_S = 60.0  # a component that ran this long before dying starts the backoff afresh


def restart_delay(streak: int) -> float:
    """1, 2, 4, 8, 16, 30, 30, ... seconds for the 1st, 2nd, ... restart in a row."""
    return min(RESTART_BASE_S * 2.0 ** (streak - 1), RESTART_MAX_S)


class StackState(BaseModel):
    supervisor: supervision.ProcessRecord | None = None
    started_at: float = Field(default_factory=time.time)
    components: dict[str, ComponentState] = Field(default_factory=dict)


class ComponentStatus(BaseModel):
    name: str
    title: str
    managed: bool
    healthy: bool
    url: str
    ui_url: str
    pid: int | None = None
    restarts: int = 0


# --------------------------------------------------------------------------------------------------
# State files
# --------------------------------------------------------------------------------------------------


def _stack_dir(settings: StackSettings) -> Path:
    return settings.home / "stack"


def _state_path(settings: StackSettings) -> Path:
    return _stack_dir(settings) / "state.json"


def _settings_path(home: Path) -> Path:
    return home / "stack" / "settings.json"


def read_state(settings: StackSettings) -> StackState | None:
    try:
        return StackState.model_validate_json(_state_path(settings).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        log.warning("ignoring unreadable stack state %s", _state_path(settings))
        return None


def _write_state(settings: StackSettings, state: StackState) -> None:
    path = _state_path(settings)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(state.model_dump_json(indent=2))
    os.replace(tmp, path)


@contextmanager
def _locked(settings: StackSettings) -> Iterator[None]:
    """One `up`/`down` at a time per home directory."""
    _stack_dir(settings).mkdir(parents=True, exist_ok=True)
    with open(_stack_dir(settings) / "lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def managed_components(settings: StackSettings) -> list[Component]:
    return [c for c in COMPONENTS if not c.external(settings)]


# --------------------------------------------------------------------------------------------------
# Status, up, down (called by the CLI)
# --------------------------------------------------------------------------------------------------


def effective_settings(settings: StackSettings) -> StackSettings:
    """The settings a running stack was started with (ports may differ from the current env)."""
    try:
        saved = json.loads(_settings_path(settings.home).read_text())
    except (FileNotFoundError, ValueError):
        return settings
    return StackSettings.model_validate({**saved, "home": settings.home})


def status(settings: StackSettings) -> list[ComponentStatus]:
    settings = effective_settings(settings)
    state = read_state(settings)
    supervisor_alive = bool(state and state.supervisor and state.supervisor.alive())
    out = []
    for comp in COMPONENTS:
        managed = not comp.external(settings)
        cstate = state.components.get(comp.name) if state else None
        proc = cstate.process if cstate and supervisor_alive else None
        out.append(
            ComponentStatus(
                name=comp.name,
                title=comp.title,
                managed=managed,
                healthy=(not managed or (proc is not None and proc.alive())) and comp.healthy(settings),
                url=comp.url(settings),
                ui_url=comp.ui_url(settings),
                pid=proc.pid if proc else None,
                restarts=cstate.restarts if cstate else 0,
            )
        )
    return out


def _cleanup_stale(settings: StackSettings, state: StackState) -> list[str]:
    """Stop whatever a dead supervisor left behind; returns what was stopped."""
    stopped = []
    for name, cstate in state.components.items():
        if cstate.process is not None and cstate.process.group_members():
            supervision.stop_group(cstate.process, grace_s=5)
            stopped.append(name)
    if state.supervisor is not None and state.supervisor.group_members():
        supervision.stop_group(state.supervisor, grace_s=5)
        stopped.append("supervisor")
    _state_path(settings).unlink(missing_ok=True)
    return stopped


def up(settings: StackSettings, *, on_progress: Callable[[str], None] = lambda _m: None) -> list[ComponentStatus]:
    """Start (or reuse) the stack and wait until every component is healthy."""
    with _locked(settings):
        state = read_state(settings)
        supervisor: supervision.ProcessRecord | None
        if state is not None and state.supervisor is not None and state.supervisor.alive():
            settings = effective_settings(settings)
            supervisor = state.supervisor
            on_progress("stack already running; checking health")
        else:
            if state is not None:
                stopped = _cleanup_stale(settings, state)
                on_progress(f"recovered a stale stack (stopped: {', '.join(stopped) or 'nothing left running'})")
            supervisor = _start_supervisor(settings, on_progress) if managed_components(settings) else None
        _wait_healthy(settings, supervisor, on_progress)
        ensure_buckets(settings)
    return status(settings)


def _start_supervisor(settings: StackSettings, on_progress: Callable[[str], None]) -> supervision.ProcessRecord:
    for comp in managed_components(settings):
        if supervision.port_in_use(settings.host, comp.port(settings)):
            raise StackError(
                f"{comp.title}: port {comp.port(settings)} on {settings.host} is already in use by another "
                f"program; set ARGUS_{comp.port_field.upper()} to a free port"
            )
    _settings_path(settings.home).write_text(settings.model_dump_json())
    log_path = _stack_dir(settings) / "supervisor.log"
    _popen, record = supervision.spawn(
        [sys.executable, "-m", "argus.stack.supervisor", "--home", str(settings.home)],
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        log_path=log_path,
    )
    on_progress(f"supervisor started (pid {record.pid}, log {log_path})")
    return record


def _wait_healthy(
    settings: StackSettings, supervisor: supervision.ProcessRecord | None, on_progress: Callable[[str], None]
) -> None:
    deadline = time.monotonic() + settings.startup_timeout_s
    pending = list(COMPONENTS)
    while pending:
        if supervisor is not None and not supervisor.alive():
            raise StackError(
                "the stack supervisor exited during start-up:\n"
                + supervision.tail(_stack_dir(settings) / "supervisor.log")
            )
        for comp in list(pending):
            if comp.healthy(settings):
                pending.remove(comp)
                on_progress(f"{comp.title} healthy at {comp.ui_url(settings)}")
        if not pending:
            return
        if time.monotonic() > deadline:
            details = "\n".join(
                f"--- {c.title} ({'external' if c.external(settings) else c.log_path(settings)}):\n"
                + ("" if c.external(settings) else supervision.tail(c.log_path(settings), 15))
                for c in pending
            )
            raise StackError(
                f"not healthy after {settings.startup_timeout_s:.0f}s: {', '.join(c.title for c in pending)}\n{details}"
            )
        time.sleep(0.5)


def down(settings: StackSettings, *, grace_s: float = 15.0) -> list[str]:
    """Stop exactly what `up` started; returns the names of what was stopped."""
    with _locked(settings):
        state = read_state(settings)
        if state is None:
            return []
        stopped: list[str] = []
        sup = state.supervisor
        if sup is not None and sup.alive():
            os.kill(sup.pid, signal.SIGTERM)
            supervision.wait_until(lambda: not sup.alive(), timeout_s=grace_s + 10)
            stopped = [n for n, c in state.components.items() if c.process is not None]
        # Whatever the supervisor did not manage to stop (or a supervisor that was already dead).
        stopped += [n for n in _cleanup_stale(settings, read_state(settings) or state) if n not in stopped]
        if sup is not None and "supervisor" not in stopped:
            stopped.append("supervisor")
        return stopped


# --------------------------------------------------------------------------------------------------
# The supervisor daemon
# --------------------------------------------------------------------------------------------------


class Supervisor:
    def __init__(self, settings: StackSettings):
        self.settings = settings
        self.state = StackState(supervisor=_self_record())
        self.stopping = False
        self.components = managed_components(settings)
        self.next_start: dict[str, float] = {}

    def _start(self, comp: Component) -> None:
        cstate = self.state.components.setdefault(comp.name, ComponentState())
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **comp.env(self.settings)}
        _popen, record = supervision.spawn(comp.command(self.settings), env=env, log_path=comp.log_path(self.settings))
        cstate.process = record
        _write_state(self.settings, self.state)
        log.info("started %s (pid %d)", comp.name, record.pid)

    def run(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        _write_state(self.settings, self.state)
        try:
            for comp in self.components:
                if self.stopping:
                    break
                self._start(comp)
                # MLflow writes artifacts to S3: the endpoint and its buckets must exist first.
                if (
                    comp.name == "s3"
                    and supervision.wait_until(
                        lambda: self.stopping or s3_healthy(self.settings), timeout_s=self.settings.startup_timeout_s
                    )
                    and not self.stopping
                ):
                    ensure_buckets(self.settings)
                # The worker registers with the Prefect API when it starts.
                if comp.name == "prefect":
                    supervision.wait_until(
                        lambda c=comp: self.stopping or c.healthy(self.settings),  # type: ignore[misc]
                        timeout_s=self.settings.startup_timeout_s,
                    )
            while not self.stopping:
                self._reap_and_restart()
                time.sleep(0.5)
        finally:
            self._stop_all()

    def _reap_and_restart(self) -> None:
        for comp in self.components:
            cstate = self.state.components.get(comp.name)
            if cstate is None or cstate.process is None or cstate.process.alive():
                continue
            now = time.monotonic()
            if comp.name not in self.next_start:
                supervision.stop_group(cstate.process, grace_s=3)  # its workers may still hold the port
                cstate.restarts += 1
                if time.time() - cstate.process.create_time >= HEALTHY_RESET_S:
                    cstate.streak = 0  # it was healthy for a while: this is a new failure, not the same one
                cstate.streak += 1
                delay = restart_delay(cstate.streak)
                self.next_start[comp.name] = now + delay
                log.warning(
                    "%s exited; restart %d in %.0fs (log %s)",
                    comp.name,
                    cstate.restarts,
                    delay,
                    comp.log_path(self.settings),
                )
                _write_state(self.settings, self.state)
            elif now >= self.next_start[comp.name]:
                del self.next_start[comp.name]
                self._start(comp)

    def _stop_all(self) -> None:
        for comp in reversed(self.components):
            cstate = self.state.components.get(comp.name)
            if cstate and cstate.process:
                log.info("stopping %s", comp.name)
                supervision.stop_group(cstate.process, grace_s=10)
        _state_path(self.settings).unlink(missing_ok=True)
        log.info("stopped")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the stack", signum)
        self.stopping = True


def _self_record() -> supervision.ProcessRecord:
    import psutil

    me = psutil.Process()
    return supervision.ProcessRecord(
        pid=me.pid,
        pgid=os.getpgid(me.pid),
        create_time=me.create_time(),
        cmd=me.cmdline(),
        ticks=supervision.start_ticks(me.pid),
    )


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Argus local stack supervisor (started by `argus stack up`).")
    parser.add_argument("--home", type=Path, required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    settings = StackSettings.model_validate_json(_settings_path(args.home.absolute()).read_text())
    Supervisor(settings).run()


if __name__ == "__main__":
    main()
