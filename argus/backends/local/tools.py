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

from argus import supervision
from argus.backends.base import ToolEndpoints, ToolsUnavailable
from argus.config import SandboxSpec, SearchSpec


@dataclass
class LocalToolEnvironment:
    """The services of one tool environment, configured by the spec's `tools.sandbox` and `tools.search`
    (the offline search provider over `index_path`)."""

    workdir: Path
    index_path: Path
    sandbox: SandboxSpec = field(default_factory=SandboxSpec)
    search: SearchSpec = field(default_factory=SearchSpec)
    startup_timeout_s: float = 120.0
    _records: list[supervision.ProcessRecord] = field(default_factory=list)

    def start(self) -> ToolEndpoints:
        self.workdir.mkdir(parents=True, exist_ok=True)
        sandbox_port, search_port = supervision.free_port(), supervision.free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("ARGUS_SANDBOX_", "ARGUS_SEARCH_"))}
        sandbox_env = {
            **base,
            **self.sandbox.service_env(),
            "ARGUS_SANDBOX_PORT": str(sandbox_port),
            "ARGUS_SANDBOX_STATE_DIR": str(self.workdir / "sandbox"),
        }
        search_env = {
            **base,
            **self.search.service_env(),
            "ARGUS_SEARCH_PORT": str(search_port),
            "ARGUS_SEARCH_INDEX_PATH": str(self.index_path),
            "ARGUS_SEARCH_CACHE_PATH": str(self.workdir / "search-cache.sqlite"),
        }
        endpoints = ToolEndpoints(
            sandbox_url=f"http://127.0.0.1:{sandbox_port}", search_url=f"http://127.0.0.1:{search_port}"
        )
        for name, env in (("sandbox", sandbox_env), ("search", search_env)):
            _popen, record = supervision.spawn(
                [sys.executable, "-m", "argus.cli", name, "serve", "--log-level", "warning"],
                env=env,
                log_path=self.workdir / f"{name}.log",
                owned=True,
            )
            self._records.append(record)
        try:
            self._wait(f"{endpoints.sandbox_url}/healthz", "code executor", self.workdir / "sandbox.log")
            self._wait(f"{endpoints.search_url}/healthz", "search proxy", self.workdir / "search.log")
        except ToolsUnavailable:
            self.stop()
            raise
        return endpoints

    def _wait(self, url: str, what: str, log: Path) -> None:
        def ready() -> bool:
            if not all(r.alive() for r in self._records):
                raise ToolsUnavailable(f"the {what} exited during start-up:\n{supervision.tail(log)}")
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        if not supervision.wait_until(ready, timeout_s=self.startup_timeout_s):
            raise ToolsUnavailable(
                f"the {what} was not healthy after {self.startup_timeout_s:.0f}s:\n{supervision.tail(log)}"
            )

    def stop(self) -> None:
        for record in reversed(self._records):
            supervision.stop_group(record, grace_s=20)
        self._records.clear()

    def __enter__(self) -> ToolEndpoints:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
