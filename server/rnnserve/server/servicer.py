"""The gRPC adapter: proto in, domain calls, proto out. A few lines per RPC.

Unary calls raise ``ServingError`` and one decorator turns it into the call's status (seq
errors add trailing metadata ``rnnserve-next-seq``). On ``Stream`` an error about one message
goes back in-band as a ``StepError`` and the stream goes on; only a broken stream or a shutdown
ends it with a status.
"""

from __future__ import annotations

import asyncio
import functools
import re
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from rnnserve.server.batcher import Work
from rnnserve.server.errors import ServingError, as_serving_error, invalid
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import CLOSED, Session, SessionManager
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import TensorError, from_tensor, to_tensor_map

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]

#: What a server-generated session id looks like (URL-safe base64, >= 128 bits).
SESSION_ID = re.compile(r"[A-Za-z0-9_-]{22,128}")


def unary(method: str) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """Map ServingError (and, logged, any other exception) onto the call's status; record the
    call's duration and code."""

    def wrap(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
        @functools.wraps(fn)
        async def handler(
            self: Any, request: Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Resp:
            started = time.perf_counter()
            try:
                reply = await fn(self, request, context)
            except Exception as exc:  # the one place unary errors meet the wire
                err = as_serving_error(exc, method)
            else:
                self.metrics.observe_request(method, "OK", time.perf_counter() - started)
                return reply
            self.metrics.observe_request(method, err.code.name, time.perf_counter() - started)
            await context.abort(err.code, err.message, err.trailing_metadata())
            raise AssertionError("unreachable: abort raises")

        return handler

    return wrap


class _Writer:
    """Sends one Stream call's replies in order, one write in flight at a time.

    A reply's write starts the moment the reply exists (inside the batch's own callback) and
    its completion is handled by a callback too, so per message the call's task wakes only
    to read, as the echo floor's does; with a writer task instead, each reply cost a task
    wake-up and a loop iteration more. ``context.write`` is a coroutine: it is driven here as a
    Task would drive it (sent into until it waits on a future, resumed when that future is
    done), without a Task per reply.
    """

    __slots__ = ("_context", "_idle", "_on_sent", "_queue", "busy", "error")

    def __init__(
        self, context: grpc.aio.ServicerContext[Any, Any], on_sent: Callable[[], None]
    ) -> None:
        self._context = context
        self._on_sent = on_sent
        self._queue: deque[pb.StreamResponse] = deque()
        self._idle: asyncio.Future[None] | None = None
        #: A write is in flight.
        self.busy = False
        #: Why writing stopped (the call broke); later replies are dropped.
        self.error: BaseException | None = None

    def send(self, reply: pb.StreamResponse) -> None:
        if self.error is not None:
            return
        if self.busy:
            self._queue.append(reply)
        else:
            self._start(reply)

    async def wait_idle(self) -> None:
        """Return once every reply handed to ``send`` is written (or writing failed)."""
        while self.busy and self.error is None:
            self._idle = asyncio.get_running_loop().create_future()
            try:
                await self._idle
            finally:
                self._idle = None

    def _start(self, reply: pb.StreamResponse) -> None:
        self.busy = True
        self._step(self._context.write(reply))

    def _step(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            waits_on = coro.send(None)
        except StopIteration:
            self._written(None)
            return
        except (Exception, asyncio.CancelledError) as exc:  # the call broke or ended
            self._written(exc)
            return
        if waits_on is None:  # a bare yield: go on at the next loop iteration
            asyncio.get_running_loop().call_soon(self._step, coro)
        else:
            waits_on.add_done_callback(functools.partial(self._resume, coro))

    def _resume(self, coro: Coroutine[Any, Any, None], _: asyncio.Future[Any]) -> None:
        self._step(coro)

    def _written(self, exc: BaseException | None) -> None:
        if exc is not None:
            self.error = exc
            self._queue.clear()
            self.busy = False
        else:
            self._on_sent()
            if self._queue:
                self._start(self._queue.popleft())
                return
            self.busy = False
        idle = self._idle
        if idle is not None and not idle.done():
            idle.set_result(None)


class _StreamWork(Work):
    """A chunk that came on a Stream: it answers its call directly (no closure per chunk)."""

    __slots__ = ("call", "reply", "rid", "started")

    def __init__(
        self,
        call: _StreamCall,
        rid: int,
        started: float,
        session: Session,
        step: pb.StepRequest,
        inputs: npt.NDArray[np.generic],
    ) -> None:
        super().__init__(
            session, step.seq, inputs, step.want_state, _no_callback, step.inputs, started
        )
        self.call = call
        self.rid = rid
        self.started = started
        #: The StreamResponse whose ``step`` new_reply handed out, once it has.
        self.reply: pb.StreamResponse | None = None

    def new_reply(self) -> pb.StepResponse:
        self.reply = pb.StreamResponse(request_id=self.rid, session_id=self.session.id)
        return self.reply.step

    def answer(self, result: pb.StepResponse | ServingError) -> None:
        if isinstance(result, ServingError):
            reply = pb.StreamResponse(request_id=self.rid, session_id=self.session.id)
            reply.error.CopyFrom(result.to_step_error())
            self.call.answer(reply, self.started, result.code.name)
            return
        built = self.reply
        if built is None:  # a cached reply (a retry), not one built for this chunk
            built = pb.StreamResponse(request_id=self.rid, session_id=self.session.id)
            built.step.CopyFrom(result)
        self.call.answer(built, self.started, None)


def _read_error(exc: BaseException) -> ServingError:
    """The status a Stream ends with when reading from it fails."""
    if isinstance(exc, DecodeError):
        return invalid(f"a Stream message is not a valid rnnserve.v1.StreamRequest: {exc}")
    return as_serving_error(exc, "Stream")


def _no_callback(result: pb.StepResponse | ServingError) -> None:
    raise AssertionError("a _StreamWork answers through its call")


class _StreamCall:
    """One Stream call's bookkeeping, shared by every chunk on it: its writer, how many chunks
    are unanswered and how many replies are not yet written (backpressure)."""

    __slots__ = (
        "limit",
        "metrics",
        "ok",
        "outstanding",
        "room",
        "sessions",
        "unsent",
        "writer",
    )

    def __init__(
        self,
        sessions: SessionManager,
        metrics: Metrics,
        limit: int,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        self.sessions = sessions
        self.metrics = metrics
        self.ok = metrics.request_child("Stream", "OK")
        self.writer = _Writer(context, self.sent)
        self.outstanding = 0
        #: Chunks received whose replies are not yet written, and the most the reader allows.
        self.unsent = 0
        self.limit = limit
        self.room: asyncio.Future[None] | None = None

    async def wait_for_room(self) -> None:
        """Return once fewer than ``limit`` chunks of this call are unsent (backpressure)."""
        while self.unsent >= self.limit and self.writer.error is None:
            self.room = asyncio.get_running_loop().create_future()
            try:
                await self.room
            finally:
                self.room = None

    def sent(self) -> None:
        """A reply was written; wake the reader if it waits for room."""
        self.unsent -= 1
        room = self.room
        if room is not None and not room.done() and self.unsent < self.limit:
            room.set_result(None)

    async def drain(self) -> None:
        """Return once every chunk received is answered and its reply written (or the call
        broke)."""
        while self.outstanding and self.writer.error is None:
            self.room = asyncio.get_running_loop().create_future()
            try:
                await self.room
            finally:
                self.room = None
        await self.writer.wait_idle()

    def accept(self, req: pb.StreamRequest) -> None:
        """Decode one message and queue its chunk; a bad one is answered in-band at once."""
        started = time.perf_counter()
        self.outstanding += 1
        self.unsent += 1
        step = req.step
        try:
            session = self.sessions.get(step.session_id)
            inputs = session.model.decode_chunk(step.inputs)
        except Exception as exc:
            err = as_serving_error(exc, "Stream")
            reply = pb.StreamResponse(
                request_id=req.request_id, session_id=step.session_id, error=err.to_step_error()
            )
            self.answer(reply, started, err.code.name)
            return
        session.model.batcher.submit(
            _StreamWork(self, req.request_id, started, session, step, inputs)
        )

    def answer(self, reply: pb.StreamResponse, started: float, code: str | None) -> None:
        """Send ``reply``; ``code`` None means OK."""
        if code is None:
            self.ok.observe(time.perf_counter() - started)
        else:
            self.metrics.observe_request("Stream", code, time.perf_counter() - started)
        self.outstanding -= 1
        self.writer.send(reply)
        if not self.outstanding:
            room = self.room  # drain() waits here for the last answer
            if room is not None and not room.done():
                room.set_result(None)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """rnnserve.v1.InferenceService over a repository and a session manager."""

    def __init__(
        self,
        repository: Repository,
        sessions: SessionManager,
        metrics: Metrics,
        max_stream_inflight: int = 1024,
    ) -> None:
        self.repository = repository
        self.sessions = sessions
        self.metrics = metrics
        self.max_stream_inflight = max_stream_inflight
        #: Stream handlers waiting on a read, which a shutdown interrupts.
        self._readers: set[asyncio.Task[Any]] = set()
        self._closing = False

    def begin_shutdown(self) -> None:
        """Stop reading from open streams; each ends with UNAVAILABLE once its in-flight chunks
        are answered."""
        self._closing = True
        for task in list(self._readers):
            task.cancel()

    @unary("ListModels")
    async def ListModels(
        self, request: pb.ListModelsRequest, context: Any
    ) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(
            models=[self.repository.info(m) for m in self.repository.all()]
        )

    @unary("GetModel")
    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.GetModelResponse:
        model = self.repository.resolve(request.model, request.version)
        return pb.GetModelResponse(model=self.repository.info(model))

    @unary("OpenSession")
    async def OpenSession(
        self, request: pb.OpenSessionRequest, context: Any
    ) -> pb.OpenSessionResponse:
        model = self.repository.resolve(request.model, request.version)
        state = model.decode_state(request.initial_state) if request.initial_state else None
        session = self.sessions.open(model, state)
        return pb.OpenSessionResponse(session=self.sessions.info(session))

    @unary("GetSession")
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Any
    ) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(
            session=self.sessions.info(self.sessions.get(request.session_id))
        )

    @unary("Step")
    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepResponse:
        session = self.sessions.get(request.session_id)
        inputs = session.model.decode_chunk(request.inputs)
        fut: asyncio.Future[pb.StepResponse | ServingError] = (
            asyncio.get_running_loop().create_future()
        )

        def done(result: pb.StepResponse | ServingError) -> None:
            if not fut.done():  # the caller may have gone away
                fut.set_result(result)

        session.model.batcher.submit(
            Work(session, request.seq, inputs, request.want_state, done, request.inputs)
        )
        result = await fut
        if isinstance(result, ServingError):
            raise result
        return result

    # A coroutine, not an async generator: grpc.aio's reader/writer form of a streaming
    # handler (the generated stub types only the generator form).
    async def Stream(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        """Read chunks as they come and hand each to its model's batcher; replies are written
        from the batch's callbacks by the call's writer, in the order they are answered. The
        handler's task only reads (read, accept, read the next), up to
        ``max_stream_inflight`` replies unwritten."""
        call = _StreamCall(self.sessions, self.metrics, self.max_stream_inflight, context)
        requests = request_iterator.__aiter__()
        handler = asyncio.current_task()
        accept = call.accept
        failed: BaseException | None = None  # why reading stopped, if not the end of input
        while not self._closing and call.writer.error is None:
            if handler is not None:
                self._readers.add(handler)
            try:
                req = await requests.__anext__()
            except StopAsyncIteration:
                break
            except asyncio.CancelledError:
                # begin_shutdown interrupts the read; the chunks in flight are still answered.
                if not self._closing or handler is None:
                    raise
                if sys.version_info >= (3, 11):
                    handler.uncancel()  # this cancel is handled; nothing else was asked
                break
            except Exception as exc:  # a message that does not decode, a broken call
                failed = exc
                break
            finally:
                if handler is not None:
                    self._readers.discard(handler)
            accept(req)
            if call.unsent >= call.limit:
                await call.wait_for_room()
        await call.drain()
        if self._closing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is shutting down; reconnect and resume each session from its next_seq",
            )
        if failed is not None:
            err = _read_error(failed)
            await context.abort(err.code, err.message)

    @unary("CloseSession")
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: Any
    ) -> pb.CloseSessionResponse:
        self.sessions.end(self.sessions.get(request.session_id), CLOSED)
        return pb.CloseSessionResponse()

    @unary("ResetSession")
    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: Any
    ) -> pb.ResetSessionResponse:
        session = self.sessions.get(request.session_id)
        await session.model.batcher.wait_idle(session)
        session = self.sessions.get(request.session_id)
        session.model.pool.zero(session.slot)
        return pb.ResetSessionResponse(session=self.sessions.info(session))

    @unary("ForkSession")
    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Any
    ) -> pb.ForkSessionResponse:
        session = self.sessions.get(request.session_id)
        await session.model.batcher.wait_idle(session)
        child = self.sessions.fork(self.sessions.get(request.session_id))
        return pb.ForkSessionResponse(session=self.sessions.info(child))

    @unary("GetState")
    async def GetState(self, request: pb.GetStateRequest, context: Any) -> pb.GetStateResponse:
        session = self.sessions.get(request.session_id)
        await session.model.batcher.wait_idle(session)
        session = self.sessions.get(request.session_id)
        m = session.model.manifest
        snap = pb.SessionSnapshot(
            model=m.name,
            version=m.version,
            state=to_tensor_map(session.model.pool.read(session.slot)),
            next_seq=session.next_seq,
        )
        if session.last_reply is not None:
            snap.last_seq = session.last_reply.seq
            snap.last_outputs.CopyFrom(session.last_reply.outputs)
            snap.last_inputs_digest = session.last_digest
        return pb.GetStateResponse(snapshot=snap)

    @unary("PutState")
    async def PutState(self, request: pb.PutStateRequest, context: Any) -> pb.PutStateResponse:
        snap = request.snapshot
        sid = request.session_id
        if sid and not SESSION_ID.fullmatch(sid):
            raise invalid(
                "session_id must be a server-generated id (URL-safe, 22 to 128 characters); "
                "leave it empty to get a new one"
            )
        if not snap.model:
            raise invalid("snapshot.model is empty; send a snapshot taken with GetState")
        model = self.repository.resolve(snap.model, snap.version)
        state = model.decode_state(snap.state)
        last_reply = None
        if snap.HasField("last_outputs"):
            try:
                outputs = from_tensor(snap.last_outputs)
            except TensorError as exc:
                raise invalid(f"snapshot.last_outputs: {exc}") from None
            if snap.last_seq + (outputs.shape[0] if outputs.ndim else 0) != snap.next_seq:
                raise invalid(
                    f"snapshot.last_outputs covers seq {snap.last_seq} to "
                    f"{snap.last_seq + (outputs.shape[0] if outputs.ndim else 0)}, "
                    f"but next_seq is {snap.next_seq}"
                )
            last_reply = pb.StepResponse(seq=snap.last_seq, next_seq=snap.next_seq)
            last_reply.outputs.CopyFrom(snap.last_outputs)
        existing = self.sessions.peek(sid) if sid else None
        if existing is not None:
            await existing.model.batcher.wait_idle(existing)
            if existing.ended is None:
                self.sessions.end(existing, CLOSED)
        session = self.sessions.open(model, state, sid or None)
        session.next_seq = snap.next_seq
        if last_reply is not None:
            last_reply.session_id = session.id
            session.last_reply = last_reply
            session.last_digest = snap.last_inputs_digest
        return pb.PutStateResponse(session=self.sessions.info(session))
