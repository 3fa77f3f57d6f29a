"""The local backend: this machine, no cluster.

Training jobs run as `torchrun` process trees with the PyTorchJob env contract and a log file per job
(`<home>/runs/<job>/train.log`); a failed job restarts up to its `backoff_limit` (the trainer resumes
from its last checkpoint, as a restarted pod would). Tool environments and vLLM servers are supervised
local processes with health checks. `close()` (and a cancelled flow) stops all of it.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel

from argus import supervision
from argus.backends.base import (
    Backend,
    BackendError,
    JobResult,
    JobState,
    ModelServer,
    StableEndpoint,
    ToolEndpoints,
    TrainingJob,
)
from argus.backends.local.launch import TrainingRun
from argus.backends.local.tools import LocalToolEnvironment
from argus.config import ServingTarget, StackSettings, ToolsSpec
from argus.events import Event, Restarting
from argus.storage import download_dir, is_s3
from argus.vllm_server import LocalVLLM


class _Deployment(BaseModel):
    server: ModelServer
    process: supervision.ProcessRecord


class _Endpoint(BaseModel):
    stable: StableEndpoint
    port: int
    process: supervision.ProcessRecord


@dataclass
class _Job:
    spec: TrainingJob
    run: TrainingRun
    state: JobState = JobState.CREATED
    restarts: int = 0
    started: float = 0.0


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, settings: StackSettings):
        self.settings = settings
        self._jobs: dict[str, _Job] = {}
        self._tools: dict[str, LocalToolEnvironment] = {}
        self._servers: dict[str, LocalVLLM] = {}
        self._lock = threading.Lock()

    def job_dir(self, name: str) -> Path:
        return self.settings.home / "runs" / name

    def log_location(self, name: str) -> str:
        return str(self.job_dir(name) / "train.log")

    # -- training jobs ----------------------------------------------------------------------------

    def submit(self, job: TrainingJob) -> None:
        with self._lock:
            previous = self._jobs.get(job.name)
            if previous is not None and not previous.state.terminal:
                raise BackendError(f"training job {job.name} is already running")
            run_dir = self.job_dir(job.name)
            run_dir.mkdir(parents=True, exist_ok=True)
            config = run_dir / "job.json"
            config.write_text(json.dumps(job.config, indent=1))
            run = TrainingRun(
                job.module,
                config,
                run_dir / "train.log",
                job.nproc_per_node,
                extra_env={**self.settings.client_env(), **job.env},
            )
            run.start()
            self._jobs[job.name] = _Job(job, run, JobState.RUNNING, started=time.monotonic())

    def _job(self, name: str) -> _Job:
        try:
            return self._jobs[name]
        except KeyError:
            raise BackendError(f"no training job {name} was submitted to this backend") from None

    def follow(self, name: str, on_event: Callable[[Event], None]) -> JobResult:
        job = self._job(name)
        seen: dict[str, Event] = {}

        def relay(event: Event) -> None:
            seen[event.event] = event
            on_event(event)

        deadline = job.spec.active_deadline_seconds
        while True:
            code = self._wait(job, relay, deadline)
            if code == 0:
                job.state = JobState.SUCCEEDED
                break
            if code is None:
                job.state = JobState.FAILED
                message = f"DeadlineExceeded: ran longer than {deadline}s"
                return self._result(job, seen, message)
            if job.restarts >= job.spec.backoff_limit:
                job.state = JobState.FAILED
                return self._result(job, seen, f"torchrun exited with {code} after {job.restarts} restart(s)")
            job.restarts += 1
            job.state = JobState.RESTARTING
            relay(Restarting(exit_code=code, restart=job.restarts))
            job.run.start()
            job.state = JobState.RUNNING
        return self._result(job, seen, "")

    def _wait(self, job: _Job, on_event: Callable[[Event], None], deadline: int | None) -> int | None:
        """torchrun's exit code, or None when the job's deadline passed (the job is then stopped)."""
        assert job.run.popen is not None
        while job.run.popen.poll() is None:
            for event in job.run.events():
                on_event(event)
            if deadline is not None and time.monotonic() - job.started > deadline:
                job.run.cancel()
                return None
            time.sleep(0.5)
        for event in job.run.events():
            on_event(event)
        return int(job.run.popen.returncode)

    def _result(self, job: _Job, seen: dict[str, Event], message: str) -> JobResult:
        return JobResult(
            name=job.spec.name,
            state=job.state,
            restarts=job.restarts,
            message=message,
            log_tail="" if job.state is JobState.SUCCEEDED else self.logs(job.spec.name, 30),
            events=list(seen.values()),
        )

    def cancel(self, name: str) -> None:
        job = self._jobs.get(name)
        if job is not None and not job.state.terminal:
            job.run.cancel()
            job.state = JobState.FAILED

    def logs(self, name: str, lines: int = 50) -> str:
        return supervision.tail(self.job_dir(name) / "train.log", lines)

    # -- tool environments ------------------------------------------------------------------------

    def tools_up(self, name: str, tools: ToolsSpec, search_data_uri: str) -> ToolEndpoints:
        if tools.search.provider != "offline":
            raise BackendError(
                f"tools.search.provider: the local backend serves the offline index; {tools.search.provider!r} "
                "needs the search proxy's API key and network access (run `argus search serve` with "
                "ARGUS_SEARCH_PROVIDER and point the spec at it)"
            )
        workdir = self.settings.home / "tools" / name
        search_dir = Path(search_data_uri)
        if is_s3(search_data_uri):
            search_dir = download_dir(search_data_uri, workdir / "search-data", self.settings)
        index = search_dir / "index.sqlite"
        if not index.exists():
            raise BackendError(f"no offline search index at {search_data_uri}/index.sqlite")
        env = LocalToolEnvironment(workdir, index_path=index, sandbox=tools.sandbox, search=tools.search)
        endpoints = env.start()
        with self._lock:
            self._tools[name] = env
        return endpoints

    def tools_down(self, name: str) -> None:
        with self._lock:
            env = self._tools.pop(name, None)
        if env is not None:
            env.stop()

    # -- serving ----------------------------------------------------------------------------------

    def _serving_dir(self) -> Path:
        return self.settings.home / "serving"

    def _record_path(self, name: str) -> Path:
        return self._serving_dir() / "deployments" / f"{name}.json"

    def deploy(
        self, name: str, model_uri: str, target: ServingTarget, served_name: str, *, keep: bool = False
    ) -> ModelServer:
        workdir = self._serving_dir() / name
        model_dir = model_uri
        if is_s3(model_uri):
            model_dir = str(download_dir(model_uri, workdir / "model", self.settings))
        server = LocalVLLM(
            model_dir,
            served_name=served_name,
            log_path=workdir / "vllm.log",
            max_model_len=target.max_model_len or 4096,
            kv_cache_bytes=target.kv_cache_memory,  # a ByteSize is an int
            extra_args=list(target.extra_args),
            owned=not keep,
        )
        base_url = server.start()
        endpoint = ModelServer(name=name, model_uri=model_uri, served_name=served_name, base_url=base_url)
        if keep:
            assert server.record is not None
            record = _Deployment(server=endpoint, process=server.record)
            path = self._record_path(name)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(record.model_dump_json(indent=1))
        else:
            with self._lock:
                self._servers[name] = server
        return endpoint

    def remove(self, name: str) -> None:
        with self._lock:
            server = self._servers.pop(name, None)
        if server is not None:
            server.stop()
        path = self._record_path(name)
        if path.exists():
            supervision.stop_group(_Deployment.model_validate_json(path.read_text()).process, grace_s=20)
            path.unlink()

    def deployments(self) -> list[ModelServer]:
        out = []
        for path in sorted((self._serving_dir() / "deployments").glob("*.json")):
            record = _Deployment.model_validate_json(path.read_text())
            if record.process.alive():
                out.append(record.server)
        return out

    def _endpoint_path(self, name: str) -> Path:
        return self._serving_dir() / "endpoints" / name / "endpoint.json"

    def endpoint(self, name: str) -> StableEndpoint | None:
        path = self._endpoint_path(name)
        if not path.exists():
            return None
        return _Endpoint.model_validate_json(path.read_text()).stable

    def _port_for(self, name: str) -> int:
        taken = set()
        for path in (self._serving_dir() / "endpoints").glob("*/endpoint.json"):
            state = _Endpoint.model_validate_json(path.read_text())
            if state.stable.name == name:
                return state.port
            taken.add(state.port)
        port = self.settings.serving_port
        while port in taken or supervision.port_in_use(self.settings.host, port):
            port += 1
        return port

    def switch(self, endpoint: str, to: ModelServer, model_version: str = "") -> StableEndpoint:
        from argus.backends.local.gateway import NginxGateway

        path = self._endpoint_path(endpoint)
        state = _Endpoint.model_validate_json(path.read_text()) if path.exists() else None
        port = state.port if state else self._port_for(endpoint)
        proxy = NginxGateway(path.parent, port=port, host=self.settings.host)
        upstream = to.base_url.removeprefix("http://").removesuffix("/v1")
        if proxy.master() is None:
            record = proxy.start(upstream, to.name, model_version)
        else:
            old_workers = proxy.switch(upstream, to.name, model_version)
            # The old route is gone for new requests; requests already on it finish first.
            proxy.wait_drained(old_workers)
            assert state is not None
            record = state.process
        stable = StableEndpoint(
            name=endpoint,
            url=f"{proxy.url}/v1",
            active=to.name,
            previous=state.stable.active if state else None,
            switched_at=time.time(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_Endpoint(stable=stable, port=port, process=record).model_dump_json(indent=1))
        return stable

    def endpoints(self) -> list[StableEndpoint]:
        out = []
        for path in sorted((self._serving_dir() / "endpoints").glob("*/endpoint.json")):
            out.append(_Endpoint.model_validate_json(path.read_text()).stable)
        return out

    def stop_serving(self) -> list[str]:
        """Stop every stable endpoint and kept deployment (`argus serving down`, `argus stack down`)."""
        stopped = []
        for stable in self.endpoints():
            self.stop_endpoint(stable.name)
            stopped.append(f"endpoint {stable.name}")
        for path in sorted((self._serving_dir() / "deployments").glob("*.json")):
            self.remove(path.stem)
            stopped.append(f"deployment {path.stem}")
        return stopped

    def stop_endpoint(self, name: str) -> None:
        path = self._endpoint_path(name)
        if path.exists():
            supervision.stop_group(_Endpoint.model_validate_json(path.read_text()).process, grace_s=10)
            path.unlink()

    def close(self) -> None:
        for name in list(self._jobs):
            self.cancel(name)
        for name in list(self._servers):
            self.remove(name)
        for name in list(self._tools):
            self.tools_down(name)
