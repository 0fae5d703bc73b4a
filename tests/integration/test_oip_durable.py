"""Open Inference Protocol sequences that outlive their replica: a drain hands a principal's
sequences over through the Redis store, and the replica that gets their next request goes on
exactly; a sequence whose replica stopped without a drain is refused with the reason."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from inference import grpc_service_pb2_grpc as oip_grpc

from tests.support.modelgen import reference_run
from tests.support.procs import RedisProc
from tests.support.raw import oip_outputs as _y
from tests.support.raw import oip_request

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef01"
TOKENS = f"alice:{ALICE},bob:{BOB}"
TOL = 1e-5


def _request(x: np.ndarray, sid: int, *, start: bool = False, end: bool = False) -> Any:
    return oip_request("tiny-gru", x, sid, start=start, end=end)


def _as(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def _x(steps: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.0, 1.0, (steps, 3)).astype(np.float32)


async def _replica(start_server: Any, redis_proc: RedisProc, name: str) -> tuple[Any, Any]:
    running = await start_server(
        auth_tokens=TOKENS, store_url=redis_proc.url, replica_name=name, checkpoint_every=16
    )
    channel = grpc.aio.insecure_channel(running.address)
    return running, oip_grpc.GRPCInferenceServiceStub(channel)


async def test_a_drain_hands_sequences_over_and_they_go_on_exactly(
    start_server: Any, redis_proc: RedisProc, model_repo: Path
) -> None:
    a, stub_a = await _replica(start_server, redis_proc, "a")
    b, stub_b = await _replica(start_server, redis_proc, "b")
    x1, x2 = _x(6, seed=1), _x(5, seed=2)
    want1, _ = reference_run(model_repo / "tiny-gru" / "1", x1)
    want2, _ = reference_run(model_repo / "tiny-gru" / "1", x2)
    # Fewer steps than checkpoint_every: no regular checkpoint has been written.
    got1 = [_y(await stub_a.ModelInfer(_request(x1[:2], 1, start=True), metadata=_as(ALICE)))]
    got2 = [_y(await stub_a.ModelInfer(_request(x2[:1], 2, start=True), metadata=_as(ALICE)))]
    await stub_a.ModelInfer(_request(_x(2, seed=3), 1, start=True), metadata=_as(BOB))

    await a.server.stop(5.0)  # SIGTERM's drain: final checkpoints, sequences named

    # On B, over one stream and without waiting: both sequences continue where they were, in
    # order, and sequence 1 ends with its last request.
    requests = [
        _request(x1[2:4], 1),
        _request(x2[1:3], 2),
        _request(x1[4:], 1, end=True),
        _request(x2[3:], 2),
    ]
    call = stub_b.ModelStreamInfer(iter(requests), metadata=_as(ALICE))
    replies = [r async for r in call]
    assert [r.error_message for r in replies] == ["", "", "", ""]
    by_seq: dict[str, list[np.ndarray]] = {"1": got1, "2": got2}
    for reply in replies:
        by_seq[reply.infer_response.id].append(_y(reply.infer_response))
    assert np.max(np.abs(np.concatenate(by_seq["1"]) - want1)) <= TOL
    assert np.max(np.abs(np.concatenate(by_seq["2"]) - want2)) <= TOL
    assert b.server.metrics.takeovers._value.get() == 2

    # Bob's sequence 1 is his own: it goes on too, apart from alice's (which ended).
    bob = await stub_b.ModelInfer(_request(_x(1, seed=4), 1), metadata=_as(BOB))
    assert len(_y(bob)) == 1
    assert b.server.metrics.takeovers._value.get() == 3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub_b.ModelInfer(_request(x1[:1], 1), metadata=_as(ALICE))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "must specify the START flag" in (err.value.details() or "")


async def test_a_sequence_not_handed_over_is_refused_saying_why(
    start_server: Any, redis_proc: RedisProc, model_repo: Path
) -> None:
    a, stub_a = await _replica(start_server, redis_proc, "a")
    b, stub_b = await _replica(start_server, redis_proc, "b")
    c, stub_c = await _replica(start_server, redis_proc, "c")
    x = _x(4, seed=5)
    await stub_a.ModelInfer(_request(x[:2], 7, start=True), metadata=_as(ALICE))
    await a.server.stop(5.0)
    await stub_b.ModelInfer(_request(x[2:3], 7), metadata=_as(ALICE))  # B takes it over
    # C gets the next request while B holds the sequence (B died, or was cut off): the store's
    # copy is older than B's last step, and the client cannot replay, so C refuses it.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub_c.ModelInfer(_request(x[3:], 7), metadata=_as(ALICE))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "stopped without handing it over" in (err.value.details() or "")
    # B heard that the session moved and no longer serves it.
    for _ in range(50):
        if not b.server.sessions.all():
            break
        await asyncio.sleep(0.05)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub_b.ModelInfer(_request(x[3:], 7), metadata=_as(ALICE))
    assert "START flag" in (err.value.details() or "")
    # A new START of the id works anywhere.
    reply = await stub_c.ModelInfer(_request(x[:1], 7, start=True), metadata=_as(ALICE))
    assert len(_y(reply)) == 1
    assert c.server.metrics.takeovers._value.get() == 1


async def test_without_tokens_sequences_stay_with_their_connection(
    start_server: Any, redis_proc: RedisProc
) -> None:
    """A connection's sequences are not named in the store: a request without START on
    another replica gets Triton's error at once, without a store lookup."""
    a = await start_server(store_url=redis_proc.url, replica_name="a")
    b = await start_server(store_url=redis_proc.url, replica_name="b")
    stub_a = oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(a.address))
    stub_b = oip_grpc.GRPCInferenceServiceStub(grpc.aio.insecure_channel(b.address))
    await stub_a.ModelInfer(_request(_x(1, seed=6), 3, start=True))
    await a.server.stop(5.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub_b.ModelInfer(_request(_x(1, seed=6), 3))
    assert "on the first request of the sequence" in (err.value.details() or "")
    assert b.server.metrics.takeovers._value.get() == 0


async def test_early_requests_are_retried_not_refused_during_the_handover(
    start_server: Any, redis_proc: RedisProc, model_repo: Path
) -> None:
    """While a drain hands a sequence over, the draining replica holds the requests that come
    and answers them UNAVAILABLE once the handover is written; another replica asked before
    that answers UNAVAILABLE too (never "unknown"). Sent again, the request goes on exactly."""
    a, stub_a = await _replica(start_server, redis_proc, "a")
    _, stub_b = await _replica(start_server, redis_proc, "b")
    x = _x(3, seed=7)
    want, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    first = _y(await stub_a.ModelInfer(_request(x[:1], 9, start=True), metadata=_as(ALICE)))

    a.server.oip.begin_drain()  # as a drain does first
    held = asyncio.ensure_future(stub_a.ModelInfer(_request(x[1:2], 9), metadata=_as(ALICE)))
    await asyncio.sleep(0.2)
    assert not held.done()  # held, not refused yet
    handover = a.server.oip.table.handed_over()
    durable = a.server.durable
    assert durable is not None and len(handover) == 1
    await durable.checkpoints.announce(handover, 5.0)
    with pytest.raises(grpc.aio.AioRpcError) as err:  # B, asked before the final checkpoint
        await stub_b.ModelInfer(_request(x[1:2], 9), metadata=_as(ALICE))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "being handed over" in (err.value.details() or "")

    await a.server.stop(5.0)  # the rest of the drain: final checkpoint, name recorded
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await held
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    rest = _y(await stub_b.ModelInfer(_request(x[1:], 9), metadata=_as(ALICE)))
    assert np.max(np.abs(np.concatenate([first, rest]) - want)) <= TOL
