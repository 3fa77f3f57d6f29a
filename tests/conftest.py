from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from argus.procs import free_port

REPO = Path(__file__).resolve().parents[1]


class Cli:
    """Runs `argus` as a user would: a separate process with its own environment."""

    def __init__(self, env: dict[str, str]):
        self.env = env

    def __call__(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "argus.cli", *args],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"argus {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc


@pytest.fixture
def stack_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """Environment for a private stack: its own home and free loopback ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_", "PREFECT_", "MLFLOW_", "AWS_"))}
    env.update(
        ARGUS_HOME=str(tmp_path / "argus-home"),
        ARGUS_S3_PORT=str(free_port()),
        ARGUS_MLFLOW_PORT=str(free_port()),
        ARGUS_PREFECT_PORT=str(free_port()),
        # Generous: a loaded CI machine must not turn a slow start into a failure.
        ARGUS_STARTUP_TIMEOUT_S="180",
        COLUMNS="200",
    )
    yield env


@pytest.fixture
def cli(stack_env: dict[str, str]) -> Cli:
    return Cli(stack_env)
