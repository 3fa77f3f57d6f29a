"""Process supervision: records of the processes Argus starts, stopping their trees, the lifeline that
stops owned processes when their owner dies, and the parent-death signal.

Every program Argus starts runs in its own session (so its own process group): stopping it means
signalling the whole group, which also reaches the workers that uvicorn, MLflow or torchrun fork.
A pid alone is not an identity (pids are reused), so records carry the process start time too.

**Lifeline.** Tool services, evaluation servers and training jobs run in sessions of their own so that
a stop reaches their whole tree; the price is that nothing stops them when their owner (`argus run`, a
flow run under the Prefect worker, a test) is killed with SIGKILL and runs no cleanup.
`PR_SET_PDEATHSIG` does not fit there: it fires when the *thread* that forked the child exits, and flows
start processes from worker threads. So each owner gets one watcher (`python -m argus.supervision PID
TOKEN`), started the first time it spawns such a process. The watcher blocks on a pidfd of its owner;
when the owner is gone, it stops every process that carries the owner's token in its environment
(children inherit it), SIGTERM first, then SIGKILL. Deployments kept for production and the local stack
are spawned without the token: they outlive the CLI on purpose.

**Parent-death signal.** Where the parent is a single-threaded launcher that forks directly (torchrun
starting ranks, the code executor starting sandboxes), `die_with_parent()` arms `PR_SET_PDEATHSIG`, so a
child never outlives the process that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot (/proc/PID/stat, field 22); None if it is gone.

    This is the identity to compare, not psutil's `create_time`: that one is boot time plus these ticks,
    and the kernel derives boot time from the wall clock, so it moves whenever the clock is stepped (a
    virtual machine paused and resumed: seen here, where every stack component was then taken for a
    stranger that had reused its pid, and killed and restarted)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses: the fields start after its last ')'.
    return int(stat.rsplit(")", 1)[1].split()[19])


class ProcessRecord(BaseModel):
    """Enough to find a process we started again later, from another process, without pid reuse risk."""

    pid: int
    pgid: int
    create_time: float
    cmd: list[str]
    log: str | None = None
    ticks: int | None = None  # `start_ticks` where /proc has it: what identity is checked against

    def _same(self, pid: int, create_time: float, *, or_newer: bool = False) -> bool:
        """Whether `pid` (started at `create_time`) is this record's process (or, with `or_newer`, one
        started no earlier than it)."""
        if self.ticks is not None:
            ticks = start_ticks(pid)
            if ticks is None:
                return False
            return ticks >= self.ticks if or_newer else ticks == self.ticks
        if or_newer:
            return create_time + 0.5 >= self.create_time
        return abs(create_time - self.create_time) <= 0.5

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            if not self._same(self.pid, proc.create_time()):
                return False
            return bool(proc.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def group_members(self) -> list[psutil.Process]:
        """Live processes still in this record's process group (children outlive their leader)."""
        members = []
        for proc in psutil.process_iter(["pid"]):
            try:
                # A recycled pgid would belong to a process newer than our leader.
                if (
                    os.getpgid(proc.pid) == self.pgid
                    and proc.status() != psutil.STATUS_ZOMBIE
                    and self._same(proc.pid, proc.create_time(), or_newer=True)
                ):
                    members.append(proc)
            except (ProcessLookupError, psutil.Error, PermissionError):
                continue
        return members


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    cwd: Path | None = None,
    owned: bool = False,
) -> tuple[subprocess.Popen[bytes], ProcessRecord]:
    """Start `cmd` detached in a new session, stdout+stderr appended to `log_path`.

    `owned`: the process is part of this process's work and is stopped when this process dies, even by
    SIGKILL (the lifeline, above); without it, it outlives this process (the stack, kept deployments).
    """
    if owned:
        env = {**(env if env is not None else os.environ), **owner_env()}
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        out = open(log_path, "ab")  # noqa: SIM115 - handed to the child, closed below
    else:
        out = open(os.devnull, "wb")  # noqa: SIM115
    try:
        popen = subprocess.Popen(
            list(cmd),
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=cwd,
            start_new_session=True,
        )
    finally:
        out.close()
    record = ProcessRecord(
        pid=popen.pid,
        pgid=popen.pid,
        create_time=psutil.Process(popen.pid).create_time(),
        cmd=list(cmd),
        log=str(log_path) if log_path else None,
        ticks=start_ticks(popen.pid),
    )
    return popen, record


def _tree(record: ProcessRecord) -> list[psutil.Process]:
    """The process group plus every descendant of the leader: children that start their own session
    (torchrun's workers do) are outside the group but still ours."""
    found = {p.pid: p for p in record.group_members()}
    if record.alive():
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(record.pid).children(recursive=True):
                found.setdefault(child.pid, child)
    return list(found.values())


def stop_group(record: ProcessRecord, *, grace_s: float = 10.0) -> None:
    """SIGTERM the record's process tree, then SIGKILL whatever is left after `grace_s`."""
    members = _tree(record)
    if not members:
        return
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for proc in members:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _, members = psutil.wait_procs(members, timeout=wait)
        # Processes forked after the first signal are in the group too.
        members = [p for p in {p.pid: p for p in [*members, *record.group_members()]}.values() if p.is_running()]
        if not members:
            return


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def http_ok(url: str, *, timeout_s: float = 2.0) -> bool:
    try:
        return httpx.get(url, timeout=timeout_s).status_code < 400
    except httpx.HTTPError:
        return False


def wait_until(predicate: Callable[[], bool], *, timeout_s: float, interval_s: float = 0.25) -> bool:
    """Poll `predicate` until it returns true or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval_s)


def tail(path: str | Path | None, lines: int = 20) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# -- parent-death signal ---------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send `sig` to this process when its parent exits (Linux; a no-op elsewhere).

    Call it in a child (a `preexec_fn`, or first thing in a program a launcher forks). If the parent died
    before the signal was armed, the child is already orphaned and exits at once."""
    if sys.platform != "linux":
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os._exit(1)


# -- lifeline ----------------------------------------------------------------------------------------

OWNER_ENV = "ARGUS_OWNER"

_lock = threading.Lock()
_watching: dict[int, str] = {}


def token_of(pid: int) -> str:
    """pid plus start time: a pid alone may be reused by an unrelated process."""
    return f"{pid}:{int(psutil.Process(pid).create_time() * 1000)}"


def owner_env() -> dict[str, str]:
    """The environment entry that ties a new process to this one; starts this process's watcher once."""
    pid = os.getpid()
    with _lock:
        token = _watching.get(pid)
        if token is None:
            token = token_of(pid)
            subprocess.Popen(
                [sys.executable, "-m", "argus.supervision", str(pid), token],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
                env={k: v for k, v in os.environ.items() if k != OWNER_ENV},
            )
            _watching[pid] = token
    return {OWNER_ENV: token}


def owned_by(token: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.pid != os.getpid() and proc.environ().get(OWNER_ENV) == token:
                found.append(proc)
    return found


def reap(token: str, grace_s: float = 10.0) -> int:
    """Stop every process tied to `token` and their descendants; returns how many there were."""
    members: dict[int, psutil.Process] = {}
    for proc in owned_by(token):
        members[proc.pid] = proc
        with contextlib.suppress(psutil.Error):
            for child in proc.children(recursive=True):
                members.setdefault(child.pid, child)
    if not members:
        return 0
    alive = list(members.values())
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for proc in alive:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)
        _gone, alive = psutil.wait_procs(alive, timeout=wait)
        if not alive:
            break
    return len(members)


def _wait_for_exit(pid: int, token: str) -> None:
    try:
        if token_of(pid) != token:
            return  # already gone, and the pid reused
        fd = os.pidfd_open(pid)
    except (psutil.Error, ProcessLookupError):
        return
    try:
        select.select([fd], [], [])
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Stop the processes an owner started once the owner is gone.")
    parser.add_argument("pid", type=int)
    parser.add_argument("token")
    args = parser.parse_args(argv)
    # The owner's terminal going away must not take the watcher with it before its work is done.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _wait_for_exit(args.pid, args.token)
    reap(args.token)


if __name__ == "__main__":
    main()
