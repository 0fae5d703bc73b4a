"""The gRPC adapter: proto in, domain calls, proto out. A few lines per RPC.

Unary calls raise ``ServingError`` and one decorator turns it into the call's status (seq
errors add trailing metadata ``rnnserve-next-seq``). On ``Stream`` an error about one message
goes back in-band as a ``StepError`` and the stream goes on; only a broken stream or a shutdown
ends it with a status.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError, Message
from rnnserve.server import snapshots
from rnnserve.server.auth import current_principal
from rnnserve.server.batcher import Work
from rnnserve.server.durable import Durability
from rnnserve.server.errors import ServingError, as_serving_error, invalid, quoted, unavailable
from rnnserve.server.limits import OpenRate
from rnnserve.server.lockstep import next_message
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import (
    CLOSED,
    ISSUED_ID,
    REPLACED,
    Session,
    SessionManager,
    check_seq_room,
    route_key,
)
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]


class BadRequest:
    """What a unary request becomes when its bytes do not decode: the handler answers
    INVALID_ARGUMENT, where gRPC itself would answer UNKNOWN and log a traceback per call."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _tolerant(kind: type[Message]) -> Callable[[bytes], Message | BadRequest]:
    def deserialize(data: bytes) -> Message | BadRequest:
        try:
            return kind.FromString(data)
        except DecodeError as exc:
            return BadRequest(f"the request is not a valid {kind.DESCRIPTOR.full_name}: {exc}")

    return deserialize


def add_to_server(servicer: InferenceServicer, server: grpc.aio.Server) -> None:
    """Register ``servicer`` as rnnserve.v1.InferenceService: the generated registration, except
    that a unary request that does not decode reaches the handler as a ``BadRequest`` (a
    Stream message that does not decode ends the call in Stream itself)."""
    service = pb.DESCRIPTOR.services_by_name["InferenceService"]
    handlers = {}
    for method in service.methods:
        request = getattr(pb, method.input_type.name)
        response = getattr(pb, method.output_type.name)
        behaviour = getattr(servicer, method.name)
        if method.client_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, request.FromString, response.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                behaviour, _tolerant(request), response.SerializeToString
            )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


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
                if isinstance(request, BadRequest):
                    raise invalid(request.message)
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


class _Replies:
    """The replies a Stream call has ready to send, and a wake-up for its writer. Lighter than
    an asyncio.Queue on the per-message path."""

    __slots__ = ("ended", "items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: list[pb.StreamResponse | None] = []
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.loop = loop

    def put(self, reply: pb.StreamResponse | None, last: bool = False) -> None:
        self.items.append(reply)
        self.ended = self.ended or last
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[pb.StreamResponse | None]:
        """Everything ready, waiting until there is something."""
        while not self.items and not self.ended:
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        items, self.items = self.items, []
        return items


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
    """One Stream call's bookkeeping, shared by every chunk on it: the replies ready to send
    and how many chunks are still unanswered."""

    __slots__ = (
        "later",
        "limit",
        "metrics",
        "ok",
        "outstanding",
        "reading",
        "replies",
        "room",
        "servicer",
        "unsent",
    )

    def __init__(
        self,
        servicer: InferenceServicer,
        limit: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.servicer = servicer
        self.metrics = metrics = servicer.metrics
        #: Chunks waiting for their session to be loaded from the store.
        self.later: set[asyncio.Task[None]] = set()
        self.ok = metrics.request_child("Stream", "OK")
        self.replies = _Replies(loop)
        self.outstanding = 0
        self.reading = True
        #: Chunks received and not yet handed back to gRPC, and the most the reader allows.
        self.unsent = 0
        self.limit = limit
        self.room: asyncio.Future[None] | None = None

    async def wait_for_room(self) -> None:
        """Return once fewer than ``limit`` chunks of this call are unsent (backpressure)."""
        while self.unsent >= self.limit:
            self.room = self.replies.loop.create_future()
            await self.room
            self.room = None

    def sent(self, count: int) -> None:
        """``count`` replies went to gRPC; wake the reader if it waits for room."""
        self.unsent -= count
        room = self.room
        if room is not None and not room.done() and self.unsent < self.limit:
            room.set_result(None)

    def accept(self, req: pb.StreamRequest) -> None:
        """Decode one message and queue its chunk; a bad one is answered in-band at once. A
        chunk whose session must first come from the store waits for it in a task."""
        started = time.perf_counter()
        self.outstanding += 1
        self.unsent += 1
        try:
            session = self.servicer.local(req.step.session_id)
            if session is None:
                task = self.replies.loop.create_task(self._accept_later(req, started))
                self.later.add(task)
                task.add_done_callback(self.later.discard)
                return
            self._submit(req, session, started)
        except Exception as exc:
            self._refuse(req, started, exc)

    async def _accept_later(self, req: pb.StreamRequest, started: float) -> None:
        try:
            session = await self.servicer.lookup(req.step.session_id)
            self._submit(req, session, started)
        except Exception as exc:
            self._refuse(req, started, exc)

    def _submit(self, req: pb.StreamRequest, session: Session, started: float) -> None:
        step = req.step
        inputs = session.model.decode_chunk(step.inputs)
        check_seq_room(step.seq, inputs.shape[0])
        session.model.batcher.submit(
            _StreamWork(self, req.request_id, started, session, step, inputs)
        )

    def _refuse(self, req: pb.StreamRequest, started: float, exc: Exception) -> None:
        err = as_serving_error(exc, "Stream")
        reply = pb.StreamResponse(
            request_id=req.request_id, session_id=req.step.session_id, error=err.to_step_error()
        )
        self.answer(reply, started, err.code.name)

    def answer(self, reply: pb.StreamResponse, started: float, code: str | None) -> None:
        """Queue ``reply``; ``code`` None means OK."""
        if code is None:
            self.ok.observe(time.perf_counter() - started)
        else:
            self.metrics.observe_request("Stream", code, time.perf_counter() - started)
        self.outstanding -= 1
        self.replies.put(reply, last=not self.reading and self.outstanding == 0)

    def end_of_input(self) -> None:
        self.reading = False
        if self.outstanding == 0:
            self.replies.put(None, last=True)


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    """rnnserve.v1.InferenceService over a repository and a session manager."""

    def __init__(
        self,
        repository: Repository,
        sessions: SessionManager,
        metrics: Metrics,
        max_stream_inflight: int = 1024,
        durable: Durability | None = None,
        open_rate: OpenRate | None = None,
        snapshot_key: bytes = b"",
    ) -> None:
        self.repository = repository
        #: Each principal's budget of opens, forks and restores per second.
        self.open_rate = open_rate or OpenRate(0)
        #: The deployment's snapshot key: GetState signs, PutState verifies (empty: off).
        self.snapshot_key = snapshot_key
        self.sessions = sessions
        self.metrics = metrics
        self.max_stream_inflight = max_stream_inflight
        #: The durable store's side, when the server has a store (see durable.py).
        self.durable = durable
        self._draining = False
        self._readers: set[asyncio.Task[None]] = set()
        #: Stream handlers waiting on a lockstep read, which a shutdown interrupts.
        self._lockstep: set[asyncio.Task[Any]] = set()
        self._closing = False

    def begin_drain(self) -> None:
        """From now on every call about a session is answered UNAVAILABLE (the client retries,
        and the proxy sends it to a replica that takes the session over from the store)."""
        self._draining = True

    def local(self, sid: str) -> Session | None:
        """Session ``sid`` when it is here and may be used at once; None when the store must be
        asked first (it is not here but may be in the store, or its ownership is suspect).
        NOT_FOUND saying why it does not exist; UNAVAILABLE while draining."""
        if self._draining:
            raise unavailable(
                "this replica is draining; retry (the session continues on another replica)"
            )
        try:
            session = self.sessions.get(sid, current_principal())
        except ServingError:
            if (
                self.durable is not None
                and self.sessions.peek(sid) is None  # not another principal's, here
                and self.durable.may_hold(sid)
            ):
                return None
            raise
        return None if session.suspect else session

    async def lookup(self, sid: str) -> Session:
        """Session ``sid``, loaded from the store when it is not here (see ``local``)."""
        session = self.local(sid)
        if session is not None:
            return session
        assert self.durable is not None
        held = self.sessions.peek(sid)
        if held is not None:  # here, but suspect
            return await self.durable.verify(held)
        taken = await self.durable.take_over(sid)
        if taken is not None and taken.principal != current_principal():
            raise self.sessions.foreign(sid)
        return taken if taken is not None else self.sessions.get(sid)  # NOT_FOUND: why

    def begin_shutdown(self) -> None:
        """Stop reading from open streams; each ends with UNAVAILABLE once its in-flight chunks
        are answered."""
        self._closing = True
        for task in [*self._readers, *self._lockstep]:
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
        self._refuse_while_draining()
        model = self.repository.resolve(request.model, request.version)
        state = model.decode_state(request.initial_state) if request.initial_state else None
        principal = current_principal()
        self.open_rate.take(principal)
        session = self.sessions.open(
            model, state, route=route_key(context.invocation_metadata()), principal=principal
        )
        return pb.OpenSessionResponse(session=self.sessions.info(session))

    @unary("GetSession")
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Any
    ) -> pb.GetSessionResponse:
        return pb.GetSessionResponse(
            session=self.sessions.info(await self.lookup(request.session_id))
        )

    @unary("Step")
    async def Step(self, request: pb.StepRequest, context: Any) -> pb.StepResponse:
        sid = request.session_id
        session = self.local(sid) or await self.lookup(sid)
        inputs = session.model.decode_chunk(request.inputs)
        check_seq_room(request.seq, inputs.shape[0])
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

    async def Stream(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamResponse]:
        """Two ways to serve a stream, picked by what it carries.

        Lockstep, while the stream names one session (what the SDK's Session does): read a
        chunk, run it, send its reply, read the next. One task and no hand-offs, the shape of
        the echo floor; a chunk still joins a batch with other streams' chunks of its loop
        tick. The session has at most one chunk in a batch anyway, so a client that sends its
        next chunk early loses no batching: it waits in gRPC's buffers.

        Read-ahead, from the first message naming a second session (a multiplexer): a reader
        task takes messages as they come, up to ``max_stream_inflight`` unsent, so a chunk
        waiting in a batch does not hold up the next message, and this generator sends replies
        as they are ready. (gRPC hands a stream's messages over one per loop tick, so on its
        own one stream's chunks mostly run one by one: docs/server.md, Batcher.)
        """
        loop = asyncio.get_running_loop()
        call = _StreamCall(self, self.max_stream_inflight, loop)
        requests = request_iterator.__aiter__()
        replies = call.replies
        handler = asyncio.current_task()
        reader: asyncio.Task[None] | None = None
        sole = None  # the one session the stream has named so far
        failed: BaseException | None = None  # why reading stopped, if not the end of input
        try:
            while not self._closing:
                req, failed = await next_message(
                    requests, handler, self._lockstep, lambda: self._closing
                )
                if req is None:
                    break
                sid = req.step.session_id
                if sole is None:
                    sole = sid
                call.accept(req)
                if sid != sole:
                    reader = loop.create_task(self._read_ahead(call, requests))
                    self._readers.add(reader)
                    break
                while call.outstanding or replies.items:
                    ready = replies.items
                    if ready:  # answered already (an eager run): no wait, no coroutine
                        replies.items = []
                    else:
                        ready = await replies.take()
                    for reply in ready:
                        if reply is not None:
                            yield reply
                            call.sent(1)
            if reader is None:
                call.end_of_input()
            while True:
                batch = await replies.take()
                for reply in batch:
                    if reply is not None:
                        yield reply
                        call.sent(1)
                if replies.ended and not replies.items:
                    break
        finally:
            if reader is not None:
                reader.cancel()
                self._readers.discard(reader)
        if self._closing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is shutting down; reconnect and resume each session from its next_seq",
            )
        if reader is not None and not reader.cancelled():
            failed = reader.exception()
        if failed is not None:
            err = _read_error(failed)
            await context.abort(err.code, err.message)

    def _refuse_while_draining(self) -> None:
        if self._draining:
            raise unavailable("this replica is draining; retry (another replica will serve)")

    async def _read_ahead(
        self, call: _StreamCall, requests: AsyncIterator[pb.StreamRequest]
    ) -> None:
        """A multiplexed Stream's reader: accept messages as they come, with backpressure."""
        accept = call.accept
        try:
            async for req in requests:
                accept(req)
                if call.unsent >= call.limit:
                    await call.wait_for_room()
        finally:
            call.end_of_input()

    async def _settled(self, sid: str) -> Session:
        """The open session ``sid`` once none of its chunks is in an engine run; NOT_FOUND
        when it does not exist or ended while waiting."""
        session = await self.lookup(sid)
        await session.model.batcher.wait_idle(session)
        return await self.lookup(sid)

    async def _may_restore_into(
        self, sid: str, principal: str, restored: snapshots.Restored
    ) -> None:
        """NOT_FOUND when session ``sid`` is another principal's (here or in the store), as
        for an unknown id; FAILED_PRECONDITION when it runs another model than the snapshot."""
        existing = self.sessions.peek(sid)
        if existing is None and self.durable is not None and self.durable.may_hold(sid):
            existing = await self.durable.take_over(sid)
        if existing is None or existing.ended is not None:
            return
        if existing.principal != principal:
            raise self.sessions.foreign(sid)
        have, want = existing.model.manifest.name, restored.model.manifest.name
        if have != want:
            raise ServingError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"session {quoted(sid)} runs model {quoted(have)}, the snapshot is of "
                f"{quoted(want)}; restore it into a new session (leave session_id empty)",
            )

    @unary("CloseSession")
    async def CloseSession(
        self, request: pb.CloseSessionRequest, context: Any
    ) -> pb.CloseSessionResponse:
        self.sessions.end(await self.lookup(request.session_id), CLOSED)
        return pb.CloseSessionResponse()

    @unary("ResetSession")
    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: Any
    ) -> pb.ResetSessionResponse:
        session = await self._settled(request.session_id)
        session.model.pool.zero(session.slot)
        return pb.ResetSessionResponse(session=self.sessions.info(session))

    @unary("ForkSession")
    async def ForkSession(
        self, request: pb.ForkSessionRequest, context: Any
    ) -> pb.ForkSessionResponse:
        source = await self._settled(request.session_id)
        self.open_rate.take(source.principal)
        child = self.sessions.fork(source)
        return pb.ForkSessionResponse(session=self.sessions.info(child))

    @unary("GetState")
    async def GetState(self, request: pb.GetStateRequest, context: Any) -> pb.GetStateResponse:
        session = await self._settled(request.session_id)
        snap = snapshots.take(session)
        if self.snapshot_key:
            snapshots.sign(snap, self.snapshot_key, session.principal)
        return pb.GetStateResponse(snapshot=snap)

    @unary("PutState")
    async def PutState(self, request: pb.PutStateRequest, context: Any) -> pb.PutStateResponse:
        sid = request.session_id
        if sid and not ISSUED_ID.fullmatch(sid):
            raise invalid(
                "session_id must be a server-generated id (<route key>.<22 URL-safe "
                "characters>, as OpenSession returns); leave it empty to get a new one"
            )
        self._refuse_while_draining()
        principal = current_principal()
        if self.snapshot_key:
            snapshots.verify(request.snapshot, self.snapshot_key, principal)
        restored = snapshots.check(request.snapshot, self.repository)
        if sid:
            await self._may_restore_into(sid, principal, restored)
        self.open_rate.take(principal)
        route = "" if sid else route_key(context.invocation_metadata())
        # Restoring over an id owns it from now on, wherever it was (a new id starts at 1).
        epoch = await self.durable.seize(sid) if sid and self.durable is not None else 1
        existing = self.sessions.peek(sid) if sid else None
        if existing is not None:
            await existing.model.batcher.wait_idle(existing)
            if existing.ended is None:
                self.sessions.end(existing, REPLACED)
        session = self.sessions.open(
            restored.model, restored.state, sid or None, route, epoch, principal
        )
        snapshots.resume(session, restored)
        return pb.PutStateResponse(session=self.sessions.info(session))
