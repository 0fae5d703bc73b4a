"""Outputs streamed in chunks over separate RPCs and connections equal one straight run; sessions
never see each other's state; retries apply once; fork, reset, snapshot and restore."""

from __future__ import annotations

import asyncio
import itertools

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor, to_tensor

from tests.support.modelgen import reference_run
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

TOL = 1e-5


def _inputs(model_repo, model: str, steps: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if model == "tiny-char":
        return rng.integers(0, 20, steps).astype(np.int64)
    return rng.normal(0.0, 1.0, (steps, 3)).astype(np.float32)


@pytest.mark.parametrize("model", ["tiny-gru", "tiny-lstm", "tiny-char"])
async def test_chunks_over_separate_rpcs_and_channels_equal_one_run(server, model_repo, model):
    x = _inputs(model_repo, model, 23, seed=5)
    want, want_state = reference_run(model_repo / model / "1", x)
    bounds = [0, 1, 4, 5, 11, 19, 23]
    got = []
    sid = ""
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        # A new connection for every chunk; odd chunks on Step, even ones on Stream.
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            if not sid:
                sid = await open_session(stub, model)
            if i % 2:
                reply = await step(stub, sid, a, x[a:b], want_state=b == 23)
            else:
                [r] = await stream_all(stub, [stream_step(sid, a, x[a:b], i)])
                assert r.WhichOneof("result") == "step", r.error.message
                assert r.request_id == i
                reply = r.step
            assert reply.seq == a and reply.next_seq == b
            got.append(outputs(reply))
    assert np.max(np.abs(np.concatenate(got) - want)) <= TOL
    for name, value in reply.state.items():
        assert np.max(np.abs(from_tensor(value) - want_state[name])) <= TOL


@pytest.mark.parametrize("inline_max_steps", [64, 0], ids=["inline", "worker-thread"])
async def test_interleaved_sessions_on_one_stream_and_across_streams(
    start_server, model_repo, inline_max_steps
):
    server = await start_server(inline_max_steps=inline_max_steps)
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    n, steps = 6, 8
    xs = [_inputs(model_repo, "tiny-lstm", steps, seed=100 + i) for i in range(n)]
    sids = [await open_session(stub, "tiny-lstm") for _ in range(n)]
    # Half the sessions share stream A, step by step, interleaved; the others go on B and C.
    reqs_a = [
        stream_step(sids[i], t, xs[i][t : t + 1], i * 100 + t)
        for t in range(steps)
        for i in range(3)
    ]
    reqs_b = [stream_step(sids[3], t, xs[3][t : t + 2], t) for t in range(0, steps, 2)]
    reqs_c = [stream_step(sids[i], 0, xs[i], i) for i in (4, 5)]
    replies = await asyncio.gather(
        stream_all(stub, reqs_a), stream_all(stub, reqs_b), stream_all(stub, reqs_c)
    )
    per_session: dict[str, list[pb.StepResponse]] = {}
    for r in (r for rs in replies for r in rs):
        assert r.WhichOneof("result") == "step", r.error.message
        per_session.setdefault(r.session_id, []).append(r.step)
    for i, sid in enumerate(sids):
        chunks = sorted(per_session[sid], key=lambda s: s.seq)
        got = np.concatenate([outputs(c) for c in chunks])
        want, _ = reference_run(model_repo / "tiny-lstm" / "1", xs[i])
        assert np.max(np.abs(got - want)) <= TOL, f"session {i}"


async def test_pipelined_chunks_of_one_session_apply_in_order(server, model_repo):
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    x = _inputs(model_repo, "tiny-gru", 30, seed=7)
    sid = await open_session(stub, "tiny-gru")
    replies = await stream_all(stub, [stream_step(sid, t, x[t : t + 1], t) for t in range(30)])
    assert [r.request_id for r in replies] == list(range(30))
    got = np.concatenate([outputs(r.step) for r in replies])
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    assert np.max(np.abs(got - want)) <= TOL


@pytest.mark.parametrize("limit", [1, 2])
async def test_stream_backpressure_keeps_order_and_never_stalls(start_server, model_repo, limit):
    # A client that pipelines far past max_stream_inflight: the server stops reading at the
    # limit and resumes as replies go out; every chunk is still applied once, in order.
    server = await start_server(max_stream_inflight=limit)
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    x = _inputs(model_repo, "tiny-gru", 30, seed=7)
    a, b = await open_session(stub, "tiny-gru"), await open_session(stub, "tiny-gru")
    requests = [stream_step(sid, t, x[t : t + 1], 2 * t + k) for t in range(30) for k, sid in
                enumerate((a, b))]  # fmt: skip
    replies = await stream_all(stub, requests)
    assert len(replies) == 60
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    for k in (0, 1):
        mine = [r for r in replies if r.request_id % 2 == k]
        assert [r.step.seq for r in mine] == list(range(30))
        got = np.concatenate([outputs(r.step) for r in mine])
        assert np.max(np.abs(got - want)) <= TOL


async def test_retry_of_last_chunk_is_answered_again_not_applied(server, model_repo):
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    x = _inputs(model_repo, "tiny-gru", 6, seed=8)
    sid = await open_session(stub, "tiny-gru")
    await step(stub, sid, 0, x[:3])
    first = await step(stub, sid, 3, x[3:])
    before = await state_bytes(stub, sid)
    again = await step(stub, sid, 3, x[3:])  # Step retry
    [streamed] = await stream_all(stub, [stream_step(sid, 3, x[3:], 1)])  # Stream retry
    assert again == first and streamed.step == first
    assert await state_bytes(stub, sid) == before
    session = (await stub.GetSession(pb.GetSessionRequest(session_id=sid))).session
    assert session.next_seq == 6


async def test_a_different_chunk_reusing_the_last_seq_is_refused_not_answered(server, model_repo):
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    x = _inputs(model_repo, "tiny-gru", 6, seed=8)
    sid = await open_session(stub, "tiny-gru")
    await step(stub, sid, 0, x[:3])
    before = await state_bytes(stub, sid)
    other = x[:3] + 1.0  # another client's chunk with the same seq
    err = await step_error(stub, pb.StepRequest(session_id=sid, seq=0, inputs=to_tensor(other)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already applied with other inputs" in err.details()
    assert next_seq_of(err) == 3  # not dict(metadata): grpcio 1.72 iterates it as pairs
    [r] = await stream_all(stub, [stream_step(sid, 0, other, 1)])
    assert r.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and r.error.next_seq == 3
    assert await state_bytes(stub, sid) == before
    # The guard travels with a snapshot: a restored session refuses the same impostor.
    snap = (await stub.GetState(pb.GetStateRequest(session_id=sid))).snapshot
    assert len(snap.last_inputs_digest) == 16
    moved = (await stub.PutState(pb.PutStateRequest(snapshot=snap))).session.session_id
    err = await step_error(stub, pb.StepRequest(session_id=moved, seq=0, inputs=to_tensor(other)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert outputs(await step(stub, moved, 0, x[:3])).shape == (3, 2)  # the true retry still works


async def test_fork_reset_snapshot_restore(server, model_repo):
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    x = _inputs(model_repo, "tiny-lstm", 10, seed=9)
    folder = model_repo / "tiny-lstm" / "1"
    want, _ = reference_run(folder, x)
    sid = await open_session(stub, "tiny-lstm")
    await step(stub, sid, 0, x[:4])

    fork = (await stub.ForkSession(pb.ForkSessionRequest(session_id=sid))).session
    assert fork.session_id != sid and fork.next_seq == 4
    snap = (await stub.GetState(pb.GetStateRequest(session_id=sid))).snapshot
    assert snap.next_seq == 4 and snap.last_seq == 0

    got_parent = outputs(await step(stub, sid, 4, x[4:]))
    got_fork = outputs(await step(stub, fork.session_id, 4, x[4:]))
    assert np.max(np.abs(got_parent - want[4:])) <= TOL
    assert np.max(np.abs(got_fork - want[4:])) <= TOL

    # Restore the snapshot (as a new id, then over the parent): it continues from step 4 again.
    restored = (await stub.PutState(pb.PutStateRequest(snapshot=snap))).session
    assert restored.next_seq == 4
    got = outputs(await step(stub, restored.session_id, 4, x[4:]))
    assert np.max(np.abs(got - want[4:])) <= TOL
    await stub.PutState(pb.PutStateRequest(session_id=sid, snapshot=snap))
    assert np.max(np.abs(outputs(await step(stub, sid, 4, x[4:])) - want[4:])) <= TOL

    # Reset: zeros again, seq goes on.
    reset = (await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))).session
    assert reset.next_seq == 10
    got = outputs(await step(stub, sid, 10, x[:4]))
    assert np.max(np.abs(got - want[:4])) <= TOL


async def test_initial_state_and_put_state_into_an_unknown_id(server, model_repo):
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    folder = model_repo / "tiny-gru" / "1"
    rng = np.random.default_rng(3)
    h = rng.normal(size=(2, 8)).astype(np.float32)
    x = _inputs(model_repo, "tiny-gru", 5, seed=10)
    want, _ = reference_run(folder, x, {"h": h})
    opened = await stub.OpenSession(
        pb.OpenSessionRequest(model="tiny-gru", initial_state={"h": to_tensor(h)})
    )
    sid = opened.session.session_id
    assert len(sid) >= 22
    assert np.max(np.abs(outputs(await step(stub, sid, 0, x)) - want)) <= TOL

    snap = (await stub.GetState(pb.GetStateRequest(session_id=sid))).snapshot
    moved_id = "route-1." + "A" * 22  # an id another replica generated
    moved = (await stub.PutState(pb.PutStateRequest(session_id=moved_id, snapshot=snap))).session
    assert moved.session_id == moved_id and moved.next_seq == 5
    # The last chunk's retry is still idempotent on the new replica.
    again = await step(stub, moved_id, 0, x)
    assert np.array_equal(outputs(again), outputs(await step(stub, sid, 0, x)))
    err = await step_error(stub, pb.StepRequest(session_id=moved_id, seq=7, inputs=to_tensor(x)))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_list_and_get_model(server):
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    models = (await stub.ListModels(pb.ListModelsRequest())).models
    assert [m.name for m in models] == ["tiny-char", "tiny-gru", "tiny-lstm"]
    char = (await stub.GetModel(pb.GetModelRequest(model="tiny-char"))).model
    assert char.input_kind == pb.INPUT_KIND_TOKENS and len(char.vocabulary) == 20
    assert char.provider == "CPUExecutionProvider" and char.versions == ["1"]
    assert list(char.input.shape) == [-1]
    lstm = (await stub.GetModel(pb.GetModelRequest(model="tiny-lstm", version="1"))).model
    assert [(s.name, list(s.shape)) for s in lstm.states] == [("h", [2, 8]), ("c", [2, 8])]
    assert lstm.max_chunk_length == server.settings.max_chunk_length
    assert "lstm0=CPUExecutionProvider" in lstm.metadata["rnn_nodes"]


async def test_a_stream_goes_from_lockstep_to_read_ahead_when_it_names_a_second_session(
    server, model_repo
):
    # A stream starts in lockstep (one session, each chunk answered before the next is read);
    # the first message naming another session switches it to reading ahead. Outputs of both
    # sessions equal one straight run either way.
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(server.address))
    x = _inputs(model_repo, "tiny-gru", 12, seed=11)
    y = _inputs(model_repo, "tiny-gru", 12, seed=12)
    a, b = await open_session(stub, "tiny-gru"), await open_session(stub, "tiny-gru")
    call = stub.Stream()
    got: dict[str, list[np.ndarray]] = {a: [], b: []}
    for t in range(4):  # closed loop on one session
        await call.write(stream_step(a, t, x[t : t + 1], t))
        reply = await call.read()
        assert reply.request_id == t and reply.step.next_seq == t + 1
        got[a].append(outputs(reply.step))
    for t in range(4, 12):  # then both sessions, pipelined, without reading in between
        await call.write(stream_step(a, t, x[t : t + 1], 100 + t))
        await call.write(stream_step(b, t - 4, y[t - 4 : t - 3], 200 + t))
    await call.done_writing()
    while (reply := await call.read()) is not grpc.aio.EOF:
        assert reply.WhichOneof("result") == "step", reply.error.message
        got[reply.session_id].append(outputs(reply.step))
    assert len(got[a]) == 12 and len(got[b]) == 8
    want_a, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    want_b, _ = reference_run(model_repo / "tiny-gru" / "1", y[:8])
    assert np.max(np.abs(np.concatenate(got[a]) - want_a)) <= TOL
    assert np.max(np.abs(np.concatenate(got[b]) - want_b)) <= TOL
    assert await call.code() == grpc.StatusCode.OK
