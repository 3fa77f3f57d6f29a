"""The code-executor kernel: one long-lived Python process per session, run inside the sandbox.

It must run with nothing but the standard library plus numpy, PIL and matplotlib (it never imports
Argus). The service talks to it over its original stdin/stdout, one JSON object per line:

    -> {"id": 1, "code": "...", "max_output": 65536, "max_images": 8, "max_image_bytes": 4194304}
    <- {"id": 1, "status": "ok"|"error", "stdout": "...", "stderr": "...", "result": "..."|null,
        "images": ["<base64 png>", ...], "error": {"ename", "evalue"}|null, "duration": 0.001}

Globals persist between requests (like a Jupyter kernel). The last expression's value is returned as
`result` (its repr; PIL images and figures are also shown as images). Figures shown with `plt.show()`
and PIL images or figures passed to `display(...)` come back as PNG. File descriptors 1 and 2 are
redirected to a file so that output of child processes and `os.write(1, ...)` is captured too and
can never corrupt the protocol stream. SIGINT interrupts a running cell (the service's timeout).
"""

from __future__ import annotations

import ast
import base64
import io
import json
import os
import shutil
import signal
import sys
import time
import traceback
from typing import Any

CELL = "<cell>"


class _Done(Exception):
    """Ends a bash run inside the shared try block."""


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
        self.images: list[bytes] = []
        self.dropped_images: list[str] = []
        self.limits = {"max_images": 8, "max_image_bytes": 4 << 20}
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

    def warm_up(self) -> dict[str, Any]:
        started = time.perf_counter()
        missing = []
        for module in ("numpy", "PIL.Image", "matplotlib.pyplot"):
            try:
                __import__(module)
            except ImportError:
                missing.append(module)
        if not missing:
            import matplotlib.pyplot as plt

            # The first figure loads fonts and renderer state; pay for it before a session needs it.
            fig, ax = plt.subplots(figsize=(2, 2))
            ax.plot([0, 1], [0, 1])
            ax.set_title("warm-up")
            fig.savefig(io.BytesIO(), format="png")
            plt.close(fig)
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
    def _fetch(paths: list[str]) -> dict[str, str]:
        files = {}
        for path in paths:
            try:
                with open(path, "rb") as fh:
                    files[path] = base64.b64encode(fh.read()).decode()
            except OSError:
                continue
        return files

    def execute(self, req: dict[str, Any]) -> dict[str, Any]:
        mode = req.get("mode", "cell")
        cap = int(req.get("max_output", 65536))
        self.limits["max_images"] = int(req.get("max_images", 8))
        self.limits["max_image_bytes"] = int(req.get("max_image_bytes", 4 << 20))
        self.images, self.dropped_images = [], []
        out, err = CappedWriter(cap), CappedWriter(cap)
        result: str | None = None
        error: dict[str, str] | None = None
        return_code = 0
        started = time.perf_counter()
        old_out, old_err, old_in = sys.stdout, sys.stderr, sys.stdin
        sys.stdout, sys.stderr = out, err
        self.executing = True
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
            tree = ast.parse(req["code"], CELL, "exec")
            last = None
            if mode == "cell" and tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, CELL, "exec"), self.namespace)
            if last is not None:
                value = eval(compile(last, CELL, "eval"), self.namespace)
                if value is not None:
                    self.namespace["_"] = value
                    png = self._to_png(value)
                    if png is not None:
                        self._add_png(png)
                    result = repr(value)
        except _Done:
            pass
        except KeyboardInterrupt:
            error = {"ename": "KeyboardInterrupt", "evalue": "execution interrupted"}
            err.write("KeyboardInterrupt: execution interrupted\n")
            return_code = 130
        except SystemExit as exc:
            return_code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if mode == "script" and exc.code is not None and not isinstance(exc.code, int):
                err.write(f"{exc.code}\n")
            if mode == "cell" or return_code:
                error = {"ename": "SystemExit", "evalue": str(exc.code)}
                if mode == "cell":
                    err.write(self._user_traceback(exc))
        except BaseException as exc:  # noqa: BLE001 - user code may raise anything
            error = {"ename": type(exc).__name__, "evalue": str(exc)}
            err.write(self._user_traceback(exc))
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
        for note in self.dropped_images:
            err.write(f"[argus] {note}\n")
        return {
            "id": req.get("id"),
            "status": "error" if error else "ok",
            "stdout": out.getvalue(),
            "stderr": err.getvalue(),
            "result": result,
            "images": [base64.b64encode(png).decode() for png in self.images],
            "error": error,
            "return_code": return_code,
            "files": self._fetch(req.get("fetch_files") or []) if mode != "cell" else {},
            "duration": time.perf_counter() - started,
        }

    @staticmethod
    def _user_traceback(exc: BaseException) -> str:
        """The traceback without the kernel's own frames, like Jupyter shows it."""
        tb = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != CELL:
            tb = tb.tb_next
        if isinstance(exc, SyntaxError):
            tb = None
        return "".join(traceback.format_exception(type(exc), exc, tb))

    # -- loop --------------------------------------------------------------------------------------

    def _on_sigint(self, _signum: int, _frame: Any) -> None:
        # An interrupt that arrives after the cell finished must not kill the idle kernel.
        if self.executing:
            raise KeyboardInterrupt

    def _send(self, msg: dict[str, Any]) -> None:
        self.proto_out.write(json.dumps(msg) + "\n")
        self.proto_out.flush()

    def serve(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)
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
            if req.get("op") == "warm":
                self._send({"id": req.get("id"), **self.warm_up()})
                continue
            try:
                reply = self.execute(req)
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
