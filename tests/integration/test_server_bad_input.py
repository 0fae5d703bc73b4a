"""Every bad input gets the right status and a message saying what to fix, and leaves every other
session untouched, bit for bit."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import to_tensor

from tests.support.raw import (
    next_seq_of,
    open_session,
    outputs,
    state_bytes,
    step,
    step_error,
    stream_all,
    stream_step,
)

X = np.ones((2, 3), np.float32)
Code = grpc.StatusCode


def _req(sid: str, inputs: pb.Tensor, seq: int = 0) -> pb.StepRequest:
    return pb.StepRequest(session_id=sid, seq=seq, inputs=inputs)


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


@pytest.fixture
async def witness(stub):
    """A session with some history on each model; the test checks it stays bit for bit."""
    sids = {}
    for model, x in (("tiny-gru", X), ("tiny-lstm", X), ("tiny-char", np.array([1, 2], np.int64))):
        sid = await open_session(stub, model)
        await step(stub, sid, 0, x)
        sids[model] = sid
    before = {m: await state_bytes(stub, s) for m, s in sids.items()}
    yield sids
    for model, sid in sids.items():
        assert await state_bytes(stub, sid) == before[model], model
        session = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
        assert session.next_seq == 2


def _nan_inputs() -> np.ndarray:
    x = np.ones((3, 3), np.float32)
    x[1, 2] = np.nan
    return x


CASES = [
    # (name, inputs tensor, expected code, words the message must hold)
    ("wrong dtype", to_tensor(np.ones((2, 3), np.float64)), Code.INVALID_ARGUMENT, "float32"),
    (
        "wrong feature size",
        to_tensor(np.ones((2, 4), np.float32)),
        Code.INVALID_ARGUMENT,
        "features",
    ),
    ("wrong rank", to_tensor(np.ones((2, 3, 1), np.float32)), Code.INVALID_ARGUMENT, "rank 3"),
    ("rank one", to_tensor(np.ones(3, np.float32)), Code.INVALID_ARGUMENT, "[T, 3]"),
    ("empty chunk", to_tensor(np.ones((0, 3), np.float32)), Code.INVALID_ARGUMENT, "T >= 1"),
    ("too long", to_tensor(np.ones((65, 3), np.float32)), Code.INVALID_ARGUMENT, "maximum of 64"),
    ("nan", to_tensor(_nan_inputs()), Code.INVALID_ARGUMENT, "NaN or Inf at step 1"),
    (
        "short raw data",
        pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 3], raw_data=b"\0" * 8),
        Code.INVALID_ARGUMENT,
        "needs 24 bytes",
    ),
    ("no dtype", pb.Tensor(shape=[1, 3]), Code.INVALID_ARGUMENT, "not supported"),
]


@pytest.fixture
async def small_server(start_server):
    return await start_server(max_chunk_length=64)


@pytest.mark.parametrize(("name", "tensor", "code", "words"), CASES, ids=[c[0] for c in CASES])
async def test_bad_chunk_on_step_and_stream(small_server, name, tensor, code, words):
    async with grpc.aio.insecure_channel(small_server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        other = await open_session(stub, "tiny-gru")
        await step(stub, other, 0, X)
        before = await state_bytes(stub, other)
        sid = await open_session(stub, "tiny-gru")
        err = await step_error(stub, _req(sid, tensor))
        assert err.code() == code and words in err.details(), err.details()
        [reply] = await stream_all(stub, [pb.StreamRequest(step=_req(sid, tensor), request_id=9)])
        assert reply.request_id == 9 and reply.WhichOneof("result") == "error"
        assert reply.error.code == code.value[0] and words in reply.error.message
        # Neither session moved; the bad one still takes its first chunk.
        assert await state_bytes(stub, other) == before
        assert (await step(stub, sid, 0, X)).next_seq == 2


async def test_token_out_of_vocabulary(stub, witness):
    sid = await open_session(stub, "tiny-char")
    for bad in ([3, 20], [-1]):
        err = await step_error(stub, _req(sid, to_tensor(np.array(bad, np.int64))))
        assert (
            err.code() == Code.INVALID_ARGUMENT
            and "outside the vocabulary (ids 0..19)" in err.details()
        )
    err = await step_error(stub, _req(sid, to_tensor(np.array([1.0], np.float32))))
    assert err.code() == Code.INVALID_ARGUMENT and "int64" in err.details()


async def test_nan_passes_when_configured(start_server):
    running = await start_server(nan_policy="pass")
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await open_session(stub, "tiny-gru")
        reply = await step(stub, sid, 0, _nan_inputs())
        # Run, not refused (what ONNX Runtime's kernels make of a NaN is theirs to say).
        assert reply.next_seq == 3 and outputs(reply).shape == (3, 2)


async def test_unknown_model_version_and_session(stub, witness):
    for request, words in (
        (pb.OpenSessionRequest(model="nope"), "served models: tiny-char, tiny-gru, tiny-lstm"),
        (pb.OpenSessionRequest(model="tiny-gru", version="7"), "versions: 1"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.OpenSession(request)
        assert info.value.code() == Code.NOT_FOUND and words in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.GetModel(pb.GetModelRequest(model="nope"))
    assert info.value.code() == Code.NOT_FOUND
    err = await step_error(stub, _req("x" * 22, to_tensor(X)))
    assert err.code() == Code.NOT_FOUND and "unknown" in err.details()
    [r] = await stream_all(stub, [stream_step("x" * 22, 0, X, 1)])
    assert r.error.code == Code.NOT_FOUND.value[0]


async def test_closed_session(stub, witness):
    sid = await open_session(stub, "tiny-gru")
    await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    err = await step_error(stub, _req(sid, to_tensor(X)))
    assert err.code() == Code.NOT_FOUND and "was closed" in err.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.CloseSession(pb.CloseSessionRequest(session_id=sid))
    assert info.value.code() == Code.NOT_FOUND


async def test_seq_gap_and_stale_seq(stub, witness):
    sid = await open_session(stub, "tiny-gru")
    await step(stub, sid, 0, X)
    await step(stub, sid, 2, X)
    for seq, words in ((5, "skips steps"), (0, "already applied"), (1, "already applied")):
        err = await step_error(stub, _req(sid, to_tensor(X), seq))
        assert err.code() == Code.FAILED_PRECONDITION and words in err.details()
        assert next_seq_of(err) == 4 and "expects seq 4" in err.details()
        [r] = await stream_all(stub, [stream_step(sid, seq, X, 3)])
        assert r.error.code == Code.FAILED_PRECONDITION.value[0] and r.error.next_seq == 4


async def test_malformed_state(stub, witness):
    good = {"h": to_tensor(np.zeros((2, 8), np.float32))}
    bad_states = [
        ({}, "missing ['h']"),
        ({"h": good["h"], "c": good["h"]}, "unknown ['c']"),
        ({"h": to_tensor(np.zeros((2, 7), np.float32))}, "needs float32 [2, 8]"),
        ({"h": to_tensor(np.zeros((2, 8), np.float64))}, "needs float32 [2, 8]"),
        ({"h": to_tensor(np.full((2, 8), np.inf, np.float32))}, "NaN or Inf"),
        ({"h": pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[2, 8], raw_data=b"1")}, "bytes"),
    ]
    snap = (await stub.GetState(pb.GetStateRequest(session_id=witness["tiny-gru"]))).snapshot
    for state, words in bad_states:
        bad = pb.SessionSnapshot(model="tiny-gru", version="1", next_seq=0)
        for k, v in state.items():
            bad.state[k].CopyFrom(v)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutState(pb.PutStateRequest(snapshot=bad))
        assert info.value.code() == Code.INVALID_ARGUMENT and words in info.value.details()
        # Restoring a bad snapshot over the witness leaves it as it was.
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.PutState(pb.PutStateRequest(session_id=witness["tiny-gru"], snapshot=bad))
        if state:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru", initial_state=state))
            assert info.value.code() == Code.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutState(pb.PutStateRequest(session_id="short", snapshot=snap))
    assert info.value.code() == Code.INVALID_ARGUMENT and "server-generated" in info.value.details()
    inconsistent = pb.SessionSnapshot()
    inconsistent.CopyFrom(snap)
    inconsistent.next_seq = 9
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutState(pb.PutStateRequest(snapshot=inconsistent))
    assert info.value.code() == Code.INVALID_ARGUMENT and "next_seq is 9" in info.value.details()


async def test_message_over_the_size_limit(start_server):
    running = await start_server(max_message_bytes=64 * 1024)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await open_session(stub, "tiny-gru")
        big = np.ones((10_000, 3), np.float32)  # 120 kB
        err = await step_error(stub, _req(sid, to_tensor(big)))
        assert err.code() == Code.RESOURCE_EXHAUSTED
        assert (await step(stub, sid, 0, X)).next_seq == 2


async def test_stream_that_sends_nothing(stub, witness):
    assert await stream_all(stub, []) == []


async def test_client_that_disconnects_mid_chunk(server, stub, witness):
    sid = await open_session(stub, "tiny-gru")
    for _ in range(5):
        channel = grpc.aio.insecure_channel(server.address)
        call = pb_grpc.InferenceServiceStub(channel).Stream()
        await call.write(stream_step(sid, 0, np.ones((64, 3), np.float32), 1))
        await channel.close(grace=None)  # gone before the reply
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await call.read()
        unary_channel = grpc.aio.insecure_channel(server.address)
        pending = asyncio.ensure_future(
            pb_grpc.InferenceServiceStub(unary_channel).Step(
                _req(sid, to_tensor(np.ones((64, 3), np.float32)))
            )
        )
        await asyncio.sleep(0)
        pending.cancel()
        await unary_channel.close(grace=None)
    # Each chunk either applied once or not at all; the session goes on from where it says.
    info = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
    assert info.next_seq in (0, 64)
    assert (await step(stub, sid, info.next_seq, X)).next_seq == info.next_seq + 2
    # No leaked slots: only the witnesses and this session hold state.
    assert len(server.server.sessions) == 4


@pytest.mark.parametrize("after", [0, 1, 2], ids=["first", "lockstep", "read-ahead"])
async def test_a_stream_message_that_is_not_a_stream_request(server, stub, witness, after):
    # Bytes that do not decode as a StreamRequest end the call with INVALID_ARGUMENT, whether
    # they come first, after a chunk of one session, or once the stream reads ahead.
    sids = [await open_session(stub, "tiny-gru") for _ in range(2)]
    good = [stream_step(sids[i], 0, X, i).SerializeToString() for i in range(after)]
    async with grpc.aio.insecure_channel(server.address) as channel:
        raw = channel.stream_stream("/rnnserve.v1.InferenceService/Stream")
        call = raw(iter([*good, b"\x0a\xff\xff\xff"]))  # field 1, length-delimited, truncated
        replies = [r async for r in _tolerant(call)]
        assert await call.code() == Code.INVALID_ARGUMENT
        assert "not a valid rnnserve.v1.StreamRequest" in await call.details()
    assert len(replies) <= after  # each good chunk answered (or dropped with the call)


async def _tolerant(call):
    try:
        async for reply in call:
            yield reply
    except grpc.aio.AioRpcError:
        return


# -- findings of the black-box test (issue 10): each failed before its fix --------------------

HUGE_SHAPES = [[2**62, 0], [2**40, 2**40, 0], [0, 2**62], [1] * 70]


async def _snapshot(stub, sid: str) -> pb.SessionSnapshot:
    return (await stub.GetState(pb.GetStateRequest(session_id=sid))).snapshot


async def test_seq_near_the_limit_is_refused_and_loses_nothing(stub, witness):
    sid = await open_session(stub, "tiny-gru")
    snap = await _snapshot(stub, sid)
    for too_far in (2**64 - 1, 2**63):
        snap.next_seq = too_far
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutState(pb.PutStateRequest(session_id=sid, snapshot=snap))
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert "largest seq" in info.value.details()
    last = 2**63 - 1
    snap.next_seq = last - 1  # room for one step, not two
    await stub.PutState(pb.PutStateRequest(session_id=sid, snapshot=snap))
    bystanders = [await open_session(stub, "tiny-gru") for _ in range(20)]
    # The bad chunk and twenty good ones in one go: only the bad one is refused.
    requests = [stream_step(sid, last - 1, X, 0)]
    requests += [stream_step(b, 0, X, i + 1) for i, b in enumerate(bystanders)]
    replies = {r.request_id: r for r in await stream_all(stub, requests)}
    assert replies[0].error.code == Code.OUT_OF_RANGE.value[0]
    assert "largest seq" in replies[0].error.message
    for i in range(1, 21):
        assert replies[i].WhichOneof("result") == "step" and replies[i].step.next_seq == 2
    err = await step_error(stub, _req(sid, to_tensor(X), last - 1))
    assert err.code() == Code.OUT_OF_RANGE
    # Not left busy: the session still answers and takes the one step it has room for.
    assert (await _snapshot(stub, sid)).next_seq == last - 1
    reply = await step(stub, sid, last - 1, X[:1])
    assert reply.next_seq == last
    await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))


@pytest.mark.parametrize("shape", HUGE_SHAPES, ids=["2^62x0", "2^40x2^40x0", "0x2^62", "rank70"])
async def test_shapes_numpy_cannot_hold_are_invalid_everywhere(stub, witness, shape):
    bad = pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=shape)
    sid = await open_session(stub, "tiny-gru")
    err = await step_error(stub, _req(sid, bad))
    assert err.code() == Code.INVALID_ARGUMENT, err.details()
    [r] = await stream_all(stub, [pb.StreamRequest(step=_req(sid, bad), request_id=1)])
    assert r.error.code == Code.INVALID_ARGUMENT.value[0]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru", initial_state={"h": bad}))
    assert info.value.code() == Code.INVALID_ARGUMENT
    snap = await _snapshot(stub, witness["tiny-gru"])
    with_bad_state = pb.SessionSnapshot()
    with_bad_state.CopyFrom(snap)
    with_bad_state.state["h"].CopyFrom(bad)
    with_bad_outputs = pb.SessionSnapshot()
    with_bad_outputs.CopyFrom(snap)
    with_bad_outputs.last_outputs.CopyFrom(bad)
    for broken in (with_bad_state, with_bad_outputs):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutState(pb.PutStateRequest(snapshot=broken))
        assert info.value.code() == Code.INVALID_ARGUMENT, info.value.details()


async def test_undecodable_unary_request_is_invalid_without_a_traceback(server, witness, caplog):
    async with grpc.aio.insecure_channel(server.address) as channel:
        for method in ("Step", "OpenSession", "PutState", "GetSession"):
            call = channel.unary_unary(f"/rnnserve.v1.InferenceService/{method}")
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call(bytes.fromhex("0affffffff0f"))
            assert info.value.code() == Code.INVALID_ARGUMENT
            assert "is not a valid rnnserve.v1." in info.value.details()
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_long_ids_and_names_are_not_echoed_whole(stub, witness):
    long_id = "a" * 10_000
    err = await step_error(stub, _req(long_id, to_tensor(X)))
    assert err.code() == Code.NOT_FOUND and "(10000 characters)" in err.details()
    assert len(err.details()) < 1100
    for request in (
        pb.OpenSessionRequest(model="m" * 10_000),
        pb.OpenSessionRequest(model="tiny-gru", version="v" * 10_000),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.OpenSession(request)
        assert info.value.code() == Code.NOT_FOUND and len(info.value.details()) < 1100
    [r] = await stream_all(stub, [stream_step(long_id, 0, X, 1)])
    assert r.error.code == Code.NOT_FOUND.value[0]


async def test_putstate_checks_last_outputs_against_the_model(stub, witness):
    snap = await _snapshot(stub, witness["tiny-gru"])  # last chunk: 2 steps, 2 outputs each
    assert list(snap.last_outputs.shape) == [2, 2]
    cases = [
        (to_tensor(np.ones((2, 2), np.float64)), "float64 [2, 2]"),
        (to_tensor(np.ones((2, 3), np.float32)), "float32 [2, 3]"),
        (to_tensor(np.ones((2, 2, 1), np.float32)), "float32 [2, 2, 1]"),
        (to_tensor(np.ones(2, np.float32)), "float32 [2]"),
    ]
    for tensor, words in cases:
        bad = pb.SessionSnapshot()
        bad.CopyFrom(snap)
        bad.last_outputs.CopyFrom(tensor)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutState(pb.PutStateRequest(snapshot=bad))
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert words in info.value.details() and "makes float32 [T, 2]" in info.value.details()
    bad = pb.SessionSnapshot()
    bad.CopyFrom(snap)
    bad.last_inputs_digest = b"short"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.PutState(pb.PutStateRequest(snapshot=bad))
    assert info.value.code() == Code.INVALID_ARGUMENT and "16 bytes" in info.value.details()
