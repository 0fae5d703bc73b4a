"""The asyncio SDK against real servers: the same outputs as the whole sequence at once,
many sessions multiplexed on one stream, and a session moved by hand to a second server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from rnnserve.client import (
    AsyncClient,
    Client,
    InvalidInput,
    ModelNotFound,
    RnnserveError,
    Snapshot,
)
from rnnserve.manifest import load_manifest

from tests.support.modelgen import reference_run

TOL = 1e-5


def _sequence(
    model_repo: Path, model: str, steps: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    size = load_manifest(model_repo / model / "1").input_size
    xs = np.random.default_rng(seed).normal(size=(steps, size)).astype(np.float32)
    expected, state = reference_run(model_repo / model / "1", xs)
    return xs, expected, state


async def test_models_metadata(server: Any) -> None:
    async with AsyncClient(server.address) as client:
        models = {m.name: m for m in await client.models()}
        assert set(models) >= {"tiny-gru", "tiny-lstm", "tiny-char"}
        lstm = models["tiny-lstm"]
        assert lstm.input_kind == "features" and lstm.output_kind == "regression"
        assert [s.name for s in lstm.states] == ["h", "c"]
        char = await client.model("tiny-char")
        assert char.is_tokens and char.output_size == len(char.vocabulary)
        with pytest.raises(ModelNotFound) as info:
            await client.model("nope")
        assert info.value.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("model", ["tiny-gru", "tiny-lstm"])
async def test_async_step_and_stream_match_whole_sequence(
    server: Any, model_repo: Path, model: str
) -> None:
    xs, expected, state = _sequence(model_repo, model, 26, seed=21)
    async with AsyncClient(server.address) as client, await client.session(model) as s:
        outs = [await s.step(xs[:5]), (await s.step(xs[5]))[np.newaxis]]

        async def rest() -> AsyncIterator[np.ndarray]:
            for i in range(6, 26, 5):
                yield xs[i : i + 5]

        outs += [out async for out in s.stream(rest())]
        got = np.concatenate(outs)
        assert np.max(np.abs(got - expected)) <= TOL
        for name, value in (await s.state()).items():
            assert np.max(np.abs(value - state[name])) <= TOL
        # A plain iterable works too, and step after stream continues the same session.
        outs2 = [o async for o in s.stream([xs[0], xs[1:3]])]
        assert [o.shape for o in outs2] == [(expected.shape[1],), (2, expected.shape[1])]
        assert s.next_seq == 29


async def test_stream_feeds_back_its_own_outputs(server: Any, model_repo: Path) -> None:
    """The next input is read only after the previous outputs were yielded."""
    async with AsyncClient(server.address) as client, await client.session("tiny-char") as s:
        vocab = s.model.vocabulary
        fed: list[int] = [0]

        async def tokens() -> AsyncIterator[int]:
            while len(fed) <= 10:
                yield fed[-1]

        async for logits in s.stream(tokens()):
            fed.append(int(np.argmax(logits)))
    ids = np.array(fed[:-1], dtype=np.int64)
    expected, _ = reference_run(model_repo / "tiny-char" / "1", ids)
    assert fed[1:] == [int(i) for i in np.argmax(expected, axis=1)]
    assert len(vocab) == expected.shape[1]


@pytest.mark.parametrize("streams", [1, 4])
async def test_many_sessions_multiplexed_on_few_streams(
    server: Any, model_repo: Path, streams: int
) -> None:
    n, rounds, chunk = 40, 4, 3
    size = load_manifest(model_repo / "tiny-lstm" / "1").input_size
    xs = np.random.default_rng(22).normal(size=(n, rounds * chunk, size)).astype(np.float32)
    async with AsyncClient(server.address) as client:
        model = await client.model("tiny-lstm")
        outs: list[list[np.ndarray]] = [[] for _ in range(n)]
        async with client.multiplexer(streams=streams) as mux:
            # Opened through the multiplexer: `streams` route keys, one stream each.
            sessions = await asyncio.gather(*(mux.session(model) for _ in range(n)))
            assert len({s.id.partition(".")[0] for s in sessions}) == streams
            for r in range(rounds):
                part = slice(r * chunk, (r + 1) * chunk)
                # Two steps of the same session in one gather still apply in order.
                results = await asyncio.gather(
                    *(mux.step(s, xs[k, part]) for k, s in enumerate(sessions))
                )
                for k, out in enumerate(results):
                    outs[k].append(out)
            # 40 sessions over `streams` calls: every lane carried some (white-box: no metric
            # counts calls per client).
            assert sum(lane.call is not None for lane in mux._lanes.values()) == streams
            with pytest.raises(InvalidInput):
                await mux.step(sessions[0], np.zeros((2, size + 1), np.float32))
            # A session opened elsewhere has its own route key, so its own stream.
            other = await client.session(model)
            await mux.step(other, xs[0, :chunk])
            assert len(mux._lanes) == streams + 1
            await other.close()
        for k, s in enumerate(sessions):
            expected, _ = reference_run(model_repo / "tiny-lstm" / "1", xs[k])
            assert np.max(np.abs(np.concatenate(outs[k]) - expected)) <= TOL
            assert s.next_seq == rounds * chunk
        await asyncio.gather(*(s.close() for s in sessions))


async def test_same_session_steps_apply_in_call_order(server: Any, model_repo: Path) -> None:
    xs, expected, _ = _sequence(model_repo, "tiny-gru", 12, seed=23)
    async with AsyncClient(server.address) as client:
        s = await client.session("tiny-gru")
        async with client.multiplexer() as mux:
            results = await asyncio.gather(*(mux.step(s, xs[i : i + 3]) for i in range(0, 12, 3)))
        assert np.max(np.abs(np.concatenate(results) - expected)) <= TOL


async def test_session_moved_to_a_second_server(start_server: Any, model_repo: Path) -> None:
    xs, expected, state = _sequence(model_repo, "tiny-lstm", 20, seed=24)
    first, second = await start_server(), await start_server()
    async with AsyncClient(first.address) as a, AsyncClient(second.address) as b:
        s = await a.session("tiny-lstm")
        head = await s.step(xs[:9])
        blob = (await s.snapshot()).to_bytes()  # what a gateway would store or send along
        await s.close()
        moved = await b.restore(Snapshot.from_bytes(blob), session_id=s.id)
        assert moved.id == s.id and moved.next_seq == 9
        tail = [o async for o in moved.stream([xs[9:14], xs[14:]])]
        got = np.concatenate([head, *tail])
        assert np.max(np.abs(got - expected)) <= TOL
        for name, value in (await moved.state()).items():
            assert np.max(np.abs(value - state[name])) <= TOL
        with pytest.raises(RnnserveError):  # the first server no longer has it
            await a.attach(s.id)


def test_sync_session_moved_to_a_second_server(
    server_thread_factory: Any, model_repo: Path
) -> None:
    xs, expected, _ = _sequence(model_repo, "tiny-gru", 16, seed=25)
    first, second = server_thread_factory(), server_thread_factory()
    with Client(first.address) as a, Client(second.address) as b:
        with a.session("tiny-gru") as s:
            head = s.step(xs[:7])
            snap = s.snapshot()
        with b.restore(snap) as moved:
            assert moved.next_seq == 7
            tail = moved.step(xs[7:])
        assert np.max(np.abs(np.concatenate([head, tail]) - expected)) <= TOL
