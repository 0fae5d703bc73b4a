"""The Open Inference Protocol (KServe v2) gRPC service with Triton's sequence extension, on
the same server, sessions, batcher and metrics as rnnserve.v1.

A ModelInferRequest is one chunk of a sequence (see oip_sequences): it is decoded (oip_codec),
checked by the model like an rnnserve.v1 chunk, and submitted to the model version's batcher as
a ``Work``, so OIP steps batch with rnnserve.v1 steps. ModelInfer awaits its reply;
ModelStreamInfer reads requests as they come, each answered when its chunk is applied, and an
error about one request goes back in-band (``error_message``) while the stream goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from inference import grpc_service_pb2 as oip
from inference import grpc_service_pb2_grpc as oip_grpc
from rnnserve.server import codec
from rnnserve.server.errors import ServingError, as_serving_error, invalid, unavailable
from rnnserve.server.limits import OpenRate
from rnnserve.server.metrics import Metrics
from rnnserve.server.oip_codec import (
    Decoded,
    build_response,
    decode_request,
    model_metadata,
    raw_inputs,
    sequence_of,
)
from rnnserve.server.oip_sequences import Caller, Key, OipSequence, SequenceTable, caller_of
from rnnserve.server.oip_stream import OipStreams
from rnnserve.server.repository import Repository
from rnnserve.server.sessions import SessionManager
from rnnserve.server.work import Rows, States, Work

if TYPE_CHECKING:  # redis is imported only when the server has a store
    from rnnserve.server.durable import Durability

#: The metrics' ``protocol`` label of this service's calls.
PROTOCOL = "oip"
SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
#: The method path of ModelStreamInfer (principal_max_streams counts its calls).
OIP_STREAM_METHOD = f"/{SERVICE_NAME}/ModelStreamInfer"

Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[[Any, Req, grpc.aio.ServicerContext[Any, Any]], Awaitable[Resp]]
#: Why a stopping server answers a request UNAVAILABLE.
DRAINED = (
    "server is shutting down; send the request to another replica (a principal's sequences "
    "continue there when the servers share a session store)"
)
#: Called once with a request's response or its error.
Answer = Callable[[oip.ModelInferResponse | ServingError], None]


def unary(method: str) -> Callable[[Handler[Req, Resp]], Handler[Req, Resp]]:
    """ServingError (and, logged, anything else) becomes the call's status; the call's
    duration and code go to the request histogram with protocol="oip"."""

    def wrap(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
        @functools.wraps(fn)
        async def handler(
            self: OipServicer, request: Req, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Resp:
            started = time.perf_counter()
            try:
                reply = await fn(self, request, context)
            except Exception as exc:  # the one place unary errors meet the wire
                err = as_serving_error(exc, method)
            else:
                self.metrics.observe_request(method, "OK", time.perf_counter() - started, PROTOCOL)
                return reply
            elapsed = time.perf_counter() - started
            self.metrics.observe_request(method, err.code.name, elapsed, PROTOCOL)
            await context.abort(err.code, err.message)
            raise AssertionError("unreachable: abort raises")

        return handler

    return wrap


class _OipWork(Work):
    """A chunk from an OIP request: it answers with a ModelInferResponse, then any error
    replies of its sequence that arrived while it was in flight."""

    __slots__ = ("decoded", "followers", "out", "reply_to", "request", "sequence", "table")

    def __init__(
        self,
        table: SequenceTable,
        seq: OipSequence,
        at: int,
        request: oip.ModelInferRequest,
        decoded: Decoded,
        chunk: Any,
        reply_to: Answer,
        started: float,
        out: oip.ModelInferResponse | None,
    ) -> None:
        super().__init__(
            seq.session, at, chunk, bool(decoded.states), self, decoded.inputs, started
        )
        self.table = table
        #: Its OIP sequence (``seq``, from Work, is the chunk's step number in the session).
        self.sequence = seq
        self.request = request
        self.decoded = decoded
        self.reply_to = reply_to
        #: The message to build the response into (a stream's reply holds it), or None.
        self.out = out
        self.followers: list[Callable[[], None]] = []

    def step_done(self, work: Work, outputs: Rows, state: States | None) -> None:
        self.table.answered(self.sequence, False)
        model = self.session.model
        self.reply_to(build_response(model, self.request, self.decoded, outputs, state, self.out))
        self._follow()

    def step_failed(self, work: Work, err: ServingError) -> None:
        self.table.answered(self.sequence, True)
        if err.next_seq is not None:  # a chunk before it failed; this one never ran
            err = invalid(
                "an earlier request of this sequence failed, so this one was not applied; "
                "send it again"
            )
        self.reply_to(err)
        self._follow()

    def _follow(self) -> None:
        for follow in self.followers:
            follow()


class OipServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over rnnserve's repository and sessions."""

    def __init__(
        self,
        repository: Repository,
        sessions: SessionManager,
        metrics: Metrics,
        max_stream_inflight: int = 1024,
        open_rate: OpenRate | None = None,
        durable: Durability | None = None,
    ) -> None:
        self.repository = repository
        #: Each principal's rate of new sessions, shared with rnnserve.v1's OpenSession.
        self.open_rate = open_rate or OpenRate(0)
        self.metrics = metrics
        self.table = SequenceTable(sessions, durable)
        #: The store lookups in progress (see ``_settle``), held so they are not collected.
        self._lookups: set[asyncio.Task[None]] = set()
        self.streams = OipStreams(self, metrics, max_stream_inflight)
        self._closing = False
        #: While a drain hands the sequences over: the answers owed to the requests that came
        #: meanwhile (see ``begin_drain``).
        self._parked: list[Callable[[], None]] | None = None
        try:
            self.version = metadata.version("rnnserve")
        except metadata.PackageNotFoundError:  # run from a source tree without installing
            self.version = "unknown"

    def begin_drain(self) -> None:
        """A drain is about to hand the sequences over: hold the requests that come from now
        on, and answer them UNAVAILABLE once it has (``end_drain``), so that a proxy's retry
        of them finds their sequences handed over on the replica it picks."""
        if self._parked is None:
            self._parked = []

    def end_drain(self) -> None:
        """The drain is over: refuse from now on, and answer the requests held meanwhile."""
        self._closing = True
        parked, self._parked = self._parked or [], None
        for answer in parked:
            answer()

    def begin_shutdown(self) -> None:
        """Not ready any more; open streams stop reading and end with UNAVAILABLE once their
        requests in flight are answered."""
        self._closing = True
        self.streams.begin_shutdown()

    @unary("ServerLive")
    async def ServerLive(self, request: oip.ServerLiveRequest, context: Any) -> Any:
        return oip.ServerLiveResponse(live=True)

    def ready(self) -> bool:
        """Serving and holding a model."""
        return not self._closing and bool(self.repository.all())

    def server_metadata(self) -> oip.ServerMetadataResponse:
        return oip.ServerMetadataResponse(
            name="rnnserve", version=self.version, extensions=["sequence", "parameters"]
        )

    def model_ready(self, name: str, version: str) -> bool:
        try:
            self.repository.resolve(name, version)
        except ServingError:
            return False
        return not self._closing

    def model_metadata(self, name: str, version: str) -> oip.ModelMetadataResponse:
        """The metadata of a model version; NOT_FOUND naming what is served."""
        model = self.repository.resolve(name, version)
        return model_metadata(model, self.repository.versions(model.manifest.name))

    @unary("ServerReady")
    async def ServerReady(self, request: oip.ServerReadyRequest, context: Any) -> Any:
        return oip.ServerReadyResponse(ready=self.ready())

    @unary("ServerMetadata")
    async def ServerMetadata(self, request: oip.ServerMetadataRequest, context: Any) -> Any:
        return self.server_metadata()

    @unary("ModelReady")
    async def ModelReady(self, request: oip.ModelReadyRequest, context: Any) -> Any:
        return oip.ModelReadyResponse(ready=self.model_ready(request.name, request.version))

    @unary("ModelMetadata")
    async def ModelMetadata(self, request: oip.ModelMetadataRequest, context: Any) -> Any:
        return self.model_metadata(request.name, request.version)

    @unary("RepositoryIndex")
    async def RepositoryIndex(self, request: oip.RepositoryIndexRequest, context: Any) -> Any:
        reply = oip.RepositoryIndexResponse()
        for model in self.repository.all():
            m = model.manifest
            reply.models.add(name=m.name, version=m.version, state="READY")
        return reply

    @unary("ModelInfer")
    async def ModelInfer(self, request: oip.ModelInferRequest, context: Any) -> Any:
        fut: asyncio.Future[oip.ModelInferResponse | ServingError] = (
            asyncio.get_running_loop().create_future()
        )

        def done(result: oip.ModelInferResponse | ServingError) -> None:
            if not fut.done():  # the caller may have gone away
                fut.set_result(result)

        self.accept(request, caller_of(context), done, time.perf_counter())
        result = await fut
        if isinstance(result, ServingError):
            raise result
        return result

    def accept(
        self,
        request: oip.ModelInferRequest,
        caller: Caller,
        answer: Answer,
        started: float,
        out: oip.ModelInferResponse | None = None,
        settled: bool = False,
    ) -> None:
        """Check one request and submit its chunk; ``answer`` gets its response (built into
        ``out`` when given) or error, possibly before this returns. Raises ServingError for a
        request that cannot run. A request whose sequence must first be looked up in the store
        waits for it (``_settle``), behind any other request of its sequence that waits."""
        if self._closing:
            raise unavailable(DRAINED)
        if self._parked is not None:
            self._parked.append(lambda: self.reject(request, caller, unavailable(DRAINED), answer))
            return
        sequence = sequence_of(request)
        name = request.model_name
        if sequence is None:
            self.repository.resolve(name, request.model_version)  # an unknown model first
            raise invalid(
                f"inference request to model '{name}' must specify a non-zero or non-empty "
                "correlation ID (the sequence_id parameter): rnnserve's models are stateful"
            )
        key: Key = (caller.scope, name, sequence.id)
        waiting = self.table.waiting.get(key)
        if not settled and (
            waiting is not None or (not sequence.start and self.table.needs_store(key))
        ):
            self._settle(key, sequence.start, request, caller, answer, started, out)
            return
        if sequence.start:
            model = self.repository.resolve(name, request.model_version)
        else:
            try:
                seq = self.table.find(key)
            except ServingError:
                self.repository.resolve(name, request.model_version)  # an unknown model first
                raise
            model = seq.session.model
            if request.model_version and request.model_version != model.manifest.version:
                raise invalid(
                    f"sequence {sequence.id} runs on version {model.manifest.version} of "
                    f"model '{name}', not {request.model_version}"
                )
        raws = raw_inputs(request)
        decoded = decode_request(model, request, raws[0] if raws else None)
        chunk = codec.decode_chunk(model, decoded.inputs)
        if sequence.start:
            self.open_rate.take(caller.principal)
            seq = self.table.start(key, model, caller.principal, caller.route)
        at = self.table.submitted(seq, int(chunk.shape[0]))
        work = _OipWork(self.table, seq, at, request, decoded, chunk, answer, started, out)
        seq.last = work
        if sequence.end:
            self.table.finish(key, seq)
        model.batcher.submit(work)

    def _settle(
        self,
        key: Key,
        start: bool,
        request: oip.ModelInferRequest,
        caller: Caller,
        answer: Answer,
        started: float,
        out: oip.ModelInferResponse | None,
    ) -> None:
        """Run the request once its sequence is settled with the store (SequenceTable.adopt),
        after the requests of its sequence that wait already; one lookup per sequence."""

        def run() -> None:
            try:
                self.accept(request, caller, answer, started, out, settled=True)
            except Exception as exc:
                self.reject(request, caller, as_serving_error(exc, "ModelInfer"), answer)

        def fail(err: ServingError) -> None:
            self.reject(request, caller, err, answer)

        waiting = self.table.waiting.get(key)
        if waiting is not None:
            waiting.append((start, run, fail))
            return
        self.table.waiting[key] = [(start, run, fail)]
        task = asyncio.get_running_loop().create_task(self._lookup(key))
        self._lookups.add(task)
        task.add_done_callback(self._lookups.discard)

    async def _lookup(self, key: Key) -> None:
        """Settle ``key`` with the store, then run the requests that waited for it; when that
        failed, the ones before the first START get the error instead."""
        err: ServingError | None = None
        try:
            await self.table.adopt(key)
        except Exception as exc:
            err = as_serving_error(exc, "ModelInfer")
        for start, run, fail in self.table.waiting.pop(key):
            if err is not None and not start:
                fail(err)
            else:
                err = None
                run()

    def reject(
        self, request: oip.ModelInferRequest, caller: Caller, err: ServingError, answer: Answer
    ) -> None:
        """Answer a request that cannot run: after the replies of its sequence already in
        flight, so a stream's replies keep each sequence's order."""
        sequence = None
        with contextlib.suppress(ServingError):
            sequence = sequence_of(request)
        if sequence is not None:
            seq = self.table.peek((caller.scope, request.model_name, sequence.id))
            last = seq.last if seq is not None else None
            if isinstance(last, _OipWork):
                last.followers.append(lambda: answer(err))
                return
        answer(err)

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[oip.ModelInferRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[oip.ModelStreamInferResponse]:
        """Requests of any number of sequences; each answered when its chunk is applied (in
        order within a sequence), errors in-band (oip_stream.py)."""
        async for reply in self.streams.serve(request_iterator, context):
            yield reply


def add_to_server(servicer: OipServicer, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` as inference.GRPCInferenceService on ``server``."""
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
