"""Code-executor benchmark: Argus' gVisor session service against per-call process baselines.

    .venv/bin/python benchmarks/sandbox_bench.py [--quick]

Prints one table with Argus' figures, the baselines measured in the same run (a fresh `python -c`
per call, and `runsc do` per call) and the targets from the issue. Not a test: numbers depend on the
machine and its load.
"""

from __future__ import annotations

import argparse
import base64
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
from PIL import Image
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from argus.supervision import free_port, wait_until  # noqa: E402

TRIVIAL = "1 + 1"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


class Server:
    def __init__(self, state: Path, warm_pool: int, max_sessions: int = 64):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        env = {
            **os.environ,
            "ARGUS_SANDBOX_PORT": str(self.port),
            "ARGUS_SANDBOX_STATE_DIR": str(state),
            "ARGUS_SANDBOX_WARM_POOL": str(warm_pool),
            "ARGUS_SANDBOX_MAX_SESSIONS": str(max_sessions),
            "ARGUS_SANDBOX_MEMORY_MB": "512",
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "argus.cli", "sandbox", "serve", "--log-level", "warning"],
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.client = httpx.Client(
            base_url=self.url, timeout=120, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64)
        )
        self.wait_warm(warm_pool)

    def wait_warm(self, n: int) -> None:
        def ready() -> bool:
            try:
                return bool(self.client.get("/healthz").json()["warm"] >= n)
            except (httpx.HTTPError, ValueError):
                return False

        assert wait_until(ready, timeout_s=300, interval_s=0.2), "sandbox service did not start"

    def run(self, session: str, code: str) -> dict:  # type: ignore[type-arg]
        resp = self.client.post("/jupyter_sandbox", json={"session_id": session, "code": code, "timeout": 60})
        resp.raise_for_status()
        return resp.json()  # type: ignore[no-any-return]

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(timeout=60)


def time_calls(fn, n: int) -> list[float]:  # type: ignore[no-untyped-def]
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def throughput(server: Server, sessions: int, seconds: float) -> float:
    names = [f"tp{sessions}-{i}" for i in range(sessions)]
    with ThreadPoolExecutor(sessions) as ex:
        list(ex.map(lambda s: server.run(s, "0"), names))  # claim every session first

        def loop(name: str) -> int:
            done, end = 0, time.monotonic() + seconds
            while time.monotonic() < end:
                server.run(name, TRIVIAL)
                done += 1
            return done

        total = sum(ex.map(loop, names))
    for name in names:
        server.client.post("/clear_session", json={"session_id": name})
    return total / seconds


def sandbox_pss_mb(state: Path) -> float:
    total = 0
    for p in psutil.process_iter(["cmdline"]):
        if str(state) in " ".join(p.info["cmdline"] or []) and "runsc" in " ".join(p.info["cmdline"] or []):
            try:
                total += p.memory_full_info().pss
            except psutil.Error:
                continue
    return total / 2**20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = 100 if args.quick else 300
    tp_seconds = 3.0 if args.quick else 6.0
    console = Console()
    rows: list[tuple[str, str, str, str]] = []
    kernel_python = str(REPO / ".venv-sandbox" / "bin" / "python")

    with tempfile.TemporaryDirectory(prefix="argus-bench-") as tmp:
        # -- baselines ---------------------------------------------------------------------------------
        console.print("baselines: fresh python -c per call, runsc do per call …")
        py = time_calls(lambda: subprocess.run([kernel_python, "-c", TRIVIAL], check=True), 30)
        runsc_root = Path(tmp) / "runsc-do"
        runsc = time_calls(
            lambda: subprocess.run(
                ["runsc", "--root", str(runsc_root), "--network=none", "do", "/usr/bin/true"],
                check=True,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            ),
            10,
        )

        # -- warm latency, claim, memory, throughput ------------------------------------------------
        console.print("Argus gVisor service: warm latency …")
        server = Server(Path(tmp) / "warm", warm_pool=4)
        try:
            server.run("lat", "x = 0")
            trivial = time_calls(lambda: server.run("lat", TRIVIAL), n)
            buf = io.BytesIO()
            Image.effect_noise((1024, 1024), 64).convert("RGB").save(buf, "PNG")
            b64 = base64.b64encode(buf.getvalue()).decode()
            server.run(
                "lat",
                f"import base64, io\nfrom PIL import Image\n"
                f"image_1 = Image.open(io.BytesIO(base64.b64decode('{b64}')))\nimage_1.load()",
            )
            crop_code = "display(image_1.crop((256, 256, 768, 768)))"
            assert server.run("lat", crop_code)["output"]["images"]
            crop = time_calls(lambda: server.run("lat", crop_code), max(n // 5, 20))

            console.print("warm-pool claims …")
            claims = []
            for i in range(8):
                server.wait_warm(4)
                t = time.perf_counter()
                sid = server.client.post("/v1/sessions", json={"session_id": f"claim-{i}"}).json()["session_id"]
                claims.append(time.perf_counter() - t)
                assert sid == f"claim-{i}"
            server.wait_warm(4)
            before = sandbox_pss_mb(server.state)
            idle = [f"idle-{i}" for i in range(8)]
            for name in idle:
                server.run(name, "0")
            server.wait_warm(4)
            time.sleep(1)
            per_session = (sandbox_pss_mb(server.state) - before) / len(idle)
            for name in [*idle, *(f"claim-{i}" for i in range(8))]:
                server.client.post("/clear_session", json={"session_id": name})

            console.print("throughput at 1, 8, 32 sessions …")
            tps = {c: throughput(server, c, tp_seconds) for c in (1, 8, 32)}
        finally:
            server.stop()

        console.print("cold session start (no warm pool) …")
        cold_server = Server(Path(tmp) / "cold", warm_pool=0)
        try:
            cold = time_calls(lambda: cold_server.run(f"cold-{time.perf_counter_ns()}", TRIVIAL), 8)
        finally:
            cold_server.stop()

    ms = 1000.0
    rows += [
        (
            "warm exec p50, trivial (HTTP)",
            f"{pct(trivial, 50) * ms:.2f} ms",
            f"python -c {pct(py, 50) * ms:.0f} ms · runsc do {pct(runsc, 50) * ms:.0f} ms",
            "≤ 5 ms",
        ),
        (
            "warm exec p99, trivial (HTTP)",
            f"{pct(trivial, 99) * ms:.2f} ms",
            f"python -c {pct(py, 99) * ms:.0f} ms · runsc do {pct(runsc, 99) * ms:.0f} ms",
            "",
        ),
        ("crop 1024² → PNG p50 / p99", f"{pct(crop, 50) * ms:.1f} / {pct(crop, 99) * ms:.1f} ms", "", ""),
        ("throughput, 1 session", f"{tps[1]:.0f} exec/s", f"python -c {1 / statistics.mean(py):.0f}/s", ""),
        ("throughput, 8 sessions", f"{tps[8]:.0f} exec/s", "", ""),
        (
            "throughput, 32 sessions",
            f"{tps[32]:.0f} exec/s",
            f"runsc do {2 / statistics.mean(runsc):.0f}/s on 2 cores",
            "≥ 200 exec/s",
        ),
        (
            "cold session start + first exec p50",
            f"{pct(cold, 50) * ms:.0f} ms",
            f"runsc do {pct(runsc, 50) * ms:.0f} ms",
            "≤ 400 ms",
        ),
        ("warm-pool claim p50 / max", f"{pct(claims, 50) * ms:.1f} / {max(claims) * ms:.1f} ms", "", "≤ 10 ms"),
        ("memory per idle session (PSS)", f"{per_session:.1f} MB", "", "≤ 40 MB"),
    ]
    table = Table(title=f"Argus code executor (gVisor) — {os.cpu_count()} cores")
    for col in ("metric", "Argus", "baseline (same run)", "target"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
