"""Run a training program on this machine exactly as a Kubeflow PyTorchJob pod would.

The training operator gives every pod `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE` (replicas times
nprocPerNode), `RANK` (the node rank), the `PET_*` variables torchrun reads as its arguments, and
`PYTHONUNBUFFERED=1`; the entrypoint is torchrun. Here there is one node: the same variables, the
same entrypoint, one process group that a cancel stops as a whole.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from argus import supervision
from argus.events import Event, parse


def pytorchjob_env(
    nproc_per_node: int,
    *,
    nnodes: int = 1,
    node_rank: int = 0,
    master_addr: str = "127.0.0.1",
    master_port: int | None = None,
) -> dict[str, str]:
    port = str(master_port or supervision.free_port())
    return {
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": port,
        "WORLD_SIZE": str(nnodes * nproc_per_node),
        "RANK": str(node_rank),
        "PET_NNODES": str(nnodes),
        "PET_NPROC_PER_NODE": str(nproc_per_node),
        "PET_NODE_RANK": str(node_rank),
        "PET_MASTER_ADDR": master_addr,
        "PET_MASTER_PORT": port,
        "PYTHONUNBUFFERED": "1",
    }


def torchrun_command(module: str, *args: str) -> list[str]:
    """torchrun takes nnodes / nproc / rank / master from the PET_* variables, as in a pod."""
    return [sys.executable, "-m", "torch.distributed.run", "-m", module, *args]


@dataclass
class TrainingRun:
    """A torchrun process tree with its log; progress events are read back from the log."""

    module: str
    config_path: Path
    log_path: Path
    nproc_per_node: int
    extra_env: dict[str, str] = field(default_factory=dict)
    record: supervision.ProcessRecord | None = None
    popen: subprocess.Popen[bytes] | None = None
    _offset: int = 0

    def start(self) -> supervision.ProcessRecord:
        env = {**os.environ, **pytorchjob_env(self.nproc_per_node), **self.extra_env}
        # The log is appended to across restarts and re-runs: only what this start writes is news.
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.popen, self.record = supervision.spawn(
            torchrun_command(self.module, "--config", str(self.config_path)),
            env=env,
            log_path=self.log_path,
            owned=True,
        )
        return self.record

    def events(self) -> list[Event]:
        """Progress events written since the last call."""
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(self._offset)
                data = fh.read()
        except FileNotFoundError:
            return []
        complete = data.rfind(b"\n") + 1
        self._offset += complete
        found = (parse(line) for line in data[:complete].decode(errors="replace").splitlines())
        return [e for e in found if e is not None]

    def wait(self, on_event: Callable[[Event], None] = lambda _e: None, poll_s: float = 0.5) -> int:
        """Follow the run to its end, passing each progress event on; returns torchrun's exit code."""
        assert self.popen is not None
        while self.popen.poll() is None:
            for event in self.events():
                on_event(event)
            time.sleep(poll_s)
        for event in self.events():
            on_event(event)
        return int(self.popen.returncode)

    def cancel(self) -> None:
        if self.record is not None:
            supervision.stop_group(self.record, grace_s=15)
