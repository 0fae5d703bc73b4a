"""What a session does, written once for ``Session`` (blocking) and ``AsyncSession`` (asyncio).

Each operation is a generator that yields the I/O it needs, an ``Op``, and gets its result sent
back in, or the exception the I/O raised thrown in. ``Session`` runs the generator with blocking
calls, ``AsyncSession`` with awaits (``run_blocking``, ``run_async`` in their modules), so the
logic lives here alone: checking the input, completing a chunk left in doubt first, cutting
chunks to the server's limit, the seq driver's retries, and what each management call does to
the session's seq bookkeeping. The shells own the transport: the channel, the stream of a
``stream()`` call, locks and sleeping.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb

from ._convert import Array, encode_inputs, join_outputs, split_chunks
from ._driver import STREAM_RETRY_CODES, ChunkDriver
from ._ledger import SeqLedger
from ._retry import Backoff
from ._routing import replay_steps, routed
from .errors import RnnserveError, rpc_code, rpc_message, rpc_next_seq
from .models import ModelInfo
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .options import ClientOptions

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Rpc:
    """A unary management call through the client (deadline, route key, retried while
    UNAVAILABLE): the response, or the client's RnnserveError thrown in."""

    method: str
    request: Any


@dataclass(frozen=True, slots=True)
class Step:
    """One attempt of the unary Step call: the StepResponse, or the grpc.RpcError thrown in."""

    request: pb.StepRequest


@dataclass(frozen=True, slots=True)
class Exchange:
    """One message on the session's stream (opened when there is none): the reply, or
    ``StreamFailure`` thrown in after the shell dropped the broken call."""

    request: pb.StreamRequest


@dataclass(frozen=True, slots=True)
class Sleep:
    """Wait before trying again."""

    seconds: float


Op = Rpc | Step | Exchange | Sleep
#: An operation: yields Ops, returns its result.
Ops = Generator[Op, Any, _T]


class StreamFailure(Exception):
    """The session's stream call broke (the shell dropped it; the next Exchange opens another).
    ``__cause__`` is what the transport raised."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class SessionCore:
    """A session's identity and seq bookkeeping, and its operations as generators of Ops."""

    def __init__(
        self,
        options: ClientOptions,
        backoff: Callable[[], Backoff],
        info: pb.SessionInfo,
        model: ModelInfo,
    ) -> None:
        self.id: str = info.session_id
        self.model = model
        self._options = options
        self._backoff = backoff
        self.ledger = SeqLedger(self.id, int(info.next_seq), replay_steps(options, info))
        #: Every call of the session carries its route key (rnnserve.proto, Routing).
        self.metadata = routed(options, self.id)
        self.closed = False

    def check_open(self) -> None:
        if self.closed:
            raise RnnserveError(grpc.StatusCode.FAILED_PRECONDITION, f"session {self.id} is closed")

    def driver(self) -> ChunkDriver:
        return ChunkDriver(self.ledger, self.model, self._backoff(), self._options.target)

    # -- steps ----------------------------------------------------------------------------------

    def step(self, x: object) -> Ops[Array]:
        """``Session.step``: settle a chunk in doubt, then each piece over unary Step."""
        inputs, single = encode_inputs(self.model, x)
        self.check_open()
        yield from self.settle()
        parts = []
        for piece in split_chunks(self.model, inputs):
            self.ledger.submit(piece)
            parts.append((yield from self.drive_unary()))
        return join_outputs(parts, single)

    def stream_item(self, item: object) -> Ops[Array]:
        """One item of ``Session.stream``: each piece over the session's stream."""
        chunk, single = encode_inputs(self.model, item)
        parts = []
        for piece in split_chunks(self.model, chunk):
            self.ledger.submit(piece)
            parts.append((yield from self.drive_stream()))
        return join_outputs(parts, single)

    def settle(self) -> Ops[None]:
        """A chunk left in doubt by an earlier failure is completed before anything else, so
        that a reset, fork or snapshot sees the steps in the order they were sent."""
        if self.ledger.pending is not None:
            yield from self.drive_unary()

    def drive_unary(self) -> Ops[Array]:
        driver = self.driver()
        while True:
            try:
                reply = yield Step(driver.request())
            except grpc.RpcError as exc:
                try:
                    delay = driver.on_failure(rpc_code(exc), rpc_message(exc), rpc_next_seq(exc))
                except RnnserveError as error:
                    raise error from exc
                yield Sleep(delay)
                continue
            outputs = driver.on_reply(reply)
            if outputs is not None:
                return outputs

    def drive_stream(self) -> Ops[Array]:
        driver = self.driver()
        while True:
            request = driver.request()
            try:
                reply = yield Exchange(pb.StreamRequest(step=request, request_id=request.seq))
            except StreamFailure as exc:
                try:
                    delay = driver.on_failure(
                        exc.code, exc.message, None, retry_codes=STREAM_RETRY_CODES
                    )
                except RnnserveError as error:
                    raise error from exc.__cause__ or exc
                yield Sleep(delay)
                continue
            result = driver.on_stream_reply(reply)
            if isinstance(result, np.ndarray):
                return result
            if result is not None:
                yield Sleep(result)

    # -- session management -----------------------------------------------------------------

    def reset(self) -> Ops[None]:
        self.check_open()
        yield from self.settle()
        yield Rpc("ResetSession", pb.ResetSessionRequest(session_id=self.id))
        self.ledger.forget_history()

    def fork(self) -> Ops[pb.SessionInfo]:
        """The new session's info (the shell wraps it)."""
        self.check_open()
        yield from self.settle()
        resp = yield Rpc("ForkSession", pb.ForkSessionRequest(session_id=self.id))
        return resp.session  # type: ignore[no-any-return]

    def snapshot(self) -> Ops[Snapshot]:
        self.check_open()
        yield from self.settle()
        resp = yield Rpc("GetState", pb.GetStateRequest(session_id=self.id))
        return Snapshot(resp.snapshot)

    def restore(self, snapshot: Snapshot) -> Ops[None]:
        self.check_open()
        self.ledger.abandon()
        req = pb.PutStateRequest(session_id=self.id, snapshot=snapshot.to_proto())
        resp = yield Rpc("PutState", req)
        replay = replay_steps(self._options, resp.session)
        self.ledger = SeqLedger(self.id, int(resp.session.next_seq), replay)

    def info(self) -> Ops[pb.SessionInfo]:
        resp = yield Rpc("GetSession", pb.GetSessionRequest(session_id=self.id))
        return resp.session  # type: ignore[no-any-return]

    def close(self) -> Ops[None]:
        """Idempotent; a session the server already dropped counts as closed."""
        if self.closed:
            return
        self.closed = True
        try:
            yield Rpc("CloseSession", pb.CloseSessionRequest(session_id=self.id))
        except RnnserveError as exc:
            if exc.code != grpc.StatusCode.NOT_FOUND:
                raise
