"""Thin helpers over the raw generated stubs (not the SDK) for the server's own tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import grpc
import numpy as np
from inference import grpc_service_pb2 as oip
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import NEXT_SEQ_KEY, from_tensor, to_tensor

Stub = pb_grpc.InferenceServiceStub


async def open_session(stub: Stub, model: str, version: str = "") -> str:
    reply = await stub.OpenSession(pb.OpenSessionRequest(model=model, version=version))
    return reply.session.session_id


async def step(
    stub: Stub, sid: str, seq: int, inputs: np.ndarray, want_state: bool = False
) -> pb.StepResponse:
    return await stub.Step(
        pb.StepRequest(session_id=sid, seq=seq, inputs=to_tensor(inputs), want_state=want_state)
    )


async def step_error(stub: Stub, request: pb.StepRequest) -> grpc.aio.AioRpcError:
    """The error a Step call ends with (AssertionError when it succeeds)."""
    try:
        await stub.Step(request)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError("the call succeeded")


def next_seq_of(err: grpc.aio.AioRpcError) -> int | None:
    for key, value in err.trailing_metadata() or ():
        if key == NEXT_SEQ_KEY:
            return int(value)
    return None


async def stream_all(stub: Stub, requests: Iterable[pb.StreamRequest]) -> list[pb.StreamResponse]:
    """Send every request on one Stream call, half-close, collect every reply."""
    reqs = list(requests)

    async def gen() -> AsyncIterator[pb.StreamRequest]:
        for r in reqs:
            yield r

    return [reply async for reply in stub.Stream(gen())]


def stream_step(sid: str, seq: int, inputs: np.ndarray, request_id: int) -> pb.StreamRequest:
    return pb.StreamRequest(
        step=pb.StepRequest(session_id=sid, seq=seq, inputs=to_tensor(inputs)),
        request_id=request_id,
    )


async def state_bytes(stub: Stub, sid: str) -> dict[str, bytes]:
    """A session's memory cell as raw bytes per state (for bit-for-bit comparisons)."""
    snap = (await stub.GetState(pb.GetStateRequest(session_id=sid))).snapshot
    return {name: t.raw_data for name, t in snap.state.items()}


def outputs(reply: pb.StepResponse) -> np.ndarray:
    return np.asarray(from_tensor(reply.outputs))


def oip_request(
    model: str, x: np.ndarray, sid: int, *, start: bool = False, end: bool = False
) -> oip.ModelInferRequest:
    """An Open Inference Protocol request: one chunk ``x`` ``[T, F]`` of sequence ``sid``,
    raw float32, with the request's id set to the sequence id."""
    req = oip.ModelInferRequest(model_name=model, id=str(sid))
    req.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    req.raw_input_contents.append(x.astype("<f4").tobytes())
    req.parameters["sequence_id"].uint64_param = sid
    req.parameters["sequence_start"].bool_param = start
    req.parameters["sequence_end"].bool_param = end
    return req


def oip_outputs(reply: oip.ModelInferResponse) -> np.ndarray:
    """The first output of an Open Inference Protocol response, as its shape says."""
    shape = list(reply.outputs[0].shape)
    return np.frombuffer(reply.raw_output_contents[0], "<f4").reshape(shape)
