"""The multiplexer's frames against an in-process fake of the Stream call (no server): what goes
in one message, how replies reach their sessions, per-entry errors, resends after a cut, and the
in-flight bound. The real server's side is in tests/integration/test_client_frames.py."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
from rnnserve.client import (
    AsyncClient,
    ClientOptions,
    InvalidInput,
    RetryPolicy,
    RnnserveError,
    SessionLost,
    StepManyError,
)
from rnnserve.client._frames import Part, frame_key, pack
from rnnserve.client._many import encode_many
from rnnserve.client.models import ModelInfo

from tests.support.fake_stream import (
    FEATURES,
    OUTPUTS,
    FakeServer,
    FakeSession,
    fake_session,
    feature_model,
    tokens_model,
    twin_outputs,
)

FAST = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01, give_up_after_s=5.0)


@pytest.fixture
async def fake() -> Any:
    client = AsyncClient(ClientOptions(target="127.0.0.1:1", retry=FAST))
    server = FakeServer()
    client._stub = server  # type: ignore[assignment]
    yield client, server
    await client.close()


async def test_steps_of_one_tick_go_out_as_one_frame(fake: Any) -> None:
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(10)]
    xs = np.random.default_rng(1).normal(size=(10, 2, FEATURES)).astype(np.float32)
    async with client.multiplexer(streams=1) as mux:
        outs = await asyncio.gather(*(mux.step(s, xs[k]) for k, s in enumerate(sessions)))
        assert len(server.messages) == 1
        assert list(server.messages[0].frame.session_ids) == [s.id for s in sessions]
        # A one-step chunk and a two-step chunk are two groups: two frames in the tick.
        await asyncio.gather(mux.step(sessions[0], xs[0, 0]), mux.step(sessions[1], xs[1]))
        assert len(server.messages) == 3
    for k in range(10):
        np.testing.assert_allclose(outs[k], twin_outputs(xs[k]))
    assert sessions[0].next_seq == 3 and sessions[1].next_seq == 4


async def test_step_many_returns_rows_and_splits_by_max_frame(fake: Any) -> None:
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(10)]
    xs = np.random.default_rng(2).normal(size=(10, 3, FEATURES)).astype(np.float32)
    async with client.multiplexer(max_frame=4) as mux:
        got = await mux.step_many(sessions, xs)
        assert [len(m.frame.session_ids) for m in server.messages] == [4, 4, 2]
        one = await mux.step_many(sessions[:2], xs[:2, 0])  # one step each: [N, outputs]
        assert one.shape == (2, OUTPUTS)
    assert got.shape == (10, 3, OUTPUTS)
    for k in range(10):
        np.testing.assert_allclose(got[k], twin_outputs(xs[k]))
    assert [s.next_seq for s in sessions] == [4, 4] + [3] * 8


async def test_step_many_reports_a_failed_entry_and_keeps_the_others(fake: Any) -> None:
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(4)]
    del server.sessions[sessions[2].id]  # the server no longer knows it
    xs = np.ones((4, 2, FEATURES), np.float32)
    async with client.multiplexer() as mux:
        with pytest.raises(StepManyError) as info:
            await mux.step_many(sessions, xs)
    err = info.value
    assert err.failed == [2] and isinstance(err.errors[2], SessionLost)
    assert err.code == grpc.StatusCode.NOT_FOUND
    assert np.all(np.isnan(err.outputs[2]))
    for k in (0, 1, 3):
        np.testing.assert_allclose(err.outputs[k], twin_outputs(xs[k]))
        assert sessions[k].next_seq == 2
    assert sessions[2].next_seq == 0  # refused, not in doubt: its seq is free again


async def test_a_seq_refusal_is_resolved_per_entry(fake: Any) -> None:
    """The server holds one session further back (it restored an older copy): that entry
    replays its answered chunk, the others are untouched, all in frames."""
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(3)]
    xs = np.random.default_rng(3).normal(size=(3, 4, FEATURES)).astype(np.float32)
    async with client.multiplexer() as mux:
        await mux.step_many(sessions, xs[:, :2])
        server.sessions[sessions[1].id] = FakeSession()  # back at seq 0
        got = await mux.step_many(sessions, xs[:, 2:])
    for k in range(3):
        np.testing.assert_allclose(got[k], twin_outputs(xs[k])[2:], rtol=1e-6)
    assert all(server.sessions[s.id].next_seq == 4 for s in sessions)


async def test_a_cut_resends_every_unanswered_entry_once(fake: Any) -> None:
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(6)]
    xs = np.random.default_rng(4).normal(size=(6, 4, FEATURES)).astype(np.float32)
    async with client.multiplexer(streams=1) as mux:
        server.hold = True  # applied on the server, replies lost in the cut
        steps = asyncio.gather(*(mux.step(s, xs[k, :2]) for k, s in enumerate(sessions)))
        while not server.held:
            await asyncio.sleep(0.001)
        server.hold = False
        server.cut()
        first = await steps
        many = mux.step_many(sessions, xs[:, 2:])
        server.hold = True
        task = asyncio.ensure_future(many)
        while not server.held:
            await asyncio.sleep(0.001)
        server.hold = False
        server.cut()
        second = await task
    assert len(server.calls) == 3
    for k in range(6):
        np.testing.assert_allclose(
            np.concatenate([first[k], second[k]]), twin_outputs(xs[k]), rtol=1e-6
        )
        assert server.sessions[sessions[k].id].next_seq == 4  # applied once


async def test_inflight_entries_are_bounded(fake: Any) -> None:
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(20)]
    xs = np.ones((20, 1, FEATURES), np.float32)
    async with client.multiplexer(max_frame=3, max_inflight=5) as mux:
        server.hold = True
        steps = asyncio.gather(*(mux.step(s, xs[k]) for k, s in enumerate(sessions)))
        for _ in range(50):
            await asyncio.sleep(0.001)
            server.release()
        server.hold = False
        server.release()
        await steps
        server.hold = True  # step_many's parts of 3: a second one does not fit beside the first
        many = asyncio.ensure_future(mux.step_many(sessions, xs))
        for _ in range(50):
            await asyncio.sleep(0.001)
            server.release()
        server.hold = False
        server.release()
        await many
    assert 0 < server.max_unanswered <= 5
    assert all(len(m.frame.session_ids) <= 3 for m in server.messages)


def test_pack_groups_by_shape_and_caps_frames() -> None:
    loop = asyncio.new_event_loop()
    try:
        model, other = feature_model(), feature_model("wide", features=5)

        def part(m: ModelInfo, n: int, steps: int) -> Part:
            x = np.zeros((n, steps, m.step_shape[0]), np.float32)
            return Part(["s"] * n, [0] * n, x, frame_key(m, steps), loop)

        parts = [part(model, 2, 1), part(other, 1, 1), part(model, 2, 1), part(model, 1, 2)]
        frames = pack(parts, max_frame=3)
        assert [[parts.index(p) for p in f] for f in frames] == [[0], [1], [2], [3]]
        assert [[parts.index(p) for p in f] for f in pack(parts, max_frame=4)] == [
            [0, 2],
            [1],
            [3],
        ]
    finally:
        loop.close()


def test_encode_many_checks_the_whole_batch() -> None:
    model = feature_model()
    chunks, single = encode_many(model, np.zeros((4, FEATURES)), 4)
    assert chunks.shape == (4, 1, FEATURES) and single and chunks.dtype == np.float32
    with pytest.raises(InvalidInput, match="expects 4 entries"):
        encode_many(model, np.zeros((3, 2, FEATURES)), 4)
    with pytest.raises(InvalidInput, match="got shape"):
        encode_many(model, np.zeros((4, 2, FEATURES + 1)), 4)
    bad = np.zeros((4, 2, FEATURES))
    bad[2, 1, 0] = np.nan
    with pytest.raises(InvalidInput, match="entry 2, step 1"):
        encode_many(model, bad, 4)
    chars = tokens_model()
    ids, single = encode_many(chars, ["ab", "ca"], 2)
    assert ids.tolist() == [[0, 1], [2, 0]] and not single
    with pytest.raises(InvalidInput, match="same number of steps"):
        encode_many(chars, ["ab", "c"], 2)
    with pytest.raises(InvalidInput, match="token id 3"):
        encode_many(chars, np.array([[0, 3]]), 1)


async def test_step_many_cuts_long_chunks_to_the_server_limit(fake: Any) -> None:
    client, server = fake
    model = feature_model(max_chunk=2)
    sessions = [fake_session(client, server, "k", model) for _ in range(3)]
    xs = np.random.default_rng(5).normal(size=(3, 5, FEATURES)).astype(np.float32)
    async with client.multiplexer() as mux:
        got = await mux.step_many(sessions, xs)
    assert [m.frame.inputs.shape[1] for m in server.messages] == [2, 2, 1]
    for k in range(3):
        np.testing.assert_allclose(got[k], twin_outputs(xs[k]), rtol=1e-6)
    assert [s.next_seq for s in sessions] == [5, 5, 5]


async def test_closing_the_multiplexer_fails_waiting_steps(fake: Any) -> None:
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(3)]
    mux = client.multiplexer()
    server.hold = True
    steps = asyncio.gather(
        *(mux.step(s, np.ones(FEATURES, np.float32)) for s in sessions), return_exceptions=True
    )
    while not server.held:
        await asyncio.sleep(0.001)
    await mux.close()
    results = await steps
    assert all(isinstance(r, RnnserveError) for r in results)
    assert {r.code for r in results if isinstance(r, RnnserveError)} == {grpc.StatusCode.CANCELLED}


async def test_step_many_completes_a_chunk_left_in_doubt_first(fake: Any) -> None:
    """A step cancelled while its frame was out leaves its chunk in doubt; step_many sends it
    again (the server answers from its cache) before the session's new row."""
    client, server = fake
    model = feature_model()
    sessions = [fake_session(client, server, "k", model) for _ in range(2)]
    xs = np.random.default_rng(6).normal(size=(2, 3, FEATURES)).astype(np.float32)
    async with client.multiplexer() as mux:
        server.hold = True
        lost = asyncio.ensure_future(mux.step(sessions[0], xs[0, :2]))
        while not server.held:
            await asyncio.sleep(0.001)
        lost.cancel()
        server.hold = False
        server.held.clear()  # its reply never arrives
        assert sessions[0]._core.ledger.pending is not None
        got = await mux.step_many(sessions, xs[:, 2:])
    np.testing.assert_allclose(got[0], twin_outputs(xs[0])[2:], rtol=1e-6)
    np.testing.assert_allclose(got[1], twin_outputs(xs[1, 2:]), rtol=1e-6)
    assert server.sessions[sessions[0].id].next_seq == 3 == sessions[0].next_seq
