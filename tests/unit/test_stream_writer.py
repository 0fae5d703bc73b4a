"""The Stream call's writer: replies written in order, one write in flight at a time, each
write driven from callbacks; a failed write stops the writer and drops what is queued."""

from __future__ import annotations

import asyncio

from rnnserve.server.servicer import _Writer
from rnnserve.v1 import rnnserve_pb2 as pb


class FakeContext:
    """``write`` is a coroutine that waits on a future the test completes (as gRPC's waits on
    its batch), after a bare yield (as ``asyncio.sleep(0)`` makes)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, asyncio.Future[None]]] = []
        self.written: list[int] = []
        self.in_flight = 0
        self.most_in_flight = 0

    async def write(self, reply: pb.StreamResponse) -> None:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0)
            fut = asyncio.get_running_loop().create_future()
            self.pending.append((reply.request_id, fut))
            await fut
            self.written.append(reply.request_id)
        finally:
            self.in_flight -= 1


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_replies_are_written_in_order_one_at_a_time():
    context = FakeContext()
    sent: list[int] = []
    writer = _Writer(context, lambda: sent.append(1))  # type: ignore[arg-type]
    for rid in range(5):
        writer.send(pb.StreamResponse(request_id=rid))
    assert writer.busy
    idle = asyncio.ensure_future(writer.wait_idle())
    for rid in range(5):
        await _settle()
        assert [r for r, _ in context.pending] == [rid]  # only the oldest is in flight
        context.pending.pop(0)[1].set_result(None)
    await asyncio.wait_for(idle, 1.0)
    assert context.written == [0, 1, 2, 3, 4]
    assert context.most_in_flight == 1 and len(sent) == 5 and not writer.busy
    assert writer.error is None


async def test_a_failed_write_stops_the_writer_and_drops_the_rest():
    context = FakeContext()
    sent: list[int] = []
    writer = _Writer(context, lambda: sent.append(1))  # type: ignore[arg-type]
    for rid in range(3):
        writer.send(pb.StreamResponse(request_id=rid))
    await _settle()
    _, fut = context.pending.pop(0)
    fut.set_exception(ConnectionResetError("peer went away"))
    await _settle()
    assert isinstance(writer.error, ConnectionResetError)
    assert not writer.busy and sent == []
    writer.send(pb.StreamResponse(request_id=9))  # dropped: the call is broken
    await _settle()
    assert context.pending == [] and context.written == []
    await asyncio.wait_for(writer.wait_idle(), 1.0)


async def test_a_cancelled_write_counts_as_failed():
    context = FakeContext()
    writer = _Writer(context, lambda: None)  # type: ignore[arg-type]
    writer.send(pb.StreamResponse(request_id=1))
    await _settle()
    _, fut = context.pending.pop(0)
    fut.cancel()
    await _settle()
    assert isinstance(writer.error, asyncio.CancelledError) and not writer.busy


async def test_wait_idle_returns_at_once_when_nothing_is_in_flight():
    writer = _Writer(FakeContext(), lambda: None)  # type: ignore[arg-type]
    await asyncio.wait_for(writer.wait_idle(), 1.0)
