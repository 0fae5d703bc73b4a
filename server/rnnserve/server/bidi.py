"""Serving a bidi stream of steps, shared by rnnserve.v1's Stream (stream.py) and the Open
Inference Protocol's ModelStreamInfer (oip_stream.py): one reply per message, errors in-band.

Two ways to serve a stream, picked by what it carries. Lockstep, while the stream names one
session (what the SDK's Session does, or a tritonclient app with one sequence per stream):
read a message, run it, send its reply, read the next. One task and no hand-offs, the shape of
the echo floor; a chunk still joins a batch with other streams' chunks of its loop tick.
Read-ahead, from the first message naming a second session (a multiplexer, a gateway's frame):
a reader task takes messages as they come, up to ``limit`` unsent, so a chunk waiting in a batch
does not hold up the next message, and the handler sends replies as they are ready. (gRPC hands
a stream's messages over one per loop tick, so on its own one stream's chunks mostly run one by
one: docs/server.md, Batcher.)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any, Generic, TypeVar

import grpc
from rnnserve.server.errors import ServingError

Request = TypeVar("Request")
Reply = TypeVar("Reply")
#: A key for a message that must switch the stream to read-ahead (a frame).
MANY = object()


class BidiCall(Generic[Request, Reply]):
    """One call's replies ready to send, how many messages are unanswered, and backpressure.
    A subclass accepts messages (``accept``) and queues their replies (``put``)."""

    __slots__ = (
        "ended",
        "items",
        "limit",
        "loop",
        "outstanding",
        "reading",
        "room",
        "unsent",
        "waiter",
    )

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: list[Reply] = []
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.reading = True
        self.outstanding = 0
        #: Messages received and not yet handed back to gRPC, and the most the reader allows.
        self.unsent = 0
        self.limit = limit
        self.room: asyncio.Future[None] | None = None

    def key(self, request: Request) -> object:
        """What the stream names (a session, a sequence); ``MANY`` for a message that names
        several. Lockstep lasts while every message has the first one's key."""
        raise NotImplementedError

    def accept(self, request: Request) -> None:
        """Take one message (counting it with ``received``); answer it now or later with
        ``put``, exactly once."""
        raise NotImplementedError

    def received(self) -> None:
        self.outstanding += 1
        self.unsent += 1

    def put(self, reply: Reply) -> None:
        """Queue the reply of one message."""
        self.outstanding -= 1
        self.items.append(reply)
        self.ended = self.ended or (not self.reading and self.outstanding == 0)
        self._wake()

    def end_of_input(self) -> None:
        self.reading = False
        if self.outstanding == 0:
            self.ended = True
            self._wake()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Reply]:
        """Every reply ready, waiting until there is one (or the stream has ended)."""
        while not self.items and not self.ended:
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        items, self.items = self.items, []
        return items

    def sent(self, count: int) -> None:
        """``count`` replies went to gRPC; wake the reader if it waits for room."""
        self.unsent -= count
        room = self.room
        if room is not None and not room.done() and self.unsent < self.limit:
            room.set_result(None)

    async def wait_for_room(self) -> None:
        """Return once fewer than ``limit`` messages of this call are unsent (backpressure)."""
        while self.unsent >= self.limit:
            self.room = self.loop.create_future()
            await self.room
            self.room = None


class BidiServer(Generic[Request, Reply]):
    """Serves the calls of one bidi method; knows every open one, so a shutdown stops them
    reading. A subclass makes each call's ``BidiCall`` and says how a call ends."""

    #: The UNAVAILABLE message of a stream a shutdown ends.
    shutdown_message = "server is shutting down"

    def __init__(self) -> None:
        self.closing = False
        self._readers: set[asyncio.Task[None]] = set()
        #: Handlers waiting on a lockstep read, which a shutdown interrupts.
        self._lockstep: set[asyncio.Task[Any]] = set()

    def new_call(self, context: grpc.aio.ServicerContext[Any, Any]) -> BidiCall[Request, Reply]:
        """The bookkeeping of a new call; ServingError refuses the call."""
        raise NotImplementedError

    def read_error(self, exc: BaseException) -> ServingError:
        """The status a call ends with when reading from it fails."""
        raise NotImplementedError

    def begin_shutdown(self) -> None:
        """Stop reading from open streams; each ends with UNAVAILABLE once its in-flight
        messages are answered."""
        self.closing = True
        for task in [*self._readers, *self._lockstep]:
            task.cancel()

    async def serve(
        self,
        request_iterator: AsyncIterator[Request],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[Reply]:
        """One call: lockstep while it names one key, then read-ahead."""
        try:
            call = self.new_call(context)
        except ServingError as bad:
            await context.abort(bad.code, bad.message)
            raise AssertionError("unreachable: abort raises") from None
        requests = request_iterator.__aiter__()
        handler = asyncio.current_task()
        reader: asyncio.Task[None] | None = None
        sole: object = None  # the one key the stream has named so far
        failed: BaseException | None = None  # why reading stopped, if not the end of input
        try:
            while not self.closing:
                request, failed = await next_message(
                    requests, handler, self._lockstep, lambda: self.closing
                )
                if request is None:
                    break
                key = call.key(request)
                if sole is None:
                    sole = key
                call.accept(request)
                if key != sole or key is MANY:
                    reader = call.loop.create_task(self._read_ahead(call, requests))
                    self._readers.add(reader)
                    break
                while call.outstanding or call.items:
                    ready = call.items
                    if ready:  # answered already (an eager run): no wait, no coroutine
                        call.items = []
                    else:
                        ready = await call.take()
                    for reply in ready:
                        yield reply
                        call.sent(1)
            if reader is None:
                call.end_of_input()
            while True:
                for reply in await call.take():
                    yield reply
                    call.sent(1)
                if call.ended and not call.items:
                    break
        finally:
            if reader is not None:
                reader.cancel()
                self._readers.discard(reader)
        if self.closing:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self.shutdown_message)
        if reader is not None and not reader.cancelled():
            failed = reader.exception()
        if failed is not None:
            err = self.read_error(failed)
            await context.abort(err.code, err.message)

    async def _read_ahead(
        self, call: BidiCall[Request, Reply], requests: AsyncIterator[Request]
    ) -> None:
        """A multiplexed stream's reader: accept messages as they come, with backpressure."""
        accept = call.accept
        try:
            async for request in requests:
                accept(request)
                if call.unsent >= call.limit:
                    await call.wait_for_room()
        finally:
            call.end_of_input()


Message = TypeVar("Message")


async def next_message(
    requests: AsyncIterator[Message],
    handler: asyncio.Task[Any] | None,
    waiting: set[asyncio.Task[Any]],
    closing: Callable[[], bool],
) -> tuple[Message | None, BaseException | None]:
    """The stream's next message, ``(message, None)``; ``(None, None)`` at the end of input or
    when a shutdown (``closing()`` true) cancelled the wait; ``(None, error)`` when reading
    failed (a message that does not decode, a broken call).

    While it waits, ``handler`` (the calling task) is in ``waiting``, the set a shutdown cancels.
    """
    if handler is not None:
        waiting.add(handler)
    try:
        return await requests.__anext__(), None
    except StopAsyncIteration:
        return None, None
    except asyncio.CancelledError:
        # A shutdown interrupts a lockstep read; nothing of the stream's is in flight then.
        if not closing() or handler is None:
            raise
        if sys.version_info >= (3, 11):
            handler.uncancel()  # this cancel is handled; nothing else was asked
        return None, None
    except Exception as exc:
        return None, exc
    finally:
        if handler is not None:
            waiting.discard(handler)
