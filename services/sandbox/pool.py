"""Sessions over kernels: a warm pool, capacity and backpressure, timeouts, idle reaping.

A session is a claimed kernel. Claiming takes a pre-started, pre-imported kernel from the warm pool
(so a new session is a claim, not a boot) and the pool refills in the background. At capacity a claim
fails at once with `AtCapacity` (the API answers 429 with Retry-After): nothing ever queues unbounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Literal

from argus.config import SandboxSettings
from services.sandbox.metrics import SandboxMetrics
from services.sandbox.runners import KernelDied, KernelProcess, Runner

log = logging.getLogger("argus.sandbox")

Status = Literal["ok", "error", "timeout", "died"]


class AtCapacity(Exception):
    def __init__(self, limit: int, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the sandbox service is at its limit of {limit} live sessions; retry later")


class SessionNotFound(KeyError):
    pass


@dataclass
class Outcome:
    status: Status
    stdout: str = ""
    stderr: str = ""
    result: str | None = None
    images: list[str] = field(default_factory=list)  # base64 PNG
    error: dict[str, str] | None = None
    execution_time: float = 0.0
    state_lost: bool = False
    return_code: int | None = None
    files: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_reply(cls, reply: dict[str, Any], elapsed: float) -> Outcome:
        return cls(
            status="error" if reply.get("status") == "error" else "ok",
            stdout=reply.get("stdout", ""),
            stderr=reply.get("stderr", ""),
            result=reply.get("result"),
            images=reply.get("images", []),
            error=reply.get("error"),
            execution_time=elapsed,
            return_code=reply.get("return_code"),
            files=reply.get("files") or {},
        )


@dataclass
class Session:
    id: str
    kernel: KernelProcess
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    executions: int = 0


class SessionPool:
    def __init__(self, runner: Runner, settings: SandboxSettings, metrics: SandboxMetrics):
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.warm: deque[KernelProcess] = deque()
        self._claiming: dict[str, asyncio.Future[Session]] = {}
        self._warming = 0
        self._refill = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        stale = await asyncio.to_thread(self.runner.cleanup_stale)
        if stale:
            log.warning("cleaned up %d sandboxes left by a previous run", stale)
        await asyncio.to_thread(self.runner.prepare)
        self._tasks = [asyncio.create_task(self._refill_loop()), asyncio.create_task(self._reap_loop())]
        self._refill.set()

    async def wait_warm(self, timeout_s: float = 120) -> None:
        """Block until the warm pool is full (used by tests and benchmarks, never by requests)."""
        deadline = time.monotonic() + timeout_s
        while len(self.warm) < self.settings.warm_pool and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        self._closed = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        kernels = [s.kernel for s in self.sessions.values()] + list(self.warm)
        self.sessions.clear()
        self.warm.clear()
        await asyncio.gather(*(self.runner.kill(k) for k in kernels), return_exceptions=True)
        # Belt and braces: the state directory is ours alone, so anything still in it is a leftover.
        await asyncio.to_thread(self.runner.cleanup_stale)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.sessions_live.set(len(self.sessions))
        self.metrics.pool_warm.set(len(self.warm))

    # -- kernels -----------------------------------------------------------------------------------

    async def _new_kernel(self, *, warm: bool) -> KernelProcess:
        kernel = await self.runner.start()
        if warm:
            try:
                msg_id = await kernel.send({"op": "warm"})
                reply = await asyncio.wait_for(kernel.receive(msg_id), timeout=120)
            except BaseException:
                await asyncio.shield(self.runner.kill(kernel))
                raise
            if reply.get("missing"):
                log.warning("kernel environment lacks %s", ", ".join(reply["missing"]))
        return kernel

    async def _refill_loop(self) -> None:
        while not self._closed:
            await self._refill.wait()
            self._refill.clear()
            while not self._closed and len(self.warm) + self._warming < self.settings.warm_pool:
                self._warming += 1
                try:
                    kernel = await self._new_kernel(warm=True)
                except (KernelDied, RuntimeError, TimeoutError) as exc:
                    log.error("could not start a warm kernel: %s", exc)
                    await asyncio.sleep(2)
                    continue
                finally:
                    self._warming -= 1
                if self._closed:
                    await self.runner.kill(kernel)
                    return
                self.warm.append(kernel)
                self._update_gauges()

    def _refill_soon(self) -> None:
        # Starting a sandbox costs the event loop a few ms (spawn, bundle); let the claim's answer go first.
        asyncio.get_running_loop().call_later(0.02, self._refill.set)

    async def _take_kernel(self) -> KernelProcess:
        while self.warm:
            kernel = self.warm.popleft()
            self._refill_soon()
            if kernel.alive:
                self.metrics.session_starts.labels(kind="warm").inc()
                return kernel
            await self.runner.kill(kernel)
        self._refill_soon()
        self.metrics.session_starts.labels(kind="cold").inc()
        return await self._new_kernel(warm=False)

    # -- sessions ----------------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id) from None

    async def claim(self, session_id: str | None = None) -> Session:
        """The session with this id, created from the warm pool if it does not exist yet."""
        session_id = session_id or secrets.token_hex(8)
        if session_id in self.sessions:
            return self.sessions[session_id]
        pending = self._claiming.get(session_id)
        if pending is not None:  # the same id is being created by a concurrent request
            return await asyncio.shield(pending)
        if len(self.sessions) + len(self._claiming) >= self.settings.max_sessions:
            self.metrics.rejected.inc()
            raise AtCapacity(self.settings.max_sessions, self.settings.retry_after_s)
        future: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._claiming[session_id] = future
        try:
            kernel = await self._take_kernel()
            session = Session(id=session_id, kernel=kernel)
            self.sessions[session_id] = session
            future.set_result(session)
            return session
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            del self._claiming[session_id]
            self._update_gauges()

    async def close(self, session_id: str, *, reason: str = "closed") -> bool:
        session = self.sessions.pop(session_id, None)
        if session is None:
            return False
        self._update_gauges()
        if reason != "closed":
            self.metrics.kills.labels(reason=reason).inc()
        await self.runner.kill(session.kernel)
        return True

    async def execute(
        self,
        session_id: str,
        code: str,
        *,
        timeout_s: float | None,
        protocol: str,
        create: bool = True,
        extra: dict[str, Any] | None = None,
    ) -> Outcome:
        session = await self.claim(session_id) if create else self.get(session_id)
        timeout = timeout_s or self.settings.timeout_s
        started = time.perf_counter()
        async with session.lock:
            session.last_used = time.monotonic()
            session.executions += 1
            outcome = await self._run(session, code, timeout, extra or {})
            session.last_used = time.monotonic()
        outcome.execution_time = time.perf_counter() - started
        self.metrics.executions.labels(protocol=protocol, status=outcome.status).inc()
        self.metrics.latency.labels(protocol=protocol).observe(outcome.execution_time)
        return outcome

    async def _run(self, session: Session, code: str, timeout: float, extra: dict[str, Any]) -> Outcome:
        s = self.settings
        request = {
            "code": code,
            "max_output": s.max_output_chars,
            "max_images": s.max_images,
            "max_image_bytes": s.max_image_bytes,
            **extra,
        }
        kernel = session.kernel
        try:
            msg_id = await kernel.send(request)
            try:
                reply = await asyncio.wait_for(kernel.receive(msg_id), timeout)
                return Outcome.from_reply(reply, 0.0)
            except TimeoutError:
                pass
            # Interrupt first: a cooperative cell stops and the session keeps its state.
            await kernel.interrupt()
            note = f"TimeoutError: execution exceeded the {timeout:g} s time limit and was interrupted\n"
            try:
                reply = await asyncio.wait_for(kernel.receive(msg_id), s.interrupt_grace_s)
                outcome = Outcome.from_reply(reply, 0.0)
                outcome.status, outcome.stderr = "timeout", outcome.stderr + note
                outcome.error = {"ename": "TimeoutError", "evalue": note.strip()}
                self.metrics.kills.labels(reason="timeout_interrupt").inc()
                return outcome
            except TimeoutError:
                pass
            # The kernel ignores interrupts: replace it. The session keeps its id, not its state.
            self.metrics.kills.labels(reason="timeout_kill").inc()
            await self.runner.kill(kernel)
            session.kernel = await self._take_kernel()
            lost = (
                f"TimeoutError: execution exceeded the {timeout:g} s time limit and did not stop when "
                "interrupted; the sandbox was restarted and the session's state was lost\n"
            )
            return Outcome(
                status="timeout",
                stderr=lost,
                state_lost=True,
                return_code=-9,
                error={"ename": "TimeoutError", "evalue": lost.strip()},
            )
        except KernelDied as exc:
            reason = str(exc)
            self.metrics.kills.labels(reason="memory" if "memory" in reason else "died").inc()
            self.sessions.pop(session.id, None)
            self._update_gauges()
            await self.runner.kill(kernel)
            msg = f"SandboxError: {reason}. The session's state was lost.\n"
            return Outcome(
                status="died",
                stderr=msg,
                state_lost=True,
                return_code=kernel.proc.returncode,
                error={"ename": "SandboxError", "evalue": msg.strip()},
            )

    async def run_once(self, code: str, *, timeout_s: float | None, protocol: str, extra: dict[str, Any]) -> Outcome:
        """A throwaway session (SandboxFusion semantics): claimed, used once, destroyed."""
        session = await self.claim()
        try:
            return await self.execute(
                session.id, code, timeout_s=timeout_s, protocol=protocol, create=False, extra=extra
            )
        finally:
            await self.close(session.id)

    async def _reap_loop(self) -> None:
        interval = min(self.settings.idle_ttl_s / 4, 5.0)
        while not self._closed:
            await asyncio.sleep(interval)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if now - session.last_used > self.settings.idle_ttl_s and not session.lock.locked():
                    log.info("closing idle session %s", session.id)
                    await self.close(session.id, reason="idle")

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "warm": len(self.warm),
            "warming": self._warming,
            "max_sessions": self.settings.max_sessions,
            "runner": self.runner.kind,
        }
