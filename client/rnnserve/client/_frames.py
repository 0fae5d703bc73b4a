"""Frames on one Stream call: chunks of many sessions in one message, for the multiplexer.

A ``Lane`` is one Stream call of the multiplexer (one route key) with a writer task and a reader
task. Callers queue ``Part``s on it: one session's chunk (``Multiplexer.step``) or the rows of a
``step_many``. The writer wakes once per event-loop tick, after every task that ran in that tick
has queued its part, and packs the queued parts into frames: one frame per group of equal input
and output shapes and chunk length T, at most ``max_frame`` entries each (a part is never cut).
The reader matches each reply to its frame by ``request_id``, decodes the frame's outputs once
(one ``np.frombuffer`` + reshape) and hands every part its ``FrameReply`` and its offset. A
frame of one entry goes as a plain step message instead (the server answered those 15-25 %
sooner, three interleaved runs), and its reply is read in a frame's terms.

Backpressure: at most ``max_inflight`` entries are written and unanswered on a lane; past it
the writer waits for replies while parts keep queueing (they go out as larger frames). What a
part's entries mean (seq bookkeeping, retries) is the caller's business, with a ChunkDriver: a
lane only moves them and reports a broken stream as ``StreamBroken`` on every part in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import grpc.aio
import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, from_tensor, to_tensor

from ._convert import Array
from ._driver import ChunkDriver
from .errors import RnnserveError, code_from_int, rpc_code, rpc_message
from .models import ModelInfo

StreamCall = grpc.aio.StreamStreamCall[pb.StreamRequest, pb.StreamResponse]
#: What entries of one frame share: input dtype, step shape, output step shape, chunk length T.
FrameKey = tuple[str, tuple[int, ...], tuple[int, ...], int]
#: An entry's failure: status code, message, the seq the server holds (seq errors).
EntryError = tuple[grpc.StatusCode, str, int]


def frame_key(model: ModelInfo, steps: int) -> FrameKey:
    """The group a chunk of ``steps`` steps of ``model`` goes out in."""
    return (model.input.dtype.str, model.step_shape, model.output.shape[1:], steps)


class StreamBroken(Exception):
    """The lane's stream ended while a part was waiting on it (or before it was sent)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class FrameReply:
    """What the entries of one frame got.

    ``outputs``: [N, T, outputs...] read-only (rows of failed entries are zeros); ``next_seqs``:
    per entry; ``errors``: entry index -> its error; ``whole``: an error about the whole frame
    (every entry failed with it); ``malformed``: the reply could not be read (DATA_LOSS).
    """

    __slots__ = ("errors", "malformed", "next_seqs", "outputs", "whole")

    def __init__(self) -> None:
        self.outputs: Array | None = None
        self.next_seqs: list[int] = []
        self.errors: dict[int, EntryError] = {}
        self.whole: EntryError | None = None
        self.malformed: str | None = None


def settle_entry(driver: ChunkDriver, reply: FrameReply, index: int) -> Array | float | None:
    """Entry ``index`` of a frame through its session's driver: its outputs (a read-only view
    of the frame's), seconds to wait before sending again, or None to send the next chunk.
    Raises the SDK exception a single step would raise."""
    if reply.malformed is not None:
        raise RnnserveError(grpc.StatusCode.DATA_LOSS, reply.malformed)
    error = reply.whole if reply.whole is not None else reply.errors.get(index)
    if error is not None:
        return driver.on_failure(*error)
    assert reply.outputs is not None
    return driver.on_outputs(reply.outputs[index], reply.next_seqs[index])


class Part:
    """Entries queued together and answered together: ``ids[i]`` at ``seqs[i]`` with row i of
    ``inputs`` ([n, T, ...]). ``future`` gets ``(FrameReply, offset of the first entry)``."""

    __slots__ = ("future", "ids", "inputs", "key", "seqs")

    def __init__(
        self,
        ids: list[str],
        seqs: list[int],
        inputs: Array,
        key: FrameKey,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self.ids = ids
        self.seqs = seqs
        self.inputs = inputs
        self.key = key
        self.future: asyncio.Future[tuple[FrameReply, int]] = loop.create_future()

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)
            # Whoever awaited it may be gone (cancelled): no "never retrieved" noise.
            self.future.exception()


class _Sent:
    """A frame written on a call and not answered yet."""

    __slots__ = ("call", "key", "parts", "size")

    def __init__(self, call: StreamCall, parts: list[Part], size: int, key: FrameKey) -> None:
        self.call = call
        self.parts = parts
        self.size = size
        self.key = key


def pack(parts: list[Part], max_frame: int) -> list[list[Part]]:
    """Group parts by frame key, in order of first appearance, at most ``max_frame`` entries
    per frame (a part larger than that goes alone)."""
    open_frames: dict[FrameKey, tuple[list[Part], list[int]]] = {}
    frames: list[list[Part]] = []
    for part in parts:
        n = len(part.ids)
        current = open_frames.get(part.key)
        if current is None or current[1][0] + n > max_frame:
            current = ([], [0])
            open_frames[part.key] = current
            frames.append(current[0])
        current[0].append(part)
        current[1][0] += n
    return frames


class Lane:
    """One Stream call (opened on demand, reopened after a break) with its writer and reader."""

    def __init__(
        self, open_call: Callable[[], StreamCall], max_frame: int, max_inflight: int
    ) -> None:
        self._open_call = open_call
        self.max_frame = max_frame
        self.max_inflight = max_inflight
        self.call: StreamCall | None = None
        self._reader: asyncio.Task[None] | None = None
        self._writer: asyncio.Task[None] | None = None
        self._queue: list[Part] = []
        self._sent: dict[int, _Sent] = {}
        self._next_id = 0
        #: Entries written and not answered (the backpressure bound's count).
        self.inflight = 0
        self._wake = asyncio.Event()
        self._room = asyncio.Event()
        self._closed = False

    def submit(self, part: Part) -> asyncio.Future[tuple[FrameReply, int]]:
        """Queue a part for the next frame; its future resolves with the reply."""
        if self._closed:
            raise RnnserveError(grpc.StatusCode.CANCELLED, "the multiplexer is closed")
        self._queue.append(part)
        if self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop())
        self._wake.set()
        return part.future

    async def close(self) -> None:
        """End the call and the tasks; every part waiting fails with CANCELLED."""
        self._closed = True
        call, self.call = self.call, None
        if call is not None:
            call.cancel()
        tasks = [t for t in (self._reader, self._writer) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        broken = StreamBroken(grpc.StatusCode.CANCELLED, "the multiplexer was closed")
        for sent in self._sent.values():
            for part in sent.parts:
                part.fail(broken)
        self._sent.clear()
        for part in self._queue:
            part.fail(broken)
        self._queue.clear()

    # -- writing --------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take()
                if not batch:  # the in-flight bound: wait for replies
                    self._room.clear()
                    await self._room.wait()
                    continue
                frames = pack(batch, self.max_frame)
                for k, frame in enumerate(frames):
                    try:
                        call, message = self._register(frame)
                    except Exception as exc:  # a bug: fail its callers rather than hang them
                        for part in frame:
                            part.fail(exc)
                        continue
                    try:
                        await call.write(message)
                    except (grpc.RpcError, asyncio.InvalidStateError) as exc:
                        self._break(call, exc)
                    except asyncio.CancelledError:  # closing: frames not written fail here
                        closed = StreamBroken(
                            grpc.StatusCode.CANCELLED, "the multiplexer was closed"
                        )
                        for rest in frames[k + 1 :]:
                            for part in rest:
                                part.fail(closed)
                        raise

    def _take(self) -> list[Part]:
        """The queued parts, in order, that fit under the in-flight bound; on an idle lane at
        least one (a part larger than the bound goes alone)."""
        room = self.max_inflight - self.inflight
        queue = self._queue
        taken = 0
        count = 0
        for part in queue:
            n = len(part.ids)
            if taken + n > room and (count or self.inflight):
                break
            taken += n
            count += 1
        batch, self._queue = queue[:count], queue[count:]
        return batch

    def _register(self, parts: list[Part]) -> tuple[StreamCall, pb.StreamRequest]:
        """The frame message of ``parts``, recorded as in flight on the lane's call."""
        if len(parts) == 1:
            ids, seqs, inputs = parts[0].ids, parts[0].seqs, parts[0].inputs
        else:
            ids, seqs = [], []
            for part in parts:
                ids += part.ids
                seqs += part.seqs
            inputs = np.concatenate([part.inputs for part in parts])
        call = self._ensure_call()
        request_id = self._next_id
        self._next_id += 1
        self._sent[request_id] = _Sent(call, parts, len(ids), parts[0].key)
        self.inflight += len(ids)
        if len(ids) == 1:  # a lone chunk goes as a plain step: the server answers it sooner
            step = pb.StepRequest(session_id=ids[0], seq=seqs[0], inputs=to_tensor(inputs[0]))
            return call, pb.StreamRequest(request_id=request_id, step=step)
        frame = pb.StepFrame(session_ids=ids, seqs=seqs, inputs=to_tensor(inputs))
        return call, pb.StreamRequest(request_id=request_id, frame=frame)

    def _ensure_call(self) -> StreamCall:
        if self.call is None:
            call = self._open_call()
            self.call = call
            self._reader = asyncio.get_running_loop().create_task(self._read(call))
        return self.call

    # -- reading --------------------------------------------------------------------------------

    async def _read(self, call: StreamCall) -> None:
        """Hand each reply to the parts of its frame, until the stream ends."""
        try:
            while True:
                reply = await call.read()
                if not isinstance(reply, pb.StreamResponse):
                    self._break(call, None)
                    return
                sent = self._sent.pop(reply.request_id, None)
                if sent is None or sent.call is not call:
                    continue
                self.inflight -= sent.size
                self._room.set()
                answer = _decode(reply, sent)
                offset = 0
                for part in sent.parts:
                    if not part.future.done():
                        part.future.set_result((answer, offset))
                    offset += len(part.ids)
        except Exception as exc:  # grpc.RpcError: the stream broke; anything else: a bug
            self._break(call, exc)

    def _break(self, call: StreamCall, exc: BaseException | None) -> None:
        """Forget a broken call and fail the parts waiting on it: with StreamBroken, so that
        their callers resend, or with ``exc`` itself when it is no gRPC error (a bug)."""
        if self.call is call:
            self.call = None
            call.cancel()
        broken: BaseException
        if isinstance(exc, grpc.RpcError):
            broken = StreamBroken(rpc_code(exc), rpc_message(exc))
        elif isinstance(exc, Exception) and not isinstance(exc, asyncio.InvalidStateError):
            broken = exc
        else:
            broken = StreamBroken(grpc.StatusCode.UNAVAILABLE, "the stream ended early")
        for request_id, sent in list(self._sent.items()):
            if sent.call is call:
                del self._sent[request_id]
                self.inflight -= sent.size
                for part in sent.parts:
                    part.fail(broken)
        self._room.set()


def _decode(reply: pb.StreamResponse, sent: _Sent) -> FrameReply:
    """A frame's reply, checked against what was sent; never raises (``malformed`` instead)."""
    answer = FrameReply()
    kind = reply.WhichOneof("result")
    if kind == "error":
        err = reply.error
        answer.whole = (code_from_int(err.code), err.message, int(err.next_seq))
        return answer
    _, _, out_shape, steps = sent.key
    if kind == "step" and sent.size == 1:
        return _decode_step(reply.step, sent, answer)
    if kind != "frame":
        answer.malformed = f"the server answered a frame with {kind or 'an empty reply'}"
        return answer
    frame = reply.frame
    for entry in frame.errors:
        err = entry.error
        answer.errors[int(entry.index)] = (
            code_from_int(err.code),
            err.message,
            int(err.next_seq),
        )
    expected = (sent.size, steps, *out_shape)
    if len(frame.next_seqs) != sent.size:
        answer.malformed = (
            f"server returned {len(frame.next_seqs)} next_seqs for a frame of {sent.size} entries"
        )
        return answer
    answer.next_seqs = list(frame.next_seqs)
    if not frame.HasField("outputs") and len(answer.errors) == sent.size:
        return answer  # every entry failed: no outputs to send
    try:
        outputs = from_tensor(frame.outputs)
    except TensorError as exc:
        answer.malformed = f"malformed frame outputs: {exc}"
        return answer
    if outputs.shape != expected:
        answer.malformed = (
            f"server returned frame outputs of shape {list(outputs.shape)} for {sent.size} "
            f"entries of {steps} steps; expected {list(expected)}"
        )
        return answer
    answer.outputs = outputs
    return answer


def _decode_step(step: pb.StepResponse, sent: _Sent, answer: FrameReply) -> FrameReply:
    """The reply to a lone chunk sent as a plain step, in a frame's terms (one entry)."""
    _, _, out_shape, steps = sent.key
    if step.seq != sent.parts[0].seqs[0]:
        answer.malformed = (
            f"the server answered seq {step.seq} for a chunk at seq {sent.parts[0].seqs[0]}"
        )
        return answer
    try:
        outputs = from_tensor(step.outputs)
    except TensorError as exc:
        answer.malformed = f"malformed outputs: {exc}"
        return answer
    if outputs.shape != (steps, *out_shape):
        answer.malformed = (
            f"server returned outputs of shape {list(outputs.shape)} for a chunk of {steps} "
            f"steps; expected {[steps, *out_shape]}"
        )
        return answer
    answer.outputs = outputs[np.newaxis]
    answer.next_seqs = [int(step.next_seq)]
    return answer
