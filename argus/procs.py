"""Process supervision primitives shared by the local stack and the local backend.

Every program Argus starts runs in its own session (so its own process group): stopping it means
signalling the whole group, which also reaches the workers that uvicorn, MLflow or torchrun fork.
A pid alone is not an identity (pids are reused), so records carry the process start time too.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import httpx
import psutil
from pydantic import BaseModel


class ProcessRecord(BaseModel):
    """Enough to find a process we started again later, from another process, without pid reuse risk."""

    pid: int
    pgid: int
    create_time: float
    cmd: list[str]
    log: str | None = None

    def alive(self) -> bool:
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.create_time) > 0.5:
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
                    and proc.create_time() + 0.5 >= self.create_time
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
    SIGKILL (see `argus.lifeline`); without it, it outlives this process (the stack, kept deployments).
    """
    if owned:
        from argus import lifeline

        env = {**(env if env is not None else os.environ), **lifeline.owner_env()}
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
