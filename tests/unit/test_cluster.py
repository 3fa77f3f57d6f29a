"""Reaching a cluster's services through `kubectl port-forward`: the local port comes from kubectl's own
output, and a kubectl that fails says why (tested here with processes that print what kubectl prints)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from argus.backends.kubernetes.cluster import Cluster, ClusterError


def _proc(script: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def test_the_local_port_is_read_from_kubectls_output() -> None:
    proc = _proc(
        "import sys, time\n"
        "print('Forwarding from 127.0.0.1:43123 -> 4200', flush=True)\n"
        "print('Forwarding from [::1]:43123 -> 4200', flush=True)\n"
        "for _ in range(3): print('Handling connection for 43123', flush=True)\n"
        "time.sleep(30)\n"
    )
    try:
        assert Cluster._forwarded_port(proc, "prefect", timeout_s=20) == 43123
        assert proc.poll() is None, "the forward stays up while it is used"
    finally:
        proc.kill()
        proc.wait()


def test_a_failing_kubectl_reports_its_reason() -> None:
    proc = _proc("import sys; sys.stderr.write('error: services \"prefect\" not found\\n'); sys.exit(1)")
    with pytest.raises(ClusterError, match='kubectl port-forward svc/prefect: error: services "prefect" not found'):
        Cluster._forwarded_port(proc, "prefect", timeout_s=20)


def test_a_silent_kubectl_times_out() -> None:
    proc = _proc("import time; time.sleep(30)")
    with pytest.raises(ClusterError, match="no local port after 1s"):
        Cluster._forwarded_port(proc, "mlflow", timeout_s=1)
    assert proc.poll() is not None, "the stuck process is stopped"
