"""An in-process fake of the rnnserve Stream call that answers frames as the contract says
(proto/rnnserve/v1/rnnserve.proto, StepFrame), for unit tests of the SDK's multiplexer: a
running sum per session as its memory cell, exactly-once per entry by seq and a one-chunk
cache, and controls to hold replies back and to cut every call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import numpy as np
from rnnserve.client import AsyncClient
from rnnserve.client.aio_session import AsyncSession
from rnnserve.client.models import ModelInfo
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import from_tensor, to_tensor

FEATURES, OUTPUTS = 3, 2


def feature_model(name: str = "fake", features: int = FEATURES, max_chunk: int = 64) -> ModelInfo:
    return ModelInfo.from_proto(
        pb.ModelInfo(
            name=name,
            version="1",
            cell="gru",
            input_kind=pb.INPUT_KIND_FEATURES,
            output_kind=pb.OUTPUT_KIND_REGRESSION,
            input=pb.TensorSpec(name="x", dtype=pb.DTYPE_FLOAT32, shape=[-1, features]),
            output=pb.TensorSpec(name="y", dtype=pb.DTYPE_FLOAT32, shape=[-1, OUTPUTS]),
            max_chunk_length=max_chunk,
        )
    )


def tokens_model() -> ModelInfo:
    return ModelInfo.from_proto(
        pb.ModelInfo(
            name="chars",
            version="1",
            cell="gru",
            input_kind=pb.INPUT_KIND_TOKENS,
            output_kind=pb.OUTPUT_KIND_LOGITS,
            input=pb.TensorSpec(name="x", dtype=pb.DTYPE_INT64, shape=[-1]),
            output=pb.TensorSpec(name="y", dtype=pb.DTYPE_FLOAT32, shape=[-1, 3]),
            vocabulary=["a", "b", "c"],
            max_chunk_length=64,
        )
    )


class FakeSession:
    """The server's side of a session: a running sum as memory cell and a one-chunk cache."""

    def __init__(self) -> None:
        self.h = 0.0
        self.next_seq = 0
        self.last: tuple[int, bytes, np.ndarray] | None = None

    def apply(self, seq: int, x: np.ndarray) -> np.ndarray | pb.StepError:
        key = x.tobytes()
        if self.last is not None and seq == self.last[0] and key == self.last[1]:
            return self.last[2]
        if seq != self.next_seq:
            return pb.StepError(
                code=grpc.StatusCode.FAILED_PRECONDITION.value[0],
                message=f"expected seq {self.next_seq}",
                next_seq=self.next_seq,
            )
        out = np.empty((x.shape[0], OUTPUTS), np.float32)
        for t in range(x.shape[0]):
            self.h = 0.5 * self.h + float(x[t].sum())
            out[t] = (self.h, seq + t)
        self.last = (seq, key, out)
        self.next_seq = seq + x.shape[0]
        return out


class FakeServer:
    """Answers frames on fake Stream calls as the contract says (FRAMES: per-entry errors,
    exactly-once per entry). ``hold`` keeps replies back; ``cut()`` breaks every call."""

    def __init__(self) -> None:
        self.sessions: dict[str, FakeSession] = {}
        self.messages: list[pb.StreamRequest] = []
        self.calls: list[FakeCall] = []
        self.hold = False
        self.held: list[tuple[FakeCall, pb.StreamResponse, int]] = []
        self.unanswered = 0
        self.max_unanswered = 0

    def Stream(self, metadata: Any = None) -> FakeCall:
        call = FakeCall(self)
        self.calls.append(call)
        return call

    def answer(self, request: pb.StreamRequest) -> pb.StreamResponse:
        if request.HasField("step"):
            return self.answer_step(request)
        frame = request.frame
        xs = from_tensor(frame.inputs)
        reply = pb.StreamResponse(request_id=request.request_id)
        outputs = np.zeros((len(frame.session_ids), xs.shape[1], OUTPUTS), np.float32)
        next_seqs = []
        for i, (sid, seq) in enumerate(zip(frame.session_ids, frame.seqs, strict=True)):
            session = self.sessions.get(sid)
            if session is None:
                err = pb.StepError(code=grpc.StatusCode.NOT_FOUND.value[0], message="unknown")
                reply.frame.errors.add(index=i, error=err)
                next_seqs.append(0)
                continue
            got = session.apply(int(seq), np.array(xs[i]))
            if isinstance(got, pb.StepError):
                reply.frame.errors.add(index=i, error=got)
            else:
                outputs[i] = got
            next_seqs.append(session.next_seq)
        reply.frame.next_seqs[:] = next_seqs
        reply.frame.outputs.CopyFrom(to_tensor(outputs))
        return reply

    def answer_step(self, request: pb.StreamRequest) -> pb.StreamResponse:
        step = request.step
        reply = pb.StreamResponse(request_id=request.request_id, session_id=step.session_id)
        session = self.sessions.get(step.session_id)
        if session is None:
            reply.error.code = grpc.StatusCode.NOT_FOUND.value[0]
            reply.error.message = "unknown"
            return reply
        got = session.apply(int(step.seq), np.array(from_tensor(step.inputs)))
        if isinstance(got, pb.StepError):
            reply.error.CopyFrom(got)
            return reply
        reply.step.seq = step.seq
        reply.step.next_seq = session.next_seq
        reply.step.outputs.CopyFrom(to_tensor(got))
        return reply

    def release(self) -> None:
        for call, reply, size in self.held:
            self.unanswered -= size
            call.replies.put_nowait(reply)
        self.held.clear()

    def cut(self) -> None:
        for call in self.calls:
            call.break_()
        self.held.clear()
        self.unanswered = 0


def rpc_error(code: grpc.StatusCode) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), "cut")


class FakeCall:
    """A grpc.aio stream-stream call as the multiplexer uses it: write, read, cancel."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.replies: asyncio.Queue[pb.StreamResponse | None] = asyncio.Queue()
        self.broken = False

    async def write(self, request: pb.StreamRequest) -> None:
        if self.broken:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)
        await asyncio.sleep(0)
        server = self.server
        server.messages.append(request)
        reply = server.answer(request)
        size = len(request.frame.session_ids) or 1
        if server.hold:
            server.held.append((self, reply, size))
            server.unanswered += size
            server.max_unanswered = max(server.max_unanswered, server.unanswered)
        else:
            self.replies.put_nowait(reply)

    async def read(self) -> pb.StreamResponse:
        reply = await self.replies.get()
        if reply is None:
            raise rpc_error(grpc.StatusCode.UNAVAILABLE)
        return reply

    def cancel(self) -> bool:
        self.break_()
        return True

    def break_(self) -> None:
        if not self.broken:
            self.broken = True
            self.replies.put_nowait(None)


def fake_session(
    client: AsyncClient, server: FakeServer, route: str, model: ModelInfo
) -> AsyncSession:
    sid = f"{route}.{len(server.sessions):04d}"
    server.sessions[sid] = FakeSession()
    info = pb.SessionInfo(session_id=sid, model=model.name, version="1", next_seq=0)
    return AsyncSession(client, info, model)


def twin_outputs(xs: np.ndarray) -> np.ndarray:
    """What the fake computes for one session's steps ``xs`` [T, features] from seq 0."""
    twin = FakeSession()
    out = twin.apply(0, xs.astype(np.float32))
    assert isinstance(out, np.ndarray)
    return out
