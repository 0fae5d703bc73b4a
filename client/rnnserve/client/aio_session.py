"""An asyncio session: the same contract as ``Session``, with ``await`` and async iterators."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import grpc.aio
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import Array, encode_inputs, join_outputs, split_chunks
from ._driver import STREAM_RETRY_CODES, ChunkDriver
from ._ledger import SeqLedger
from ._routing import replay_steps, routed
from .errors import RnnserveError, rpc_code, rpc_message, rpc_next_seq
from .models import ModelInfo
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .aio import AsyncClient

_Resp = TypeVar("_Resp")
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
    """An asyncio lock that the task holding it may take again.

    A stream holds its session while it runs, and the caller's input generator runs in the
    stream's own task; so ``snapshot()`` or ``step()`` called from that generator (between
    chunks, when nothing is in flight) must not wait for the stream, as with ``Session``'s RLock.
    """

    def __init__(self) -> None:
        self._inner = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    async def __aenter__(self) -> None:
        task = asyncio.current_task()
        if self._owner is not task or task is None:
            await self._inner.acquire()
            self._owner = task
        self._depth += 1

    async def __aexit__(self, *exc: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._inner.release()


class AsyncSession:
    """A session for asyncio code; see ``Session`` for the contract (ordering, resume, errors).

    Calls on one session are serialised by an ``asyncio.Lock``; ``async with`` closes it.
    """

    def __init__(self, client: AsyncClient, info: pb.SessionInfo, model: ModelInfo) -> None:
        """Internal: sessions come from ``AsyncClient.session()``, ``attach()``, ``restore()``."""
        self._client = client
        self.id: str = info.session_id
        self.model: ModelInfo = model
        self._ledger = SeqLedger(self.id, int(info.next_seq), replay_steps(client.options, info))
        #: Every call of the session carries its route key (rnnserve.proto, Routing).
        self._metadata = routed(client.options, self.id)
        self._lock = _TaskLock()
        self._closed = False

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
        return self._ledger.next_seq

    async def step(self, x: object) -> Array:
        """Apply one step or a chunk and return its outputs (see ``Session.step``)."""
        inputs, single = encode_inputs(self.model, x)
        async with self._lock:
            self._check_open()
            await self._settle()
            parts = []
            for piece in split_chunks(self.model, inputs):
                self._ledger.submit(piece)
                parts.append(await self._drive_unary())
        return join_outputs(parts, single)

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
            self._check_open()
            holder: list[_StreamCall] = []
            try:
                if self._ledger.pending is not None:
                    await self._drive_stream(holder)
                async for item in _items(inputs):
                    chunk, single = encode_inputs(self.model, item)
                    parts = []
                    for piece in split_chunks(self.model, chunk):
                        self._ledger.submit(piece)
                        parts.append(await self._drive_stream(holder))
                    yield join_outputs(parts, single)
            except GeneratorExit:  # the caller stopped early: a clean end if nothing is in flight
                for call in holder:
                    if self._ledger.pending is None:
                        await _finish(call)
                    call.cancel()
                raise
            except BaseException:
                for call in holder:
                    call.cancel()
                raise
            for call in holder:
                await _finish(call)

    async def _drive_unary(self) -> Array:
        driver = ChunkDriver(self._ledger, self.model, self._client._backoff(), self._target)
        stub, options = self._client._stub, self._client.options
        while True:
            try:
                reply = await stub.Step(
                    driver.request(), timeout=options.deadline_s, metadata=self._metadata
                )
            except grpc.RpcError as exc:
                try:
                    delay = driver.on_failure(rpc_code(exc), rpc_message(exc), rpc_next_seq(exc))
                except RnnserveError as error:
                    raise error from exc
                await asyncio.sleep(delay)
                continue
            outputs = driver.on_reply(reply)
            if outputs is not None:
                return outputs

    async def _drive_stream(self, holder: list[_StreamCall]) -> Array:
        driver = ChunkDriver(self._ledger, self.model, self._client._backoff(), self._target)
        while True:
            request = driver.request()
            try:
                if not holder:
                    holder.append(self._client._stub.Stream(metadata=self._metadata))
                call = holder[0]
                await call.write(pb.StreamRequest(step=request, request_id=request.seq))
                reply = await call.read()
            except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                code, message = await _why_ended(holder.pop(), exc)
                try:
                    delay = driver.on_failure(code, message, None, retry_codes=STREAM_RETRY_CODES)
                except RnnserveError as error:
                    raise error from exc
                await asyncio.sleep(delay)
                continue
            if not isinstance(reply, pb.StreamResponse):  # EOF: the server ended the stream
                holder.pop().cancel()
                delay = driver.on_failure(
                    grpc.StatusCode.UNAVAILABLE,
                    "the server ended the stream early",
                    None,
                    retry_codes=STREAM_RETRY_CODES,
                )
                await asyncio.sleep(delay)
                continue
            result = driver.on_stream_reply(reply)
            if isinstance(result, np.ndarray):
                return result
            if result is not None:
                await asyncio.sleep(result)

    async def reset(self) -> None:
        """Set the memory cell back to zeros; seq numbering goes on."""
        async with self._lock:
            self._check_open()
            await self._settle()
            req = pb.ResetSessionRequest(session_id=self.id)
            await self._unary(self._client._stub.ResetSession, req)
            self._ledger.forget_history()

    async def fork(self) -> AsyncSession:
        """A new session starting from a copy of this one's memory cell and seq."""
        async with self._lock:
            self._check_open()
            await self._settle()
            req = pb.ForkSessionRequest(session_id=self.id)
            resp = await self._unary(self._client._stub.ForkSession, req)
        return AsyncSession(self._client, resp.session, self.model)

    async def snapshot(self) -> Snapshot:
        """A portable copy of the session to restore elsewhere."""
        async with self._lock:
            self._check_open()
            await self._settle()
            req = pb.GetStateRequest(session_id=self.id)
            resp = await self._unary(self._client._stub.GetState, req)
        return Snapshot(resp.snapshot)

    async def state(self) -> dict[str, Array]:
        """The current memory cell: state name -> array of its per-session shape."""
        return (await self.snapshot()).state

    async def restore(self, snapshot: Snapshot) -> None:
        """Overwrite this session with a snapshot; it continues from the snapshot's seq."""
        async with self._lock:
            self._check_open()
            self._ledger.abandon()
            req = pb.PutStateRequest(session_id=self.id, snapshot=snapshot.to_proto())
            resp = await self._unary(self._client._stub.PutState, req)
            replay = replay_steps(self._client.options, resp.session)
            self._ledger = SeqLedger(self.id, int(resp.session.next_seq), replay)

    async def info(self) -> pb.SessionInfo:
        """The session as the server holds it (expiry, the seq it expects next)."""
        req = pb.GetSessionRequest(session_id=self.id)
        return (await self._unary(self._client._stub.GetSession, req)).session

    async def close(self) -> None:
        """End the session on the server (idempotent; one the server dropped counts as closed)."""
        async with self._lock:
            if self._closed:
                return
            self._closed = True
            try:
                req = pb.CloseSessionRequest(session_id=self.id)
                await self._unary(self._client._stub.CloseSession, req)
            except RnnserveError as exc:
                if exc.code != grpc.StatusCode.NOT_FOUND:
                    raise

    @property
    def _target(self) -> str:
        return self._client.options.target

    async def _unary(self, method: Callable[..., Awaitable[_Resp]], request: Any) -> _Resp:
        return await self._client._call(method, request, self.id)

    async def _settle(self) -> None:
        # See Session._settle: a chunk left in doubt is completed first.
        if self._ledger.pending is not None:
            await self._drive_unary()

    def _check_open(self) -> None:
        if self._closed:
            raise RnnserveError(grpc.StatusCode.FAILED_PRECONDITION, f"session {self.id} is closed")
