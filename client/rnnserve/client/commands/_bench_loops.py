"""The closed loops of ``rnnserve bench``: how one session (or one frame of sessions) keeps a
message in flight on a Stream call, and the measured window they record in.

A loop sends one message, waits for its reply, then sends the next. A *session loop* sends one
session's chunk per message (``StreamRequest.step``); a *frame loop* sends one message carrying
a chunk of each of its K sessions (``StreamRequest.frame``, columnar) and gets one
``FrameResponse`` back. Loops run until the window closes and count only what was answered
inside it.
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import grpc
import numpy as np
from rnnserve import wire
from rnnserve.v1 import rnnserve_pb2 as pb

from .._routing import Metadata

if TYPE_CHECKING:
    from rnnserve.v1.rnnserve_pb2_grpc import InferenceServiceAsyncStub

#: Distinct pre-built inputs each loop cycles through (inputs vary, encoding stays off the
#: measured path).
INPUTS_PER_LOOP = 8
_FAILED_PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION.value[0]


class BenchError(RuntimeError):
    """The benchmark cannot run or its stream broke; the message says why."""


def own_cpu_s() -> float:
    """This process's CPU time so far, user + system, seconds."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Window:
    """The measured window: loops record only while it is open; callbacks at its edges."""

    def __init__(self, on_start: Callable[[], None] | None, on_stop: Callable[[], None] | None):
        self.open = False
        self.stopped = False
        self.started_ns = 0
        self.stopped_ns = 0
        self.cpu_start = 0.0
        self.cpu_stop = 0.0
        self._on_start = on_start
        self._on_stop = on_stop

    def start(self) -> None:
        if self._on_start is not None:
            self._on_start()
        self.cpu_start = own_cpu_s()
        self.started_ns = time.perf_counter_ns()
        self.open = True

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped_ns = time.perf_counter_ns()
        self.cpu_stop = own_cpu_s()
        self.open = False
        self.stopped = True
        if self._on_stop is not None:
            self._on_stop()


class Channel(Protocol):
    """One way of carrying a loop's round trips: a dedicated or a shared Stream call."""

    async def round_trip(self, request: pb.StreamRequest) -> pb.StreamResponse: ...

    async def close(self) -> None: ...


class DedicatedStream:
    """A Stream call carrying one loop: write, then read its reply."""

    def __init__(self, stub: InferenceServiceAsyncStub, metadata: Metadata) -> None:
        self._call = stub.Stream(metadata=metadata)

    async def round_trip(self, request: pb.StreamRequest) -> pb.StreamResponse:
        await self._call.write(request)
        reply = await self._call.read()
        if reply is grpc.aio.EOF:
            raise BenchError("the server ended a stream while a message was in flight")
        assert isinstance(reply, pb.StreamResponse)
        return reply

    async def close(self) -> None:
        await self._call.done_writing()
        while await self._call.read() is not grpc.aio.EOF:
            pass


class SharedStream:
    """A Stream call shared by several loops: one writer, one reader matching request ids."""

    def __init__(self, stub: InferenceServiceAsyncStub, metadata: Metadata) -> None:
        self._outbox: asyncio.Queue[pb.StreamRequest | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[pb.StreamResponse]] = {}
        self._next_id = 1
        self._call = stub.Stream(metadata=metadata)
        self._writer = asyncio.create_task(self._write())
        self._reader = asyncio.create_task(self._read())

    async def _write(self) -> None:
        while (request := await self._outbox.get()) is not None:
            await self._call.write(request)
        await self._call.done_writing()

    async def _read(self) -> None:
        error = BenchError("a shared stream ended with messages in flight")
        try:
            while (reply := await self._call.read()) is not grpc.aio.EOF:
                assert isinstance(reply, pb.StreamResponse)
                future = self._pending.pop(reply.request_id, None)
                if future is not None and not future.done():
                    future.set_result(reply)
        except grpc.aio.AioRpcError as exc:
            error = BenchError(f"shared stream failed: {exc.code().name}: {exc.details()}")
        finally:
            # Every loop waiting on this stream learns why it broke.
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(error)

    async def round_trip(self, request: pb.StreamRequest) -> pb.StreamResponse:
        request.request_id = self._next_id
        future: asyncio.Future[pb.StreamResponse] = asyncio.get_running_loop().create_future()
        self._pending[self._next_id] = future
        self._next_id += 1
        self._outbox.put_nowait(request)
        return await future

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        await asyncio.gather(self._writer, self._reader)


def sample_inputs(
    info: pb.ModelInfo, chunk: int, rng: np.random.Generator, rows: int = 0
) -> list[pb.Tensor]:
    """Pre-encoded inputs that fit the model's input spec: a session's chunk ``[chunk, ...]``,
    or with ``rows`` a frame's ``[rows, chunk, ...]``."""
    lead = (rows, chunk) if rows else (chunk,)
    if info.input_kind == pb.INPUT_KIND_TOKENS:
        vocab = len(info.vocabulary)
        if vocab < 1:
            raise BenchError(f"token model {info.name} lists no vocabulary")
        return [
            wire.to_tensor(rng.integers(0, vocab, size=lead, dtype=np.int64))
            for _ in range(INPUTS_PER_LOOP)
        ]
    dims = [int(d) for d in info.input.shape[1:]]
    if any(d < 1 for d in dims):
        raise BenchError(f"model {info.name} input shape {list(info.input.shape)} is not [-1, F]")
    dtype = wire.dtype_from_proto(info.input.dtype) if info.input.dtype else np.dtype("<f4")
    return [
        wire.to_tensor(rng.standard_normal((*lead, *dims)).astype(dtype))
        for _ in range(INPUTS_PER_LOOP)
    ]


def code_name(code: int) -> str:
    """The gRPC status name of a numeric code (``CODE_<n>`` when unknown)."""
    for status in grpc.StatusCode:
        if status.value[0] == code:
            return str(status.name)
    return f"CODE_{code}"


async def session_loop(
    channel: Channel,
    session: pb.SessionInfo,
    inputs: list[pb.Tensor],
    chunk: int,
    steps: int,
    window: Window,
    latencies: list[int],
    errors: dict[str, int],
) -> tuple[int, int]:
    """Closed loop of one session until the window closes (or, with ``steps``, until it has
    applied that many in the window); returns the measured (messages, steps)."""
    request = pb.StreamRequest()
    request.step.session_id = session.session_id
    seq = session.next_seq
    measured = 0
    i = 0
    while not window.stopped:
        if steps and measured * chunk >= steps:
            break
        request.step.seq = seq
        request.step.inputs.CopyFrom(inputs[i % len(inputs)])
        i += 1
        t0 = time.perf_counter_ns()
        reply = await channel.round_trip(request)
        t1 = time.perf_counter_ns()
        counted = window.open and not window.stopped
        if reply.HasField("error"):
            code = code_name(reply.error.code)
            if counted:
                errors[code] = errors.get(code, 0) + 1
            if reply.error.code != _FAILED_PRECONDITION:
                raise BenchError(
                    f"session {session.session_id[:8]}…: {code}: {reply.error.message}"
                )
            seq = reply.error.next_seq  # a seq error tells where to resume
            continue
        seq = reply.step.next_seq
        if counted:
            measured += 1
            # A round trip sent before the window opened belongs to the warmup's conditions
            # (connection and stream set-up): it counts as throughput, not as a latency sample.
            if t0 >= window.started_ns:
                latencies.append(t1 - t0)
    return measured, measured * chunk


async def frame_loop(
    channel: Channel,
    sessions: list[pb.SessionInfo],
    inputs: list[pb.Tensor],
    chunk: int,
    steps: int,
    window: Window,
    latencies: list[int],
    errors: dict[str, int],
) -> tuple[int, int]:
    """Closed loop of one frame of sessions: each message a chunk of every session in
    ``sessions`` (``inputs`` are ``[K, chunk, ...]``); returns the measured (frames,
    session-steps applied). An entry's seq error is counted and resumed from its next_seq;
    any other error ends the run."""
    request = pb.StreamRequest()
    frame = request.frame
    frame.session_ids.extend(s.session_id for s in sessions)
    seqs = [s.next_seq for s in sessions]
    frames = applied = 0
    i = 0
    while not window.stopped:
        if steps and frames * chunk >= steps:
            break
        del frame.seqs[:]
        frame.seqs.extend(seqs)
        frame.inputs.CopyFrom(inputs[i % len(inputs)])
        i += 1
        t0 = time.perf_counter_ns()
        reply = await channel.round_trip(request)
        t1 = time.perf_counter_ns()
        counted = window.open and not window.stopped
        if reply.HasField("error"):
            raise BenchError(
                f"frame of {len(sessions)}: {code_name(reply.error.code)}: {reply.error.message}"
            )
        if not reply.HasField("frame"):
            raise BenchError(
                "the server answered a frame without a FrameResponse: it does not serve frames"
            )
        answer = reply.frame
        for failed in answer.errors:
            code = code_name(failed.error.code)
            if counted:
                errors[code] = errors.get(code, 0) + 1
            if failed.error.code != _FAILED_PRECONDITION:
                raise BenchError(
                    f"frame entry {failed.index} (session {sessions[failed.index].session_id[:8]}"
                    f"…): {code}: {failed.error.message}"
                )
        if len(answer.next_seqs) != len(sessions):
            raise BenchError(
                f"a frame of {len(sessions)} came back with {len(answer.next_seqs)} next_seqs"
            )
        seqs = list(answer.next_seqs)  # a seq error's entry says where to resume
        if counted:
            frames += 1
            applied += (len(sessions) - len(answer.errors)) * chunk
            if t0 >= window.started_ns:
                latencies.append(t1 - t0)
    return frames, applied
