"""vLLM's OpenAI-compatible server as a local process, from the serving virtualenv.

vLLM lives in its own virtualenv (`.venv-serve`, or `ARGUS_VLLM_PYTHON`; its FastAPI range excludes
Prefect's); this starts `python -m vllm.entrypoints.openai.api_server` there, waits for `/health` and
`/v1/models`, and stops its whole process group. Two users: the local backend's serving and evaluation
endpoints, and the RL trainer's colocated rollout engine (one server per rank, `trainers.rl.vllm`),
which is why it lives in the core and not in a backend. On clusters the official vLLM image runs the
same server for serving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from argus import supervision
from argus.config import kv_cache_args, repo_root


class VLLMError(RuntimeError):
    pass


def serving_python() -> Path:
    return Path(os.environ.get("ARGUS_VLLM_PYTHON", repo_root() / ".venv-serve" / "bin" / "python"))


@dataclass
class LocalVLLM:
    model: str
    served_name: str
    log_path: Path
    port: int = field(default_factory=supervision.free_port)
    host: str = "127.0.0.1"
    max_model_len: int = 4096
    dtype: str = "float32"
    # On CPU this is the share of memory vLLM reserves for its KV cache; the default (0.9) fails on
    # machines where other processes hold memory.
    memory_fraction: float = 0.2
    # The KV cache outright (--kv-cache-memory-bytes), in place of the share: on CPU the share is of the
    # whole machine and all of it is written at start-up, whatever the model needs.
    kv_cache_bytes: int | None = None
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict, repr=False)  # on top of this process's environment
    startup_timeout_s: float = 300.0
    # A server for one evaluation dies with the process that started it; a deployment kept for
    # staging/production must outlive the CLI that deployed it.
    owned: bool = True
    record: supervision.ProcessRecord | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def command(self) -> list[str]:
        return [
            str(serving_python()),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            self.model,
            "--served-model-name",
            self.served_name,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--enforce-eager",
            "--dtype",
            self.dtype,
            "--max-model-len",
            str(self.max_model_len),
            *(
                kv_cache_args(self.kv_cache_bytes)
                if self.kv_cache_bytes
                else ["--gpu-memory-utilization", str(self.memory_fraction)]
            ),
            # One model replica on one device: no distributed executor.
            "--distributed-executor-backend",
            "uni",
            *self.extra_args,
        ]

    def start(self) -> str:
        python = serving_python()
        if not python.exists():
            raise VLLMError(f"no serving virtualenv at {python} (run scripts/setup.sh)")
        cmd = self.command()
        env = {
            **os.environ,
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # The CPU platform starts its model worker as one more process (another import of torch and
            # vLLM, and IPC on every step) even with the `uni` executor; this keeps it inside the engine
            # process. Measured on 2 cores, tiny model: ready in 37-38 s instead of 57-61 s, and 24 chat
            # completions (8 at a time, 128 tokens each) in 2.3 s instead of 5.3 s.
            "VLLM_ENABLE_V1_MULTIPROCESSING": os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0"),
            **self.env,
        }
        _popen, self.record = supervision.spawn(cmd, env=env, log_path=self.log_path, owned=self.owned)
        if not supervision.wait_until(self._ready, timeout_s=self.startup_timeout_s, interval_s=1.0):
            self.stop()
            raise VLLMError(
                f"vLLM did not become ready in {self.startup_timeout_s:.0f}s:\n{supervision.tail(self.log_path, 30)}"
            )
        return self.base_url

    def _ready(self) -> bool:
        assert self.record is not None
        if not self.record.alive():
            raise VLLMError(f"vLLM exited during start-up:\n{supervision.tail(self.log_path, 30)}")
        try:
            health = httpx.get(f"http://{self.host}:{self.port}/health", timeout=2)
            models = httpx.get(f"{self.base_url}/models", timeout=2)
        except httpx.HTTPError:
            return False
        return health.status_code == 200 and models.status_code == 200

    def stop(self) -> None:
        if self.record is not None:
            supervision.stop_group(self.record, grace_s=20)
            self.record = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
