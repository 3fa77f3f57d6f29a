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
            # One pre-booted one-shot sandbox: consecutive /run_code calls land on the same one.
            "ARGUS_SANDBOX_ONESHOT_POOL": "1",
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
        oneshot = (
            int(self.env["ARGUS_SANDBOX_ONESHOT_POOL"]) if self.env.get("ARGUS_SANDBOX_RUNNER") != "process" else 0
        )

        def ready() -> bool:
            try:
                health = httpx.get(f"{self.url}/healthz", timeout=2).json()
            except (httpx.HTTPError, ValueError):
                return False
            return bool(health["warm"] >= warm and health["oneshot_ready"] >= oneshot)

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
    assert first["output"]["stdout"] == "Out[0]: (64, 48)\n"  # the reference echoes the value
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
    assert after["status"] == "success" and "NameError" in after["output"]["stderr"]


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
    assert out["output"]["stdout"] == "'text'\nOut[0]: 42\n"
    shown = jupyter(client, "rich", "Image.new('RGB', (8, 8))")  # an image result is shown, not echoed
    assert len(shown["output"]["images"]) == 1 and shown["output"]["stdout"] == ""
    err = jupyter(client, "rich", "def f():\n    return 1 / 0\nf()")
    assert err["status"] == "success"  # DeepEyesV2 ends the episode on anything else
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


# -- parity with the reference sandbox (MultiModal-Jupyter-Sandbox), which DeepEyesV2 was trained on -----

IPYTHON_HEADER = "ZeroDivisionError                         Traceback (most recent call last)\n"


def run_jupyter(client: httpx.Client, session: str, code: str, timeout: float = 20) -> dict:  # type: ignore[type-arg]
    resp = client.post("/run_jupyter", json={"session_id": session, "code": code, "timeout": timeout})
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def test_an_exception_answers_success_with_an_ipython_traceback(client: httpx.Client) -> None:
    jupyter(client, "exc", "a = 1")
    out = jupyter(client, "exc", "x = 1/0")
    assert out["status"] == "success"
    assert out["output"]["stderr"] == (
        "-" * 75
        + "\n"
        + IPYTHON_HEADER
        + "Cell In[2], line 1\n----> 1 x = 1/0\n\nZeroDivisionError: division by zero\n"
    )
    assert (out["output"]["stdout"], out["output"]["result"]) == ("", "None")
    nested = jupyter(client, "exc", "def f(v):\n    return v / 0\nf(3)")["output"]["stderr"]
    assert "Cell In[3], line 3\n" in nested and "Cell In[3], line 2, in f(v)\n" in nested
    assert "----> 2     return v / 0" in nested and "kernel.py" not in nested
    syntax = jupyter(client, "exc", "y = (")
    assert syntax["status"] == "success" and syntax["output"]["stderr"].startswith("  Cell In[4], line 1\n")
    assert "SyntaxError" in syntax["output"]["stderr"]
    fixed = jupyter(client, "exc", "x = 1/1\nx")  # the model repairs its code and the session goes on
    assert (fixed["output"]["stdout"], fixed["output"]["result"], fixed["output"]["stderr"]) == (
        "Out[0]: 1.0\n",
        "1.0",
        "",
    )
    v2 = run_jupyter(client, "exc", "a / 0")
    assert v2["status"] == "success" and IPYTHON_HEADER in v2["output"]["stderr"]


def test_plt_is_predefined_and_figures_are_laid_out(client: httpx.Client) -> None:
    out = jupyter(client, "fresh-plt", "plt.plot([1, 2, 3])\nplt.title('no import needed')\nplt.show()")
    assert out["status"] == "success" and out["output"]["stderr"] == ""
    (img,) = out["output"]["images"]
    # tight_layout + a tight bounding box, as Jupyter's inline backend: the reference gives 620x470
    # for a titled default figure; the exact width depends on the tick labels' fonts.
    width, height = Image.open(io.BytesIO(base64.b64decode(img))).size
    assert 600 <= width <= 640 and 460 <= height <= 480, (width, height)


def test_the_last_value_is_echoed_like_the_reference(client: httpx.Client) -> None:
    assert jupyter(client, "echo", "1 + 2")["output"] == {
        "result": "3",
        "stdout": "Out[0]: 3\n",
        "stderr": "",
        "images": [],
    }
    quiet = jupyter(client, "echo", "z = 5")["output"]
    assert (quiet["result"], quiet["stdout"]) == ("None", "")
    v2 = run_jupyter(client, "echo", "print('a')\nz * 2")["output"]
    assert v2["stdout"] == v2["stdout_raw"] == "a\n10\n"


def test_only_tracebacks_reach_v1_stderr(client: httpx.Client) -> None:
    code = "import sys, warnings\nsys.stderr.write('noise\\n')\nwarnings.warn('careful')\nprint('ok')"
    v1 = jupyter(client, "streams", code)["output"]
    assert (v1["stdout"], v1["stderr"]) == ("ok\n", "")
    v2 = run_jupyter(client, "streams-v2", code)["output"]
    assert "noise\n" in v2["stderr"] and "Cell In[1], line 3: UserWarning: careful" in v2["stderr"]
    assert "kernel.py" not in v2["stderr"] and "/opt/argus" not in v2["stderr"]


@pytest.mark.parametrize("path", ["/jupyter_sandbox", "/run_jupyter"])
@pytest.mark.parametrize("code", ["", "   \n"])
def test_empty_code_is_answered_as_the_reference_does(client: httpx.Client, path: str, code: str) -> None:
    resp = client.post(path, json={"session_id": "empty", "code": code})
    assert resp.status_code == 200
    assert resp.json() == {"output": "Error: No code provided", "status": "error", "execution_time": 0.0}


def test_the_default_profile_has_what_model_code_imports(client: httpx.Client) -> None:
    code = (
        "import cv2, scipy.ndimage, pandas, skimage, sympy, pytesseract\n"
        "from PIL import Image, ImageDraw, ImageFont\n"
        "img = Image.new('L', (360, 90), 255)\n"
        "ImageDraw.Draw(img).text((12, 12), 'ARGUS 42', fill=0, font=ImageFont.load_default(size=48))\n"
        "print(cv2.cvtColor(__import__('numpy').asarray(img.convert('RGB')), cv2.COLOR_RGB2GRAY).shape)\n"
        "print(pytesseract.image_to_string(img).strip())"
    )
    out = jupyter(client, "libs", code, timeout=60)["output"]
    assert out["stderr"] == "", out["stderr"]
    assert out["stdout"].splitlines() == ["(90, 360)", "ARGUS 42"]


def test_one_shot_runs_leave_nothing_for_the_next(client: httpx.Client) -> None:
    plant = (
        "import os, subprocess\n"
        "for d in ('.', '/tmp', '/scratch'):\n"
        "    open(os.path.join(d, 'planted.txt'), 'w').write('left behind')\n"
        "subprocess.Popen(['sleep', '600'], start_new_session=True)\n"
        "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    import time\n"
        "    while True:\n"
        "        open('/tmp/daemon.txt', 'w').write('still running')\n"
        "        time.sleep(0.01)\n"
        "print('planted', os.getpid())"
    )
    check = (
        "import os\n"
        "print(sorted(os.path.join(d, p) for d in ('.', '/tmp', '/scratch') for p in os.listdir(d)))\n"
        "print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) not in (1, os.getpid())))"
    )
    before = client.post("/run_code", json={"code": check}).json()["run_result"]["stdout"]
    first = client.post("/run_code", json={"code": plant}).json()
    assert first["status"] == "Success" and first["run_result"]["stdout"].startswith("planted"), first
    after = client.post("/run_code", json={"code": check}).json()
    # The same files (the kernel's own, mount points of its environment) and no other process.
    assert after["run_result"]["stdout"] == before and before.endswith("\n[]\n"), (before, after)
    assert "planted" not in before and "daemon" not in before
    bash = client.post("/run_code", json={"code": "ls -A /scratch/run /tmp | grep -c planted", "language": "bash"})
    assert bash.json()["run_result"]["stdout"] == "0\n"


# -- limits ------------------------------------------------------------------------------------------


def test_timeout_interrupts_and_keeps_state(client: httpx.Client) -> None:
    jupyter(client, "slow", "kept = 'state'")
    out = jupyter(client, "slow", "while True:\n    pass", timeout=1)
    assert out["status"] == "success"  # v1 reports timeouts as success, with the reference's text
    assert out["output"]["stderr"] == "Timed out waiting for Jupyter kernel output.\n"
    assert jupyter(client, "slow", "kept")["output"]["result"] == "'state'"
    native = client.post("/v1/sessions", json={"session_id": "slow-native"}).json()["session_id"]
    run = client.post(f"/v1/sessions/{native}/execute", json={"code": "while True:\n    pass", "timeout": 1}).json()
    assert run["status"] == "timeout" and "exceeded the 1 s time limit" in run["stderr"]


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
    twelve = "from PIL import Image\nfor i in range(12):\n    display(Image.new('RGB', (4 + i, 4)))"
    many = jupyter(client, "caps", twelve)
    widths = [Image.open(io.BytesIO(base64.b64decode(i))).width for i in many["output"]["images"]]
    assert widths == list(range(4, 14)) and many["output"]["stderr"] == ""  # ten, in order, no note
    sid = client.post("/v1/sessions", json={"session_id": "caps-native"}).json()["session_id"]
    native = client.post(f"/v1/sessions/{sid}/execute", json={"code": twelve}).json()
    assert len(native["images"]) == 10 and "image dropped: more than 10 images" in native["stderr"]


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
    assert out["status"] == "success"  # reported to the model, not as a failed call
    # Either the allocation fails in the cell, or the kernel is killed, and the report says which.
    assert any(s in out["output"]["stderr"] for s in ("memory limit", "MemoryError", "killed by SIGKILL"))
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


def test_capacity_admission_backpressure_and_no_orphans(tmp_path: Path) -> None:
    svc = Service(
        tmp_path, ARGUS_SANDBOX_MAX_SESSIONS="2", ARGUS_SANDBOX_WARM_POOL="1", ARGUS_SANDBOX_ADMISSION_TIMEOUT_S="1"
    )
    svc.start()
    try:
        with httpx.Client(base_url=svc.url, timeout=60) as c:
            for i in range(2):
                assert c.post("/jupyter_sandbox", json={"session_id": f"cap-{i}", "code": "1"}).status_code == 200
            # At capacity a call waits for a slot (DeepEyesV2 never retries) ...
            with ThreadPoolExecutor(1) as ex:
                waiting = ex.submit(c.post, "/jupyter_sandbox", json={"session_id": "cap-w", "code": "'admitted'"})
                assert wait_until(lambda: c.get("/healthz").json()["queued"] == 1, timeout_s=5)
                assert "argus_sandbox_admission_queue" in c.get("/metrics").text
                assert c.post("/clear_session", json={"session_id": "cap-0"}).json()["cleared"]
                assert waiting.result().json()["output"]["result"] == "'admitted'"
            # ... and only after `admission_timeout_s` is it refused, with Retry-After.
            full = c.post("/jupyter_sandbox", json={"session_id": "cap-x", "code": "1"})
            assert full.status_code == 429 and full.headers["Retry-After"] == "1" and "limit of 2" in full.text
            assert 'argus_sandbox_admission_wait_seconds_count{kind="session"} 2.0' in c.get("/metrics").text
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


def test_one_shot_capacity_answers_504_after_the_wait(tmp_path: Path) -> None:
    svc = Service(tmp_path, ARGUS_SANDBOX_WARM_POOL="0", ARGUS_SANDBOX_ADMISSION_TIMEOUT_S="0.5")
    svc.start()
    try:
        with httpx.Client(base_url=svc.url, timeout=60) as c, ThreadPoolExecutor(1) as ex:
            busy = ex.submit(c.post, "/run_code", json={"code": "import time; time.sleep(4)", "run_timeout": 10})
            assert wait_until(lambda: c.get("/healthz").json()["oneshot_ready"] == 0, timeout_s=5)
            verl = c.post("/run_code", json={"code": "1"})
            assert verl.status_code == 504 and "Retry-After" in verl.headers  # verl retries on 504 only
            assert busy.result().json()["status"] == "Success"
    finally:
        svc.stop()


def test_a_burst_beyond_the_warm_pool_gets_every_session(tmp_path: Path) -> None:
    svc = Service(tmp_path, ARGUS_SANDBOX_WARM_POOL="1", ARGUS_SANDBOX_WARM_PARALLEL="2")
    svc.start()
    booting: list[int] = []
    done = threading.Event()

    def watch() -> None:
        with httpx.Client(base_url=svc.url, timeout=10) as c:
            while not done.is_set():
                booting.append(c.get("/healthz").json()["warming"])
                time.sleep(0.05)

    try:
        watcher = threading.Thread(target=watch)
        watcher.start()
        with httpx.Client(base_url=svc.url, timeout=120) as c, ThreadPoolExecutor(6) as ex:
            answers = list(
                ex.map(lambda i: c.post("/jupyter_sandbox", json={"session_id": f"b{i}", "code": "7 * 6"}), range(6))
            )
            metrics = c.get("/metrics").text
        done.set()
        watcher.join()
    finally:
        svc.stop()
    assert [a.json()["output"]["result"] for a in answers] == ["42"] * 6
    assert 'argus_sandbox_session_starts_total{kind="booted"}' in metrics  # handed over as the refill booted them
    assert max(booting) <= 2  # boots bounded by warm_parallel, not one per waiting request


def test_deepeyesv2_trajectories_at_twice_capacity_all_complete(tmp_path: Path) -> None:
    """Twice `max_sessions` DeepEyesV2-style trajectories at once: none ends on a capacity answer or
    an `error` status (its rollout would end the episode on either)."""
    svc = Service(tmp_path, ARGUS_SANDBOX_MAX_SESSIONS="3", ARGUS_SANDBOX_WARM_POOL="3", ARGUS_SANDBOX_IDLE_TTL_S="2")
    svc.start()
    image = png_b64((96, 64), (0, 128, 255))

    def trajectory(i: int) -> list[dict]:  # type: ignore[type-arg]
        sid = f"traj-{i}"
        cells = [
            define_image_1(image),
            "crop = image_1.crop((0, 0, 48, 32))\nplt.imshow(crop)\nplt.show()",
            "print(crop.size[0] / 0)",
            "print(crop.size[0] / 2)",
        ]
        with httpx.Client(base_url=svc.url, timeout=120) as c:
            answers = []
            for code in cells:
                resp = c.post("/jupyter_sandbox", json={"session_id": sid, "code": code, "timeout": 30})
                answers.append({"http": resp.status_code, **resp.json()})
            # No clear_session: the session idles out, and its slot is reclaimed for a waiting trajectory.
            return answers

    try:
        with ThreadPoolExecutor(6) as ex:
            runs = list(ex.map(trajectory, range(6)))
    finally:
        svc.stop()
    for answers in runs:
        assert [a["http"] for a in answers] == [200] * 4, answers
        assert [a["status"] for a in answers] == ["success"] * 4, answers
        assert len(answers[1]["output"]["images"]) == 1
        assert "ZeroDivisionError" in answers[2]["output"]["stderr"]
        assert answers[3]["output"]["stdout"] == "24.0\n"


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
            assert mem["status"] == "success" and "MemoryError" in mem["output"]["stderr"]
            # No one-shot pool without gVisor (the kernel is not an init process): a session per run.
            run = c.post("/run_code", json={"code": "print(6 * 7)"}).json()
            assert run["status"] == "Success" and run["run_result"]["stdout"] == "42\n"
    finally:
        svc.stop()
    time.sleep(0.5)
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(svc.state_dir) in " ".join(p.info["cmdline"] or [])]


# -- reliability: what the adversarial campaign broke ------------------------------------------------------

SURROGATE = "print('a\\ud800b')"  # prints a lone surrogate, which JSON can carry but UTF-8 cannot encode


@pytest.mark.reliability
def test_a_lone_surrogate_in_output_is_replaced_on_every_protocol(client: httpx.Client) -> None:
    answers = {
        "v1": client.post("/jupyter_sandbox", json={"session_id": "sur-1", "code": SURROGATE}),
        "v2": client.post("/run_jupyter", json={"session_id": "sur-2", "code": SURROGATE}),
        "fusion": client.post("/run_code", json={"code": SURROGATE, "language": "python"}),
    }
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    answers["native"] = client.post(f"/v1/sessions/{sid}/execute", json={"code": SURROGATE})
    for protocol, resp in answers.items():
        assert resp.status_code == 200, (protocol, resp.text)
    assert answers["v1"].json()["output"]["stdout"] == "a\ufffdb\n"
    assert answers["v2"].json()["output"]["stdout"] == "a\ufffdb\n"
    native = answers["native"].json()
    assert native["stdout"] == "a\ufffdb\n" and "U+FFFD" in native["stderr"]  # replaced, and said so
    assert answers["fusion"].json()["run_result"]["status"] == "Finished"


@pytest.mark.reliability
def test_garbage_on_the_protocol_channel_replaces_the_kernel(client: httpx.Client) -> None:
    jupyter(client, "garbler", "kept = 1")
    code = (
        "import os\nfor fd in range(3, 64):\n    try:\n        os.write(fd, b'garbage\\n')\n"
        "    except OSError:\n        pass"
    )
    out = jupyter(client, "garbler", code)
    assert out["status"] == "success" and "protocol channel" in out["output"]["stderr"], out
    after = jupyter(client, "garbler", "try:\n    print(kept)\nexcept NameError:\n    print('fresh kernel')")
    assert after["output"]["stdout"] == "fresh kernel\n"  # replaced: said so, and the session goes on


@pytest.mark.reliability
def test_chunked_oversize_bodies_are_refused_and_errors_keep_the_connection(
    client: httpx.Client, service: Service
) -> None:
    from tests.conftest import chunked, raw_request

    head = (
        "POST /jupyter_sandbox HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    )
    answer = raw_request(service.url, head, chunked((64 << 20) + (1 << 20), size=1 << 20))
    assert answer.startswith(b"HTTP/1.1 413") and b"byte limit" in answer, answer[:300]
    # An error answer leaves its keep-alive connection fit for the next request (another session's).
    with httpx.Client(base_url=service.url, timeout=60) as one:
        bad = one.post("/jupyter_sandbox", json={"session_id": "k", "code": "1", "timeout": 10_000})
        good = one.post("/jupyter_sandbox", json={"session_id": "k2", "code": "print(2)"})
        assert bad.status_code == 422 and good.status_code == 200 and good.json()["output"]["stdout"] == "2\n"


@pytest.mark.reliability
def test_background_processes_are_visible_and_can_be_killed(client: httpx.Client) -> None:
    sid = client.post("/v1/sessions", json={}).json()["session_id"]
    spin = "import subprocess, sys\np = subprocess.Popen([sys.executable, '-c', 'while True: pass'])\np.pid"
    run = client.post(f"/v1/sessions/{sid}/execute", json={"code": spin}).json()
    (proc,) = run["background"]
    assert str(proc["pid"]) == run["result"] and "while True" in proc["cmd"]
    # The session looks idle, but its leftover burns CPU: the native API and /metrics show it.
    assert wait_until(
        lambda: (
            next(s for s in client.get("/v1/sessions").json() if s["session_id"] == sid)["background"][0]["cpu_s"] > 0.2
        ),
        timeout_s=30,
    )
    assert "argus_sandbox_background_processes 1.0" in client.get("/metrics").text
    killed = client.post(f"/v1/sessions/{sid}/execute", json={"code": "1", "background": "kill"}).json()
    assert killed["background"] == [] and "killed 1 background process" in killed["stderr"]
    client.delete(f"/v1/sessions/{sid}")


@pytest.mark.reliability
def test_a_kernel_that_exits_137_is_not_blamed_on_memory(client: httpx.Client) -> None:
    out = jupyter(client, "exits", "import os\nos._exit(137)")
    stderr = out["output"]["stderr"]
    assert "status 137" in stderr and "or it exited with that code" in stderr and "memory" not in stderr, stderr
