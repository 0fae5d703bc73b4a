"""The rnnserve.v1 ``Stream`` call: many messages in, one reply per message out.

A message carries one session's chunk (``step``) or a frame of many sessions' chunks
(``frame``, frames.py). Errors about one message, or one entry of a frame, go back in-band and
the stream goes on; only a broken stream or a shutdown ends it with a status. Lockstep while
the stream names one session, read-ahead from the first message naming a second or carrying a
frame (bidi.py). A message whose session must first come from the store (a takeover) holds the
messages after it until it is submitted, so a stream's chunks reach the batcher in the order
they came, whichever of their sessions load first.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from rnnserve.server import codec, frames
from rnnserve.server.bidi import MANY, BidiCall, BidiServer
from rnnserve.server.errors import ServingError, as_serving_error, invalid
from rnnserve.server.metrics import Metrics
from rnnserve.server.sessions import Session, check_seq_room
from rnnserve.server.work import Rows, States, Work
from rnnserve.v1 import rnnserve_pb2 as pb

#: Session ``sid`` now, or None when it must first come from the store (servicer.local).
Local = Callable[[str], Session | None]
#: ``Local`` of each id of a frame, or the error about it (servicer.local_many).
LocalMany = Callable[[list[str]], list[Session | BaseException | None]]
#: Session ``sid``, from the store if need be (servicer.lookup).
Lookup = Callable[[str], Awaitable[Session]]
METHOD = "Stream"
log = logging.getLogger("rnnserve.server")


class _StreamWork(Work):
    """A chunk that came on a Stream: its call is its sink."""

    __slots__ = ("rid",)

    def __init__(
        self,
        call: StreamCall,
        rid: int,
        started: float,
        session: Session,
        step: pb.StepRequest,
        inputs: npt.NDArray[np.generic],
    ) -> None:
        super().__init__(session, step.seq, inputs, step.want_state, call, step.inputs, started)
        self.rid = rid


class StreamCall(BidiCall[pb.StreamRequest, pb.StreamResponse]):
    """One Stream call: its messages in, their replies out; the sink of its chunks."""

    __slots__ = (
        "backlog",
        "local",
        "local_many",
        "lookup",
        "max_frame",
        "metrics",
        "ok",
        "pending",
    )

    def __init__(
        self,
        local: Local,
        local_many: LocalMany,
        lookup: Lookup,
        metrics: Metrics,
        limit: int,
        max_frame: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__(limit, loop)
        self.local = local
        self.local_many = local_many
        self.lookup = lookup
        self.metrics = metrics
        self.max_frame = max_frame
        #: The messages waiting, in arrival order, behind one whose sessions come from the
        #: store; None while none waits.
        self.backlog: deque[Coroutine[Any, Any, None]] | None = None
        #: The task working through the backlog, held so it is not collected.
        self.pending: set[asyncio.Task[None]] = set()
        self.ok = metrics.request_child(METHOD, "OK")

    def key(self, request: pb.StreamRequest) -> object:
        return MANY if request.HasField("frame") else request.step.session_id

    def accept(self, request: pb.StreamRequest) -> None:
        """Queue one message's chunk or frame; a bad one is answered in-band at once. A
        message whose sessions must first come from the store waits for them in a task, and
        the messages after it wait behind it (``backlog``)."""
        started = time.perf_counter()
        self.received()
        if self.backlog is not None:
            self.backlog.append(self._in_turn(request, started))
            return
        waiting = self._try(request, started)
        if waiting is not None:
            self.backlog = deque([waiting])
            task = self.loop.create_task(self._work_backlog())
            self.pending.add(task)
            task.add_done_callback(self.pending.discard)

    def _try(self, request: pb.StreamRequest, started: float) -> Coroutine[Any, Any, None] | None:
        """Submit (or answer) one message now; the coroutine that finishes it when its
        sessions must first come from the store."""
        if request.HasField("frame"):
            return frames.accept(self, request, started)
        try:
            session = self.local(request.step.session_id)
            if session is None:
                return self._accept_later(request, started)
            self._submit(request, session, started)
        except Exception as exc:
            self.refuse(request.request_id, request.step.session_id, started, exc)
        return None

    async def _in_turn(self, request: pb.StreamRequest, started: float) -> None:
        waiting = self._try(request, started)
        if waiting is not None:
            await waiting

    async def _work_backlog(self) -> None:
        """Finish the waiting messages one after another, then let messages run at once
        again."""
        backlog = self.backlog
        assert backlog is not None
        while backlog:
            try:
                await backlog.popleft()
            except Exception:  # a bug: the messages behind it must still run
                log.exception("a Stream message waiting for the store failed")
        self.backlog = None

    async def _accept_later(self, request: pb.StreamRequest, started: float) -> None:
        try:
            session = await self.lookup(request.step.session_id)
            self._submit(request, session, started)
        except Exception as exc:
            self.refuse(request.request_id, request.step.session_id, started, exc)

    def _submit(self, request: pb.StreamRequest, session: Session, started: float) -> None:
        step = request.step
        inputs = codec.decode_chunk(session.model, step.inputs)
        check_seq_room(step.seq, inputs.shape[0])
        session.model.batcher.submit(
            _StreamWork(self, request.request_id, started, session, step, inputs)
        )

    def refuse(self, rid: int, sid: str, started: float, exc: Exception) -> None:
        """Answer a message that cannot run with its error."""
        err = as_serving_error(exc, METHOD)
        reply = pb.StreamResponse(request_id=rid, session_id=sid, error=err.to_step_error())
        self.answer(reply, started, err.code.name)

    def step_done(self, work: Work, outputs: Rows, state: States | None) -> None:
        assert isinstance(work, _StreamWork)
        reply = pb.StreamResponse(request_id=work.rid, session_id=work.session.id)
        codec.step_response(reply.step, work.session.id, work.seq, outputs, state)
        self.answer(reply, work.enqueued, None)

    def step_failed(self, work: Work, err: ServingError) -> None:
        assert isinstance(work, _StreamWork)
        reply = pb.StreamResponse(request_id=work.rid, session_id=work.session.id)
        reply.error.CopyFrom(err.to_step_error())
        self.answer(reply, work.enqueued, err.code.name)

    def answer(self, reply: pb.StreamResponse, started: float, code: str | None) -> None:
        """Queue ``reply``; ``code`` None means OK."""
        if code is None:
            self.ok.observe(time.perf_counter() - started)
        else:
            self.metrics.observe_request(METHOD, code, time.perf_counter() - started)
        self.put(reply)


class Streams(BidiServer[pb.StreamRequest, pb.StreamResponse]):
    """Serves Stream calls (``serve``, registered by servicer.add_to_server)."""

    shutdown_message = (
        "server is shutting down; reconnect and resume each session from its next_seq"
    )

    def __init__(
        self,
        local: Local,
        local_many: LocalMany,
        lookup: Lookup,
        metrics: Metrics,
        max_inflight: int = 1024,
        max_frame: int = 4096,
    ) -> None:
        super().__init__()
        self.local = local
        self.local_many = local_many
        self.lookup = lookup
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_frame = max_frame

    def new_call(self, context: grpc.aio.ServicerContext[Any, Any]) -> StreamCall:
        return StreamCall(
            self.local,
            self.local_many,
            self.lookup,
            self.metrics,
            self.max_inflight,
            self.max_frame,
            asyncio.get_running_loop(),
        )

    def read_error(self, exc: BaseException) -> ServingError:
        if isinstance(exc, DecodeError):
            return invalid(f"a Stream message is not a valid rnnserve.v1.StreamRequest: {exc}")
        return as_serving_error(exc, METHOD)
