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
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message
from rnnserve.server import codec, snapshots
from rnnserve.server.auth import current_principal
from rnnserve.server.errors import ServingError, as_serving_error, invalid, quoted, unavailable
from rnnserve.server.limits import OpenRate
from rnnserve.server.metrics import Metrics
from rnnserve.server.repository import Repository
from rnnserve.server.session_ids import ISSUED_ID, route_key
from rnnserve.server.sessions import CLOSED, REPLACED, Session, SessionManager, check_seq_room
from rnnserve.server.stream import Streams
from rnnserve.server.work import Rows, States, Work
from rnnserve.v1 import rnnserve_pb2 as pb

if TYPE_CHECKING:
    from rnnserve.server.durable import Durability

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
        if method.client_streaming:  # Stream, served by stream.py
            behaviour = servicer.streams.serve
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                behaviour, request.FromString, response.SerializeToString
            )
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                getattr(servicer, method.name), _tolerant(request), response.SerializeToString
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


def _draining() -> ServingError:
    return unavailable("this replica is draining; retry (the session continues on another replica)")


class _StepWaiter:
    """The sink of a unary Step's chunk: its answer, for the handler to await."""

    __slots__ = ("future",)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[pb.StepResponse | ServingError] = loop.create_future()

    def step_done(self, work: Work, outputs: Rows, state: States | None) -> None:
        if not self.future.done():  # the caller may have gone away
            reply = codec.step_response(
                pb.StepResponse(), work.session.id, work.seq, outputs, state
            )
            self.future.set_result(reply)

    def step_failed(self, work: Work, err: ServingError) -> None:
        if not self.future.done():
            self.future.set_result(err)


class InferenceServicer:
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
        max_frame: int = 4096,
    ) -> None:
        self.repository = repository
        #: Each principal's budget of opens, forks and restores per second.
        self.open_rate = open_rate or OpenRate(0)
        #: The deployment's snapshot key: GetState signs, PutState verifies (empty: off).
        self.snapshot_key = snapshot_key
        self.sessions = sessions
        self.metrics = metrics
        #: The durable store's side, when the server has a store (see durable.py).
        self.durable = durable
        self._draining = False
        self.streams = Streams(
            self.local, self.local_many, self.lookup, metrics, max_stream_inflight, max_frame
        )

    def begin_drain(self) -> None:
        """From now on every call about a session is answered UNAVAILABLE (the client retries,
        and the proxy sends it to a replica that takes the session over from the store)."""
        self._draining = True

    def local(self, sid: str) -> Session | None:
        """Session ``sid`` when it is here and may be used at once; None when the store must be
        asked first (it is not here but may be in the store, or its ownership is suspect).
        NOT_FOUND saying why it does not exist; UNAVAILABLE while draining."""
        if self._draining:
            raise _draining()
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

    def local_many(self, sids: list[str]) -> list[Session | BaseException | None]:
        """``local`` of each id of a frame: the session, None when the store must be asked
        first, or the error that says why it cannot be used."""
        if self._draining:
            return [_draining() for _ in sids]
        got_many = self.sessions.get_many(sids, current_principal())
        if self.durable is None:  # no store to ask, no ownership to doubt: get's answers
            return list(got_many)
        found: list[Session | BaseException | None] = []
        for sid, got in zip(sids, got_many, strict=True):
            if isinstance(got, ServingError):
                try:
                    found.append(self.local(sid))  # the store may hold it; or why it is missing
                except ServingError:
                    found.append(got)
            else:
                found.append(None if got.suspect else got)
        return found

    async def lookup(self, sid: str) -> Session:
        """Session ``sid``, loaded from the store when it is not here (see ``local``)."""
        session = self.local(sid)
        if session is not None:
            return session
        assert self.durable is not None
        held = self.sessions.peek(sid)
        if held is not None:  # here, but suspect
            return await self.durable.verify(held)
        principal = current_principal()
        taken = await self.durable.take_over(sid, principal)  # another principal's: NOT_FOUND
        if taken is not None and taken.principal != principal:  # and again, in memory
            raise self.sessions.foreign(sid)
        return taken if taken is not None else self.sessions.get(sid)  # NOT_FOUND: why

    def begin_shutdown(self) -> None:
        """Stop reading from open streams; each ends with UNAVAILABLE once its in-flight chunks
        are answered."""
        self.streams.begin_shutdown()

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
        state = codec.decode_state(model, request.initial_state) if request.initial_state else None
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
        inputs = codec.decode_chunk(session.model, request.inputs)
        check_seq_room(request.seq, inputs.shape[0])
        waiter = _StepWaiter(asyncio.get_running_loop())
        session.model.batcher.submit(
            Work(session, request.seq, inputs, request.want_state, waiter, request.inputs)
        )
        result = await waiter.future
        if isinstance(result, ServingError):
            raise result
        return result

    def _refuse_while_draining(self) -> None:
        if self._draining:
            raise unavailable("this replica is draining; retry (another replica will serve)")

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
            existing = await self.durable.take_over(sid, principal)
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
        session = await self.lookup(request.session_id)
        self.sessions.end(session, CLOSED)
        if self.durable is not None:
            await self.durable.checkpoints.written(session.id)
        return pb.CloseSessionResponse()

    @unary("ResetSession")
    async def ResetSession(
        self, request: pb.ResetSessionRequest, context: Any
    ) -> pb.ResetSessionResponse:
        session = await self._settled(request.session_id)
        session.model.pool.zero(session.slot)
        session.state_replaced()
        if self.durable is not None:
            await self.durable.checkpoints.written(session.id)
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
        if self.durable is not None:
            await self.durable.checkpoints.written(session.id)
        return pb.PutStateResponse(session=self.sessions.info(session))
