"""How a kernel process is started: inside its own gVisor sandbox, or as a limited plain process.

`GVisorRunner` generates an OCI bundle per kernel (read-only root built from read-only bind mounts of
/usr and the kernel's Python, a private tmpfs as working directory, no network, memory / CPU / pids
limits) and starts it with `runsc run`, talking to the kernel over the container's stdin/stdout.
`ProcessRunner` starts the same kernel as a plain subprocess with rlimits, a private scratch dir and
an empty environment, for pods that already run under `runtimeClassName: gvisor` (gVisor does not
nest).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import logging
import os
import resource
import secrets
import shutil
import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from argus.config import SandboxSettings
from argus.supervision import die_with_parent

log = logging.getLogger("argus.sandbox")

# Only this directory is visible inside a sandbox: never the service's own code or settings.
KERNEL_DIR = Path(__file__).with_name("kernel")
KERNEL_PY = KERNEL_DIR / "kernel.py"
# Replies carry base64 images; one line may be large.
STREAM_LIMIT = 256 << 20


class KernelDied(RuntimeError):
    pass


@dataclass(eq=False)  # identity semantics: kernels are kept in sets
class KernelProcess:
    """A started kernel: the process we talk to and how to interrupt and kill it."""

    runner: Runner
    name: str
    proc: asyncio.subprocess.Process
    workdir: Path
    next_id: int = 0
    info: dict[str, Any] = field(default_factory=dict)
    max_rss_mb: float = 0.0  # the kernel's peak memory, as its last reply said

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def send(self, msg: dict[str, Any]) -> int:
        assert self.proc.stdin is not None
        self.next_id += 1
        msg = {**msg, "id": self.next_id}
        try:
            self.proc.stdin.write((json.dumps(msg) + "\n").encode())
            await self.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError) as exc:
            raise KernelDied(self.exit_reason()) from exc
        return self.next_id

    async def receive(self, msg_id: int) -> dict[str, Any]:
        """The reply to `msg_id`; replies to earlier (interrupted) requests are skipped."""
        assert self.proc.stdout is not None
        while True:
            try:
                line = await self.proc.stdout.readline()
            except (ValueError, asyncio.LimitOverrunError) as exc:
                raise KernelDied(f"kernel reply too large: {exc}") from exc
            if not line:
                await self.proc.wait()
                raise KernelDied(self.exit_reason())
            try:
                reply = json.loads(line)
            except ValueError:
                reply = None
            if not isinstance(reply, dict):
                # Code in the sandbox can write to the kernel's channel (its fd 1): a kernel whose channel
                # carries anything but its own replies can no longer be trusted, and is replaced.
                raise KernelDied(f"the kernel's protocol channel carried a line that is not a reply: {line[:80]!r}")
            if reply.get("id") == msg_id:
                return reply

    def exit_reason(self) -> str:
        """What ended the kernel, said only as far as the evidence goes. A negative status is a signal the
        runner saw; runsc reports a signal death as 128 + n, which a process may also exit with, so that
        is said as both; the memory limit is named only when the kernel's peak memory had reached 90 % of
        it before it was killed. (A cell that hits the pids limit does not end the kernel: its fork fails
        with EAGAIN, and the kernel says so in the cell's notes.)"""
        code = self.proc.returncode
        if code is None:
            return "the kernel stopped answering"
        sig = -code if code < 0 else code - 128 if code > 128 else 0
        if not sig:
            return f"the kernel exited with code {code}"
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else f"signal {sig}"
        limit = self.runner.settings.memory_mb
        if sig == signal.SIGKILL and self.max_rss_mb >= 0.9 * limit:
            return (
                f"the kernel was killed by {name} (status {code}) after its memory reached {self.max_rss_mb:.0f} MB "
                f"of the {limit} MB limit: it went over the memory limit (OOM kill)"
            )
        if code < 0:
            return f"the kernel was killed by {name} (status {code})"
        return f"the kernel ended with status {code}: killed by {name}, or it exited with that code"

    async def interrupt(self) -> None:
        await self.runner.interrupt(self)

    async def kill(self) -> None:
        await self.runner.kill(self)


class Runner(abc.ABC):
    kind: str

    def __init__(self, settings: SandboxSettings):
        self.settings = settings
        self.state_dir = settings.state_dir / self.kind
        self._python: dict[str, Any] | None = None

    def kernel_python(self) -> dict[str, Any]:
        """Paths of the kernel's interpreter: executable, base prefix, site-packages, font cache."""
        if self._python is None:
            env_dir = self.settings.kernel_env_path
            python = env_dir / "bin" / "python"
            if not python.exists():
                raise RuntimeError(
                    f"kernel environment {env_dir} (profile {self.settings.profile!r}) has no bin/python "
                    f"(run ARGUS_SANDBOX_PROFILE={self.settings.profile} scripts/setup.sh, "
                    "or set ARGUS_SANDBOX_KERNEL_ENV)"
                )
            probe = (
                "import json, sys, sysconfig; print(json.dumps({'executable': sys.executable, "
                "'base_prefix': sys.base_prefix, 'site': sorted({sysconfig.get_path('purelib'), "
                "sysconfig.get_path('platlib')})}))"
            )
            out = subprocess.run([str(python), "-c", probe], check=True, capture_output=True, text=True).stdout
            info = json.loads(out)
            info["real_executable"] = os.path.realpath(info["executable"])
            cache = env_dir / "mpl-cache"
            info["mpl_cache"] = str(cache) if cache.is_dir() else None
            self._python = info
        return self._python

    def kernel_env(self) -> dict[str, str]:
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            # One thread per BLAS/OpenMP pool: threads count against the pids limit and the CPU quota.
            "OMP_NUM_THREADS": "1",
            "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            # Blocks up to 4 MiB come from the heap, and freed heap is kept: a cell's buffers (the task
            # image inlined as base64, its decoded pixels) then reuse pages the warm-up already touched.
            # A first touch is a page fault, and in gVisor a fault costs tens of microseconds.
            "MALLOC_MMAP_THRESHOLD_": str(4 << 20),
            "MALLOC_TRIM_THRESHOLD_": str(16 << 20),
        }
        cache = self.kernel_python()["mpl_cache"]
        if cache:
            env["ARGUS_MPL_CACHE"] = cache
        return env

    def kernel_argv(self, kernel_path: str) -> list[str]:
        py = self.kernel_python()
        # -S: no site module (the kernel puts its site-packages on sys.path itself), faster start.
        return [py["real_executable"], "-S", "-s", "-B", kernel_path, *py["site"]]

    def new_name(self) -> str:
        return f"argus-{secrets.token_hex(6)}"

    async def start(self) -> KernelProcess:
        """Start a kernel and wait for its ready line (imports done)."""
        kernel = await self._spawn()
        assert kernel.proc.stdout is not None
        try:
            line = await asyncio.wait_for(kernel.proc.stdout.readline(), timeout=120)
        except TimeoutError:
            await self.kill(kernel)
            raise KernelDied("the kernel did not start within 120 s") from None
        except asyncio.CancelledError:
            # Service shutting down mid-start: this kernel is in nobody's books, stop it here.
            await asyncio.shield(self.kill(kernel))
            raise
        if not line:
            await kernel.proc.wait()
            reason = kernel.exit_reason()
            detail = self.start_log(kernel)
            await self.kill(kernel)
            raise KernelDied(f"the kernel failed to start: {reason}\n{detail}")
        kernel.info = json.loads(line)
        return kernel

    def start_log(self, kernel: KernelProcess) -> str:
        path = kernel.workdir / "runner.log"
        try:
            return path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    @abc.abstractmethod
    def prepare(self) -> None:
        """One-time set-up before the first kernel starts."""

    @abc.abstractmethod
    async def _spawn(self) -> KernelProcess: ...

    @abc.abstractmethod
    async def interrupt(self, kernel: KernelProcess) -> None: ...

    @abc.abstractmethod
    async def kill(self, kernel: KernelProcess) -> None: ...

    @abc.abstractmethod
    def cleanup_stale(self) -> int:
        """Remove what a previous (crashed) service left behind; returns how many were found."""


# --------------------------------------------------------------------------------------------------
# gVisor
# --------------------------------------------------------------------------------------------------


class GVisorRunner(Runner):
    kind = "gvisor"

    def __init__(self, settings: SandboxSettings):
        super().__init__(settings)
        self.runsc_root = self.state_dir / "runsc"
        self.rootfs = self.state_dir / "rootfs"
        self.bundles = self.state_dir / "bundles"

    def _runsc(self, *args: str) -> list[str]:
        cmd = [self.settings.runsc, "--root", str(self.runsc_root), "--network=none"]
        if self.settings.runsc_platform:
            cmd.append(f"--platform={self.settings.runsc_platform}")
        return [*cmd, *args]

    def prepare(self) -> None:
        """The shared, empty root: mount points and a minimal /etc (the host's /etc is never mounted)."""
        py = self.kernel_python()
        self.runsc_root.mkdir(parents=True, exist_ok=True)
        self.bundles.mkdir(parents=True, exist_ok=True)
        root = self.rootfs
        for d in ("proc", "dev", "sys", "tmp", "scratch", "usr", "etc", "opt/argus"):
            (root / d).mkdir(parents=True, exist_ok=True)
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / name
            target = root / name
            if host.is_symlink():  # merged /usr: keep the same symlinks
                if not target.is_symlink():
                    target.symlink_to(os.readlink(host))
            elif host.is_dir():
                target.mkdir(exist_ok=True)
        for mount in self._python_mounts(py):
            (root / mount.lstrip("/")).mkdir(parents=True, exist_ok=True)
        (root / "opt/argus/kernel").mkdir(exist_ok=True)
        (root / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/scratch:/bin/sh\n")
        (root / "etc/group").write_text("root:x:0:\nnogroup:x:65534:\n")
        (root / "etc/hosts").write_text("127.0.0.1 localhost sandbox\n")

    @staticmethod
    def _python_mounts(py: dict[str, Any]) -> list[str]:
        """Host directories the kernel's Python needs, mounted read-only at the same path."""
        paths = [py["base_prefix"], *py["site"]]
        if py["mpl_cache"]:
            paths.append(py["mpl_cache"])
        out: list[str] = []
        for p in sorted(set(paths)):
            if p.startswith("/usr/") or p == "/usr" or any(p.startswith(o + "/") for o in out):
                continue
            out.append(p)
        return out

    def bundle_config(self) -> dict[str, Any]:
        s = self.settings
        py = self.kernel_python()
        ro = ["rbind", "ro", "nosuid", "nodev"]
        mounts: list[dict[str, Any]] = [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=1m"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {
                "destination": "/tmp",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", f"size={s.scratch_mb}m"],
            },
            {
                "destination": "/scratch",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "nodev", "mode=1777", f"size={s.scratch_mb}m"],
            },
            {"destination": "/usr", "type": "bind", "source": "/usr", "options": ro},
            {"destination": "/opt/argus/kernel", "type": "bind", "source": str(KERNEL_DIR), "options": ro},
        ]
        for name in ("bin", "lib", "lib64", "sbin"):
            host = Path("/") / name
            if host.is_dir() and not host.is_symlink():
                mounts.append({"destination": f"/{name}", "type": "bind", "source": str(host), "options": ro})
        for path in self._python_mounts(py):
            mounts.append({"destination": path, "type": "bind", "source": path, "options": ro})
        env = {**self.kernel_env(), "HOME": "/scratch", "TMPDIR": "/tmp"}
        return {
            "ociVersion": "1.0.0",
            "process": {
                "terminal": False,
                "user": {"uid": 65534, "gid": 65534},
                "args": self.kernel_argv("/opt/argus/kernel/kernel.py"),
                "env": [f"{k}={v}" for k, v in env.items()],
                "cwd": "/scratch",
                "rlimits": [
                    {"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024},
                    {"type": "RLIMIT_CORE", "hard": 0, "soft": 0},
                ],
                "noNewPrivileges": True,
            },
            "root": {"path": str(self.rootfs), "readonly": True},
            "hostname": "sandbox",
            "mounts": mounts,
            "linux": {
                "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
                "resources": {
                    "memory": {"limit": s.memory_mb << 20, "swap": s.memory_mb << 20},
                    "cpu": {"quota": int(s.cpus * 100_000), "period": 100_000},
                    "pids": {"limit": s.pids},
                },
            },
        }

    async def _spawn(self) -> KernelProcess:
        name = self.new_name()
        bundle = self.bundles / name
        bundle.mkdir(parents=True)
        (bundle / "config.json").write_text(json.dumps(self.bundle_config()))
        # setpriv sets the parent-death signal, then execs runsc: with no preexec_fn Python can spawn
        # with vfork instead of copying the whole service process on every sandbox start.
        with open(bundle / "runner.log", "wb") as errlog:
            proc = await asyncio.create_subprocess_exec(
                "setpriv",
                "--pdeathsig",
                "KILL",
                "--",
                *self._runsc("run", "--bundle", str(bundle), name),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=errlog,
                limit=STREAM_LIMIT,
            )
        return KernelProcess(runner=self, name=name, proc=proc, workdir=bundle)

    async def _runsc_quiet(self, *args: str) -> int:
        proc = await asyncio.create_subprocess_exec(
            *self._runsc(*args), stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
        )
        return await proc.wait()

    async def interrupt(self, kernel: KernelProcess) -> None:
        await self._runsc_quiet("kill", kernel.name, "INT")

    async def kill(self, kernel: KernelProcess) -> None:
        if kernel.alive:
            await self._runsc_quiet("kill", kernel.name, "KILL")
            try:
                await asyncio.wait_for(kernel.proc.wait(), timeout=5)
            except TimeoutError:
                kernel.proc.kill()
                await kernel.proc.wait()
        await self._runsc_quiet("delete", "--force", kernel.name)
        shutil.rmtree(kernel.workdir, ignore_errors=True)

    def cleanup_stale(self) -> int:
        found = 0
        if self.runsc_root.is_dir():
            listing = subprocess.run(self._runsc("list", "--quiet"), capture_output=True, text=True)
            for name in listing.stdout.split():
                found += 1
                subprocess.run(self._runsc("delete", "--force", name), capture_output=True)
        # runsc processes of an earlier service that still point at our state directory.
        mark = f"--root={self.runsc_root}"
        mark2 = str(self.runsc_root)
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmd = (pid_dir / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if "runsc" in cmd and (mark in cmd or f"--root {mark2} " in cmd):
                found += 1
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)
        if self.bundles.is_dir():
            shutil.rmtree(self.bundles, ignore_errors=True)
        self.bundles.mkdir(parents=True, exist_ok=True)
        return found


# --------------------------------------------------------------------------------------------------
# Plain process (inside a pod that already runs under gVisor)
# --------------------------------------------------------------------------------------------------


class ProcessRunner(Runner):
    kind = "process"

    def prepare(self) -> None:
        self.kernel_python()
        self.state_dir.mkdir(parents=True, exist_ok=True)

    def _limits(self) -> None:
        die_with_parent()  # in the child before exec: no sandbox outlives the service
        mem = self.settings.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
        scratch = self.settings.scratch_mb << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (scratch, scratch))
        # Per-user, and not enforced for root: the pod's own pids limit is the real bound there.
        resource.setrlimit(resource.RLIMIT_NPROC, (self.settings.pids, self.settings.pids))

    async def _spawn(self) -> KernelProcess:
        name = self.new_name()
        workdir = self.state_dir / name
        scratch = workdir / "scratch"
        tmp = workdir / "tmp"
        scratch.mkdir(parents=True)
        tmp.mkdir()
        env = {**self.kernel_env(), "HOME": str(scratch), "TMPDIR": str(tmp)}
        with open(workdir / "runner.log", "wb") as errlog:
            proc = await asyncio.create_subprocess_exec(
                *self.kernel_argv(str(KERNEL_PY)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=errlog,
                cwd=scratch,
                env=env,
                limit=STREAM_LIMIT,
                start_new_session=True,
                preexec_fn=self._limits,
            )
        return KernelProcess(runner=self, name=name, proc=proc, workdir=workdir)

    async def interrupt(self, kernel: KernelProcess) -> None:
        if kernel.alive:
            os.kill(kernel.proc.pid, signal.SIGINT)

    async def kill(self, kernel: KernelProcess) -> None:
        if kernel.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(kernel.proc.pid, signal.SIGKILL)
            await kernel.proc.wait()
        shutil.rmtree(kernel.workdir, ignore_errors=True)

    def cleanup_stale(self) -> int:
        found = 0
        if self.state_dir.is_dir():
            for d in self.state_dir.iterdir():
                found += 1
                shutil.rmtree(d, ignore_errors=True)
        return found


def make_runner(settings: SandboxSettings) -> Runner:
    runner: Runner = GVisorRunner(settings) if settings.runner == "gvisor" else ProcessRunner(settings)
    return runner
