"""The asyncio session lock: re-entrant for its task, handed to waiters in order, and never lost
to a waiter cancelled while (or just after) it was handed over."""

from __future__ import annotations

import asyncio

import pytest
from rnnserve.client.aio_session import _TaskLock


async def test_reentrant_for_its_task_and_exclusive_for_others() -> None:
    lock = _TaskLock()
    order: list[str] = []

    async def holder() -> None:
        async with lock:
            async with lock:  # the same task takes it again
                order.append("holder in")
                await asyncio.sleep(0.01)
            order.append("holder still in")
        order.append("holder out")

    async def other() -> None:
        await asyncio.sleep(0)
        assert not lock.try_acquire(asyncio.current_task())
        async with lock:
            order.append("other in")

    await asyncio.gather(holder(), other())
    assert order == ["holder in", "holder still in", "holder out", "other in"]
    assert lock.try_acquire(None)  # free again
    lock.release()


async def test_waiters_get_it_in_order_and_a_cancelled_one_is_skipped() -> None:
    lock = _TaskLock()
    got: list[int] = []
    assert lock.try_acquire(asyncio.current_task())

    async def wait(k: int) -> None:
        async with lock:
            got.append(k)

    tasks = [asyncio.ensure_future(wait(k)) for k in range(4)]
    await asyncio.sleep(0)
    tasks[1].cancel()
    await asyncio.sleep(0)
    lock.release()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert got == [0, 2, 3]
    assert lock.try_acquire(None)


async def test_a_waiter_cancelled_after_the_handover_passes_the_lock_on() -> None:
    lock = _TaskLock()
    assert lock.try_acquire(asyncio.current_task())
    first = asyncio.ensure_future(lock.__aenter__())
    second = asyncio.ensure_future(lock.__aenter__())
    await asyncio.sleep(0)
    lock.release()  # handed to `first`, which is cancelled before it runs
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1.0)  # `second` owns it now
    assert not lock.try_acquire(None)
