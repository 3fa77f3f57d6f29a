from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from argus.supervision import free_port

if TYPE_CHECKING:
    from argus.config import StackSettings

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


@pytest.fixture(scope="session")
def tiny_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of built tiny base models for the session: the copy pre-trained `mini` (minutes of
    training, deterministic for its seed) is built by the first test that needs it and reused by the
    others, as homes that share `ARGUS_TINY_MODEL_CACHE` reuse it. `ARGUS_TEST_TINY_MODEL_CACHE` names a
    cache that outlives the session: `scripts/test.sh` builds the `mini` there before the workers start,
    so that no test builds it while the other worker competes for the two cores."""
    if os.environ.get("ARGUS_TEST_TINY_MODEL_CACHE"):
        kept = Path(os.environ["ARGUS_TEST_TINY_MODEL_CACHE"])
        kept.mkdir(parents=True, exist_ok=True)
        return kept
    if os.environ.get("PYTEST_XDIST_WORKER"):  # one cache for every worker: their basetemps share a parent
        shared = tmp_path_factory.getbasetemp().parent / "tiny-models"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture
def stack_env(tmp_path: Path, tiny_model_cache: Path) -> Iterator[dict[str, str]]:
    """Environment for a private stack: its own home and free loopback ports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_", "PREFECT_", "MLFLOW_", "AWS_"))}
    env.update(
        ARGUS_HOME=str(tmp_path / "argus-home"),
        ARGUS_TINY_MODEL_CACHE=str(tiny_model_cache),
        ARGUS_S3_PORT=str(free_port()),
        ARGUS_MLFLOW_PORT=str(free_port()),
        ARGUS_PREFECT_PORT=str(free_port()),
        ARGUS_WORKER_PORT=str(free_port()),
        ARGUS_SERVING_PORT=str(free_port()),
        # Generous: a loaded CI machine must not turn a slow start into a failure.
        ARGUS_STARTUP_TIMEOUT_S="180",
        COLUMNS="200",
    )
    yield env


@pytest.fixture
def cli(stack_env: dict[str, str]) -> Cli:
    return Cli(stack_env)


@contextlib.contextmanager
def serve_app(app: object) -> Iterator[str]:
    """Serve an ASGI app on a free loopback port in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server (Debian package) on a free port, no persistence."""
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path_factory.mktemp("redis")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        deadline = time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def s3_endpoint(root: Path) -> Iterator[object]:
    """A local S3 endpoint (the durable moto server) with Argus' buckets; yields its StackSettings."""
    from argus.config import StackSettings
    from argus.storage import ensure_buckets, s3_healthy
    from argus.supervision import wait_until

    stack = StackSettings(home=root, s3_port=free_port())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "argus.stack.s3server",
            "--port",
            str(stack.s3_port),
            "--data-dir",
            str(root / "s3-data"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(lambda: s3_healthy(stack), timeout_s=60), "local S3 endpoint did not start"
        ensure_buckets(stack)
        yield stack
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def local_tools(settings: StackSettings) -> Any:
    """The data generator's tools, started by a local backend (as `argus data generate` does)."""
    import functools

    from argus.backends.local.backend import LocalBackend

    return functools.partial(LocalBackend(settings).tool_environment, "gold")


@pytest.fixture(scope="session")
def training_stack(tmp_path_factory: pytest.TempPathFactory, tiny_model_cache: Path) -> Iterator[StackSettings]:
    """A private platform stack (S3, MLflow, Prefect) the training tests share: one start per session."""
    from argus.config import StackSettings

    home = tmp_path_factory.mktemp("training-stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_", "MLFLOW_", "AWS_", "PREFECT_"))}
    env.update(
        ARGUS_HOME=str(home),
        ARGUS_S3_PORT=str(free_port()),
        ARGUS_MLFLOW_PORT=str(free_port()),
        ARGUS_PREFECT_PORT=str(free_port()),
        ARGUS_WORKER_PORT=str(free_port()),
        ARGUS_STARTUP_TIMEOUT_S="180",
    )
    cli = Cli(env)
    cli("stack", "up")
    settings = StackSettings.model_validate(
        {
            "home": home,
            "s3_port": env["ARGUS_S3_PORT"],
            "mlflow_port": env["ARGUS_MLFLOW_PORT"],
            "prefect_port": env["ARGUS_PREFECT_PORT"],
            "tiny_model_cache": tiny_model_cache,
        }
    )
    try:
        yield settings
    finally:
        cli("stack", "down")


def raw_request(url: str, head: str, chunks: Iterator[bytes] | list[bytes] = (), timeout: float = 30) -> bytes:
    """Send a request as bytes on a fresh socket (a chunked body, a client that goes away) and return
    whatever the server answered; a server that stops reading mid-body still gets its answer read."""
    import socket
    from urllib.parse import urlparse

    where = urlparse(url)
    sock = socket.create_connection((where.hostname, where.port), timeout=timeout)
    try:
        sock.sendall(head.encode())
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before taking the whole body
        answer = b""
        try:
            while data := sock.recv(65536):
                answer += data
        except (ConnectionResetError, TimeoutError):
            pass
        return answer
    finally:
        sock.close()


def chunked(total: int, size: int = 65536) -> Iterator[bytes]:
    """`total` bytes of body in HTTP/1.1 chunked framing, then the last chunk."""
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield f"{n:x}\r\n".encode() + b"x" * n + b"\r\n"
        sent += n
    yield b"0\r\n\r\n"
