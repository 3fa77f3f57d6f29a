"""The code-executor HTTP service: every protocol over one session pool.

argus sandbox serve --runner gvisor --port 8080
"""

from __future__ import annotations

import base64
import binascii
import posixpath
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from argus.config import SandboxSettings
from services.asgi import BodyLimit, error_responses, validation_failed
from services.sandbox import models as m
from services.sandbox.metrics import SandboxMetrics
from services.sandbox.pool import AtCapacity, Outcome, SessionNotFound, SessionPool
from services.sandbox.runners import Runner, make_runner

# What the reference sandbox (MultiModal-Jupyter-Sandbox) answers; real clients were trained on these.
TIMEOUT_TEXT = "Timed out waiting for Jupyter kernel output.\n"
STATE_LOST_TEXT = (
    "[argus] the cell did not stop when interrupted: the sandbox was restarted and the session's state was lost\n"
)
NO_CODE = {"output": "Error: No code provided", "status": "error", "execution_time": 0.0}


def _strip_ansi(text: str) -> str:
    return m.ANSI.sub("", text)


def _jupyter_errors(out: Outcome) -> str:
    """The error text of a Jupyter-protocol answer: the traceback, or the reference's timeout text."""
    if out.status == "timeout":
        return TIMEOUT_TEXT + (STATE_LOST_TEXT if out.state_lost else "")
    if out.status == "died":
        return out.stderr
    return out.traceback


def _echo(out: Outcome) -> str | None:
    """The last expression's text as a Jupyter execute_result shows it; images are shown, not echoed."""
    return None if out.result is None or out.result_is_image else out.result


def render_v1(out: Outcome) -> m.V1Response:
    """DeepEyesV2's protocol: `success` for every executed cell, stderr holds only the traceback.

    Its rollout ends the episode on anything but `success`, so an exception, a timeout or a sandbox
    that died is reported in stderr for the model to read and repair, never as a failed call.
    """
    echo = _echo(out)
    return m.V1Response(
        status="success",
        execution_time=out.execution_time,
        output=m.V1Output(
            result=out.result if out.result is not None else "None",
            stdout=out.stdout + (f"Out[0]: {echo}\n" if echo is not None else ""),
            stderr=_jupyter_errors(out),
            images=out.images,
        ),
    )


def render_v2(out: Outcome) -> m.V2Response:
    """MultiModal-Jupyter-Sandbox v2: streams as Jupyter sends them, the result's text in stdout."""
    echo = _echo(out)
    stdout = out.stdout
    if echo:
        stdout += echo if echo.endswith("\n") else echo + "\n"
    stderr = (out.stderr if out.status != "died" else "") + _jupyter_errors(out)
    return m.V2Response(
        status="success",
        execution_time=out.execution_time,
        output=m.V2Output(
            stdout=_strip_ansi(stdout),
            stderr=_strip_ansi(stderr),
            stdout_raw=stdout,
            stderr_raw=stderr,
            images=[f"data:image/png;base64,{img}" for img in out.images],
        ),
    )


def render_native(out: Outcome) -> m.ExecuteResponse:
    """Argus' own API keeps the status per cell and every stream, with the service's notes in stderr."""
    stderr = out.stderr + out.traceback
    if out.timeout_text:
        stderr += f"TimeoutError: {out.timeout_text}\n"
    stderr += "".join(f"[argus] {note}\n" for note in out.notes)
    return m.ExecuteResponse(
        status=out.status,
        stdout=out.stdout,
        stderr=stderr,
        result=out.result,
        images=out.images,
        error=m.ExecuteError(**out.error) if out.error else None,
        execution_time=out.execution_time,
        state_lost=out.state_lost,
        background=[m.BackgroundProcess(**b) for b in out.background],
    )


def create_app(settings: SandboxSettings | None = None, runner: Runner | None = None) -> FastAPI:
    settings = settings or SandboxSettings()
    metrics = SandboxMetrics()
    pool = SessionPool(runner or make_runner(settings), settings, metrics)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await pool.start()
        try:
            yield
        finally:
            await pool.shutdown()

    app = FastAPI(title="Argus code executor", version="1", lifespan=lifespan)
    app.state.pool = pool
    app.state.settings = settings

    # -- errors: always a 4xx with a reason, never a stack trace ------------------------------------

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_failed(exc)

    @app.exception_handler(AtCapacity)
    async def _full(_req: Request, exc: AtCapacity) -> JSONResponse:
        # SandboxFusion's client (verl) retries only on 504, so that protocol gets 504 for "try again".
        status = 504 if _req.url.path == "/run_code" else 429
        return JSONResponse({"detail": str(exc)}, status_code=status, headers={"Retry-After": str(exc.retry_after)})

    @app.exception_handler(SessionNotFound)
    async def _missing(_req: Request, exc: SessionNotFound) -> JSONResponse:
        return JSONResponse({"detail": f"no session {exc.args[0]!r}"}, status_code=404)

    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)  # chunked bodies included

    def check_code(code: str) -> None:
        if len(code) > settings.max_code_chars:
            raise HTTPException(413, f"code is {len(code)} characters; the limit is {settings.max_code_chars}")

    def check_timeout(timeout: float | None) -> float | None:
        if timeout is not None and timeout > settings.max_timeout_s:
            raise HTTPException(422, f"timeout {timeout:g} s is over the {settings.max_timeout_s:g} s limit")
        return timeout

    async def run_cell(session_id: str, code: str, timeout: float | None, protocol: str) -> Outcome:
        check_code(code)
        return await pool.execute(session_id, code, timeout_s=check_timeout(timeout), protocol=protocol)

    # -- DeepEyesV2 / MultiModal-Jupyter-Sandbox v1 ---------------------------------------------------

    # Empty code is answered as the reference answers it (its `output` is then a string).
    jupyter_responses: dict[int | str, dict[str, Any]] = {
        200: {"description": "the cell ran (whatever it raised), or `Error: No code provided`"},
        **error_responses(400, 413, 429),  # 400: a body that is not JSON text
    }

    @app.post("/jupyter_sandbox", response_model=m.V1Response, responses=jupyter_responses)
    async def jupyter_sandbox(req: m.JupyterRequest) -> Any:
        if not req.code.strip():
            return JSONResponse(NO_CODE)
        return render_v1(await run_cell(req.session_id, req.code, req.timeout, "jupyter_v1"))

    # -- MultiModal-Jupyter-Sandbox v2 ------------------------------------------------------------------

    @app.post("/run_jupyter", response_model=m.V2Response, responses=jupyter_responses)
    async def run_jupyter(req: m.JupyterRequest) -> Any:
        if not req.code.strip():
            return JSONResponse(NO_CODE)
        return render_v2(await run_cell(req.session_id, req.code, req.timeout, "jupyter_v2"))

    @app.post("/clear_session", responses=error_responses(400, 413))
    async def clear_session(req: m.ClearSessionRequest) -> m.ClearSessionResponse:
        return m.ClearSessionResponse(cleared=await pool.close(req.session_id))

    # -- SandboxFusion ---------------------------------------------------------------------------------

    @app.post("/run_code", responses=error_responses(400, 413, 504))
    async def run_code(req: m.RunCodeRequest) -> m.RunCodeResponse:
        if req.language not in ("python", "bash"):
            raise HTTPException(400, f"language {req.language!r} is not supported (python, bash)")
        check_code(req.code)
        files: dict[str, str] = {}
        for path, content in req.files.items():
            norm = posixpath.normpath(path)
            if path.startswith("/") or norm.startswith(".."):
                raise HTTPException(400, f"file path {path!r} must be relative and stay inside the sandbox")
            try:
                base64.b64decode(content or "", validate=True)
            except (binascii.Error, ValueError):
                raise HTTPException(400, f"file {path!r} is not valid base64") from None
            files[norm] = content or ""
        extra: dict[str, Any] = {
            "mode": "script" if req.language == "python" else "bash",
            "stdin": req.stdin or "",
            "files": files,
            "fetch_files": req.fetch_files,
            "memory_limit_mb": req.memory_limit_MB if req.memory_limit_MB > 0 else None,
        }
        out = await pool.run_once(
            req.code, timeout_s=check_timeout(req.run_timeout), protocol="sandboxfusion", extra=extra
        )
        if out.status == "timeout":
            run_status, status, message = "TimeLimitExceeded", "Failed", "time limit exceeded"
        elif out.status == "died":
            run_status, status, message = "Error", "SandboxError", out.stderr.strip()
        else:
            run_status = "Finished"
            status, message = ("Success", "") if out.return_code == 0 else ("Failed", "")
        return m.RunCodeResponse(
            status=status,
            message=message,
            run_result=m.CommandRunResult(
                status=run_status,
                execution_time=out.execution_time,
                return_code=out.return_code,
                stdout=out.stdout,
                stderr=out.stderr,
            ),
            files=out.files,
        )

    # -- Argus native ----------------------------------------------------------------------------------

    def info(session_id: str) -> m.SessionInfo:
        s = pool.get(session_id)
        now = time.monotonic()
        return m.SessionInfo(
            session_id=s.id,
            runner=pool.runner.kind,
            executions=s.executions,
            age_s=now - s.created,
            idle_s=now - s.last_used,
            background=[m.BackgroundProcess(**b) for b in s.background],
        )

    @app.post("/v1/sessions", status_code=201, responses=error_responses(400, 409, 413, 429))
    async def create_session(req: m.CreateSessionRequest | None = None) -> m.SessionInfo:
        wanted = req.session_id if req else None
        if wanted is not None and wanted in pool.sessions:
            raise HTTPException(409, f"session {wanted!r} already exists")
        session = await pool.claim(wanted)
        return info(session.id)

    @app.get("/v1/sessions")
    async def list_sessions() -> list[m.SessionInfo]:
        return [info(sid) for sid in list(pool.sessions)]

    @app.post("/v1/sessions/{session_id}/execute", responses=error_responses(400, 404, 413, 429))
    async def execute(session_id: str, req: m.ExecuteRequest) -> m.ExecuteResponse:
        check_code(req.code)
        out = await pool.execute(
            session_id,
            req.code,
            timeout_s=check_timeout(req.timeout),
            protocol="native",
            create=False,
            extra={"background": req.background} if req.background else None,
        )
        return render_native(out)

    @app.delete("/v1/sessions/{session_id}", status_code=204, responses=error_responses(404))
    async def delete_session(session_id: str) -> Response:
        if not await pool.close(session_id):
            raise SessionNotFound(session_id)
        return Response(status_code=204)

    @app.get("/healthz")
    async def healthz() -> m.Health:
        return m.Health(**pool.stats())

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
