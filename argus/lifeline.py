"""Processes that must not outlive the Argus process that started them.

Tool services, evaluation servers and training jobs run in sessions of their own so that a stop reaches
their whole tree; the price is that nothing stops them when their owner (`argus run`, a flow run under
the Prefect worker, a test) is killed with SIGKILL and runs no cleanup. `PR_SET_PDEATHSIG` does not fit:
it fires when the *thread* that forked the child exits, and flows start processes from worker threads.

So each owner gets one watcher (`python -m argus.lifeline`), started the first time it spawns such a
process. The watcher blocks on a pidfd of its owner; when the owner is gone, it stops every process that
carries the owner's token in its environment (children inherit it), SIGTERM first, then SIGKILL.
Deployments kept for production and the local stack are spawned without the token: they outlive the CLI
on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading

import psutil

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
                [sys.executable, "-m", "argus.lifeline", str(pid), token],
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
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
