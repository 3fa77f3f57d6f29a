"""`argus stack up | status | down` against real moto, MLflow and Prefect servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import psutil
import pytest

from argus.config import StackSettings
from argus.stack import StackState
from argus.storage import s3_client
from argus.supervision import ProcessRecord, wait_until
from tests.conftest import REPO, Cli

pytestmark = pytest.mark.integration


def state(env: dict[str, str]) -> StackState:
    return StackState.model_validate_json((Path(env["ARGUS_HOME"]) / "stack" / "state.json").read_text())


def every_process(st: StackState) -> list[psutil.Process]:
    """The supervisor and every process in each component's group (uvicorn workers included)."""
    records: list[ProcessRecord] = [c.process for c in st.components.values() if c.process]
    if st.supervisor:
        records.append(st.supervisor)
    return [p for r in records for p in r.group_members()]


def ours_still_running(env: dict[str, str]) -> list[str]:
    """Any live process that mentions this stack's home directory or ports."""
    marks = [
        env["ARGUS_HOME"],
        *(f"--port {env[k]}" for k in ("ARGUS_S3_PORT", "ARGUS_MLFLOW_PORT", "ARGUS_PREFECT_PORT")),
    ]
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        cmd = " ".join(proc.info["cmdline"] or [])
        if any(m in cmd for m in marks):
            found.append(f"{proc.pid}: {cmd}")
    return found


def prefect_flow_runs(env: dict[str, str]) -> list[dict[str, object]]:
    url = f"http://127.0.0.1:{env['ARGUS_PREFECT_PORT']}/api/flow_runs/filter"
    resp = httpx.post(url, json={"flows": {"name": {"any_": ["stack-check"]}}}, timeout=10)
    resp.raise_for_status()
    runs: list[dict[str, object]] = resp.json()
    return runs


def test_stack_lifecycle(cli: Cli, stack_env: dict[str, str]) -> None:
    settings = StackSettings.model_validate(
        {
            "home": stack_env["ARGUS_HOME"],
            "s3_port": stack_env["ARGUS_S3_PORT"],
            "mlflow_port": stack_env["ARGUS_MLFLOW_PORT"],
            "prefect_port": stack_env["ARGUS_PREFECT_PORT"],
        }
    )
    seen: dict[int, psutil.Process] = {}
    try:
        started = time.monotonic()
        up = cli("stack", "up")
        startup_s = time.monotonic() - started
        for url in (settings.s3_url, settings.mlflow_url, settings.prefect_url.removesuffix("/api")):
            assert url in up.stdout
        status = cli("stack", "status")
        assert status.stdout.count("healthy") == 4 and "unhealthy" not in status.stdout
        print(f"stack up → all healthy in {startup_s:.1f}s")
        first = state(stack_env)
        seen.update({p.pid: p for p in every_process(first)})

        # A real Prefect flow against the stack's Prefect server, logging to its MLflow, landing in S3.
        check = cli("stack", "check", str(REPO / "examples" / "quickstart.yaml"))
        assert "s3://argus-mlflow/artifacts/" in check.stdout and "spec/quickstart.yaml" in check.stdout
        runs = prefect_flow_runs(stack_env)
        assert len(runs) == 1 and runs[0]["state_type"] == "COMPLETED"
        flow_run_id = str(runs[0]["id"])
        import mlflow

        client = mlflow.MlflowClient(tracking_uri=settings.mlflow_url)
        (run,) = client.search_runs([client.get_experiment_by_name("quickstart").experiment_id])
        assert run.data.tags["argus.prefect.flow_run_id"] == flow_run_id
        keys = [o["Key"] for o in s3_client(settings).list_objects_v2(Bucket="argus-mlflow")["Contents"]]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/spec/quickstart.yaml") for k in keys)

        # A second `up` reuses the healthy stack.
        again = cli("stack", "up")
        assert "already running" in again.stdout
        assert {n: c.process.pid for n, c in state(stack_env).components.items() if c.process} == {
            n: c.process.pid for n, c in first.components.items() if c.process
        }

        # The supervisor restarts a component that dies.
        mlflow_proc = first.components["mlflow"].process
        assert mlflow_proc is not None
        os.kill(mlflow_proc.pid, signal.SIGKILL)
        assert wait_until(
            lambda: (
                (p := state(stack_env).components["mlflow"].process) is not None
                and p.pid != mlflow_proc.pid
                and cli("stack", "status", check=False).returncode == 0
            ),
            timeout_s=180,
            interval_s=1,
        ), cli("stack", "status", check=False).stdout
        assert state(stack_env).components["mlflow"].restarts == 1
        seen.update({p.pid: p for p in every_process(state(stack_env))})

        # A killed supervisor leaves a stale state: status says so, `up` cleans up and recovers.
        sup = state(stack_env).supervisor
        assert sup is not None
        os.kill(sup.pid, signal.SIGKILL)
        assert cli("stack", "status", check=False).returncode == 1
        recovered = cli("stack", "up")
        assert "recovered a stale stack" in recovered.stdout
        assert cli("stack", "status").returncode == 0
        for proc in seen.values():  # nothing of the old generation survived the recovery
            assert not (proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE), proc
        seen.update({p.pid: p for p in every_process(state(stack_env))})

        # Data written before the crash is still there: the MLflow artifact comes back through the server.
        path = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="spec/resolved.json", tracking_uri=settings.mlflow_url
        )
        assert json.loads(Path(path).read_text())["name"] == "quickstart"

        # External endpoints: a second home pointing at this stack starts nothing and reports them healthy.
        external = Cli(
            {
                **stack_env,
                "ARGUS_HOME": stack_env["ARGUS_HOME"] + "-second",
                "ARGUS_S3_ENDPOINT": settings.s3_url,
                "ARGUS_MLFLOW_TRACKING_URI": settings.mlflow_url,
                "ARGUS_PREFECT_API_URL": settings.prefect_url,
            }
        )
        ext_up = external("stack", "up")
        assert "supervisor started" not in ext_up.stdout and ext_up.stdout.count("external") == 4
        assert external("stack", "status").returncode == 0
        assert "the stack was not running" in external("stack", "down").stdout
    finally:
        down = cli("stack", "down", check=False)
    assert down.returncode == 0, down.stderr
    assert "stopped: s3, mlflow, prefect, worker, supervisor" in down.stdout
    leftovers = [p for p in seen.values() if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, leftovers
    assert not ours_still_running(stack_env)
    assert not (Path(stack_env["ARGUS_HOME"]) / "stack" / "state.json").exists()
    assert cli("stack", "status", check=False).returncode == 1


def test_port_in_use_is_a_clear_error_and_starts_nothing(cli: Cli, stack_env: dict[str, str]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(stack_env["ARGUS_MLFLOW_PORT"])))
        blocker.listen()
        result = cli("stack", "up", check=False)
    assert result.returncode == 1
    assert f"port {stack_env['ARGUS_MLFLOW_PORT']}" in result.stderr and "ARGUS_MLFLOW_PORT" in result.stderr
    assert "Traceback" not in result.stderr
    assert not ours_still_running(stack_env)


def test_unreachable_external_endpoint_fails_with_its_name(cli: Cli, stack_env: dict[str, str]) -> None:
    env = {
        **stack_env,
        "ARGUS_STARTUP_TIMEOUT_S": "3",
        "ARGUS_S3_ENDPOINT": f"http://127.0.0.1:{stack_env['ARGUS_S3_PORT']}",
        "ARGUS_MLFLOW_TRACKING_URI": f"http://127.0.0.1:{stack_env['ARGUS_MLFLOW_PORT']}",
        "ARGUS_PREFECT_API_URL": f"http://127.0.0.1:{stack_env['ARGUS_PREFECT_PORT']}/api",
    }
    result = Cli(env)("stack", "up", check=False)
    assert result.returncode == 1
    assert "not healthy after 3s: S3 endpoint, MLflow, Prefect" in result.stderr
    assert "Traceback" not in result.stderr
