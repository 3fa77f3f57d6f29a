"""The stable serving endpoint on this machine: nginx in front of the active vLLM server.

Clients always talk to one address. Switching the model behind it rewrites the upstream and reloads
nginx (`nginx -s reload`): the master starts workers with the new upstream while the old workers
finish the requests they hold and then exit, so no connection is refused and no request is dropped.
`wait_drained` reports when the old workers are gone, i.e. when the old server may be stopped. Client
connections are not kept alive between requests, so no client can race a reload with a reused one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil

from argus import supervision

CONF = """\
# Written by Argus; the upstream is rewritten on every switch.
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {root}/access.log;
    client_body_temp_path {root}/tmp/body;
    proxy_temp_path {root}/tmp/proxy;
    fastcgi_temp_path {root}/tmp/fastcgi;
    uwsgi_temp_path {root}/tmp/uwsgi;
    scgi_temp_path {root}/tmp/scgi;
    client_max_body_size 64m;
    upstream argus_active {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen {host}:{port};
        # No idle client connections: a reload closes those, and a client that reuses one at that
        # moment sees "server disconnected" (a POST is not retried). A new connection per request costs
        # ~0.1 ms on loopback, nothing next to a model's latency. nginx keeps its upstream connections.
        keepalive_timeout 0;
        location / {{
            proxy_pass http://argus_active;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_buffering off;
            proxy_read_timeout 600s;
            add_header X-Argus-Deployment "{deployment}" always;
            add_header X-Argus-Model-Version "{model_version}" always;
        }}
    }}
}}
"""


class GatewayError(RuntimeError):
    pass


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if found is None:
        raise GatewayError("nginx is not installed (scripts/setup.sh installs it with apt)")
    return found


def _not_accepting(workers: list[int]) -> bool:
    """Old nginx workers that got the graceful stop retitle themselves "... is shutting down"."""
    for pid in workers:
        try:
            proc = psutil.Process(pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if "shutting down" not in " ".join(proc.cmdline()):
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@dataclass
class NginxGateway:
    root: Path
    port: int
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def conf(self) -> Path:
        return self.root / "nginx.conf"

    def _write(self, upstream: str, deployment: str, model_version: str) -> None:
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (self.root / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        text = CONF.format(
            root=self.root,
            host=self.host,
            port=self.port,
            upstream=upstream,
            deployment=deployment,
            model_version=model_version or "unregistered",
        )
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text(text)
        self._nginx("-t", "-c", str(tmp))  # never install a config nginx would refuse
        tmp.replace(self.conf)

    def _nginx(self, *args: str) -> None:
        proc = subprocess.run([nginx_binary(), "-p", str(self.root), *args], capture_output=True, text=True, timeout=30)
        if proc.returncode != 0:
            raise GatewayError(f"nginx {' '.join(args)}: {proc.stderr.strip()}")

    def master(self) -> psutil.Process | None:
        try:
            proc = psutil.Process(int((self.root / "nginx.pid").read_text().strip()))
        except (FileNotFoundError, ValueError, psutil.NoSuchProcess):
            return None
        return proc if proc.is_running() and "nginx" in proc.name() else None

    def start(self, upstream: str, deployment: str, model_version: str = "") -> supervision.ProcessRecord:
        """Start nginx in front of `upstream` (host:port); returns its process record. Every response
        names the deployment and the registered model version (`name/version`) that answered."""
        if supervision.port_in_use(self.host, self.port):
            raise GatewayError(f"port {self.port} on {self.host} is already in use (set ARGUS_SERVING_PORT)")
        self.root.mkdir(parents=True, exist_ok=True)
        self._write(upstream, deployment, model_version)
        _popen, record = supervision.spawn(
            [nginx_binary(), "-p", str(self.root), "-c", str(self.conf), "-g", "daemon off;"],
            log_path=self.root / "nginx.log",
        )
        if not supervision.wait_until(lambda: self.serving(deployment) or not record.alive(), timeout_s=20):
            raise GatewayError(f"nginx did not start:\n{supervision.tail(self.root / 'error.log')}")
        if not record.alive():
            raise GatewayError(f"nginx exited at start:\n{supervision.tail(self.root / 'error.log')}")
        return record

    def serving(self, deployment: str) -> bool:
        """Whether a new request through the endpoint reaches `deployment`."""
        try:
            response = httpx.get(f"{self.url}/v1/models", timeout=5)
        except httpx.HTTPError:
            return False
        return response.headers.get("x-argus-deployment") == deployment and response.status_code == 200

    def switch(self, upstream: str, deployment: str, model_version: str = "", timeout_s: float = 30) -> list[int]:
        """Point the endpoint at `upstream` without dropping a request; returns the pids of the old
        workers (pass them to `wait_drained` before stopping the old server)."""
        master = self.master()
        if master is None:
            raise GatewayError("the serving proxy is not running")
        old_workers = [p.pid for p in master.children()]
        self._write(upstream, deployment, model_version)
        os.kill(master.pid, 1)  # SIGHUP: re-read the config, graceful worker rollover
        # The master starts the new workers before it tells the old ones to stop accepting; until then
        # a new connection may still land on an old worker. Done = every old worker is shutting down.
        if not supervision.wait_until(lambda: _not_accepting(old_workers), timeout_s=timeout_s) or not self.serving(
            deployment
        ):
            raise GatewayError(
                f"the endpoint did not switch to {deployment}:\n{supervision.tail(self.root / 'error.log')}"
            )
        return old_workers

    @staticmethod
    def wait_drained(old_workers: list[int], timeout_s: float = 120) -> bool:
        """True once the old workers have finished their requests and exited."""

        def gone() -> bool:
            for pid in old_workers:
                try:
                    proc = psutil.Process(pid)
                    if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                        return False
                except psutil.NoSuchProcess:
                    continue
            return True

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if gone():
                return True
            time.sleep(0.2)
        return False
