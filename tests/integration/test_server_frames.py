"""Frames on Stream: many sessions' chunks in one message, against a real server. Each entry
gets what a single step of its session would get, fails alone, and is exactly-once."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor, to_tensor

from tests.support.raw import open_session, outputs, step, stream_all

Code = grpc.StatusCode


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        yield pb_grpc.InferenceServiceStub(channel)


def _frame(rid: int, sids: list[str], seqs: list[int], x: np.ndarray) -> pb.StreamRequest:
    return pb.StreamRequest(
        request_id=rid, frame=pb.StepFrame(session_ids=sids, seqs=seqs, inputs=to_tensor(x))
    )


def _errors(reply: pb.StreamResponse) -> dict[int, pb.StepError]:
    return {e.index: e.error for e in reply.frame.errors}


async def test_a_frame_answers_every_entry_as_its_own_step_would(stub):
    rng = np.random.default_rng(0)
    sids = [await open_session(stub, "tiny-gru") for _ in range(5)]
    twins = [await open_session(stub, "tiny-gru") for _ in range(5)]
    x = rng.normal(size=(5, 2, 3)).astype(np.float32)
    [first] = await stream_all(stub, [_frame(7, sids, [0] * 5, x)])
    assert first.request_id == 7 and first.WhichOneof("result") == "frame"
    got = from_tensor(first.frame.outputs)
    assert got.shape == (5, 2, 2) and list(first.frame.next_seqs) == [2] * 5
    assert not first.frame.errors
    for i, twin in enumerate(twins):
        single = await step(stub, twin, 0, x[i])
        np.testing.assert_array_equal(got[i], outputs(single))
    # The sessions went on from the frame: their next single steps match the twins' too.
    y = rng.normal(size=(1, 3)).astype(np.float32)
    for sid, twin in zip(sids, twins, strict=True):
        a = await step(stub, sid, 2, y)
        b = await step(stub, twin, 2, y)
        np.testing.assert_array_equal(outputs(a), outputs(b))


async def test_bad_entries_fail_alone_and_a_resent_frame_is_not_applied_twice(stub):
    rng = np.random.default_rng(1)
    good = [await open_session(stub, "tiny-gru") for _ in range(3)]
    other_model = await open_session(stub, "tiny-char")
    sids = [good[0], "no-such-session", good[1], good[2], other_model]
    seqs = [0, 0, 5, 0, 0]  # good[1] at a gap
    x = rng.normal(size=(5, 1, 3)).astype(np.float32)
    frame = _frame(1, sids, seqs, x)
    [reply] = await stream_all(stub, [frame])
    errors = _errors(reply)
    assert set(errors) == {1, 2, 4}
    assert errors[1].code == Code.NOT_FOUND.value[0]
    assert errors[2].code == Code.FAILED_PRECONDITION.value[0] and errors[2].next_seq == 0
    assert reply.frame.next_seqs[2] == 0
    assert errors[4].code == Code.INVALID_ARGUMENT.value[0] and "tiny-char" in errors[4].message
    got = from_tensor(reply.frame.outputs)
    assert not got[[1, 2, 4]].any()
    assert list(reply.frame.next_seqs[i] for i in (0, 3)) == [1, 1]
    # The same frame again (a client that lost the reply): the applied entries answer from
    # the cache with the same outputs and the sessions do not move.
    [again] = await stream_all(stub, [frame])
    np.testing.assert_array_equal(from_tensor(again.frame.outputs)[[0, 3]], got[[0, 3]])
    assert list(again.frame.next_seqs[i] for i in (0, 3)) == [1, 1]
    # Other inputs at an applied seq are refused, not applied.
    [changed] = await stream_all(stub, [_frame(2, [good[0]], [0], x[1:2])])
    assert _errors(changed)[0].code == Code.FAILED_PRECONDITION.value[0]
    assert "other inputs" in _errors(changed)[0].message


async def test_a_malformed_frame_is_refused_whole_and_the_stream_goes_on(stub):
    sid = await open_session(stub, "tiny-gru")
    x = np.ones((2, 1, 3), np.float32)
    bad = [
        _frame(1, [sid, sid], [0], x),  # one seq for two ids
        _frame(2, [sid], [0], x),  # two rows of inputs for one id
        _frame(3, [sid], [0], np.ones((1, 1, 4), np.float32)),  # 4 features, the model takes 3
        _frame(4, [sid], [0], np.full((1, 1, 3), np.nan, np.float32)),
        pb.StreamRequest(request_id=5, frame=pb.StepFrame()),
    ]
    ok = _frame(6, [sid], [0], x[:1])
    replies = await stream_all(stub, [*bad, ok])
    by_id = {r.request_id: r for r in replies}
    for rid in range(1, 6):
        assert by_id[rid].WhichOneof("result") == "error", rid
        assert by_id[rid].error.code == Code.INVALID_ARGUMENT.value[0]
    assert "features" in by_id[3].error.message or "3]" in by_id[3].error.message
    assert list(by_id[6].frame.next_seqs) == [1]


async def test_a_frame_with_a_token_outside_the_vocabulary_is_refused(stub):
    sids = [await open_session(stub, "tiny-char") for _ in range(2)]
    frames = [
        _frame(1, sids, [0, 0], np.array([[3], [-1]], np.int64)),
        _frame(2, sids, [0, 0], np.array([[20], [3]], np.int64)),  # ids 0..19
        _frame(3, sids, [0, 0], np.array([[19], [0]], np.int64)),
    ]
    by_id = {r.request_id: r for r in await stream_all(stub, frames)}
    for rid, bad in ((1, -1), (2, 20)):
        assert by_id[rid].error.code == Code.INVALID_ARGUMENT.value[0]
        assert f"token id {bad}, outside the vocabulary (ids 0..19)" in by_id[rid].error.message
    assert list(by_id[3].frame.next_seqs) == [1, 1]  # nothing of the refused frames applied


async def test_an_entry_past_the_largest_seq_fails_alone(stub):
    sids = [await open_session(stub, "tiny-gru") for _ in range(2)]
    x = np.ones((2, 2, 3), np.float32)
    [reply] = await stream_all(stub, [_frame(1, sids, [2**63 - 2, 0], x)])
    [err] = reply.frame.errors
    assert err.index == 0 and err.error.code == Code.OUT_OF_RANGE.value[0]
    assert "past the largest seq" in err.error.message
    assert list(reply.frame.next_seqs) == [0, 2]  # the other entry applied


async def test_frames_and_single_steps_share_a_stream(stub):
    sids = [await open_session(stub, "tiny-lstm") for _ in range(3)]
    x = np.ones((3, 1, 3), np.float32)
    messages = [
        _frame(1, sids, [0, 0, 0], x),
        pb.StreamRequest(
            request_id=2, step=pb.StepRequest(session_id=sids[0], seq=1, inputs=to_tensor(x[0]))
        ),
        _frame(3, sids[1:], [1, 1], x[1:]),
    ]
    replies = {r.request_id: r for r in await stream_all(stub, messages)}
    assert replies[2].step.next_seq == 2
    assert list(replies[3].frame.next_seqs) == [2, 2]


async def test_a_frame_over_max_frame_sessions_is_refused(start_server):
    running = await start_server(max_frame_sessions=2)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await open_session(stub, "tiny-gru")
        [reply] = await stream_all(
            stub, [_frame(1, [sid] * 3, [0, 1, 2], np.ones((3, 1, 3), np.float32))]
        )
        assert reply.error.code == Code.INVALID_ARGUMENT.value[0]
        assert "max_frame_sessions" in reply.error.message


async def test_a_frame_whose_lookup_fails_is_answered_and_the_stream_goes_on(
    start_server, monkeypatch: pytest.MonkeyPatch
):
    running = await start_server()
    streams = running.server.servicer.streams

    def broken(sids):
        raise RuntimeError("injected lookup failure")

    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        sid = await open_session(stub, "tiny-gru")
        monkeypatch.setattr(streams, "local_many", broken)
        x = np.ones((1, 1, 3), np.float32)
        step_msg = pb.StreamRequest(
            request_id=2, step=pb.StepRequest(session_id=sid, seq=0, inputs=to_tensor(x[0]))
        )
        replies = {
            r.request_id: r for r in await stream_all(stub, [_frame(1, [sid], [0], x), step_msg])
        }
        assert replies[1].error.code == Code.INTERNAL.value[0]
        assert replies[2].step.next_seq == 1
