"""Admission at capacity: FIFO hand-over, bounded waits, and no slot lost to a cancelled waiter."""

from __future__ import annotations

import asyncio

from services.sandbox.metrics import SandboxMetrics
from services.sandbox.pool import Admission


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_a_freed_slot_goes_to_the_oldest_waiter() -> None:
    async def scenario() -> list[str]:
        gate = Admission(1, SandboxMetrics(), "session")
        assert await gate.acquire(0)
        order: list[str] = []

        async def wait(name: str) -> None:
            assert await gate.acquire(5)
            order.append(name)

        first = asyncio.create_task(wait("first"))
        await asyncio.sleep(0)
        second = asyncio.create_task(wait("second"))
        await asyncio.sleep(0)
        assert len(gate.waiters) == 2
        # A newcomer that does not wait cannot overtake the queue.
        assert not await gate.acquire(0)
        gate.release()
        await first
        gate.release()
        await second
        assert gate.held == 1 and not gate.waiters
        return order

    assert run(scenario()) == ["first", "second"]


def test_a_wait_is_bounded_and_counted() -> None:
    async def scenario() -> tuple[bool, int, str]:
        metrics = SandboxMetrics()
        gate = Admission(1, metrics, "oneshot")
        await gate.acquire(0)
        admitted = await gate.acquire(0.05)
        text = metrics.registry.get_sample_value("argus_sandbox_admission_wait_seconds_count", {"kind": "oneshot"})
        return admitted, gate.held, str(text)

    assert run(scenario()) == (False, 1, "1.0")


def test_a_cancelled_waiter_does_not_leak_the_slot() -> None:
    async def scenario(release_first: bool) -> int:
        gate = Admission(1, SandboxMetrics(), "session")
        await gate.acquire(0)
        waiter = asyncio.create_task(gate.acquire(5))
        await asyncio.sleep(0)
        waiter.cancel()
        if release_first:  # the slot is handed to the waiter while its cancellation is under way
            gate.release()
            await asyncio.gather(waiter, return_exceptions=True)
        else:
            await asyncio.gather(waiter, return_exceptions=True)
            gate.release()
        assert not gate.waiters and gate.held == 0
        assert await gate.acquire(0)
        return gate.held

    assert run(scenario(release_first=False)) == 1
    assert run(scenario(release_first=True)) == 1
