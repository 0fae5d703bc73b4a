"""The Redis session store with in-process servers and a real Redis: what each session event
writes, and what another replica (sharing the Redis) makes of it."""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import ROUTE_HEADER, to_tensor

from tests.support.procs import RedisProc
from tests.support.raw import outputs, step, stream_all

X = np.ones((2, 3), np.float32)
Code = grpc.StatusCode


async def _pair(start_server, redis_proc: RedisProc, **settings):
    """Two replicas of one deployment (same Redis), as stubs."""
    a = await start_server(store_url=redis_proc.url, replica_name="a", **settings)
    b = await start_server(store_url=redis_proc.url, replica_name="b", **settings)
    channels = [grpc.aio.insecure_channel(r.address) for r in (a, b)]
    return (a, b), [pb_grpc.InferenceServiceStub(c) for c in channels], channels


async def _settle(running, timeout: float = 5.0) -> None:
    """Wait until the replica's checkpoint queue is empty."""
    durable = running.server.durable
    assert durable is not None
    await asyncio.wait_for(durable.checkpoints.flush(timeout), timeout + 1)


async def _open(stub, model: str = "tiny-gru", route: str = "k1") -> str:
    reply = await stub.OpenSession(
        pb.OpenSessionRequest(model=model), metadata=((ROUTE_HEADER, route),)
    )
    return reply.session.session_id


async def test_session_id_carries_the_route_key_and_checkpoint_interval(start_server, redis_proc):
    _, (stub, _), channels = await _pair(start_server, redis_proc, checkpoint_every=3)
    reply = await stub.OpenSession(
        pb.OpenSessionRequest(model="tiny-gru"), metadata=((ROUTE_HEADER, "shard-7"),)
    )
    assert reply.session.session_id.startswith("shard-7.")
    assert reply.session.checkpoint_every == 3
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.OpenSession(
            pb.OpenSessionRequest(model="tiny-gru"), metadata=((ROUTE_HEADER, "no.dots"),)
        )
    assert info.value.code() == Code.INVALID_ARGUMENT and ROUTE_HEADER in info.value.details()
    for c in channels:
        await c.close()


async def test_another_replica_takes_over_and_the_first_lets_go(start_server, redis_proc):
    (a, b), (stub_a, stub_b), channels = await _pair(start_server, redis_proc, checkpoint_every=2)
    sid = await _open(stub_a)
    replies = [await step(stub_a, sid, 2 * i, X) for i in range(3)]  # 6 steps: saved at 2, 4, 6
    await _settle(a)
    # A call for the session on B: B loads the checkpoint and continues exactly.
    info = (await stub_b.GetSession(pb.GetSessionRequest(session_id=sid))).session
    assert info.next_seq == 6
    moved = await step(stub_b, sid, 6, X)
    reference = await _open(stub_a, route="k2")
    for i in range(4):
        last = await step(stub_a, reference, 2 * i, X)
    np.testing.assert_array_equal(outputs(moved), outputs(last))
    assert len(replies) == 3
    # A heard of the takeover and dropped its copy; it neither serves nor overwrites it.
    for _ in range(50):
        if a.server.sessions.peek(sid) is None:
            break
        await asyncio.sleep(0.05)
    assert a.server.sessions.peek(sid) is None
    assert a.server.sessions.ended_reason(sid) == "moved"
    assert b.server.metrics.takeovers._value.get() == 1
    assert a.server.metrics.fenced._value.get() == 1
    for c in channels:
        await c.close()


async def test_an_evicted_session_comes_back_from_the_store(start_server, redis_proc):
    (a, _), (stub, _), channels = await _pair(start_server, redis_proc, max_sessions=2)
    first = await _open(stub)
    await step(stub, first, 0, X)
    await _settle(a)
    await _open(stub, route="k2")
    await _open(stub, route="k3")  # evicts the first (least recently used): saved on the way out
    await _settle(a)
    assert a.server.sessions.ended_reason(first) == "capacity"
    reply = await step(stub, first, 2, X)  # loaded back, it goes on from seq 2
    assert reply.next_seq == 4
    for c in channels:
        await c.close()


async def test_a_closed_session_is_not_brought_back_anywhere(start_server, redis_proc):
    (a, _), (stub_a, stub_b), channels = await _pair(start_server, redis_proc)
    sid = await _open(stub_a)
    await step(stub_a, sid, 0, X)
    await _settle(a)
    await stub_a.CloseSession(pb.CloseSessionRequest(session_id=sid))
    await _settle(a)
    for stub in (stub_a, stub_b):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetSession(pb.GetSessionRequest(session_id=sid))
        assert info.value.code() == Code.NOT_FOUND
    for c in channels:
        await c.close()


async def test_a_restore_over_an_id_fences_its_holder(start_server, redis_proc):
    (a, b), (stub_a, stub_b), channels = await _pair(start_server, redis_proc)
    sid = await _open(stub_a)
    await step(stub_a, sid, 0, X)
    snap = (await stub_a.GetState(pb.GetStateRequest(session_id=sid))).snapshot
    await step(stub_a, sid, 2, X)
    await _settle(a)
    # B restores the older snapshot under the same id: B owns it now, A must let go.
    await stub_b.PutState(pb.PutStateRequest(session_id=sid, snapshot=snap))
    await _settle(b)
    for _ in range(50):
        if a.server.sessions.peek(sid) is None:
            break
        await asyncio.sleep(0.05)
    assert a.server.sessions.peek(sid) is None
    # Through A again: the store's copy (B's restore, at seq 2) is what continues.
    info = (await stub_a.GetSession(pb.GetSessionRequest(session_id=sid))).session
    assert info.next_seq == 2
    for c in channels:
        await c.close()


async def test_a_session_in_use_keeps_its_store_copy_alive(start_server, redis_proc):
    # Fewer steps than checkpoint_every, yet in use past its TTL: the store copy is renewed;
    # once the session is idle, both copies expire.
    import redis

    (a, _), (stub, _), channels = await _pair(start_server, redis_proc, session_ttl_s=2.0)
    sid = await _open(stub)
    await step(stub, sid, 0, X)
    store = redis.Redis.from_url(redis_proc.url)
    key = f"rnnserve:session:{sid}"
    for _ in range(12):  # 3.6 s of use, no checkpoint by steps
        await stub.GetSession(pb.GetSessionRequest(session_id=sid))
        await asyncio.sleep(0.3)
    assert store.exists(key)
    assert a.server.sessions.peek(sid) is not None
    await asyncio.sleep(2.6)  # idle past the TTL
    assert not store.exists(key)
    store.close()
    for c in channels:
        await c.close()


async def test_an_idle_replica_sees_redis_go_and_come_back(start_server, redis_proc):
    # No session, so no checkpoint to fail or succeed: the takeover listener notices both.
    running = await start_server(store_url=redis_proc.url, replica_name="idle")
    up = running.server.metrics.store_up

    async def until(value: float) -> None:
        for _ in range(100):
            if up._value.get() == value:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"rnnserve_store_up never became {value}")

    await until(1)
    redis_proc.kill()
    await until(0)
    await asyncio.to_thread(redis_proc.restart)
    await until(1)


async def test_a_reset_reaches_the_store_and_the_next_replica(start_server, redis_proc):
    # A reset changes the state but not the seq: the checkpoint written before it is stale.
    # It is written again at once (so a takeover after a crash is not served the old state),
    # and a drain writes it too.
    (a, b), (stub_a, stub_b), channels = await _pair(start_server, redis_proc, checkpoint_every=2)
    sid = await _open(stub_a)
    await step(stub_a, sid, 0, X)  # 2 steps: a checkpoint at seq 2
    await _settle(a)
    await stub_a.ResetSession(pb.ResetSessionRequest(session_id=sid))
    await _settle(a)
    moved = await step(stub_b, sid, 2, X)  # B takes it over: the state must be zeros
    fresh = await _open(stub_a, route="k2")
    want = await step(stub_a, fresh, 0, X)
    np.testing.assert_array_equal(outputs(moved), outputs(want))
    # And through a drain with nothing else to write.
    await step(stub_b, sid, 4, X)
    await _settle(b)
    await stub_b.ResetSession(pb.ResetSessionRequest(session_id=sid))
    await b.server.stop(5.0)
    c = await start_server(store_url=redis_proc.url, replica_name="c")
    async with grpc.aio.insecure_channel(c.address) as channel:
        again = await step(pb_grpc.InferenceServiceStub(channel), sid, 6, X)
    np.testing.assert_array_equal(outputs(again), outputs(want))
    for ch in channels:
        await ch.close()


async def test_a_reset_or_restore_is_stored_before_it_is_acknowledged(start_server, redis_proc):
    # A crash right after the reply must not bring back the state from before the reset: the
    # store holds the zeroed state (same seq) by the time ResetSession answers.
    import redis

    (a, _), (stub, _), channels = await _pair(start_server, redis_proc, checkpoint_every=1)
    durable = a.server.durable
    store = redis.Redis.from_url(redis_proc.url)
    for _ in range(5):
        sid = await _open(stub)
        await step(stub, sid, 0, X)
        await _settle(a)
        durable.store.write = _slow(durable.store.write)  # a store 50 ms away
        await stub.ResetSession(pb.ResetSessionRequest(session_id=sid))
        snap = pb.SessionSnapshot.FromString(store.hget(f"rnnserve:session:{sid}", "snap"))
        assert snap.next_seq == 2
        for tensor in snap.state.values():
            assert not np.frombuffer(tensor.raw_data, "<f4").any()
        durable.store.write = durable.store.write.__wrapped__
    # The same for a restore over the session: the store holds the restored seq at once.
    old = (await stub.GetState(pb.GetStateRequest(session_id=sid))).snapshot
    await step(stub, sid, 2, X)
    await _settle(a)
    durable.store.write = _slow(durable.store.write)
    await stub.PutState(pb.PutStateRequest(session_id=sid, snapshot=old))
    snap = pb.SessionSnapshot.FromString(store.hget(f"rnnserve:session:{sid}", "snap"))
    assert snap.next_seq == 2
    durable.store.write = durable.store.write.__wrapped__
    store.close()
    for c in channels:
        await c.close()


def _slow(write):
    async def slow(writes):
        await asyncio.sleep(0.05)
        return await write(writes)

    slow.__wrapped__ = write
    return slow


async def test_a_stream_applies_its_messages_in_order_across_takeovers(start_server, redis_proc):
    # Frame 1 names s1 (its load is slow) and s2; frame 2 names s2 again. Both load from the
    # store on B; frame 2 must not overtake frame 1 (its s2 entry would skip a step).
    (a, b), (stub_a, stub_b), channels = await _pair(start_server, redis_proc, checkpoint_every=1)
    s1, s2 = await _open(stub_a, route="r1"), await _open(stub_a, route="r2")
    await _settle(a)
    claim = b.server.durable.store.claim

    async def slow_claim(sid, ttl_ms, principal):
        if sid == s1:
            await asyncio.sleep(0.3)
        return await claim(sid, ttl_ms, principal)

    b.server.durable.store.claim = slow_claim
    x = np.ones((2, 1, 3), np.float32)
    frames = [
        pb.StreamRequest(
            request_id=1, frame=pb.StepFrame(session_ids=[s1, s2], seqs=[0, 0], inputs=to_tensor(x))
        ),
        pb.StreamRequest(
            request_id=2, frame=pb.StepFrame(session_ids=[s2], seqs=[1], inputs=to_tensor(x[:1]))
        ),
    ]
    replies = await stream_all(stub_b, frames)
    assert [list(r.frame.errors) for r in replies] == [[], []]
    assert [list(r.frame.next_seqs) for r in sorted(replies, key=lambda r: r.request_id)] == [
        [1, 1],
        [2],
    ]
    for c in channels:
        await c.close()


async def test_a_session_on_a_version_this_replica_lacks_is_not_lost(
    start_server, redis_proc, model_repo
):
    # A rollout reaches replicas one by one: a session opened on version 2 on A moves to B
    # before B has loaded version 2. B looks on disk at once; while the version is missing
    # there too, the call is UNAVAILABLE (retry), never NOT_FOUND (the SDK's SessionLost).
    import shutil

    from tests.support.modelgen import write_model

    a = await start_server(store_url=redis_proc.url, replica_name="a")
    b = await start_server(store_url=redis_proc.url, replica_name="b", reload_interval_s=3600)
    stub_a = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(a.address))
    stub_b = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(b.address))
    folder = write_model(model_repo, "tiny-gru", "2", seed=9)
    await a.server.repository.scan()
    sid = (await stub_a.OpenSession(pb.OpenSessionRequest(model="tiny-gru"))).session.session_id
    await step(stub_a, sid, 0, X)
    await _settle(a)
    hidden = folder.with_name("hidden")
    folder.rename(hidden)  # not on B's disk yet
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await step(stub_b, sid, 2, X)
    assert info.value.code() == Code.UNAVAILABLE
    assert "version '2'" in (info.value.details() or "")
    hidden.rename(folder)  # it arrives: B loads it when the session is next asked for
    reply = await step(stub_b, sid, 2, X)
    assert reply.next_seq == 4
    assert b.server.repository.resolve("tiny-gru", "2") is not None
    shutil.rmtree(folder)


async def test_another_principals_call_does_not_move_a_session(start_server, redis_proc):
    # A call with another principal's token for a session held elsewhere is NOT_FOUND, as for
    # an unknown id, and moves nothing: the store refuses the claim, so the holder keeps it.
    alice, bob = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef01"
    tokens = f"alice:{alice},bob:{bob}"
    (a, b), (stub_a, stub_b), channels = await _pair(start_server, redis_proc, auth_tokens=tokens)
    as_alice = (("authorization", f"Bearer {alice}"),)
    as_bob = (("authorization", f"Bearer {bob}"),)
    reply = await stub_a.OpenSession(pb.OpenSessionRequest(model="tiny-gru"), metadata=as_alice)
    sid = reply.session.session_id
    request = pb.StepRequest(session_id=sid, seq=0, inputs=to_tensor(X))
    await stub_a.Step(request, metadata=as_alice)
    await _settle(a)
    epoch = a.server.sessions.peek(sid).epoch
    for call in (
        stub_b.Step(pb.StepRequest(session_id=sid, seq=2, inputs=to_tensor(X)), metadata=as_bob),
        stub_b.GetState(pb.GetStateRequest(session_id=sid), metadata=as_bob),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == Code.NOT_FOUND
        assert "unknown here" in (info.value.details() or "")
    await asyncio.sleep(0.3)  # a moved session would be dropped on A by now
    held = a.server.sessions.peek(sid)
    assert held is not None and held.epoch == epoch
    assert b.server.metrics.takeovers._value.get() == 0
    again = pb.StepRequest(session_id=sid, seq=2, inputs=to_tensor(X))
    assert (await stub_a.Step(again, metadata=as_alice)).next_seq == 4
    for c in channels:
        await c.close()
