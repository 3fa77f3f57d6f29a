"""Sessions over kernels: a warm pool, admission at capacity, timeouts, idle reaping, one-shot runs.

A session is a claimed kernel. Claiming takes a pre-started, pre-imported kernel from the warm pool
(so a new session is a claim, not a boot); the pool refills in the background, booting up to
`warm_parallel` sandboxes at once, and a claim that finds it empty takes the next kernel the refill
finishes, which boots as fast as the machine allows. At capacity a claim first reclaims sessions idle
past their TTL, then waits in a FIFO queue for up to `admission_timeout_s` (DeepEyesV2's client never
retries, so an instant refusal would end its trajectory), and only then fails with `AtCapacity` (429
with Retry-After; 504 on /run_code, which verl retries). Nothing ever queues unbounded in time.

One-shot runs (SandboxFusion's /run_code) do not take a session: `OneShotPool` keeps pre-booted
sandboxes whose kernel forks a child per run and, after it, kills and wipes everything the run left.
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
from services.asgi import REPLACED_NOTE, safe_text
from services.sandbox.metrics import SandboxMetrics
from services.sandbox.runners import KernelDied, KernelProcess, Runner

log = logging.getLogger("argus.sandbox")

Status = Literal["ok", "error", "timeout", "died"]


REFILL_DEBOUNCE_S = 0.5


class AtCapacity(Exception):
    def __init__(self, limit: int, retry_after: int):
        self.retry_after = retry_after
        super().__init__(f"the sandbox service is at its limit of {limit} live sessions; retry later")


class SessionNotFound(KeyError):
    pass


@dataclass
class Outcome:
    """What one execution did, before any protocol renders it.

    `stderr` is what the code wrote to stderr, `traceback` the IPython-formatted traceback of an
    exception, `notes` the service's own remarks (dropped images); each protocol decides which of
    them its clients see. `timeout_text` is set when the call ran out of time.
    """

    status: Status
    stdout: str = ""
    stderr: str = ""
    traceback: str = ""
    result: str | None = None
    result_is_image: bool = False
    images: list[str] = field(default_factory=list)  # base64 PNG
    notes: list[str] = field(default_factory=list)
    error: dict[str, str] | None = None
    execution_time: float = 0.0
    state_lost: bool = False
    return_code: int | None = None
    files: dict[str, str] = field(default_factory=dict)
    timeout_text: str = ""
    background: list[dict[str, Any]] = field(default_factory=list)  # processes still running after the cell

    @classmethod
    def from_reply(cls, reply: dict[str, Any], elapsed: float) -> Outcome:
        """The kernel's reply; text that cannot be encoded (a cell that printed a lone surrogate) has
        each unpaired surrogate replaced by U+FFFD, and a note says so, so every protocol can answer."""
        status = reply.get("status")
        replaced = False

        def text(value: Any) -> Any:
            nonlocal replaced
            if not isinstance(value, str):
                return value
            cleaned, changed = safe_text(value)
            replaced |= changed
            return cleaned

        error = reply.get("error")
        out = cls(
            status=status if status in ("error", "timeout") else "ok",
            stdout=text(reply.get("stdout", "")),
            stderr=text(reply.get("stderr", "")),
            traceback=text(reply.get("traceback", "")),
            result=text(reply.get("result")),
            result_is_image=bool(reply.get("result_is_image")),
            images=reply.get("images", []),
            notes=[text(n) for n in reply.get("notes") or []],
            error={k: text(v) for k, v in error.items()} if isinstance(error, dict) else None,
            execution_time=elapsed,
            return_code=reply.get("return_code"),
            files=reply.get("files") or {},
            background=[{**b, "cmd": text(b.get("cmd", ""))} for b in reply.get("background") or []],
        )
        if replaced:
            out.notes.append(REPLACED_NOTE)
        return out


@dataclass
class Session:
    id: str
    kernel: KernelProcess
    created: float = field(default_factory=time.monotonic)
    last_used: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    executions: int = 0
    background: list[dict[str, Any]] = field(default_factory=list)  # as last seen: after a cell, or while idle


class Admission:
    """At most `limit` holders; the rest wait in FIFO order for up to a deadline.

    A freed slot goes to the oldest waiter directly, so a newcomer can never overtake the queue.
    """

    def __init__(self, limit: int, metrics: SandboxMetrics, kind: str):
        self.limit = limit
        self.held = 0
        self.waiters: deque[asyncio.Future[None]] = deque()
        self.metrics = metrics
        self.kind = kind

    @property
    def full(self) -> bool:
        return self.held >= self.limit

    async def acquire(self, timeout_s: float) -> bool:
        if not self.full and not self.waiters:
            self.held += 1
            return True
        if timeout_s <= 0:
            return False
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        gauge = self.metrics.admission_queue.labels(kind=self.kind)
        gauge.inc()
        started = time.perf_counter()
        try:
            await asyncio.wait_for(asyncio.shield(waiter), timeout_s)
            return True  # the slot was handed over by release()
        except TimeoutError:
            return waiter.done()  # handed over just as the wait ended: keep it
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the client went away after the slot was handed to it
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
            gauge.dec()
            self.metrics.admission_wait.labels(kind=self.kind).observe(time.perf_counter() - started)

    def release(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes on: `held` stays the same
                return
        self.held -= 1


class SessionPool:
    def __init__(self, runner: Runner, settings: SandboxSettings, metrics: SandboxMetrics):
        self.runner = runner
        self.settings = settings
        self.metrics = metrics
        self.sessions: dict[str, Session] = {}
        self.warm: deque[KernelProcess] = deque()
        self.admission = Admission(settings.max_sessions, metrics, "session")
        self._claiming: dict[str, asyncio.Future[Session]] = {}
        self._kernel_waiters: deque[asyncio.Future[KernelProcess]] = deque()
        self._warming = 0
        self._booting_cold = 0
        self._refill = asyncio.Event()
        self._refill_timer: asyncio.TimerHandle | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._boots: set[asyncio.Task[None]] = set()
        self._closed = False
        self.oneshot = OneShotPool(self)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        stale = await asyncio.to_thread(self.runner.cleanup_stale)
        if stale:
            log.warning("cleaned up %d sandboxes left by a previous run", stale)
        await asyncio.to_thread(self.runner.prepare)
        self._tasks = [asyncio.create_task(self._refill_loop()), asyncio.create_task(self._reap_loop())]
        self._refill.set()
        await self.oneshot.start()

    async def wait_warm(self, timeout_s: float = 120) -> None:
        """Block until the warm pool is full (used by tests and benchmarks, never by requests)."""
        deadline = time.monotonic() + timeout_s
        while len(self.warm) < self.settings.warm_pool and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def shutdown(self) -> None:
        self._closed = True
        for task in [*self._tasks, *self._boots]:
            task.cancel()
        for task in [*self._tasks, *self._boots]:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for waiter in self._kernel_waiters:
            if not waiter.done():
                waiter.set_exception(KernelDied("the service is shutting down"))
                waiter.exception()
        kernels = [s.kernel for s in self.sessions.values()] + list(self.warm)
        self.sessions.clear()
        self.warm.clear()
        await self.oneshot.shutdown()
        await asyncio.gather(*(self.runner.kill(k) for k in kernels), return_exceptions=True)
        # Belt and braces: the state directory is ours alone, so anything still in it is a leftover.
        await asyncio.to_thread(self.runner.cleanup_stale)
        self._update_gauges()

    def _update_gauges(self) -> None:
        self.metrics.sessions_live.set(len(self.sessions))
        self.metrics.pool_warm.set(len(self.warm))

    # -- kernels -----------------------------------------------------------------------------------

    async def _new_kernel(self, *, warm: bool, preload: list[str] | None = None) -> KernelProcess:
        kernel = await self.runner.start()
        if warm:
            try:
                modules = self.settings.preload if preload is None else preload
                msg_id = await kernel.send({"op": "warm", "modules": modules})
                reply = await asyncio.wait_for(kernel.receive(msg_id), timeout=120)
            except BaseException:
                await asyncio.shield(self.runner.kill(kernel))
                raise
            if reply.get("missing"):
                log.warning("kernel environment lacks %s", ", ".join(reply["missing"]))
        return kernel

    def _boot_target(self) -> int:
        """Kernels wanted: a full warm pool plus one for every claim waiting on an empty pool."""
        return self.settings.warm_pool + len(self._kernel_waiters)

    async def _refill_loop(self) -> None:
        while not self._closed:
            await self._refill.wait()
            self._refill.clear()
            while (
                not self._closed
                and len(self.warm) + self._warming < self._boot_target()
                and self._warming < self.settings.warm_parallel
            ):
                # A claim waiting on an empty pool gets a kernel booted without the warm-up imports:
                # ready in a fraction of the time, and its first cell imports what it uses.
                warm = len(self._kernel_waiters) <= self._booting_cold
                self._warming += 1
                self._booting_cold += not warm
                task = asyncio.create_task(self._boot_one(warm))
                self._boots.add(task)
                task.add_done_callback(self._boots.discard)

    async def _boot_one(self, warm: bool) -> None:
        try:
            kernel = await self._new_kernel(warm=warm)
        except (KernelDied, RuntimeError, TimeoutError) as exc:
            log.error("could not start a kernel: %s", exc)
            await asyncio.sleep(2)
            self._refill.set()
            return
        finally:
            self._warming -= 1
            self._booting_cold -= not warm
        if self._closed:
            await self.runner.kill(kernel)
            return
        self._hand_over(kernel)
        self._refill.set()

    def _hand_over(self, kernel: KernelProcess) -> None:
        """A freshly booted kernel goes to the oldest claim waiting for one, else into the pool."""
        while self._kernel_waiters:
            waiter = self._kernel_waiters.popleft()
            if not waiter.done():
                waiter.set_result(kernel)
                self.metrics.session_starts.labels(kind="booted").inc()
                return
        self.warm.append(kernel)
        self._update_gauges()

    def _refill_soon(self) -> None:
        """Refill once claims have paused for REFILL_DEBOUNCE_S.

        Claims come in bursts (an RL group's reset opens all its sessions at once) and each session's
        first cell follows at once; booting sandboxes during that would take the CPU from them.
        Claims that wait on an empty pool do not wait for this: they set `_refill` themselves.
        """
        if self._refill_timer is not None:
            self._refill_timer.cancel()
        self._refill_timer = asyncio.get_running_loop().call_later(REFILL_DEBOUNCE_S, self._refill.set)

    async def _take_kernel(self) -> KernelProcess:
        while self.warm:
            kernel = self.warm.popleft()
            self._refill_soon()
            if kernel.alive:
                self.metrics.session_starts.labels(kind="warm").inc()
                self._update_gauges()
                return kernel
            await self.runner.kill(kernel)
        # The pool is empty (a burst larger than it): wait for the next kernel the refill boots, which
        # boots `warm_parallel` at a time instead of every claim starting its own sandbox at once.
        waiter: asyncio.Future[KernelProcess] = asyncio.get_running_loop().create_future()
        self._kernel_waiters.append(waiter)
        self._refill.set()
        try:
            return await asyncio.shield(waiter)
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                self.warm.appendleft(waiter.result())  # booted for us after all: keep it for the next claim
                self._update_gauges()
            else:
                waiter.cancel()
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._kernel_waiters.remove(waiter)

    # -- sessions ----------------------------------------------------------------------------------

    def get(self, session_id: str) -> Session:
        try:
            return self.sessions[session_id]
        except KeyError:
            raise SessionNotFound(session_id) from None

    def _reclaim_idle(self) -> list[str]:
        """Sessions idle past their TTL that the reaper has not closed yet: capacity comes first."""
        now = time.monotonic()
        return [
            s.id for s in self.sessions.values() if now - s.last_used > self.settings.idle_ttl_s and not s.lock.locked()
        ]

    async def _admit(self) -> None:
        if self.admission.full:
            for session_id in self._reclaim_idle():
                log.info("at capacity: closing idle session %s", session_id)
                await self.close(session_id, reason="idle")
        if not await self.admission.acquire(self.settings.admission_timeout_s):
            self.metrics.rejected.inc()
            raise AtCapacity(self.settings.max_sessions, self.settings.retry_after_s)

    async def claim(self, session_id: str | None = None) -> Session:
        """The session with this id, created from the warm pool if it does not exist yet."""
        session_id = session_id or secrets.token_hex(8)
        if session_id in self.sessions:
            return self.sessions[session_id]
        pending = self._claiming.get(session_id)
        if pending is not None:  # the same id is being created by a concurrent request
            return await asyncio.shield(pending)
        future: asyncio.Future[Session] = asyncio.get_running_loop().create_future()
        self._claiming[session_id] = future
        admitted = False
        try:
            await self._admit()
            admitted = True
            kernel = await self._take_kernel()
            session = Session(id=session_id, kernel=kernel)
            self.sessions[session_id] = session
            future.set_result(session)
            return session
        except BaseException as exc:
            if admitted:
                self.admission.release()
            future.set_exception(exc)
            future.exception()  # mark retrieved: concurrent waiters re-raise it themselves
            raise
        finally:
            del self._claiming[session_id]
            self._update_gauges()

    def _drop(self, session_id: str) -> Session | None:
        session = self.sessions.pop(session_id, None)
        if session is not None:
            self.admission.release()
            self._update_gauges()
        return session

    async def close(self, session_id: str, *, reason: str = "closed") -> bool:
        session = self._drop(session_id)
        if session is None:
            return False
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
            "background": s.after_cell,
            **extra,
        }
        kernel = session.kernel
        try:
            msg_id = await kernel.send(request)
            try:
                reply = await asyncio.wait_for(kernel.receive(msg_id), timeout)
                outcome = Outcome.from_reply(reply, 0.0)
                kernel.max_rss_mb = float(reply.get("max_rss_mb") or 0.0)
                session.background = outcome.background
                self._observe_background()
                return outcome
            except TimeoutError:
                pass
            # Interrupt first: a cooperative cell stops and the session keeps its state.
            await kernel.interrupt()
            note = f"execution exceeded the {timeout:g} s time limit and was interrupted"
            try:
                reply = await asyncio.wait_for(kernel.receive(msg_id), s.interrupt_grace_s)
                outcome = Outcome.from_reply(reply, 0.0)
                outcome.status, outcome.timeout_text = "timeout", note
                outcome.error = {"ename": "TimeoutError", "evalue": note}
                self.metrics.kills.labels(reason="timeout_interrupt").inc()
                return outcome
            except TimeoutError:
                pass
            # The kernel ignores interrupts: replace it. The session keeps its id, not its state.
            self.metrics.kills.labels(reason="timeout_kill").inc()
            await self.runner.kill(kernel)
            session.kernel = await self._take_kernel()
            lost = (
                f"execution exceeded the {timeout:g} s time limit and did not stop when interrupted; "
                "the sandbox was restarted and the session's state was lost"
            )
            return Outcome(
                status="timeout",
                timeout_text=lost,
                state_lost=True,
                return_code=-9,
                error={"ename": "TimeoutError", "evalue": lost},
            )
        except KernelDied as exc:
            reason = str(exc)
            self.metrics.kills.labels(reason="memory" if "memory" in reason else "died").inc()
            self._drop(session.id)
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
        """A SandboxFusion run: on a pre-booted one-shot sandbox, else a throwaway session."""
        timeout = timeout_s or self.settings.timeout_s
        if self.oneshot.enabled:
            started = time.perf_counter()
            outcome = await self.oneshot.run(code, timeout, extra)
            outcome.execution_time = time.perf_counter() - started
            self.metrics.executions.labels(protocol=protocol, status=outcome.status).inc()
            self.metrics.latency.labels(protocol=protocol).observe(outcome.execution_time)
            return outcome
        session = await self.claim()
        try:
            return await self.execute(session.id, code, timeout_s=timeout, protocol=protocol, create=False, extra=extra)
        finally:
            await self.close(session.id)

    async def _reap_loop(self) -> None:
        interval = min(self.settings.idle_ttl_s / 4, 5.0)
        while not self._closed:
            await asyncio.sleep(interval)
            for session_id in self._reclaim_idle():
                log.info("closing idle session %s", session_id)
                await self.close(session_id, reason="idle")
            await self._poll_background()

    async def _poll_background(self) -> None:
        """Ask each idle session that had background processes what they use now: a session that looks
        idle while its leftovers burn a core shows it (native API, `/metrics`)."""
        for session in list(self.sessions.values()):
            if not session.background or session.lock.locked():
                continue
            async with session.lock:
                try:
                    msg_id = await session.kernel.send({"op": "stats"})
                    reply = await asyncio.wait_for(session.kernel.receive(msg_id), 5.0)
                except (KernelDied, TimeoutError):
                    continue
                session.background = reply.get("background") or []
        self._observe_background()

    def _observe_background(self) -> None:
        procs = [p for s in self.sessions.values() for p in s.background]
        self.metrics.background_processes.set(len(procs))
        self.metrics.background_cpu.set(sum(float(p.get("cpu_s", 0.0)) for p in procs))

    def stats(self) -> dict[str, Any]:
        return {
            "sessions": len(self.sessions),
            "warm": len(self.warm),
            "warming": self._warming,
            "max_sessions": self.settings.max_sessions,
            "queued": len(self.admission.waiters),
            "oneshot_ready": self.oneshot.ready,
            "runner": self.runner.kind,
        }


# A one-shot sandbox forks per run, and in gVisor a fork costs with the parent's mappings: measured
# 11 ms with numpy and PIL loaded, 38 ms once matplotlib.pyplot is too. Runs that plot import it.
ONESHOT_PRELOAD = ["numpy", "PIL.Image"]


class OneShotPool:
    """Pre-booted sandboxes for one-shot runs, each serving one forked run at a time.

    Only the gVisor runner supports it: the kernel must be its sandbox's init process to reach every
    process a run leaves behind. With the process runner (or `oneshot_pool: 0`) every run boots a
    throwaway session instead. A sandbox that times out hard or dies is replaced.
    """

    def __init__(self, pool: SessionPool):
        self.pool = pool
        self.settings = pool.settings
        self.size = self.settings.oneshot_pool if pool.runner.kind == "gvisor" else 0
        self.idle: asyncio.Queue[KernelProcess] = asyncio.Queue()
        self.admission = Admission(self.size, pool.metrics, "oneshot")
        self.kernels: set[KernelProcess] = set()
        self._boots: set[asyncio.Task[None]] = set()
        self._booting = 0

    @property
    def enabled(self) -> bool:
        return self.size > 0

    @property
    def ready(self) -> int:
        return self.idle.qsize()

    async def start(self) -> None:
        for _ in range(self.size):
            self._boot()

    def _boot(self) -> None:
        task = asyncio.create_task(self._boot_one())
        self._boots.add(task)
        task.add_done_callback(self._boots.discard)

    async def _boot_one(self) -> None:
        while not self.pool._closed:
            try:
                kernel = await self.pool._new_kernel(warm=True, preload=ONESHOT_PRELOAD)
            except (KernelDied, RuntimeError, TimeoutError) as exc:
                log.error("could not start a one-shot sandbox: %s", exc)
                await asyncio.sleep(2)
                continue
            self.kernels.add(kernel)
            self.idle.put_nowait(kernel)
            return

    async def shutdown(self) -> None:
        for task in list(self._boots):
            task.cancel()
        for task in list(self._boots):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(self.pool.runner.kill(k) for k in self.kernels), return_exceptions=True)
        self.kernels.clear()

    async def run(self, code: str, timeout: float, extra: dict[str, Any]) -> Outcome:
        s = self.settings
        if not await self.admission.acquire(s.admission_timeout_s):
            self.pool.metrics.rejected.inc()
            raise AtCapacity(self.size, s.retry_after_s)
        try:
            try:
                # Admitted means a sandbox is ours; it may still be booting (start-up, or a replacement).
                kernel = await asyncio.wait_for(self.idle.get(), max(s.admission_timeout_s, 30.0))
            except TimeoutError:
                self.pool.metrics.rejected.inc()
                raise AtCapacity(self.size, s.retry_after_s) from None
            healthy = False
            try:
                outcome, healthy = await self._run_on(kernel, code, timeout, extra)
                return outcome
            finally:
                if healthy:
                    self.idle.put_nowait(kernel)
                else:
                    self.kernels.discard(kernel)
                    await asyncio.shield(self.pool.runner.kill(kernel))
                    self._boot()
        finally:
            self.admission.release()

    async def _run_on(
        self, kernel: KernelProcess, code: str, timeout: float, extra: dict[str, Any]
    ) -> tuple[Outcome, bool]:
        request = {
            "op": "oneshot",
            "code": code,
            "timeout": timeout,
            "max_output": self.settings.max_output_chars,
            **extra,
        }
        try:
            msg_id = await kernel.send(request)
            # The kernel enforces `timeout` on its child itself; this bound only catches a stuck kernel.
            reply = await asyncio.wait_for(kernel.receive(msg_id), timeout + self.settings.interrupt_grace_s + 5)
        except TimeoutError:
            self.pool.metrics.kills.labels(reason="timeout_kill").inc()
            return Outcome(status="timeout", return_code=None, timeout_text="the sandbox stopped answering"), False
        except KernelDied as exc:
            self.pool.metrics.kills.labels(reason="died").inc()
            msg = f"SandboxError: {exc}\n"
            return Outcome(status="died", stderr=msg, error={"ename": "SandboxError", "evalue": msg.strip()}), False
        if (reply.get("error") or {}).get("ename") == "KernelError":
            # The kernel could not run it at all (bad request content): answered, and the sandbox is fine.
            return Outcome(status="died", stderr=reply.get("stderr", ""), return_code=1), True
        outcome = Outcome.from_reply(reply, 0.0)
        if outcome.status == "timeout":
            self.pool.metrics.kills.labels(reason="timeout_oneshot").inc()
        return outcome, True
