"""Frames from the SDK against the real server: the multiplexer coalesces one loop tick's steps
into one Stream message, ``step_many`` sends a batch in hand, and each entry keeps the contract
of a single step (same numbers, its own errors, exactly once across a cut, bounded in flight).

Messages are counted on the client's side of the wire: the test wraps the client's stub, so each
``write`` on a Stream call is one message, whatever the server does with it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import (
    AsyncClient,
    ClientOptions,
    RetryPolicy,
    RnnserveError,
    SessionLost,
    StepManyError,
)
from rnnserve.manifest import load_manifest
from rnnserve.v1 import rnnserve_pb2 as pb

from tests.integration.test_client_resume import CuttableProxy
from tests.support.modelgen import reference_run

TOL = 1e-5
FAST_RETRY = RetryPolicy(initial_backoff_s=0.02, max_backoff_s=0.2, give_up_after_s=30.0)

# Frames need a server that serves them: a test must fail, never hang, on one that does not.
pytestmark = pytest.mark.timeout(120)


class _CountingCall:
    """A Stream call that counts what goes over it into its ``_Counter``."""

    def __init__(self, counter: _Counter, call: Any) -> None:
        self._counter = counter
        self._call = call
        self._sizes: dict[int, int] = {}

    async def write(self, request: pb.StreamRequest) -> None:
        counter = self._counter
        size = len(request.frame.session_ids) if request.HasField("frame") else 1
        counter.messages += 1
        counter.entries += size
        counter.frame_sizes.append(size)
        self._sizes[request.request_id] = size
        counter.unanswered += size
        counter.max_unanswered = max(counter.max_unanswered, counter.unanswered)
        await self._call.write(request)

    async def read(self) -> Any:
        reply = await self._call.read()
        if isinstance(reply, pb.StreamResponse):
            self._counter.unanswered -= self._sizes.pop(reply.request_id, 0)
        return reply

    def cancel(self) -> bool:
        self._counter.unanswered -= sum(self._sizes.values())
        self._sizes.clear()
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class _Counter:
    """Wraps a client's stub: Stream messages written, session-chunks in them, and the most
    session-chunks written and not yet answered at any time."""

    def __init__(self, client: AsyncClient) -> None:
        self._stub = client._stub
        self.messages = 0
        self.entries = 0
        self.frame_sizes: list[int] = []
        self.unanswered = 0
        self.max_unanswered = 0
        client._stub = self  # type: ignore[assignment]

    def Stream(self, *args: Any, **kwargs: Any) -> _CountingCall:
        return _CountingCall(self, self._stub.Stream(*args, **kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stub, name)


def _inputs(model_repo: Path, model: str, shape: tuple[int, ...], seed: int) -> np.ndarray:
    manifest = load_manifest(model_repo / model / "1")
    rng = np.random.default_rng(seed)
    if manifest.input_kind == "tokens":
        return rng.integers(0, len(manifest.vocabulary or []), size=shape).astype(np.int64)
    return rng.normal(size=(*shape, manifest.input_size)).astype(np.float32)


@pytest.mark.parametrize("model", ["tiny-gru", "tiny-lstm", "tiny-char"])
async def test_one_tick_of_steps_is_one_message(server: Any, model_repo: Path, model: str) -> None:
    n, rounds, chunk = 32, 3, 2
    xs = _inputs(model_repo, model, (n, rounds * chunk), seed=31)
    async with AsyncClient(server.address) as client:
        counter = _Counter(client)
        async with client.multiplexer(streams=1) as mux:
            sessions = [await mux.session(model) for _ in range(n)]
            outs: list[list[np.ndarray]] = [[] for _ in range(n)]
            for r in range(rounds):
                part = slice(r * chunk, (r + 1) * chunk)
                got = await asyncio.gather(
                    *(mux.step(s, xs[k, part]) for k, s in enumerate(sessions))
                )
                for k in range(n):
                    outs[k].append(got[k])
        # Every round's 32 steps went out as one frame: 3 messages for 96 session-chunks.
        assert counter.frame_sizes == [n] * rounds
        for k, s in enumerate(sessions):
            expected, _ = reference_run(model_repo / model / "1", xs[k])
            assert np.max(np.abs(np.concatenate(outs[k]) - expected)) <= TOL
            assert s.next_seq == rounds * chunk
        await asyncio.gather(*(s.close() for s in sessions))


async def test_step_many_matches_single_steps_on_twin_sessions(
    server: Any, model_repo: Path
) -> None:
    """The same inputs through step_many and through AsyncSession.step (unary Step) on twin
    sessions give the same numbers, chunk after chunk, with one-step and multi-step rows."""
    n = 24
    xs = _inputs(model_repo, "tiny-lstm", (n, 7), seed=32)
    async with AsyncClient(server.address) as client:
        counter = _Counter(client)
        async with client.multiplexer(streams=2) as mux:
            sessions = [await mux.session("tiny-lstm") for _ in range(n)]
            twins = [await client.session("tiny-lstm") for _ in range(n)]
            for part in (slice(0, 3), slice(3, 4), slice(4, 7)):
                one = part.stop - part.start == 1
                batch = xs[:, part.start] if one else xs[:, part]
                got = await mux.step_many(sessions, batch)
                want = await asyncio.gather(*(t.step(batch[k]) for k, t in enumerate(twins)))
                assert got.shape == np.stack(want).shape
                assert np.max(np.abs(got - np.stack(want))) <= TOL
            # Two lanes (route keys), three calls: six frames of 12.
            assert sorted(counter.frame_sizes) == [n // 2] * 6
            for s, t in zip(sessions, twins, strict=True):
                assert s.next_seq == t.next_seq == 7
                mine, theirs = await s.state(), await t.state()
                for name, value in mine.items():
                    assert np.max(np.abs(value - theirs[name])) <= TOL
            await asyncio.gather(*(s.close() for s in [*sessions, *twins]))


async def test_step_many_reports_failed_entries_and_keeps_the_others(
    server: Any, model_repo: Path
) -> None:
    n = 8
    xs = _inputs(model_repo, "tiny-gru", (n, 3), seed=33)
    async with AsyncClient(server.address) as client, client.multiplexer() as mux:
        sessions = [await mux.session("tiny-gru") for _ in range(n)]
        # Entry 2: ended on the server by another handle (the server answers NOT_FOUND for it);
        # entry 5: closed through this very handle (refused before sending, as step() does).
        await (await client.attach(sessions[2].id)).close()
        await sessions[5].close()
        with pytest.raises(StepManyError) as info:
            await mux.step_many(sessions, xs)
        err = info.value
        assert err.failed == [2, 5]
        assert isinstance(err.errors[2], SessionLost)
        assert err.errors[2].code == grpc.StatusCode.NOT_FOUND
        assert err.errors[5].code == grpc.StatusCode.FAILED_PRECONDITION
        assert "closed" in err.errors[5].message
        assert err.code == grpc.StatusCode.NOT_FOUND and "2 of 8 entries failed" in str(err)
        for k in range(n):
            if k in (2, 5):
                assert np.all(np.isnan(err.outputs[k]))
                continue
            expected, _ = reference_run(model_repo / "tiny-gru" / "1", xs[k])
            assert np.max(np.abs(err.outputs[k] - expected)) <= TOL
            assert (await client.attach(sessions[k].id)).next_seq == 3
        # The good sessions go on; a single step of the lost one raises what step_many said.
        good = [s for k, s in enumerate(sessions) if k not in (2, 5)]
        out_size = sessions[0].model.output_size
        assert (await mux.step_many(good, xs[: len(good), :1])).shape == (len(good), 1, out_size)
        with pytest.raises(SessionLost):
            await mux.step(sessions[2], xs[2, 0])


async def test_step_many_resumes_exactly_once_across_cuts(server: Any, model_repo: Path) -> None:
    """A frame applied on the server whose reply is lost in a cut is sent again at the same
    seqs and answered from each session's cached reply: every session applied each step once."""
    n, chunk, rounds = 16, 3, 4
    xs = _inputs(model_repo, "tiny-gru", (n, chunk * rounds), seed=34)
    proxy = CuttableProxy(server.port)
    port = await proxy.start()
    options = ClientOptions(target=f"127.0.0.1:{port}", retry=FAST_RETRY)
    async with AsyncClient(server.address) as direct, AsyncClient(options) as client:
        async with client.multiplexer(streams=1) as mux:
            sessions = [await mux.session("tiny-gru") for _ in range(n)]
            outs = []
            for r in range(rounds):
                batch = xs[:, r * chunk : (r + 1) * chunk]
                if r == 1:  # applied, replies swallowed, then the connection drops
                    proxy.swallow_replies = True
                    step = asyncio.ensure_future(mux.step_many(sessions, batch))
                    last = sessions[-1].id
                    while (await direct.attach(last)).next_seq < 2 * chunk:
                        await asyncio.sleep(0.01)
                    proxy.swallow_replies = False
                    await proxy.cut()
                    outs.append(await step)
                elif r == 2:  # dropped before anything reaches the server, reconnects refused
                    proxy.refuse = True
                    await proxy.cut()
                    step = asyncio.ensure_future(mux.step_many(sessions, batch))
                    await asyncio.sleep(0.3)
                    proxy.refuse = False
                    outs.append(await step)
                else:
                    outs.append(await mux.step_many(sessions, batch))
        got = np.concatenate(outs, axis=1)
        for k, s in enumerate(sessions):
            expected, state = reference_run(model_repo / "tiny-gru" / "1", xs[k])
            assert np.max(np.abs(got[k] - expected)) <= TOL
            again = await direct.attach(s.id)
            assert again.next_seq == chunk * rounds  # a step applied twice would move it on
            for name, value in (await again.state()).items():
                assert np.max(np.abs(value - state[name])) <= TOL
        assert proxy.connections >= 3
    await proxy.stop()


async def test_coalesced_steps_survive_a_cut(server: Any, model_repo: Path) -> None:
    n, chunk = 12, 2
    xs = _inputs(model_repo, "tiny-char", (n, 3 * chunk), seed=35)
    proxy = CuttableProxy(server.port)
    port = await proxy.start()
    options = ClientOptions(target=f"127.0.0.1:{port}", retry=FAST_RETRY)
    async with AsyncClient(server.address) as direct, AsyncClient(options) as client:
        async with client.multiplexer(streams=1) as mux:
            sessions = [await mux.session("tiny-char") for _ in range(n)]
            outs: list[list[np.ndarray]] = [[] for _ in range(n)]
            for r in range(3):
                part = slice(r * chunk, (r + 1) * chunk)
                steps: list[Any] = [mux.step(s, xs[k, part]) for k, s in enumerate(sessions)]
                if r == 1:
                    proxy.swallow_replies = True

                    async def cut_once_applied() -> None:
                        while (await direct.attach(sessions[-1].id)).next_seq < 2 * chunk:
                            await asyncio.sleep(0.01)
                        proxy.swallow_replies = False
                        await proxy.cut()

                    steps.append(cut_once_applied())
                got = await asyncio.gather(*steps)
                for k in range(n):
                    outs[k].append(got[k])
        for k, s in enumerate(sessions):
            expected, _ = reference_run(model_repo / "tiny-char" / "1", xs[k])
            assert np.max(np.abs(np.concatenate(outs[k]) - expected)) <= TOL
            assert (await direct.attach(s.id)).next_seq == 3 * chunk
    await proxy.stop()


async def test_inflight_session_chunks_stay_within_the_bound(server: Any, model_repo: Path) -> None:
    n = 40
    xs = _inputs(model_repo, "tiny-gru", (n, 4), seed=36)
    async with AsyncClient(server.address) as client:
        counter = _Counter(client)
        async with client.multiplexer(streams=1, max_frame=6, max_inflight=8) as mux:
            sessions = [await mux.session("tiny-gru") for _ in range(n)]
            for t in range(4):
                await asyncio.gather(*(mux.step(s, xs[k, t]) for k, s in enumerate(sessions)))
            got = await mux.step_many(sessions, xs[:, :1])  # a batch of 40 in frames of 6
        assert max(counter.frame_sizes) <= 6
        assert 0 < counter.max_unanswered <= 8
        assert counter.entries == 5 * n
        for k in range(n):
            expected, _ = reference_run(
                model_repo / "tiny-gru" / "1", np.concatenate([xs[k], xs[k, :1]])
            )
            assert np.max(np.abs(got[k, 0] - expected[-1])) <= TOL


async def test_a_frame_over_the_server_limit_is_a_clear_error(start_server: Any) -> None:
    running = await start_server(max_frame_sessions=4)
    async with (
        AsyncClient(running.address) as client,
        client.multiplexer(streams=1, max_frame=8) as mux,
    ):
        sessions = [await mux.session("tiny-gru") for _ in range(8)]
        x = np.zeros((8, 1, sessions[0].model.step_shape[0]), np.float32)
        with pytest.raises(StepManyError) as info:
            await mux.step_many(sessions, x)
        err = info.value
        assert err.failed == list(range(8))
        assert all(e.code == grpc.StatusCode.INVALID_ARGUMENT for e in err.errors.values())
        assert "max_frame_sessions" in str(err)
        # Within the limit it works (and the refused chunks were freed, not left in doubt).
        async with client.multiplexer(streams=1, max_frame=4) as small:
            assert (await small.step_many(sessions, x)).shape == (8, 1, 2)
        assert all(s.next_seq == 1 for s in sessions)


async def test_step_many_refuses_bad_batches_before_sending(server: Any) -> None:
    async with AsyncClient(server.address) as client, client.multiplexer() as mux:
        gru = [await mux.session("tiny-gru") for _ in range(2)]
        char = await mux.session("tiny-char")
        features = gru[0].model.step_shape[0]
        with pytest.raises(RnnserveError, match="each session once"):
            await mux.step_many([gru[0], gru[0]], np.zeros((2, 1, features), np.float32))
        with pytest.raises(RnnserveError, match="once per model"):
            await mux.step_many([gru[0], char], np.zeros((2, 1, features), np.float32))
        with pytest.raises(ValueError, match=r"expects 2 entries.*got shape"):
            await mux.step_many(gru, np.zeros((2, 1, features + 1), np.float32))
        assert [s.next_seq for s in gru] == [0, 0]
