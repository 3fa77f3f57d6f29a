"""A tool environment on this machine: the code executor and the search proxy as supervised processes.

The same programs a cluster runs as a DaemonSet and a Deployment (`argus sandbox serve`, `argus search
serve`), started with their settings in the environment, health-checked, and stopped with their
process groups.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx

from argus import procs
from argus.backends.base import ToolEndpoints


class ToolEnvError(RuntimeError):
    pass


@dataclass
class LocalToolEnvironment:
    workdir: Path
    index_path: Path
    runner: str = "gvisor"
    warm_pool: int = 4
    max_sessions: int = 64
    memory_mb: int = 1024
    search_cache_mode: str = "cache-first"
    startup_timeout_s: float = 120.0
    extra_env: dict[str, str] = field(default_factory=dict)
    _records: list[procs.ProcessRecord] = field(default_factory=list)

    def start(self) -> ToolEndpoints:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sandbox_port, search_port = procs.free_port(), procs.free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_SANDBOX_", "ARGUS_SEARCH_"))}
        sandbox_env = {
            **base,
            **{k: v for k, v in self.extra_env.items() if k.startswith("ARGUS_SANDBOX_")},
            "ARGUS_SANDBOX_PORT": str(sandbox_port),
            "ARGUS_SANDBOX_RUNNER": self.runner,
            "ARGUS_SANDBOX_STATE_DIR": str(self.workdir / "sandbox"),
            "ARGUS_SANDBOX_WARM_POOL": str(self.warm_pool),
            "ARGUS_SANDBOX_MAX_SESSIONS": str(self.max_sessions),
            "ARGUS_SANDBOX_MEMORY_MB": str(self.memory_mb),
        }
        search_env = {
            **base,
            **{k: v for k, v in self.extra_env.items() if k.startswith("ARGUS_SEARCH_")},
            "ARGUS_SEARCH_PORT": str(search_port),
            "ARGUS_SEARCH_BACKEND": "offline",
            "ARGUS_SEARCH_INDEX_PATH": str(self.index_path),
            "ARGUS_SEARCH_CACHE_MODE": self.search_cache_mode,
            "ARGUS_SEARCH_CACHE_PATH": str(self.workdir / "search-cache.sqlite"),
        }
        endpoints = ToolEndpoints(
            sandbox_url=f"http://127.0.0.1:{sandbox_port}", search_url=f"http://127.0.0.1:{search_port}"
        )
        for name, env in (("sandbox", sandbox_env), ("search", search_env)):
            _popen, record = procs.spawn(
                [sys.executable, "-m", "argus.cli", name, "serve", "--log-level", "warning"],
                env=env,
                log_path=self.workdir / f"{name}.log",
                owned=True,
            )
            self._records.append(record)
        try:
            self._wait(f"{endpoints.sandbox_url}/healthz", "code executor", self.workdir / "sandbox.log")
            self._wait(f"{endpoints.search_url}/healthz", "search proxy", self.workdir / "search.log")
        except ToolEnvError:
            self.stop()
            raise
        return endpoints

    def _wait(self, url: str, what: str, log: Path) -> None:
        def ready() -> bool:
            if not all(r.alive() for r in self._records):
                raise ToolEnvError(f"the {what} exited during start-up:\n{procs.tail(log)}")
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not procs.wait_until(ready, timeout_s=self.startup_timeout_s):
            raise ToolEnvError(f"the {what} was not healthy after {self.startup_timeout_s:.0f}s:\n{procs.tail(log)}")

    def stop(self) -> None:
        for record in reversed(self._records):
            procs.stop_group(record, grace_s=20)
        self._records.clear()

    def __enter__(self) -> ToolEndpoints:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
