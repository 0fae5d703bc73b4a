"""An asyncio session: the same contract as ``Session``, with ``await`` and async iterators."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import Array
from ._session_core import Exchange, Ops, Rpc, SessionCore, Sleep, Step, StreamFailure
from .errors import rpc_code, rpc_message
from .models import ModelInfo
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .aio import AsyncClient

_T = TypeVar("_T")
_StreamCall = grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse]


async def _items(inputs: Iterable[object] | AsyncIterable[object]) -> AsyncIterator[object]:
    if isinstance(inputs, AsyncIterable):
        async for item in inputs:
            yield item
    else:
        for item in inputs:
            yield item


async def _why_ended(call: _StreamCall, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status of a broken stream call (a write to a finished call raises no RpcError)."""
    call.cancel()
    if isinstance(exc, grpc.RpcError):
        return rpc_code(exc), rpc_message(exc)
    code = await call.code()
    if code in (grpc.StatusCode.OK, grpc.StatusCode.CANCELLED):
        return grpc.StatusCode.UNAVAILABLE, "the stream ended early"
    return code, await call.details()


async def _finish(call: _StreamCall) -> None:
    """End a stream whose replies have all arrived: half-close, let the server end it with OK."""
    try:
        await call.done_writing()
        await call.code()
    except (grpc.RpcError, asyncio.InvalidStateError):
        call.cancel()


class _TaskLock:
    """An asyncio lock that the task holding it may take again, handed to waiters in order.

    A stream holds its session while it runs, and the caller's input generator runs in the
    stream's own task; so ``snapshot()`` or ``step()`` called from that generator (between
    chunks, when nothing is in flight) must not wait for the stream, as with ``Session``'s RLock.
    ``try_acquire`` takes a free lock without a coroutine (``step_many`` takes hundreds).
    """

    def __init__(self) -> None:
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0
        self._waiters: deque[tuple[asyncio.Task[Any] | None, asyncio.Future[None]]] = deque()

    def try_acquire(self, task: asyncio.Task[Any] | None) -> bool:
        """Take the lock for ``task`` if it is free (and nobody waits) or already ``task``'s."""
        if self._depth:
            if self._owner is task and task is not None:
                self._depth += 1
                return True
            return False
        if self._waiters:
            return False
        self._owner = task
        self._depth = 1
        return True

    def release(self) -> None:
        self._depth -= 1
        if self._depth:
            return
        self._owner = None
        while self._waiters:
            task, waiter = self._waiters.popleft()
            if not waiter.done():  # hand the lock over: the waiter owns it when it wakes
                self._owner = task
                self._depth = 1
                waiter.set_result(None)
                return

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if self.try_acquire(task):
            return
        entry = (task, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release()  # handed over just before the cancel: pass it on
            elif entry in self._waiters:
                self._waiters.remove(entry)
            raise

    async def __aexit__(self, *exc: object) -> None:
        self.release()


class AsyncSession:
    """A session for asyncio code; see ``Session`` for the contract (ordering, resume, errors).

    Calls on one session are serialised by an ``asyncio.Lock``; ``async with`` closes it.
    """

    def __init__(self, client: AsyncClient, info: pb.SessionInfo, model: ModelInfo) -> None:
        """Internal: sessions come from ``AsyncClient.session()``, ``attach()``, ``restore()``."""
        self._client = client
        self._core = SessionCore(client.options, client._backoff, info, model)
        self.id: str = self._core.id
        self.model: ModelInfo = model
        self._lock = _TaskLock()

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"AsyncSession(id={self.id!r}, model={self.model.name!r}, next_seq={self.next_seq})"

    @property
    def next_seq(self) -> int:
        """Steps this session has applied (the seq of its next chunk)."""
        return self._core.ledger.next_seq

    async def step(self, x: object) -> Array:
        """Apply one step or a chunk and return its outputs (see ``Session.step``)."""
        async with self._lock:
            return await self._run(self._core.step(x))

    async def stream(
        self, inputs: Iterable[object] | AsyncIterable[object]
    ) -> AsyncIterator[Array]:
        """Send each item over one bidi stream, yielding its outputs in order.

        ``inputs`` may be a plain or an async iterable; the next item is read only after the
        previous outputs were yielded. Reconnects and resumes by itself (see ``Session.stream``).
        The stream holds the session until ``inputs`` is exhausted or the generator is closed
        (``break``, or ``aclose()`` on a generator kept in a variable).
        """
        async with self._lock:
            self._core.check_open()
            holder: list[_StreamCall] = []
            try:
                if self._core.ledger.pending is not None:
                    await self._run(self._core.drive_stream(), holder)
                async for item in _items(inputs):
                    yield await self._run(self._core.stream_item(item), holder)
            except GeneratorExit:  # the caller stopped early: a clean end if nothing is in flight
                for call in holder:
                    if self._core.ledger.pending is None:
                        await _finish(call)
                    call.cancel()
                raise
            except BaseException:
                for call in holder:
                    call.cancel()
                raise
            for call in holder:
                await _finish(call)

    async def reset(self) -> None:
        """Set the memory cell back to zeros; seq numbering goes on."""
        async with self._lock:
            await self._run(self._core.reset())

    async def fork(self) -> AsyncSession:
        """A new session starting from a copy of this one's memory cell and seq."""
        async with self._lock:
            info = await self._run(self._core.fork())
        return AsyncSession(self._client, info, self.model)

    async def snapshot(self) -> Snapshot:
        """A portable copy of the session to restore elsewhere."""
        async with self._lock:
            return await self._run(self._core.snapshot())

    async def state(self) -> dict[str, Array]:
        """The current memory cell: state name -> array of its per-session shape."""
        return (await self.snapshot()).state

    async def restore(self, snapshot: Snapshot) -> None:
        """Overwrite this session with a snapshot; it continues from the snapshot's seq."""
        async with self._lock:
            await self._run(self._core.restore(snapshot))

    async def info(self) -> pb.SessionInfo:
        """The session as the server holds it (expiry, the seq it expects next)."""
        return await self._run(self._core.info())

    async def close(self) -> None:
        """End the session on the server (idempotent; one the server dropped counts as closed)."""
        async with self._lock:
            await self._run(self._core.close())

    # -- the transport --------------------------------------------------------------------------

    async def _run(self, ops: Ops[_T], holder: list[_StreamCall] | None = None) -> _T:
        """Run an operation with awaits (see _session_core)."""
        result: Any = None
        error: Exception | None = None
        while True:
            try:
                op = ops.send(result) if error is None else ops.throw(error)
            except StopIteration as stop:
                return stop.value  # type: ignore[no-any-return]
            result, error = None, None
            try:
                result = await self._do(op, holder)
            except Exception as exc:
                error = exc

    async def _do(self, op: Rpc | Step | Exchange | Sleep, holder: list[_StreamCall] | None) -> Any:
        client = self._client
        if isinstance(op, Step):
            timeout = client.options.deadline_s
            return await client._stub.Step(
                op.request, timeout=timeout, metadata=self._core.metadata
            )
        if isinstance(op, Rpc):
            return await client._call(getattr(client._stub, op.method), op.request, self.id)
        if isinstance(op, Sleep):
            await asyncio.sleep(op.seconds)
            return None
        assert holder is not None, "an Exchange outside a stream"
        try:
            if not holder:
                holder.append(client._stub.Stream(metadata=self._core.metadata))
            call = holder[0]
            await call.write(op.request)
            reply = await call.read()
        except (grpc.RpcError, asyncio.InvalidStateError) as exc:
            code, message = await _why_ended(holder.pop(), exc)
            raise StreamFailure(code, message) from exc
        if not isinstance(reply, pb.StreamResponse):  # EOF: the server ended the stream
            holder.pop().cancel()
            raise StreamFailure(grpc.StatusCode.UNAVAILABLE, "the server ended the stream early")
        return reply
