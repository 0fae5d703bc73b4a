"""Many sessions over a few bidi streams, for gateway-style asyncio apps.

One stream per session does not scale to thousands of sessions; a few streams carrying every
session's chunks do. A session always uses the same stream of the multiplexer (its "lane"), so
its chunks stay in order. Lanes follow route keys: behind a proxy a stream is routed once, at
open, by its ``x-rnnserve-route`` (rnnserve.proto, Routing), so a lane only carries sessions of
its own route key, which live on the replica the stream reaches. ``Multiplexer.session`` opens
sessions on ``streams`` route keys, round robin; a session opened elsewhere gets a lane of its
own key. Why more than one stream by default: grpc.aio handles one stream's messages one at a
time on each side, so a single shared stream is a sequential pipe (docs/benchmarks.md measured
0.4-0.6x the throughput of one stream per session; four streams recovered it).
Replies are matched to requests by ``request_id``; each session still has one chunk in flight,
so the resume logic is the same as for a single session. When a stream breaks, every step
waiting on it reconnects (one new stream for the lane) and resends its chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING

import grpc
import grpc.aio
import numpy as np
import numpy.typing as npt
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import route_of

from ._convert import Array, encode_inputs, join_outputs, split_chunks
from ._driver import STREAM_RETRY_CODES, ChunkDriver
from ._routing import Metadata, new_route_key, routed
from .aio_session import AsyncSession
from .errors import RnnserveError, rpc_code, rpc_message
from .models import ModelInfo

if TYPE_CHECKING:
    from .aio import AsyncClient

_StreamCall = grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse]


class _StreamBroken(Exception):
    """The shared stream ended while a request was waiting on it."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Lane:
    """One Stream call of a multiplexer (for one route key), the task reading its replies, and
    its write lock."""

    __slots__ = ("call", "metadata", "reader", "write_lock")

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self.call: _StreamCall | None = None
        self.reader: asyncio.Task[None] | None = None
        self.write_lock = asyncio.Lock()


class Multiplexer:
    """Drives any number of ``AsyncSession`` objects over ``streams`` Stream calls.

    >>> async with client.multiplexer() as mux:
    ...     outs = await asyncio.gather(*(mux.step(s, x) for s, x in zip(sessions, xs)))

    ``step(session, x)`` has the contract of ``AsyncSession.step``; steps of different sessions
    run concurrently on the stream, steps of one session in order. Use it from one event loop.
    """

    def __init__(self, client: AsyncClient, streams: int = 4) -> None:
        """Internal: use ``AsyncClient.multiplexer()``. Each stream opens at its first step."""
        if streams < 1:
            raise ValueError(f"streams must be at least 1, got {streams}")
        self._client = client
        #: The route keys of the sessions this multiplexer opens, one stream each.
        self._keys = [new_route_key() for _ in range(streams)]
        self._opened = 0
        self._lanes: dict[str, _Lane] = {}
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
        """End the streams; steps still waiting fail with CANCELLED. Sessions stay open."""
        self._closed = True
        for lane in self._lanes.values():
            call, reader = lane.call, lane.reader
            lane.call = lane.reader = None
            if call is not None:
                call.cancel()
            if reader is not None:
                reader.cancel()
                await asyncio.gather(reader, return_exceptions=True)
        self._fail_waiting(None, grpc.StatusCode.CANCELLED, "the multiplexer was closed")

    async def session(
        self,
        model: str | ModelInfo,
        version: str = "",
        initial_state: Mapping[str, npt.ArrayLike] | None = None,
    ) -> AsyncSession:
        """Open a session (see ``AsyncClient.session``) on one of this multiplexer's route keys,
        so that it shares a stream (and, behind a proxy, a replica) with others."""
        key = self._keys[self._opened % len(self._keys)]
        self._opened += 1
        return await self._client.session(model, version, initial_state, route_key=key)

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
        key = route_of(session.id)
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(routed(self._client.options, route=key))
        while True:
            try:
                reply = await self._exchange(lane, driver.request())
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

    async def _exchange(self, lane: _Lane, request: pb.StepRequest) -> pb.StreamResponse:
        """Send one request on the lane's stream and wait for its reply."""
        call = self._ensure_call(lane)
        request_id = self._next_id
        self._next_id += 1
        reply: asyncio.Future[pb.StreamResponse] = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = (call, reply)
        try:
            async with lane.write_lock:
                try:
                    await call.write(pb.StreamRequest(step=request, request_id=request_id))
                except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                    self._break(lane, call, exc)
            return await reply
        finally:
            self._waiting.pop(request_id, None)

    def _ensure_call(self, lane: _Lane) -> _StreamCall:
        if self._closed:
            raise RnnserveError(grpc.StatusCode.CANCELLED, "the multiplexer is closed")
        if lane.call is None:
            # No await between the check and the assignment: concurrent steps share one call.
            call = self._client._stub.Stream(metadata=lane.metadata)
            lane.call = call
            lane.reader = asyncio.create_task(self._read(lane, call))
        return lane.call

    async def _read(self, lane: _Lane, call: _StreamCall) -> None:
        """Hand each reply to the step waiting for it, until the stream ends."""
        try:
            while True:
                reply = await call.read()
                if not isinstance(reply, pb.StreamResponse):
                    self._break(lane, call, None)
                    return
                entry = self._waiting.get(reply.request_id)
                if entry is not None and not entry[1].done():
                    entry[1].set_result(reply)
        except grpc.RpcError as exc:
            self._break(lane, call, exc)

    def _break(self, lane: _Lane, call: _StreamCall, exc: BaseException | None) -> None:
        """Forget a broken call and fail the steps waiting on it (they retry on a new one)."""
        if lane.call is call:
            lane.call = None
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
