"""Code-executor benchmark: Argus' gVisor session service against peers measured in the same run.

    .venv/bin/python benchmarks/sandbox_bench.py [--quick]

Prints one table with Argus' figures, the peers measured in the same run and the targets from the
issues. The peers: a plain Jupyter kernel driven through `jupyter_client` (the stateful kernel any
user could pick instead; it isolates nothing), a fresh `python -c` per call and `runsc do` per call.
The reference sandbox's 335 ms burst figure was measured beside Argus when the issue was filed and is
quoted, not re-measured (it needs its own Redis-backed server). Not a test: numbers depend on the
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
from typing import Any

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
    def __init__(self, state: Path, warm_pool: int, max_sessions: int = 64, oneshot_pool: int = 4):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.state = state
        env = {
            **os.environ,
            "ARGUS_SANDBOX_PORT": str(self.port),
            "ARGUS_SANDBOX_STATE_DIR": str(state),
            "ARGUS_SANDBOX_WARM_POOL": str(warm_pool),
            "ARGUS_SANDBOX_MAX_SESSIONS": str(max_sessions),
            "ARGUS_SANDBOX_ONESHOT_POOL": str(oneshot_pool),
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
            base_url=self.url, timeout=120, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256)
        )
        self.wait_warm(warm_pool, oneshot_pool)

    def wait_warm(self, n: int, oneshot: int = 0) -> None:
        def ready() -> bool:
            try:
                health = self.client.get("/healthz").json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool(health["warm"] >= n and health["oneshot_ready"] >= oneshot)

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


def sandboxes_pss_mb(server: Server) -> float:
    """PSS of every process the service started: runsc, its gofer and sentry, and gVisor's stub
    processes, which have no command line (counting only "runsc" command lines misses ~20 MB each)."""
    total = 0
    for p in psutil.Process(server.proc.pid).children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


def noise_png_b64(size: int) -> str:
    buf = io.BytesIO()
    Image.effect_noise((size, size), 64).convert("RGB").save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def image_init(b64: str) -> str:
    """DeepEyesV2's first cell of a trajectory: the task image, inlined as base64."""
    return (
        "import base64, io\nfrom PIL import Image\n"
        f"image_1 = Image.open(io.BytesIO(base64.b64decode('{b64}')))\nimage_1.load()\nimage_1.size"
    )


def session_burst(server: Server, n: int, init: str) -> list[float]:
    """n new sessions at once, each with an image init, as a rollout group's reset sends them."""
    tag = time.perf_counter_ns()

    def one(i: int) -> float:
        t = time.perf_counter()
        out = server.run(f"burst-{tag}-{i}", init)
        assert out["status"] == "success" and not out["output"]["stderr"], out
        return time.perf_counter() - t

    with ThreadPoolExecutor(n) as ex:
        latencies = list(ex.map(one, range(n)))
    for i in range(n):
        server.client.post("/clear_session", json={"session_id": f"burst-{tag}-{i}"})
    return latencies


def verl_clients(server: Server, clients: int, per_client: int) -> dict[str, float]:
    """verl's SandboxFusion client: 30 s request timeout (scored -1), up to 3 retries on 504 only."""
    code = "print(sum(i * i for i in range(100)))"

    def one(_: int) -> tuple[float, str]:
        t = time.perf_counter()
        for attempt in range(4):
            try:
                resp = server.client.post(
                    "/run_code", json={"code": code, "language": "python", "run_timeout": 10}, timeout=30
                )
            except httpx.TimeoutException:
                return time.perf_counter() - t, "timeout"
            if resp.status_code == 504 and attempt < 3:
                time.sleep(1.0)
                continue
            ok = resp.status_code == 200 and resp.json()["run_result"]["stdout"] == "328350\n"
            return time.perf_counter() - t, "ok" if ok else "error"
        return time.perf_counter() - t, "error"

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(one, range(clients * per_client)))
    wall = time.perf_counter() - started
    latencies = [r[0] for r in results]
    return {
        "rate": len(results) / wall,
        "p50": pct(latencies, 50),
        "p99": pct(latencies, 99),
        "timeouts": sum(r[1] == "timeout" for r in results),
        "errors": sum(r[1] == "error" for r in results),
    }


class JupyterPeer:
    """A plain ipykernel through jupyter_client: what the reference sandbox runs underneath."""

    def __init__(self) -> None:
        from jupyter_client import KernelManager

        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel()
        self.kc = self.km.blocking_client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)

    def run(self, code: str) -> dict[str, Any]:
        reply: dict[str, Any] = self.kc.execute_interactive(code, timeout=120, output_hook=lambda _msg: None)
        assert reply["content"]["status"] == "ok", reply["content"]
        return reply

    def pss_mb(self) -> float:
        assert self.km.provisioner is not None
        pid = self.km.provisioner.process.pid  # type: ignore[attr-defined]
        return float(psutil.Process(pid).memory_full_info().pss) / 2**20

    def stop(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def jupyter_peer(n: int, init: str) -> dict[str, float]:
    starts = []
    for _ in range(3):
        t = time.perf_counter()
        peer = JupyterPeer()
        peer.run(init)
        starts.append(time.perf_counter() - t)
        peer.stop()
    peer = JupyterPeer()
    try:
        peer.run("import numpy, PIL.Image, matplotlib.pyplot as plt")
        peer.run("x = 0")
        trivial = time_calls(lambda: peer.run(TRIVIAL), n)
        memory = peer.pss_mb()
    finally:
        peer.stop()
    return {"p50": pct(trivial, 50), "p99": pct(trivial, 99), "start": pct(starts, 50), "pss": memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    args = parser.parse_args()
    n = 100 if args.quick else 300
    tp_seconds = 3.0 if args.quick else 6.0
    console = Console()
    kernel_python = str(REPO / ".venv-sandbox" / "bin" / "python")
    init = image_init(noise_png_b64(256))  # ~260 KB of base64, as a task image inlined in the first cell

    with tempfile.TemporaryDirectory(prefix="argus-bench-") as tmp:
        # -- peers ------------------------------------------------------------------------------------
        console.print("peers: a Jupyter kernel via jupyter_client, python -c per call, runsc do per call …")
        jp = jupyter_peer(n, init)
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

        # -- warm latency, claim, memory, throughput (default profile, default pool) ------------------
        console.print("Argus gVisor service: warm latency …")
        server = Server(Path(tmp) / "warm", warm_pool=4)
        try:
            server.run("lat", "x = 0")
            trivial = time_calls(lambda: server.run("lat", TRIVIAL), n)
            server.run("lat", image_init(noise_png_b64(1024)))
            crop_code = "display(image_1.crop((256, 256, 768, 768)))"
            assert server.run("lat", crop_code)["output"]["images"]
            crop = time_calls(lambda: server.run("lat", crop_code), max(n // 5, 20))

            console.print("warm-pool claims …")
            claims = []
            for i in range(8):
                server.wait_warm(4, 4)
                t = time.perf_counter()
                sid = server.client.post("/v1/sessions", json={"session_id": f"claim-{i}"}).json()["session_id"]
                claims.append(time.perf_counter() - t)
                assert sid == f"claim-{i}"
            for i in range(8):
                server.client.post("/clear_session", json={"session_id": f"claim-{i}"})
            server.client.post("/clear_session", json={"session_id": "lat"})

            console.print("memory per idle session, every process counted …")
            server.wait_warm(4, 4)
            time.sleep(2)
            before = sandboxes_pss_mb(server)
            idle = [f"idle-{i}" for i in range(8)]
            for name in idle:
                server.run(name, "0")
            server.wait_warm(4, 4)
            time.sleep(2)
            per_session = (sandboxes_pss_mb(server) - before) / len(idle)
            for name in idle:
                server.client.post("/clear_session", json={"session_id": name})

            console.print("throughput at 1, 8, 32 sessions …")
            tps = {c: throughput(server, c, tp_seconds) for c in (1, 8, 32)}

            console.print("new session + image init, back to back …")
            back_to_back = []
            for i in range(8):
                server.wait_warm(4, 4)
                t = time.perf_counter()
                server.run(f"b2b-{i}", init)
                back_to_back.append(time.perf_counter() - t)
                server.client.post("/clear_session", json={"session_id": f"b2b-{i}"})

            console.print("burst of 16 new sessions beyond a warm pool of 4 …")
            server.wait_warm(4, 4)
            burst_small = session_burst(server, 16, init)

            console.print("/run_code, verl-style clients: 1, 32, 120 …")
            per = 3 if args.quick else 5
            verl = {c: verl_clients(server, c, max(per, 40 // c)) for c in (1, 32, 120)}
        finally:
            server.stop()

        console.print("burst of 16 new sessions with the warm pool sized to the burst …")
        burst_server = Server(Path(tmp) / "burst", warm_pool=16, oneshot_pool=0)
        try:
            bursts = []
            for _ in range(2 if args.quick else 3):
                burst_server.wait_warm(16)
                time.sleep(1)
                bursts += session_burst(burst_server, 16, init)
        finally:
            burst_server.stop()

        console.print("cold session start (no warm pool) …")
        cold_server = Server(Path(tmp) / "cold", warm_pool=0, oneshot_pool=0)
        try:
            cold = time_calls(lambda: cold_server.run(f"cold-{time.perf_counter_ns()}", TRIVIAL), 8)
        finally:
            cold_server.stop()

    ms = 1000.0

    def verl_row(c: int) -> str:
        v = verl[c]
        return (
            f"{v['rate']:.0f} runs/s · p50 {v['p50'] * ms:.0f} ms · p99 {v['p99']:.2f} s · "
            f"{v['timeouts']:.0f} timeouts · {v['errors']:.0f} errors"
        )

    rows = [
        (
            "warm exec p50, trivial (HTTP)",
            f"{pct(trivial, 50) * ms:.2f} ms",
            f"Jupyter kernel {jp['p50'] * ms:.2f} ms · python -c {pct(py, 50) * ms:.0f} ms",
            "≤ 5 ms, ≤ Jupyter's",
        ),
        (
            "warm exec p99, trivial (HTTP)",
            f"{pct(trivial, 99) * ms:.2f} ms",
            f"Jupyter kernel {jp['p99'] * ms:.2f} ms · runsc do {pct(runsc, 99) * ms:.0f} ms",
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
            "new session + image init, back to back, p50",
            f"{pct(back_to_back, 50) * ms:.0f} ms",
            f"reference sandbox 335 ms (quoted) · Jupyter kernel start + init {jp['start'] * ms:.0f} ms",
            "",
        ),
        (
            "burst of 16 new sessions + image init, pool 16: p50 / max",
            f"{pct(bursts, 50) * ms:.0f} / {max(bursts) * ms:.0f} ms",
            f"reference sandbox 335 ms (quoted) · Jupyter kernel start + init {jp['start'] * ms:.0f} ms",
            "p50 ≤ 300 ms",
        ),
        (
            "burst of 16 beyond a pool of 4: p50 / max",
            f"{pct(burst_small, 50) * ms:.0f} / {max(burst_small) * ms:.0f} ms",
            "",
            "",
        ),
        (
            "cold session start + first exec p50",
            f"{pct(cold, 50) * ms:.0f} ms",
            f"runsc do {pct(runsc, 50) * ms:.0f} ms",
            "≤ 400 ms",
        ),
        ("warm-pool claim p50 / max", f"{pct(claims, 50) * ms:.1f} / {max(claims) * ms:.1f} ms", "", "≤ 10 ms"),
        (
            "memory per idle session (PSS, every process)",
            f"{per_session:.1f} MB",
            f"Jupyter kernel {jp['pss']:.1f} MB (no sandbox)",
            "≤ 40 MB",
        ),
        ("/run_code, 1 client", verl_row(1), "", ""),
        ("/run_code, 32 clients", verl_row(32), "", ""),
        ("/run_code, 120 clients (verl)", verl_row(120), "", "0 timeouts/errors · p99 ≤ 5 s · ≥ 50/s"),
    ]
    table = Table(title=f"Argus code executor (gVisor, default profile) — {os.cpu_count()} cores")
    for col in ("metric", "Argus", "peers (same run)", "target"):
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)


if __name__ == "__main__":
    main()
