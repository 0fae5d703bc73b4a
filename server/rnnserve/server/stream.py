"""The rnnserve.v1 ``Stream`` call: many messages in, one reply per message out.

A message carries one session's chunk (``step``) or a frame of many sessions' chunks
(``frame``, columnar: ids, seqs and one inputs tensor). Errors about one message, or one entry
of a frame, go back in-band and the stream goes on; only a broken stream or a shutdown ends it
with a status.

Two ways to serve a stream, picked by what it carries. Lockstep, while the stream names one
session (what the SDK's Session does): read a chunk, run it, send its reply, read the next. One
task and no hand-offs, the shape of the echo floor; a chunk still joins a batch with other
streams' chunks of its loop tick. Read-ahead, from the first message naming a second session or
carrying a frame (a multiplexer, a gateway): a reader task takes messages as they come, up to
``max_inflight`` unsent, so a chunk waiting in a batch does not hold up the next message, and
the handler sends replies as they are ready. (gRPC hands a stream's messages over one per loop
tick, so on its own one stream's chunks mostly run one by one: docs/server.md, Batcher.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
from google.protobuf.message import DecodeError
from rnnserve.server import codec
from rnnserve.server.batcher import FrameWork, Rows, States, Work
from rnnserve.server.errors import ServingError, as_serving_error, invalid
from rnnserve.server.lockstep import next_message
from rnnserve.server.metrics import Metrics
from rnnserve.server.model import ServedModel
from rnnserve.server.sessions import MAX_SEQ, Session, check_seq_room
from rnnserve.v1 import rnnserve_pb2 as pb

#: Session ``sid`` now, or None when it must first come from the store (servicer.local).
Local = Callable[[str], Session | None]
#: Session ``sid``, from the store if need be (servicer.lookup).
Lookup = Callable[[str], Awaitable[Session]]
METHOD = "Stream"


class ReplyQueue:
    """The replies a stream call has ready to send, and a wake-up for its writer. Lighter than
    an asyncio.Queue on the per-message path."""

    __slots__ = ("ended", "items", "loop", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.items: list[Any] = []
        self.waiter: asyncio.Future[None] | None = None
        self.ended = False
        self.loop = loop

    def put(self, reply: Any, last: bool = False) -> None:
        self.items.append(reply)
        self.ended = self.ended or last
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take(self) -> list[Any]:
        """Everything ready, waiting until there is something."""
        while not self.items and not self.ended:
            self.waiter = self.loop.create_future()
            await self.waiter
            self.waiter = None
        items, self.items = self.items, []
        return items


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


class _Frame:
    """One frame's reply, filled in as its entries are answered and sent once all are."""

    __slots__ = ("call", "errors", "next_seqs", "outputs", "remaining", "rid", "seqs", "started")

    def __init__(self, call: StreamCall, rid: int, seqs: list[int], started: float) -> None:
        self.call = call
        self.rid = rid
        self.seqs = seqs
        self.started = started
        self.remaining = len(seqs)
        self.next_seqs = np.zeros(len(seqs), dtype=np.uint64)
        self.errors: list[tuple[int, ServingError]] = []
        #: float32 [N, T, outputs] once the shape is known (an entry's session was found).
        self.outputs: npt.NDArray[np.float32] | None = None

    def shape(self, steps: int, width: int) -> None:
        self.outputs = np.zeros((len(self.seqs), steps, width), dtype=np.float32)

    def entries_done(self, rows: list[int], outputs: npt.NDArray[Any]) -> None:
        index = np.array(rows, dtype=np.intp)
        assert self.outputs is not None
        self.outputs[index] = outputs
        self.next_seqs[index] = (
            np.array([self.seqs[r] for r in rows], dtype=np.uint64) + (outputs.shape[1])
        )
        self._answered(len(rows))

    def entry_done(self, row: int, outputs: Rows) -> None:
        assert self.outputs is not None
        if outputs.shape != self.outputs.shape[1:]:
            self.entry_failed(
                row,
                invalid(
                    f"entry {row} repeats seq {self.seqs[row]}, which was applied with "
                    f"{outputs.shape[0]} steps, not {self.outputs.shape[1]}; send the same chunk"
                ),
            )
            return
        self.outputs[row] = outputs
        self.next_seqs[row] = self.seqs[row] + outputs.shape[0]
        self._answered(1)

    def entry_failed(self, row: int, err: ServingError) -> None:
        self.errors.append((row, err))
        self.next_seqs[row] = err.next_seq or 0
        self._answered(1)

    def _answered(self, count: int) -> None:
        self.remaining -= count
        if self.remaining == 0:
            self.call.answer(self.reply(), self.started, None)

    def reply(self) -> pb.StreamResponse:
        reply = pb.StreamResponse(request_id=self.rid)
        frame = reply.frame
        if self.outputs is not None:
            out = frame.outputs
            out.dtype = pb.DTYPE_FLOAT32
            out.shape[:] = self.outputs.shape
            out.raw_data = self.outputs.tobytes()
        frame.next_seqs[:] = self.next_seqs.tolist()
        for row, err in sorted(self.errors, key=lambda e: e[0]):
            frame.errors.add(index=row, error=err.to_step_error())
        return reply


class StreamCall:
    """One Stream call's bookkeeping, shared by every chunk on it: the replies ready to send
    and how many messages are still unanswered. The sink of its chunks."""

    __slots__ = (
        "later",
        "limit",
        "local",
        "lookup",
        "max_frame",
        "metrics",
        "ok",
        "outstanding",
        "reading",
        "replies",
        "room",
        "unsent",
    )

    def __init__(
        self,
        local: Local,
        lookup: Lookup,
        metrics: Metrics,
        limit: int,
        max_frame: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.local = local
        self.lookup = lookup
        self.metrics = metrics
        self.max_frame = max_frame
        #: Messages waiting for a session to be loaded from the store.
        self.later: set[asyncio.Task[None]] = set()
        self.ok = metrics.request_child(METHOD, "OK")
        self.replies = ReplyQueue(loop)
        self.outstanding = 0
        self.reading = True
        #: Messages received and not yet handed back to gRPC, and the most the reader allows.
        self.unsent = 0
        self.limit = limit
        self.room: asyncio.Future[None] | None = None

    async def wait_for_room(self) -> None:
        """Return once fewer than ``limit`` messages of this call are unsent (backpressure)."""
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

    # -- one session's chunk --------------------------------------------------------------

    def accept(self, req: pb.StreamRequest) -> None:
        """Decode one message and queue its chunk or frame; a bad one is answered in-band at
        once. A chunk whose session must first come from the store waits for it in a task."""
        started = time.perf_counter()
        self.outstanding += 1
        self.unsent += 1
        if req.HasField("frame"):
            self._accept_frame(req, started)
            return
        try:
            session = self.local(req.step.session_id)
            if session is None:
                self._later(self._accept_later(req, started))
                return
            self._submit(req, session, started)
        except Exception as exc:
            self._refuse(req.request_id, req.step.session_id, started, exc)

    def _later(self, coro: Any) -> None:
        task = self.replies.loop.create_task(coro)
        self.later.add(task)
        task.add_done_callback(self.later.discard)

    async def _accept_later(self, req: pb.StreamRequest, started: float) -> None:
        try:
            session = await self.lookup(req.step.session_id)
            self._submit(req, session, started)
        except Exception as exc:
            self._refuse(req.request_id, req.step.session_id, started, exc)

    def _submit(self, req: pb.StreamRequest, session: Session, started: float) -> None:
        step = req.step
        inputs = session.model.decode_chunk(step.inputs)
        check_seq_room(step.seq, inputs.shape[0])
        session.model.batcher.submit(
            _StreamWork(self, req.request_id, started, session, step, inputs)
        )

    def _refuse(self, rid: int, sid: str, started: float, exc: Exception) -> None:
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

    # -- a frame --------------------------------------------------------------------------

    def _accept_frame(self, req: pb.StreamRequest, started: float) -> None:
        """Look up a frame's sessions, then run it (after the store, for sessions not here)."""
        frame = req.frame
        try:
            sids = list(frame.session_ids)
            seqs = list(frame.seqs)
            if not sids or len(seqs) != len(sids):
                raise invalid(
                    f"a frame needs one seq per session id and at least one entry; it has "
                    f"{len(sids)} session_ids and {len(seqs)} seqs"
                )
            if len(sids) > self.max_frame:
                raise invalid(
                    f"a frame holds at most {self.max_frame} entries (max_frame_sessions); "
                    f"this one has {len(sids)}: split it"
                )
        except Exception as exc:
            self._refuse(req.request_id, "", started, exc)
            return
        reply = _Frame(self, req.request_id, seqs, started)
        sessions: list[Session | BaseException | None] = []
        waiting = False
        local = self.local
        for sid in sids:
            try:
                found = local(sid)
            except Exception as exc:
                sessions.append(exc)
                continue
            waiting = waiting or found is None
            sessions.append(found)
        if waiting:
            self._later(self._frame_later(req, reply, sids, sessions))
        else:
            self._run_frame(req, reply, sessions)

    async def _frame_later(
        self,
        req: pb.StreamRequest,
        reply: _Frame,
        sids: list[str],
        sessions: list[Session | BaseException | None],
    ) -> None:
        for i, found in enumerate(sessions):
            if found is None:
                try:
                    sessions[i] = await self.lookup(sids[i])
                except Exception as exc:
                    sessions[i] = exc
        self._run_frame(req, reply, sessions)

    def _run_frame(
        self,
        req: pb.StreamRequest,
        reply: _Frame,
        sessions: list[Session | BaseException | None],
    ) -> None:
        """Decode the frame's inputs for the model of its first session found, then submit
        its entries to their models' batchers; every entry that cannot run is answered."""
        failed: list[tuple[int, ServingError]] = []
        groups: dict[ServedModel, list[int]] = {}
        first: ServedModel | None = None
        for i, found in enumerate(sessions):
            if isinstance(found, Session):
                if first is None:
                    first = found.model
                groups.setdefault(found.model, []).append(i)
            else:
                failed.append((i, as_serving_error(found or RuntimeError("no session"), METHOD)))
        inputs = None
        if first is not None:
            try:
                inputs = codec.frame_inputs(first, req.frame.inputs, len(sessions))
            except Exception as exc:
                self._refuse(req.request_id, "", reply.started, exc)
                return
            reply.shape(inputs.shape[1], first.manifest.output_size)
        for row, err in failed:
            reply.entry_failed(row, err)
        if inputs is None:
            return
        assert first is not None
        steps = inputs.shape[1]
        seqs = reply.seqs
        for model, rows in groups.items():
            if model is not first and not _same_shapes(model, first):
                err = invalid(
                    f"the session runs {model.label}, whose input or output shape differs from "
                    f"{first.label} of the frame's first session: send it in another frame"
                )
                for row in rows:
                    reply.entry_failed(row, err)
                continue
            ok = [r for r in rows if seqs[r] <= MAX_SEQ - steps]
            for row in rows:
                if seqs[row] > MAX_SEQ - steps:
                    try:
                        check_seq_room(seqs[row], steps)
                    except ServingError as err:
                        reply.entry_failed(row, err)
            if not ok:
                continue
            part = inputs if len(ok) == len(sessions) else inputs[np.array(ok, dtype=np.intp)]
            picked = [sessions[r] for r in ok]
            model.batcher.submit(
                FrameWork(
                    reply,
                    picked,  # type: ignore[arg-type]  # every entry of ok is a Session
                    [seqs[r] for r in ok],
                    ok,
                    part,
                    reply.started,
                )
            )

    # -- replies --------------------------------------------------------------------------

    def answer(self, reply: pb.StreamResponse, started: float, code: str | None) -> None:
        """Queue ``reply``; ``code`` None means OK."""
        if code is None:
            self.ok.observe(time.perf_counter() - started)
        else:
            self.metrics.observe_request(METHOD, code, time.perf_counter() - started)
        self.outstanding -= 1
        self.replies.put(reply, last=not self.reading and self.outstanding == 0)

    def end_of_input(self) -> None:
        self.reading = False
        if self.outstanding == 0:
            self.replies.put(None, last=True)


def _same_shapes(a: ServedModel, b: ServedModel) -> bool:
    """Whether sessions of ``a`` can share a frame with those of ``b``."""
    ma, mb = a.manifest, b.manifest
    return (a.tokens, ma.input_size, ma.output_size) == (b.tokens, mb.input_size, mb.output_size)


def _read_error(exc: BaseException) -> ServingError:
    """The status a Stream ends with when reading from it fails."""
    if isinstance(exc, DecodeError):
        return invalid(f"a Stream message is not a valid rnnserve.v1.StreamRequest: {exc}")
    return as_serving_error(exc, METHOD)


class Streams:
    """Serves Stream calls; knows every open one, so a shutdown stops them reading."""

    def __init__(
        self,
        local: Local,
        lookup: Lookup,
        metrics: Metrics,
        max_inflight: int = 1024,
        max_frame: int = 4096,
    ) -> None:
        self.local = local
        self.lookup = lookup
        self.metrics = metrics
        self.max_inflight = max_inflight
        self.max_frame = max_frame
        self.closing = False
        self._readers: set[asyncio.Task[None]] = set()
        #: Handlers waiting on a lockstep read, which a shutdown interrupts.
        self._lockstep: set[asyncio.Task[Any]] = set()

    def begin_shutdown(self) -> None:
        """Stop reading from open streams; each ends with UNAVAILABLE once its in-flight chunks
        are answered."""
        self.closing = True
        for task in [*self._readers, *self._lockstep]:
            task.cancel()

    async def serve(
        self,
        request_iterator: AsyncIterator[pb.StreamRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.StreamResponse]:
        """One Stream call, lockstep while it names one session, then read-ahead."""
        loop = asyncio.get_running_loop()
        call = StreamCall(
            self.local, self.lookup, self.metrics, self.max_inflight, self.max_frame, loop
        )
        requests = request_iterator.__aiter__()
        replies = call.replies
        handler = asyncio.current_task()
        reader: asyncio.Task[None] | None = None
        sole = None  # the one session the stream has named so far
        failed: BaseException | None = None  # why reading stopped, if not the end of input
        try:
            while not self.closing:
                req, failed = await next_message(
                    requests, handler, self._lockstep, lambda: self.closing
                )
                if req is None:
                    break
                sid = req.step.session_id
                if sole is None:
                    sole = sid
                call.accept(req)
                if sid != sole or req.HasField("frame"):
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
        if self.closing:
            await context.abort(
                grpc.StatusCode.UNAVAILABLE,
                "server is shutting down; reconnect and resume each session from its next_seq",
            )
        if reader is not None and not reader.cancelled():
            failed = reader.exception()
        if failed is not None:
            err = _read_error(failed)
            await context.abort(err.code, err.message)

    async def _read_ahead(
        self, call: StreamCall, requests: AsyncIterator[pb.StreamRequest]
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
