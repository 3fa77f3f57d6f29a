"""The code-executor kernel: one long-lived Python process per session, run inside the sandbox.

It must run with nothing but the standard library plus numpy, PIL and matplotlib (it never imports
Argus). The service talks to it over its original stdin/stdout, one JSON object per line:

    -> {"id": 1, "code": "...", "max_output": 65536, "max_images": 10, "max_image_bytes": 4194304}
    <- {"id": 1, "status": "ok"|"error", "stdout": "...", "stderr": "...", "traceback": "...",
        "result": "..."|null, "result_is_image": false, "images": ["<base64 png>", ...],
        "notes": [...], "error": {"ename", "evalue"}|null, "execution_count": 1, "duration": 0.001}

Globals persist between requests (like a Jupyter kernel), and every session starts with `plt`
(matplotlib.pyplot) defined, as the reference sandbox's kernels do. The last expression's value is
returned as `result` (its repr; PIL images and figures are shown as images instead). Figures shown
with `plt.show()` and PIL images or figures passed to `display(...)` come back as PNG, laid out with
`tight_layout` first. An exception's traceback is formatted the way IPython prints it (`Cell In[n],
line k` / `----> k code`) and kept apart from what the cell wrote to stderr, because the v1 protocol
returns the traceback alone. File descriptors 1 and 2 are redirected to a file so that output of
child processes and `os.write(1, ...)` is captured too and can never corrupt the protocol stream.
SIGINT interrupts a running cell (the service's timeout).

`{"op": "oneshot", ...}` runs a SandboxFusion request in a forked child instead (see `OneShot`):
nothing it leaves behind survives it, so a pre-booted sandbox serves many one-shot runs.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import gc
import importlib
import io
import json
import linecache
import os
import shutil
import signal
import stat
import sys
import time
import traceback
import types
import warnings
from typing import Any

KERNEL_FILE = os.path.abspath(__file__)
# Imported ahead of time by warm kernels unless the service says otherwise (its `preload` setting).
SESSION_PRELOAD = ["numpy", "PIL.Image"]
HEAP_PRETOUCH_MB = 3
# IPython's layout: a 75-column rule, the exception name padded to 42 columns, line numbers in 7.
RULE = "-" * 75
NUMBER_WIDTH = 7
CONTEXT = 2  # source lines shown before and after the failing one


def cell_name(count: int) -> str:
    return f"<cell-{count}>"


def cell_count(filename: str) -> int | None:
    if filename.startswith("<cell-") and filename.endswith(">"):
        digits = filename[6:-1]
        return int(digits) if digits.isdigit() else None
    return None


def _location(filename: str) -> str:
    count = cell_count(filename)
    return f"Cell In[{count}]" if count is not None else f"File {filename}"


def _numbered(filename: str, lineno: int, context: int = CONTEXT) -> str:
    lines = []
    for i in range(max(1, lineno - context), lineno + context + 1):
        text = linecache.getline(filename, i)
        if not text:
            if i > lineno:
                break
            continue
        number = ("-" * (NUMBER_WIDTH - len(str(i)) - 2) + "> " + str(i)) if i == lineno else str(i).rjust(NUMBER_WIDTH)
        lines.append(f"{number} {text.rstrip()}")
    return "\n".join(lines)


def ipython_traceback(exc: BaseException, *, skip_file: str = KERNEL_FILE) -> str:
    """`exc` as IPython prints it (no colours), without frames of `skip_file` (the kernel itself).

    DeepEyesV2 was trained on observations from a Jupyter kernel, so a model reads and repairs this
    layout: a rule, `Name<pad>Traceback (most recent call last)`, one block per frame
    (`Cell In[3], line 2, in f(x)` and numbered source lines with `---->` at the failing one), then
    `Name: message`. Chained exceptions are printed first, as Python and IPython do.
    """
    parts: list[str] = []
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None and cause is not exc:
        parts.append(ipython_traceback(cause, skip_file=skip_file))
        parts.append(
            "\nThe above exception was the direct cause of the following exception:\n\n"
            if exc.__cause__ is not None
            else "\nDuring handling of the above exception, another exception occurred:\n\n"
        )
    name = type(exc).__name__
    message = "".join(traceback.format_exception_only(type(exc), exc)).rstrip("\n")
    if isinstance(exc, SyntaxError):
        where = f"  {_location(exc.filename or '<unknown>')}, line {exc.lineno}"
        body = [where]
        if exc.text:
            text = exc.text.rstrip("\n")
            stripped = text.lstrip()
            body.append(f"    {stripped}")
            if exc.offset:
                body.append("    " + " " * max(0, exc.offset - 1 - (len(text) - len(stripped))) + "^")
        body.append(f"{name}: {exc.msg}")
        parts.append("\n".join(body) + "\n")
        return "".join(parts)
    frames = [(f, lineno) for f, lineno in traceback.walk_tb(exc.__traceback__) if f.f_code.co_filename != skip_file]
    blocks = []
    for frame, lineno in frames:
        code = frame.f_code
        head = f"{_location(code.co_filename)}, line {lineno}"
        if code.co_name != "<module>":
            args = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
            head += f", in {code.co_name}({', '.join(args)})"
        source = _numbered(code.co_filename, lineno)
        blocks.append(head + ("\n" + source if source else ""))
    header = f"{RULE}\n{name.ljust(42)}Traceback (most recent call last)"
    parts.append("\n".join([header, *blocks]) + f"\n\n{message}\n")
    return "".join(parts)


class LazyModule(types.ModuleType):
    """A module name bound before its import: the first attribute access imports it.

    Sessions start with `plt` defined, as in the reference sandbox, without a cold sandbox paying
    matplotlib's import before its first cell; warm sandboxes bind the real module instead.
    """

    def __init__(self, alias: str, target: str, namespace: dict[str, Any]):
        super().__init__(target)
        self.__dict__["_argus_lazy"] = (alias, target, namespace)

    def __getattr__(self, attr: str) -> Any:
        alias, target, namespace = self.__dict__["_argus_lazy"]
        module = importlib.import_module(target)
        if namespace.get(alias) is self:
            namespace[alias] = module
        return getattr(module, attr)

    def __repr__(self) -> str:
        return repr(importlib.import_module(self.__dict__["_argus_lazy"][1]))


class _Done(Exception):
    """Ends a bash run inside the shared try block."""


class _Expired(Exception):
    """A one-shot run's time limit."""


class CappedWriter(io.TextIOBase):
    """A text stream that keeps the first `cap` characters and counts the rest."""

    def __init__(self, cap: int):
        self.cap = cap
        self.parts: list[str] = []
        self.kept = 0
        self.dropped = 0

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        room = self.cap - self.kept
        if room > 0:
            self.parts.append(s[:room])
            self.kept += min(len(s), room)
        self.dropped += max(0, len(s) - max(room, 0))
        return len(s)

    def getvalue(self) -> str:
        text = "".join(self.parts)
        if self.dropped:
            text += f"\n[... output truncated: {self.dropped} more characters not shown ...]\n"
        return text


class Kernel:
    def __init__(self, proto_in: Any, proto_out: Any, capture_paths: dict[int, str]):
        self.proto_in = proto_in
        self.proto_out = proto_out
        self.capture_paths = capture_paths
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.namespace["plt"] = LazyModule("plt", "matplotlib.pyplot", self.namespace)
        self.images: list[bytes] = []
        self.dropped_images: list[str] = []
        self.limit_notes: list[str] = []  # which limit refused the cell something, said in its notes
        self.limits = {"max_images": 10, "max_image_bytes": 4 << 20}
        self.execution_count = 0
        self.sources: dict[str, str] = {}
        self.executing = False
        self.pid = os.getpid()

    # -- rich output -------------------------------------------------------------------------------

    def _add_png(self, data: bytes) -> None:
        if len(self.images) >= self.limits["max_images"]:
            self.dropped_images.append(f"image dropped: more than {self.limits['max_images']} images")
        elif len(data) > self.limits["max_image_bytes"]:
            self.dropped_images.append(
                f"image dropped: {len(data)} bytes is over the {self.limits['max_image_bytes']}-byte limit"
            )
        else:
            self.images.append(data)

    def _figure_png(self, fig: Any) -> bytes:
        # What Jupyter's inline backend and the reference sandbox do: lay out, then crop to content.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.suppress(Exception):  # a layout that cannot be tightened is saved as it is
                fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        return buf.getvalue()

    def display(self, *objs: Any) -> None:
        for obj in objs:
            png = self._to_png(obj)
            if png is not None:
                self._add_png(png)
            else:
                print(repr(obj))

    def _to_png(self, obj: Any) -> bytes | None:
        module = type(obj).__module__ or ""
        if module.startswith("PIL.") and hasattr(obj, "save"):
            buf = io.BytesIO()
            image = obj if obj.mode in ("RGB", "RGBA", "L", "LA", "P", "1", "I", "I;16") else obj.convert("RGB")
            image.save(buf, format="PNG")
            return buf.getvalue()
        if module.startswith("matplotlib.") and hasattr(obj, "savefig"):
            return self._figure_png(obj)
        repr_png = getattr(obj, "_repr_png_", None)
        if callable(repr_png) and not isinstance(obj, type):
            data = repr_png()
            if isinstance(data, bytes):
                return data
        return None

    def _show(self, *_args: Any, **_kwargs: Any) -> None:
        import matplotlib.pyplot as plt

        for num in plt.get_fignums():
            self._add_png(self._figure_png(plt.figure(num)))
        plt.close("all")

    # -- set-up ------------------------------------------------------------------------------------

    def install_hooks(self) -> None:
        """Cheap set-up done at start: `display`, the inline matplotlib backend, the font cache.

        Nothing heavy is imported here so a cold kernel is ready fast; `warm_up` imports the
        libraries ahead of time for kernels that wait in the service's warm pool.
        """
        import builtins

        builtins.display = self.display  # type: ignore[attr-defined]
        mpl_dir = os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "mpl"))
        os.makedirs(mpl_dir, exist_ok=True)
        mpl_cache = os.environ.get("ARGUS_MPL_CACHE")
        if mpl_cache and os.path.isdir(mpl_cache):
            # A prebuilt font cache: without it matplotlib scans fonts on every sandbox start (seconds).
            for name in os.listdir(mpl_cache):
                shutil.copy(os.path.join(mpl_cache, name), mpl_dir)

        # plt.show() goes through argus_inline_backend (next to this file) to _show.
        builtins.__argus_show__ = self._show  # type: ignore[attr-defined]
        os.environ["MPLBACKEND"] = "module://argus_inline_backend"
        warnings.showwarning = self._show_warning

    def _show_warning(
        self, message: Any, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
    ) -> None:
        """Warnings name the cell as IPython does, and never the kernel's own file."""
        where = "" if filename == KERNEL_FILE else f"{_location(filename)}, line {lineno}: "
        (file or sys.stderr).write(f"{where}{category.__name__}: {message}\n")

    def warm_up(self, modules: list[str]) -> dict[str, Any]:
        """Import `modules` ahead of time (the cheap, common ones; heavy libraries stay lazy)."""
        started = time.perf_counter()
        missing = []
        for module in modules:
            try:
                importlib.import_module(module)
            except ImportError:
                missing.append(module)
        if "matplotlib.pyplot" in modules and "matplotlib.pyplot" not in missing:
            import matplotlib.pyplot as plt

            self.namespace["plt"] = plt
            # The first figure loads fonts and renderer state; pay for it before a session needs it.
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [0, 1])
            ax.set_title("warm-up")
            fig.savefig(io.BytesIO(), format="png")
            plt.close(fig)
        # Touch a few MiB of heap and free it (the runner's malloc settings keep it): the first big cell
        # of a session, the task image as base64, then finds its pages resident instead of faulting.
        touched = b"\x01" * (HEAP_PRETOUCH_MB << 20)
        del touched
        # Objects that exist now are never collected: the GC then leaves their pages alone, so a forked
        # one-shot child shares them instead of copying each page it scans (a page fault in gVisor).
        gc.freeze()
        return {"warm": True, "missing": missing, "duration": time.perf_counter() - started}

    # -- execution ---------------------------------------------------------------------------------

    def _drain_fd_capture(self, fd: int, out: CappedWriter) -> None:
        """Move what was written to fd 1 or 2 directly (child processes, os.write) into `out`."""
        with open(self.capture_paths[fd], "rb+") as fh:
            data = fh.read(max(out.cap - out.kept, 0) + 1)
            rest = os.fstat(fh.fileno()).st_size - len(data)
            fh.truncate(0)
        os.lseek(fd, 0, os.SEEK_SET)
        if data:
            out.write(data.decode("utf-8", errors="replace"))
        if rest > 0:
            out.dropped += rest

    def _prepare_oneshot(self, req: dict[str, Any]) -> None:
        """SandboxFusion-style runs: files in, stdin, and an address-space limit for this kernel alone."""
        for path, b64 in (req.get("files") or {}).items():
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            with open(path, "wb") as fh:
                fh.write(base64.b64decode(b64))
        if req.get("memory_limit_mb"):
            import resource

            limit = int(req["memory_limit_mb"]) << 20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sys.stdin = io.StringIO(req.get("stdin") or "")

    @staticmethod
    def _fetch(paths: list[str], base: str = "") -> dict[str, str]:
        """Files the client asked back, keyed as it named them (relative ones under `base`)."""
        files = {}
        for path in paths:
            try:
                with open(os.path.join(base, path), "rb") as fh:
                    files[path] = base64.b64encode(fh.read()).decode()
            except OSError:
                continue
        return files

    def execute(self, req: dict[str, Any]) -> dict[str, Any]:
        mode = req.get("mode", "cell")
        cap = int(req.get("max_output", 65536))
        self.limits["max_images"] = int(req.get("max_images", 10))
        self.limits["max_image_bytes"] = int(req.get("max_image_bytes", 4 << 20))
        self.images, self.dropped_images = [], []
        out, err = CappedWriter(cap), CappedWriter(cap)
        tb_text = ""
        result: str | None = None
        result_is_image = False
        error: dict[str, str] | None = None
        return_code = 0
        started = time.perf_counter()
        old_out, old_err, old_in = sys.stdout, sys.stderr, sys.stdin
        sys.stdout, sys.stderr = out, err
        self.executing = True
        if mode == "cell":
            self.execution_count += 1
        filename = cell_name(self.execution_count) if mode == "cell" else "main.py"
        try:
            if mode != "cell":
                self._prepare_oneshot(req)
            if mode == "bash":
                import subprocess

                proc = subprocess.run(
                    ["bash", "-c", req["code"]],
                    input=sys.stdin.read(),
                    capture_output=True,
                    text=True,
                    errors="replace",
                )
                out.write(proc.stdout)
                err.write(proc.stderr)
                return_code = proc.returncode
                if return_code:
                    error = {"ename": "NonZeroExit", "evalue": f"exit code {return_code}"}
                raise _Done
            code = req["code"]
            # Kept so that tracebacks show it, in this and in later cells (split into lines only then).
            self.sources[filename] = code
            tree = ast.parse(code, filename, "exec")
            last = None
            if mode == "cell" and tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, filename, "exec"), self.namespace)
            if last is not None:
                value = eval(compile(last, filename, "eval"), self.namespace)
                if value is not None:
                    self.namespace["_"] = value
                    png = self._to_png(value)
                    if png is not None:
                        self._add_png(png)
                        result_is_image = True
                    result = repr(value)
        except _Done:
            pass
        except KeyboardInterrupt as exc:
            error = {"ename": "KeyboardInterrupt", "evalue": "execution interrupted"}
            self._register_sources()
            tb_text = ipython_traceback(exc) if mode == "cell" else "KeyboardInterrupt: execution interrupted\n"
            return_code = 130
        except SystemExit as exc:
            return_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if mode == "script" and exc.code is not None and not isinstance(exc.code, int):
                err.write(f"{exc.code}\n")
            if mode == "cell" or return_code:
                error = {"ename": "SystemExit", "evalue": str(exc.code)}
                if mode == "cell":
                    self._register_sources()
                    tb_text = ipython_traceback(exc)
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            error = {"ename": type(exc).__name__, "evalue": str(exc)}
            if isinstance(exc, BlockingIOError):  # fork/clone refused with EAGAIN: the sandbox's pids limit
                self.limit_notes.append("a new process was refused (EAGAIN): the sandbox's process limit is reached")
            self._register_sources()
            tb_text = ipython_traceback(exc) if mode == "cell" else self._script_traceback(exc)
            return_code = 1
        finally:
            if os.getpid() != self.pid:
                # A process the cell forked got here: only the kernel itself may answer on the channel.
                os._exit(0)
            self.executing = False
            sys.stdout, sys.stderr, sys.stdin = old_out, old_err, old_in
            sys.stdout.flush()
            sys.stderr.flush()
        self._drain_fd_capture(1, out)
        self._drain_fd_capture(2, err)
        if mode != "cell":
            # SandboxFusion has one stderr: the traceback is part of it, as a script's would be.
            err.write(tb_text)
            tb_text = ""
        notes = [*self.dropped_images, *self.limit_notes]
        self.limit_notes = []
        background = self.background()
        if background and req.get("background") == "kill":
            for leftover in background:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(leftover["pid"], signal.SIGKILL)
            self._reap()
            notes.append(f"killed {len(background)} background process(es) the cell left running")
            background = []
        return {
            "id": req.get("id"),
            "status": "error" if error else "ok",
            "background": background,
            "max_rss_mb": self.max_rss_mb(),
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "traceback": tb_text[:cap],
            "result": result,
            "result_is_image": result_is_image,
            "images": [base64.b64encode(png).decode() for png in self.images],
            "notes": notes,
            "error": error,
            "execution_count": self.execution_count,
            "return_code": return_code,
            "files": self._fetch(req.get("fetch_files") or []) if mode != "cell" else {},
            "duration": time.perf_counter() - started,
        }

    def _register_sources(self) -> None:
        for name, code in self.sources.items():
            if name not in linecache.cache:
                linecache.cache[name] = (len(code), None, code.splitlines(keepends=True), name)

    @staticmethod
    def _script_traceback(exc: BaseException) -> str:
        """What `python main.py` prints: Python's own format, without the kernel's frames."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename == KERNEL_FILE:
            tb = tb.tb_next
        if isinstance(exc, SyntaxError):
            tb = None
        return "".join(traceback.format_exception(type(exc), exc, tb))

    # -- one-shot runs (SandboxFusion) ----------------------------------------------------------

    def oneshot(self, req: dict[str, Any]) -> dict[str, Any]:
        """Run one request in a forked child, then leave the sandbox as it was before it.

        The kernel is the sandbox's init process (pid 1), so after the child ends `kill(-1)`
        reaches every process the request started, daemonised ones included, and the kernel reaps
        them all. Then the only writable places (`/tmp`, `/scratch`) are emptied. A later request
        sees no file and no process of an earlier one, and the pre-imported interpreter is reused
        instead of a sandbox booted per request.
        """
        if os.getpid() != 1:
            raise RuntimeError("one-shot runs need the kernel to be the sandbox's init process")
        try:
            return self._fork_run(req)
        finally:
            # Also when the request failed half-way (bad file content): the next run starts clean.
            self._kill_all()
            self._wipe()

    def _fork_run(self, req: dict[str, Any]) -> dict[str, Any]:
        started = time.perf_counter()
        cap = int(req.get("max_output", 65536))
        timeout = float(req.get("timeout", 10.0))
        run_dir = "/scratch/run"
        os.makedirs(run_dir, exist_ok=True)
        paths = {name: os.path.join("/tmp", f".oneshot-{name}") for name in ("stdin", "stdout", "stderr")}
        with open(paths["stdin"], "w", encoding="utf-8") as fh:
            fh.write(req.get("stdin") or "")
        for path, b64 in (req.get("files") or {}).items():
            target = os.path.join(run_dir, path)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(base64.b64decode(b64))
        fds = {
            0: os.open(paths["stdin"], os.O_RDONLY),
            1: os.open(paths["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
            2: os.open(paths["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
        }
        pid = os.fork()
        if pid == 0:  # the child: never returns
            self._oneshot_child(req, run_dir, fds)
        for fd in fds.values():
            os.close(fd)
        status, timed_out = self._wait_child(pid, timeout)
        self._kill_all()
        return_code: int | None = None
        if not timed_out:
            return_code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return {
            "id": req.get("id"),
            "status": "timeout" if timed_out else ("ok" if return_code == 0 else "error"),
            "stdout": self._read_capped(paths["stdout"], cap),
            "stderr": self._read_capped(paths["stderr"], cap),
            "return_code": return_code,
            "files": self._fetch(req.get("fetch_files") or [], run_dir),
            "duration": time.perf_counter() - started,
        }

    def _oneshot_child(self, req: dict[str, Any], run_dir: str, fds: dict[int, int]) -> None:
        code = 1
        try:
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
            for target, fd in fds.items():
                os.dup2(fd, target)
                os.close(fd)
            for stream in (self.proto_in, self.proto_out):
                stream.close()
            os.chdir(run_dir)
            if req.get("memory_limit_mb"):
                import resource

                limit = int(req["memory_limit_mb"]) << 20
                resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            if req.get("mode") == "bash":
                os.execv("/bin/bash", ["bash", "-c", req["code"]])
            # sys.stdout/stderr already write to fds 1 and 2, now the run's files. Replacing them would
            # free the kernel's wrappers, which own fds 1 and 2 and would close them.
            sys.stdin = open(0, encoding="utf-8", errors="replace", closefd=False)  # noqa: SIM115
            sys.argv = ["main.py"]
            source = req["code"]
            linecache.cache["main.py"] = (len(source), None, source.splitlines(keepends=True), "main.py")
            namespace: dict[str, Any] = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
            try:
                exec(compile(source, "main.py", "exec"), namespace)
                code = 0
            except SystemExit as exc:
                if exc.code is None or isinstance(exc.code, int):
                    code = exc.code or 0
                else:
                    sys.stderr.write(f"{exc.code}\n")
                    code = 1
            except BaseException as exc:  # noqa: BLE001 - user code may raise anything
                sys.stderr.write(self._script_traceback(exc))
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)

    @staticmethod
    def _wait_child(pid: int, timeout: float) -> tuple[int, bool]:
        """Block in waitpid until the child ends or a real-time timer fires (no polling: sleeps in
        gVisor last milliseconds, longer than a trivial run)."""

        signal.setitimer(signal.ITIMER_REAL, timeout)  # SIGALRM raises _Expired (see serve)
        try:
            return os.waitpid(pid, 0)[1], False
        except _Expired:
            return 0, True
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)

    def background(self) -> list[dict[str, Any]]:
        """Processes the kernel's cells started that are still running: pid, command and CPU seconds used,
        read from /proc (every descendant of the kernel; in gVisor the kernel is init, so orphans are
        its children too)."""
        ticks = os.sysconf("SC_CLK_TCK")
        stats: dict[int, tuple[int, float]] = {}  # pid -> (ppid, cpu seconds)
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == self.pid:
                continue
            try:
                with open(f"/proc/{name}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if fields[0] != "Z":
                stats[int(name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / ticks)
        out = []
        for pid in sorted(stats):
            seen, at = set(), pid
            while at in stats and at not in seen:
                seen.add(at)
                at = stats[at][0]
            if at != self.pid:
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as fh:
                    cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            out.append({"pid": pid, "cmd": cmd[:200], "cpu_s": round(stats[pid][1], 2)})
        return out

    @staticmethod
    def max_rss_mb() -> float:
        """The kernel's peak resident memory: the evidence an exit report cites before it blames the limit."""
        import resource

        return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)

    @staticmethod
    def _reap() -> None:
        with contextlib.suppress(ChildProcessError):
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass

    @staticmethod
    def _kill_all() -> None:
        """Stop and reap every other process in the sandbox (we are init: `kill(-1)` spares only us)."""
        while True:
            with contextlib.suppress(ProcessLookupError):
                os.kill(-1, signal.SIGKILL)
            try:
                while os.waitpid(-1, 0)[0]:
                    pass
            except ChildProcessError:
                return

    def _wipe(self) -> None:
        """Empty /tmp and /scratch, and never reach into a mount below them.

        The kernel's own read-only mounts can sit below /tmp (a checkout under /tmp puts its
        virtualenv there, mounted at the same path): their mount points stay, nothing under them
        is touched or walked.
        """
        keep = set(self.capture_paths.values())
        for top in ("/tmp", "/scratch"):
            self._wipe_dir(top, os.lstat(top).st_dev, keep)

    def _wipe_dir(self, path: str, device: int, keep: set[str]) -> None:
        try:
            names = os.listdir(path)
        except OSError:
            return
        for name in names:
            entry = os.path.join(path, name)
            if entry in keep:
                continue
            try:
                st = os.lstat(entry)
            except OSError:
                continue
            if st.st_dev != device:  # a mount point: not ours to empty
                continue
            if stat.S_ISDIR(st.st_mode):
                self._wipe_dir(entry, device, keep)
                with contextlib.suppress(OSError):  # still holds a mount point
                    os.rmdir(entry)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry)

    @staticmethod
    def _read_capped(path: str, cap: int) -> str:
        try:
            with open(path, "rb") as fh:
                data = fh.read(cap + 1)
                size = os.fstat(fh.fileno()).st_size
        except OSError:
            return ""
        text = data[:cap].decode("utf-8", errors="replace")
        if size > cap:
            text += f"\n[... output truncated: {size - cap} more bytes not shown ...]\n"
        return text

    # -- loop --------------------------------------------------------------------------------------

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        # An interrupt that arrives after the cell finished must not kill the idle kernel.
        if self.executing:
            raise KeyboardInterrupt

    def _send(self, msg: dict[str, Any]) -> None:
        self.proto_out.write(json.dumps(msg) + "\n")
        self.proto_out.flush()

    @staticmethod
    def _on_sigalrm(_signum: int, _frame: Any) -> None:
        raise _Expired

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
        signal.signal(signal.SIGALRM, self._on_sigalrm)
        self._send({"ready": True, "pid": os.getpid()})
        for line in self.proto_in:
            if not line.strip():
                continue
            try:
                req = json.loads(line)
            except ValueError:
                self._send({"id": None, "status": "error", "error": {"ename": "ProtocolError", "evalue": "bad json"}})
                continue
            if req.get("op") == "ping":
                self._send({"id": req.get("id"), "pong": True})
                continue
            if req.get("op") == "stats":  # asked while idle: what the session's background processes use
                self._reap()
                self._send({"id": req.get("id"), "background": self.background()})
                continue
            if req.get("op") == "warm":
                self._send({"id": req.get("id"), **self.warm_up(req.get("modules", SESSION_PRELOAD))})
                continue
            try:
                reply = self.oneshot(req) if req.get("op") == "oneshot" else self.execute(req)
            except Exception as exc:  # noqa: BLE001 - e.g. bad base64 in files: answer, keep serving
                reply = {
                    "id": req.get("id"),
                    "status": "error",
                    "stdout": "",
                    "stderr": f"{exc}\n",
                    "result": None,
                    "images": [],
                    "error": {"ename": "KernelError", "evalue": str(exc)},
                    "return_code": 1,
                    "files": {},
                    "duration": 0.0,
                }
            self._send(reply)


def main() -> None:
    # Started with -S for a faster start; keep what the site module gives interactive users.
    import site

    site.setquit()
    site.setcopyright()
    site.sethelper()
    for path in sys.argv[1:]:
        sys.path.insert(0, path)
    # Keep private copies of the protocol channel, then point fds 0-2 away from it.
    proto_in = os.fdopen(os.dup(0), "r", encoding="utf-8")
    proto_out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    tmp = os.environ.get("TMPDIR", "/tmp")
    capture_paths = {fd: os.path.join(tmp, f".kernel-fd{fd}") for fd in (1, 2)}
    for fd, path in capture_paths.items():
        capture_fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.dup2(capture_fd, fd)
        os.close(capture_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    sys.stdin = open(os.devnull)  # noqa: SIM115
    sys.stdout = io.TextIOWrapper(os.fdopen(1, "wb", buffering=0), write_through=True)
    sys.stderr = io.TextIOWrapper(os.fdopen(2, "wb", buffering=0), write_through=True)
    kernel = Kernel(proto_in, proto_out, capture_paths)
    kernel.install_hooks()
    kernel.serve()


if __name__ == "__main__":
    main()
