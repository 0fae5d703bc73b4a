"""Many sessions over one bidi stream, for gateway-style asyncio apps.

One stream per session does not scale to thousands of sessions; one stream with every session's
chunks on it does. Replies are matched to requests by ``request_id``; each session still has
one chunk in flight, so the resume logic is the same as for a single session. When the stream
breaks, every waiting step reconnects (one new stream for all) and resends its chunk.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import Array, encode_inputs, join_outputs, split_chunks
from ._driver import STREAM_RETRY_CODES, ChunkDriver
from .aio_session import AsyncSession
from .errors import RnnserveError, rpc_code, rpc_message

if TYPE_CHECKING:
    from .aio import AsyncClient

_StreamCall = grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse]


class _StreamBroken(Exception):
    """The shared stream ended while a request was waiting on it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Multiplexer:
    """Drives any number of ``AsyncSession`` objects over one Stream call.

    >>> async with client.multiplexer() as mux:
    ...     outs = await asyncio.gather(*(mux.step(s, x) for s, x in zip(sessions, xs)))

    ``step(session, x)`` has the contract of ``AsyncSession.step``; steps of different sessions
    run concurrently on the stream, steps of one session in order. Use it from one event loop.
    """

    def __init__(self, client: AsyncClient) -> None:
        """Internal: use ``AsyncClient.multiplexer()``. The stream opens at the first step."""
        self._client = client
        self._call: _StreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._write_lock = asyncio.Lock()
        self._waiting: dict[int, tuple[_StreamCall, asyncio.Future[pb.StreamResponse]]] = {}
        self._next_id = 0
        self._closed = False

    async def __aenter__(self) -> Multiplexer:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """End the stream; steps still waiting fail with CANCELLED. Sessions stay open."""
        self._closed = True
        call, reader = self._call, self._reader
        self._call = self._reader = None
        if call is not None:
            call.cancel()
        if reader is not None:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
        self._fail_waiting(None, grpc.StatusCode.CANCELLED, "the multiplexer was closed")

    async def step(self, session: AsyncSession, x: object) -> Array:
        """Apply one step or a chunk to ``session`` over the shared stream; its outputs."""
        inputs, single = encode_inputs(session.model, x)
        async with session._lock:
            session._check_open()
            if session._ledger.pending is not None:
                await self._drive(session)
            parts = []
            for piece in split_chunks(session.model, inputs):
                session._ledger.submit(piece)
                parts.append(await self._drive(session))
        return join_outputs(parts, single)

    async def _drive(self, session: AsyncSession) -> Array:
        driver = ChunkDriver(
            session._ledger, session.model, self._client._backoff(), self._client.options.target
        )
        while True:
            try:
                reply = await self._exchange(driver.request())
            except _StreamBroken as exc:
                delay = driver.on_failure(
                    exc.code, exc.message, None, retry_codes=STREAM_RETRY_CODES
                )
                await asyncio.sleep(delay)
                continue
            result = driver.on_stream_reply(reply)
            if isinstance(result, np.ndarray):
                return result
            if result is not None:
                await asyncio.sleep(result)

    async def _exchange(self, request: pb.StepRequest) -> pb.StreamResponse:
        """Send one request on the shared stream and wait for its reply."""
        call = self._ensure_call()
        request_id = self._next_id
        self._next_id += 1
        reply: asyncio.Future[pb.StreamResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (call, reply)
        try:
            async with self._write_lock:
                try:
                    await call.write(pb.StreamRequest(step=request, request_id=request_id))
                except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                    self._break(call, exc)
            return await reply
        finally:
            self._waiting.pop(request_id, None)

    def _ensure_call(self) -> _StreamCall:
        if self._closed:
            raise RnnserveError(grpc.StatusCode.CANCELLED, "the multiplexer is closed")
        if self._call is None:
            # No await between the check and the assignment: concurrent steps share one call.
            call = self._client._stub.Stream(metadata=self._client.options.metadata)
            self._call = call
            self._reader = asyncio.create_task(self._read(call))
        return self._call

    async def _read(self, call: _StreamCall) -> None:
        """Hand each reply to the step waiting for it, until the stream ends."""
        try:
            while True:
                reply = await call.read()
                if not isinstance(reply, pb.StreamResponse):
                    self._break(call, None)
                    return
                entry = self._waiting.get(reply.request_id)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(reply)
        except grpc.RpcError as exc:
            self._break(call, exc)

    def _break(self, call: _StreamCall, exc: BaseException | None) -> None:
        """Forget a broken call and fail the steps waiting on it (they retry on a new one)."""
        if self._call is call:
            self._call = None
            call.cancel()
        if isinstance(exc, grpc.RpcError):
            code, message = rpc_code(exc), rpc_message(exc)
        else:
            code, message = grpc.StatusCode.UNAVAILABLE, "the stream ended early"
        self._fail_waiting(call, code, message)

    def _fail_waiting(self, call: _StreamCall | None, code: grpc.StatusCode, message: str) -> None:
        for owner, reply in list(self._waiting.values()):
            if (call is None or owner is call) and not reply.done():
                reply.set_exception(_StreamBroken(code, message))
