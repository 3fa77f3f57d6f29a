"""The code-executor service under real gVisor: protocols, limits, an adversarial corpus, bad input."""

from __future__ import annotations

import base64
import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image

from argus.supervision import free_port, wait_until
from tests.conftest import REPO

pytestmark = pytest.mark.integration

SECRET = "argus-test-secret-5f1d"


class Service:
    def __init__(self, tmp: Path, **overrides: str):
        self.port = free_port()
        self.state_dir = tmp / "sandbox-state"
        self.log = tmp / "sandbox.log"
        self.env = {
            **os.environ,
            "ARGUS_SANDBOX_PORT": str(self.port),
            "ARGUS_SANDBOX_STATE_DIR": str(self.state_dir),
            "ARGUS_SANDBOX_MEMORY_MB": "256",
            "ARGUS_SANDBOX_WARM_POOL": "2",
            "ARGUS_SANDBOX_MAX_OUTPUT_CHARS": "10000",
            "ARGUS_SANDBOX_INTERRUPT_GRACE_S": "1",
            "ARGUS_TEST_SECRET": SECRET,
            **overrides,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "argus.cli", "sandbox", "serve", "--log-level", "warning"],
                env=self.env,
                cwd=REPO,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        warm = int(self.env["ARGUS_SANDBOX_WARM_POOL"])

        def ready() -> bool:
            try:
                return bool(httpx.get(f"{self.url}/healthz", timeout=2).json()["warm"] >= warm)
            except (httpx.HTTPError, ValueError):
                return False

        assert wait_until(ready, timeout_s=120), self.log.read_text()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def sandboxes(self) -> list[psutil.Process]:
        """runsc processes (run, gofer, sandbox) that belong to this service's state directory."""
        mark = str(self.state_dir)
        found = []
        for p in psutil.process_iter(["cmdline", "status"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "runsc" in cmd and mark in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(p)
        return found


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    svc = Service(tmp_path_factory.mktemp("sandbox"))
    svc.start()
    yield svc
    svc.stop()
    assert wait_until(lambda: not svc.sandboxes(), timeout_s=30), svc.sandboxes()


@pytest.fixture
def client(service: Service) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service.url, timeout=120) as c:
        yield c


def png_b64(size: tuple[int, int] = (64, 48), color: tuple[int, int, int] = (255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def jupyter(client: httpx.Client, session: str, code: str, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    resp = client.post("/jupyter_sandbox", json={"session_id": session, "code": code, "timeout": timeout})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def define_image_1(b64: str) -> str:
    return (
        "import base64, io\nfrom PIL import Image\n"
        f"image_1 = Image.open(io.BytesIO(base64.b64decode('{b64}')))\nimage_1.size"
    )


CROP_AND_SHOW = (
    "import matplotlib.pyplot as plt\ncrop = image_1.crop((0, 0, 32, 24))\n"
    "plt.imshow(crop)\nplt.axis('off')\nplt.show()\nprint(crop.size, crop.getpixel((1, 1)))"
)


# -- the DeepEyesV2 flow on every protocol -----------------------------------------------------------


def test_deepeyesv2_flow_on_jupyter_sandbox(client: httpx.Client) -> None:
    first = jupyter(client, "de-v1", define_image_1(png_b64()))
    assert first["status"] == "success" and first["output"]["result"] == "(64, 48)"
    second = jupyter(client, "de-v1", CROP_AND_SHOW)
    assert second["status"] == "success", second
    assert second["output"]["stdout"] == "(32, 24) (255, 0, 0)\n"
    (img,) = second["output"]["images"]
    assert not img.startswith("data:")
    assert Image.open(io.BytesIO(base64.b64decode(img))).format == "PNG"
    assert set(second["output"]) == {"result", "stdout", "stderr", "images"}
    assert isinstance(second["execution_time"], float)


def test_deepeyesv2_flow_on_run_jupyter(client: httpx.Client) -> None:
    client.post("/run_jupyter", json={"session_id": "de-v2", "code": define_image_1(png_b64()), "timeout": 20})
    resp = client.post("/run_jupyter", json={"session_id": "de-v2", "code": CROP_AND_SHOW, "timeout": 20}).json()
    assert resp["status"] == "success"
    out = resp["output"]
    assert "result" not in out and out["stdout"] == out["stdout_raw"] == "(32, 24) (255, 0, 0)\n"
    (img,) = out["images"]
    assert img.startswith("data:image/png;base64,")
    Image.open(io.BytesIO(base64.b64decode(img.split(",", 1)[1]))).verify()
    cleared = client.post("/clear_session", json={"session_id": "de-v2"}).json()
    assert cleared == {"status": "success", "cleared": True}
    after = client.post("/run_jupyter", json={"session_id": "de-v2", "code": "image_1", "timeout": 20}).json()
    assert after["status"] == "error" and "NameError" in after["output"]["stderr"]


def test_deepeyesv2_flow_on_run_code(client: httpx.Client) -> None:
    code = define_image_1(png_b64()).removesuffix("image_1.size") + CROP_AND_SHOW + "\ncrop.save('crop.png')"
    resp = client.post(
        "/run_code", json={"code": code, "language": "python", "run_timeout": 30, "fetch_files": ["crop.png"]}
    ).json()
    assert resp["status"] == "Success", resp
    assert resp["run_result"]["status"] == "Finished" and resp["run_result"]["return_code"] == 0
    assert resp["run_result"]["stdout"] == "(32, 24) (255, 0, 0)\n"
    assert Image.open(io.BytesIO(base64.b64decode(resp["files"]["crop.png"]))).size == (32, 24)


def test_run_code_semantics(client: httpx.Client) -> None:
    files = {"data/in.txt": base64.b64encode(b"hello").decode()}
    py = client.post(
        "/run_code",
        json={
            "code": "import sys\nprint(open('data/in.txt').read(), input())\nsys.exit(3)",
            "stdin": "world\n",
            "files": files,
        },
    ).json()
    assert py["status"] == "Failed" and py["run_result"]["return_code"] == 3
    assert py["run_result"]["stdout"] == "hello world\n"
    sh = client.post(
        "/run_code", json={"code": "echo $((6*7)); cat; echo oops >&2", "language": "bash", "stdin": "piped"}
    ).json()
    assert (
        sh["status"] == "Success"
        and sh["run_result"]["stdout"] == "42\npiped"
        and sh["run_result"]["stderr"] == "oops\n"
    )
    slow = client.post("/run_code", json={"code": "import time; time.sleep(30)", "run_timeout": 1}).json()
    assert slow["status"] == "Failed" and slow["run_result"]["status"] == "TimeLimitExceeded"
    # One-shot: nothing of a run is visible to the next one.
    leak = client.post("/run_code", json={"code": "import os; print(sorted(os.listdir('.')))"}).json()
    assert leak["run_result"]["stdout"] == "[]\n"


def test_last_expression_display_and_errors(client: httpx.Client) -> None:
    out = jupyter(client, "rich", "from PIL import Image\ndisplay(Image.new('RGB', (8, 8)), 'text')\n40 + 2")
    assert out["output"]["result"] == "42" and len(out["output"]["images"]) == 1
    assert out["output"]["stdout"] == "'text'\n"
    err = jupyter(client, "rich", "def f():\n    return 1 / 0\nf()")
    assert err["status"] == "error"
    assert "ZeroDivisionError: division by zero" in err["output"]["stderr"]
    assert "kernel.py" not in err["output"]["stderr"]  # the user's frames only, like Jupyter
    assert jupyter(client, "rich", "print('still alive')")["output"]["stdout"] == "still alive\n"


def test_native_api(client: httpx.Client) -> None:
    created = client.post("/v1/sessions", json={})
    assert created.status_code == 201
    sid = created.json()["session_id"]
    assert client.post("/v1/sessions", json={"session_id": sid}).status_code == 409
    run = client.post(f"/v1/sessions/{sid}/execute", json={"code": "x = 6 * 7\nx"}).json()
    assert (run["status"], run["result"], run["state_lost"]) == ("ok", "42", False)
    assert sid in [s["session_id"] for s in client.get("/v1/sessions").json()]
    assert client.delete(f"/v1/sessions/{sid}").status_code == 204
    assert client.delete(f"/v1/sessions/{sid}").status_code == 404
    assert client.post(f"/v1/sessions/{sid}/execute", json={"code": "1"}).status_code == 404
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["runner"] == "gvisor"
    metrics = client.get("/metrics").text
    for name in (
        "argus_sandbox_executions_total",
        "argus_sandbox_execution_seconds_bucket",
        "argus_sandbox_sessions_live",
        "argus_sandbox_pool_warm",
        "argus_sandbox_kills_total",
    ):
        assert name in metrics


# -- limits ------------------------------------------------------------------------------------------


def test_timeout_interrupts_and_keeps_state(client: httpx.Client) -> None:
    jupyter(client, "slow", "kept = 'state'")
    out = jupyter(client, "slow", "while True:\n    pass", timeout=1)
    assert out["status"] == "success"  # v1 reports timeouts as success, with the error in stderr
    assert "TimeoutError: execution exceeded the 1 s time limit" in out["output"]["stderr"]
    assert jupyter(client, "slow", "kept")["output"]["result"] == "'state'"


def test_timeout_that_ignores_interrupts_restarts_the_sandbox(client: httpx.Client) -> None:
    jupyter(client, "stubborn", "kept = 1")
    code = "import signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    time.sleep(0.01)"
    out = jupyter(client, "stubborn", code, timeout=1)
    assert "state was lost" in out["output"]["stderr"]
    after = jupyter(client, "stubborn", "kept")
    assert "NameError" in after["output"]["stderr"]
    assert jupyter(client, "stubborn", "1 + 1")["output"]["result"] == "2"


def test_output_and_image_caps(client: httpx.Client) -> None:
    big = jupyter(client, "caps", "print('x' * 100_000_000)")
    assert len(big["output"]["stdout"]) < 11_000
    assert "[... output truncated: 99990001 more characters not shown ...]" in big["output"]["stdout"]
    raw = jupyter(client, "caps", "import os\nfor _ in range(100):\n    os.write(1, b'y' * 1_000_000)")
    assert len(raw["output"]["stdout"]) < 11_000 and "output truncated" in raw["output"]["stdout"]
    many = jupyter(client, "caps", "from PIL import Image\nfor i in range(12):\n    display(Image.new('RGB', (4, 4)))")
    assert len(many["output"]["images"]) == 8 and "image dropped: more than 8 images" in many["output"]["stderr"]


# -- adversarial corpus: contained, and the service keeps serving others ------------------------------


@pytest.fixture
def bystander(client: httpx.Client) -> Iterator[str]:
    jupyter(client, "bystander", "canary = 'alive'")
    yield "bystander"
    assert jupyter(client, "bystander", "canary")["output"]["result"] == "'alive'"


def test_no_network_to_the_host(client: httpx.Client, bystander: str) -> None:
    accepted: list[object] = []
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(3)
        port = listener.getsockname()[1]

        def accept() -> None:
            with contextlib.suppress(OSError):
                accepted.append(listener.accept())

        waiter = threading.Thread(target=accept)
        waiter.start()
        code = (
            f"import socket\ns = socket.socket()\ns.settimeout(2)\n"
            f"try:\n    s.connect(('127.0.0.1', {port}))\n    print('CONNECTED')\n"
            f"except OSError as e:\n    print('blocked', type(e).__name__)"
        )
        out = jupyter(client, "net", code)
        waiter.join()
    assert "blocked" in out["output"]["stdout"] and not accepted
    dns = jupyter(
        client,
        "net",
        "import socket\ntry:\n    socket.gethostbyname('example.com')\n"
        "    print('resolved')\nexcept OSError:\n    print('no dns')",
    )
    assert dns["output"]["stdout"] == "no dns\n"


def test_cannot_write_outside_scratch(client: httpx.Client, bystander: str) -> None:
    # Every host directory the sandbox can see (the read-only root, the kernel's Python and its
    # libraries, the kernel code) refuses writes. The sandbox's own /tmp and /scratch are private tmpfs.
    targets = [
        "/usr/argus-pwned",
        "/etc/argus-pwned",
        "/argus-pwned",
        "/opt/argus/kernel/kernel.py",
        f"{REPO / '.venv-sandbox' / 'lib' / 'python3.11' / 'site-packages'}/argus-pwned",
        f"{sys.base_prefix}/argus-pwned",
    ]
    code = "results = []\n"
    for t in targets:
        code += (
            f"try:\n    open({t!r}, 'a').write('x')\n    results.append('WROTE')\n"
            "except OSError as e:\n    results.append(type(e).__name__)\n"
        )
    code += "open('ok.txt', 'w').write('scratch is writable')\nprint(results, open('ok.txt').read())"
    out = jupyter(client, "writer", code)
    assert "WROTE" not in out["output"]["stdout"] and "scratch is writable" in out["output"]["stdout"]
    # Nothing reached the host, wherever the checkout lives (under /tmp too, where the sandbox's
    # private /tmp shadows it).
    escape = jupyter(
        client,
        "writer",
        f"open({str(REPO / 'argus-pwned')!r}, 'w').write('x') if __import__('os').path.isdir({str(REPO)!r}) else None",
    )
    assert escape["status"] in ("success", "error")
    for t in [*targets, str(REPO / "argus-pwned")]:
        assert not Path(t).exists() or t.endswith("kernel.py"), t
    assert (REPO / "services/sandbox/kernel/kernel.py").read_text().endswith("main()\n")


def test_cannot_see_the_service_environment_or_files(client: httpx.Client, bystander: str) -> None:
    code = (
        "import os, glob\n"
        f"print({SECRET!r} in str(os.environ))\n"
        "for p in ['/proc/1/environ', '/proc/self/environ']:\n"
        "    try:\n        print(" + repr(SECRET) + ".encode() in open(p, 'rb').read())\n"
        "    except OSError:\n        print('unreadable')\n"
        f"print(os.path.exists({str(REPO / 'services/sandbox/app.py')!r}), os.path.exists('/root/.gitconfig'),\n"
        "      os.path.exists('/etc/shadow'), sorted(os.listdir('/opt/argus/kernel')))\n"
        "print(sorted(p for p in os.listdir('/proc') if p.isdigit()))"
    )
    lines = jupyter(client, "snoop", code)["output"]["stdout"].splitlines()
    assert lines[0] == "False" and "True" not in lines[1:3]
    assert lines[3].startswith("False False False") and "app.py" not in lines[3]
    assert lines[4] == "['1']"  # only the kernel itself: no host processes, no other sessions


def test_sessions_are_isolated_from_each_other(client: httpx.Client) -> None:
    jupyter(client, "session-a", "secret_b = 'not yours'\nopen('b.txt', 'w').write('private')")
    out = jupyter(
        client,
        "session-b",
        "import os\ntry:\n    print(secret_b)\nexcept NameError:\n    print('no var')\n"
        "print(os.listdir('.'), os.path.exists('/scratch/b.txt'))",
    )
    assert out["output"]["stdout"] == "no var\n[] False\n"


def test_fork_bomb_is_contained(client: httpx.Client, bystander: str) -> None:
    out = jupyter(client, "forker", "import os\nwhile True:\n    os.fork()", timeout=5)
    assert out["status"] in ("success", "error")  # contained: a pids-limit error, a timeout, or a dead kernel
    assert any(
        s in out["output"]["stderr"]
        for s in ("BlockingIOError", "Resource temporarily", "TimeoutError", "SandboxError")
    )


def test_memory_bomb_kills_only_its_session(client: httpx.Client, bystander: str) -> None:
    jupyter(client, "hog", "x = 1")
    out = jupyter(client, "hog", "blob = bytearray(1024 * 1024 * 1024)")
    assert out["status"] == "error"
    assert any(s in out["output"]["stderr"] for s in ("memory limit", "MemoryError"))
    assert jupyter(client, "hog", "1 + 1")["output"]["result"] == "2"


def test_killing_the_parent_does_not_reach_the_service(client: httpx.Client, bystander: str, service: Service) -> None:
    jupyter(client, "parricide", "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)", timeout=5)
    jupyter(
        client, "parricide2", "import os, signal\nos.kill(1, signal.SIGKILL)\nos.kill(-1, signal.SIGKILL)", timeout=5
    )
    assert service.proc is not None and service.proc.poll() is None
    assert client.get("/healthz").status_code == 200


def test_concurrent_sessions(client: httpx.Client) -> None:
    def one(i: int) -> str:
        jupyter(client, f"conc-{i}", f"v = {i}")
        return str(jupyter(client, f"conc-{i}", "v * 2")["output"]["result"])

    with ThreadPoolExecutor(8) as ex:
        assert list(ex.map(one, range(8))) == [str(i * 2) for i in range(8)]
    for i in range(8):
        client.post("/clear_session", json={"session_id": f"conc-{i}"})


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "status", "reason"),
    [
        ("/jupyter_sandbox", {"code": "1"}, 422, "session_id"),
        ("/jupyter_sandbox", {"session_id": "s", "code": 5}, 422, "code"),
        ("/jupyter_sandbox", {"session_id": "s", "code": "1", "timeout": "soon"}, 422, "timeout"),
        ("/jupyter_sandbox", {"session_id": "s", "code": "1", "timeout": -1}, 422, "greater than 0"),
        ("/jupyter_sandbox", {"session_id": "s", "code": "1", "timeout": 10_000}, 422, "over the 300 s limit"),
        ("/jupyter_sandbox", {"session_id": "", "code": "1"}, 422, "at least 1 character"),
        ("/run_jupyter", {"session_id": "s"}, 422, "code"),
        ("/clear_session", {}, 422, "session_id"),
        ("/run_code", {"code": "1", "language": "cobol"}, 400, "not supported"),
        ("/run_code", {"code": "1", "files": {"a.txt": "%%%not base64"}}, 400, "not valid base64"),
        ("/run_code", {"code": "1", "files": {"../escape": ""}}, 400, "inside the sandbox"),
        ("/run_code", {"code": "1", "files": {"/etc/x": ""}}, 400, "must be relative"),
        ("/v1/sessions/nope/execute", {"code": "1"}, 404, "no session"),
    ],
)
def test_malformed_requests_get_4xx_with_a_reason(
    client: httpx.Client, path: str, body: object, status: int, reason: str
) -> None:
    resp = client.post(path, json=body)
    assert resp.status_code == status, resp.text
    assert reason in resp.text and "Traceback" not in resp.text


def test_broken_json_and_huge_bodies(client: httpx.Client) -> None:
    broken = client.post("/jupyter_sandbox", content=b"{not json", headers={"content-type": "application/json"})
    assert broken.status_code == 422 and "JSON" in broken.text
    huge = client.post("/jupyter_sandbox", content=b"x" * (65 << 20), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "limit" in huge.text


# -- lifecycle: capacity, crashes, shutdown -------------------------------------------------------------


def test_capacity_backpressure_and_no_orphans(tmp_path: Path) -> None:
    svc = Service(tmp_path, ARGUS_SANDBOX_MAX_SESSIONS="2", ARGUS_SANDBOX_WARM_POOL="1")
    svc.start()
    try:
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            for i in range(2):
                assert c.post("/jupyter_sandbox", json={"session_id": f"cap-{i}", "code": "1"}).status_code == 200
            full = c.post("/jupyter_sandbox", json={"session_id": "cap-x", "code": "1"})
            assert full.status_code == 429 and full.headers["Retry-After"] == "1" and "limit of 2" in full.text
            verl = c.post("/run_code", json={"code": "1"})
            assert verl.status_code == 504 and "Retry-After" in verl.headers
            assert c.post("/clear_session", json={"session_id": "cap-0"}).json()["cleared"]
            assert c.post("/jupyter_sandbox", json={"session_id": "cap-x", "code": "1"}).status_code == 200
        assert svc.sandboxes()
        # A crashed service takes its sandboxes with it ...
        svc.stop(signal.SIGKILL)
        assert wait_until(lambda: not svc.sandboxes(), timeout_s=30), svc.sandboxes()
        # ... and the next one cleans up whatever runsc state is left, then serves.
        svc.start()
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            assert (
                c.post("/jupyter_sandbox", json={"session_id": "again", "code": "2"}).json()["output"]["result"] == "2"
            )
    finally:
        svc.stop()
    assert wait_until(lambda: not svc.sandboxes(), timeout_s=30), svc.sandboxes()
    listing = subprocess.run(
        ["runsc", "--root", str(svc.state_dir / "gvisor" / "runsc"), "list", "--quiet"], capture_output=True, text=True
    )
    assert listing.stdout.split() == []


def test_process_runner_speaks_the_same_protocol(tmp_path: Path) -> None:
    svc = Service(tmp_path, ARGUS_SANDBOX_RUNNER="process", ARGUS_SANDBOX_WARM_POOL="1")
    svc.start()
    try:
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            c.post("/jupyter_sandbox", json={"session_id": "p", "code": define_image_1(png_b64())})
            out = c.post("/jupyter_sandbox", json={"session_id": "p", "code": CROP_AND_SHOW}).json()
            assert out["output"]["stdout"] == "(32, 24) (255, 0, 0)\n" and len(out["output"]["images"]) == 1
            env = c.post("/jupyter_sandbox", json={"session_id": "p", "code": "import os; sorted(os.environ)"}).json()
            assert "ARGUS_TEST_SECRET" not in env["output"]["result"]
            mem = c.post("/jupyter_sandbox", json={"session_id": "p", "code": "b = bytearray(1 << 30)"}).json()
            assert mem["status"] == "error" and "MemoryError" in mem["output"]["stderr"]
    finally:
        svc.stop()
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(svc.state_dir) in " ".join(p.info["cmdline"] or [])]
