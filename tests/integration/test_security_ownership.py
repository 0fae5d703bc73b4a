"""Sessions belong to the principal that opened them; PutState restores only into ids the
server issued and never over another principal's session; snapshots are signed with the
deployment's key; per-principal limits and fair eviction. Through raw stubs and the SDK."""

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
    ClientOptions,
    RetryPolicy,
    RnnserveError,
    SessionLost,
    Snapshot,
)
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import to_tensor

from tests.support import raw

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"
CAROL = "carol-token-00112233445566"
TOKENS = f"alice:{ALICE},bob:{BOB},carol:{CAROL}"
X = np.ones((2, 3), np.float32)
Code = grpc.StatusCode


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class As:
    """Raw stub calls as one principal."""

    def __init__(self, channel: grpc.aio.Channel, token: str) -> None:
        self.stub = pb_grpc.InferenceServiceStub(channel)
        self.md = _md(token)

    async def open(self, model: str = "tiny-gru") -> str:
        reply = await self.stub.OpenSession(pb.OpenSessionRequest(model=model), metadata=self.md)
        return reply.session.session_id

    async def step(self, sid: str, seq: int) -> pb.StepResponse:
        req = pb.StepRequest(session_id=sid, seq=seq, inputs=to_tensor(X))
        return await self.stub.Step(req, metadata=self.md)

    async def snapshot(self, sid: str) -> pb.SessionSnapshot:
        reply = await self.stub.GetState(pb.GetStateRequest(session_id=sid), metadata=self.md)
        return reply.snapshot

    async def code(self, call: Any) -> tuple[grpc.StatusCode, str]:
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
        return Code.OK, ""

    async def every_rpc(self, sid: str, snap: pb.SessionSnapshot) -> dict[str, Any]:
        """The status of each session RPC about ``sid``, sent as this principal."""
        s, md = self.stub, self.md

        async def chunk() -> AsyncIterator[pb.StreamRequest]:
            yield raw.stream_step(sid, 0, X, 1)

        results = {
            "Step": await self.code(
                s.Step(pb.StepRequest(session_id=sid, inputs=to_tensor(X)), metadata=md)
            ),
            "GetSession": await self.code(
                s.GetSession(pb.GetSessionRequest(session_id=sid), metadata=md)
            ),
            "GetState": await self.code(
                s.GetState(pb.GetStateRequest(session_id=sid), metadata=md)
            ),
            "PutState": await self.code(
                s.PutState(pb.PutStateRequest(session_id=sid, snapshot=snap), metadata=md)
            ),
            "ForkSession": await self.code(
                s.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=md)
            ),
            "ResetSession": await self.code(
                s.ResetSession(pb.ResetSessionRequest(session_id=sid), metadata=md)
            ),
            "CloseSession": await self.code(
                s.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=md)
            ),
        }
        replies = [r async for r in s.Stream(chunk(), metadata=md)]
        results["Stream"] = (
            (
                Code(next(c for c in Code if c.value[0] == replies[0].error.code)),
                replies[0].error.message,
            )
            if replies[0].HasField("error")
            else (Code.OK, "")
        )
        return results


@pytest.fixture
async def channel(start_server: Any, request: Any) -> AsyncIterator[grpc.aio.Channel]:
    overrides = getattr(request, "param", {})
    running = await start_server(auth_tokens=TOKENS, **overrides)
    async with grpc.aio.insecure_channel(running.address) as ch:
        ch.running = running  # type: ignore[attr-defined]
        yield ch


async def test_another_principal_gets_not_found_through_every_rpc(
    channel: grpc.aio.Channel,
) -> None:
    alice, bob = As(channel, ALICE), As(channel, BOB)
    sid = await alice.open()
    await alice.step(sid, 0)
    before = await alice.snapshot(sid)
    bob_own = await bob.snapshot(await bob.open("tiny-lstm"))
    unknown = sid.split(".")[0] + "." + "A" * 22
    expected = (
        await bob.code(
            bob.stub.GetSession(pb.GetSessionRequest(session_id=unknown), metadata=bob.md)
        )
    )[1]
    results = await bob.every_rpc(sid, bob_own)
    for rpc, (code, message) in results.items():
        assert code == Code.NOT_FOUND, (rpc, code, message)
        # The same words as for an id that never existed: nothing about alice's session leaks.
        assert message == expected.replace(unknown, sid), (rpc, message)
    after = await alice.snapshot(sid)
    assert after == before, "bob's calls changed alice's session"
    assert (await alice.step(sid, 2)).next_seq == 4


async def test_put_state_rules(channel: grpc.aio.Channel) -> None:
    alice, bob = As(channel, ALICE), As(channel, BOB)
    gru = await alice.open("tiny-gru")
    await alice.step(gru, 0)
    snap = await alice.snapshot(gru)
    put = alice.stub.PutState
    # Ids the server did not issue are refused, whatever their shape.
    for bad in ("alice-session-000000001", "x" * 23, "route.short", "a.b.cccccccccccccccccccccc"):
        code, message = await alice.code(
            put(pb.PutStateRequest(session_id=bad, snapshot=snap), metadata=alice.md)
        )
        assert code == Code.INVALID_ARGUMENT and "server-generated" in message, bad
    # Not onto another model's session, even one's own.
    lstm = await alice.open("tiny-lstm")
    code, message = await alice.code(
        put(pb.PutStateRequest(session_id=lstm, snapshot=snap), metadata=alice.md)
    )
    assert code == Code.FAILED_PRECONDITION and "tiny-lstm" in message
    # Onto one's own session of that model, or into a new id: yes.
    reply = await put(pb.PutStateRequest(session_id=gru, snapshot=snap), metadata=alice.md)
    assert reply.session.session_id == gru and reply.session.next_seq == 2
    fresh = await put(pb.PutStateRequest(snapshot=snap), metadata=alice.md)
    assert fresh.session.session_id != gru
    # Bob cannot take alice's id over, and after alice closes it, it is gone for everyone.
    code, _ = await bob.code(
        bob.stub.PutState(pb.PutStateRequest(session_id=gru, snapshot=snap), metadata=bob.md)
    )
    assert code == Code.NOT_FOUND
    assert (await alice.step(gru, 2)).next_seq == 4


async def test_snapshots_are_signed_when_the_deployment_has_a_key(
    start_server: Any, tmp_path: Path
) -> None:
    key = tmp_path / "snapshot.key"
    key.write_text("k" * 64 + "\n")
    a = await start_server(auth_tokens=TOKENS, snapshot_key_file=key)
    b = await start_server(auth_tokens=TOKENS, snapshot_key_file=key)  # a replica
    other_key = tmp_path / "other.key"
    other_key.write_text("z" * 64)
    c = await start_server(auth_tokens=TOKENS, snapshot_key_file=other_key)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
        grpc.aio.insecure_channel(c.address) as cc,
    ):
        alice_a, alice_b, bob_b = As(ca, ALICE), As(cb, ALICE), As(cb, BOB)
        sid = await alice_a.open()
        await alice_a.step(sid, 0)
        snap = await alice_a.snapshot(sid)
        assert len(snap.mac) == 32
        # Portable to a replica of the same deployment, into the same id.
        moved = await alice_b.stub.PutState(
            pb.PutStateRequest(session_id=sid, snapshot=snap), metadata=alice_b.md
        )
        assert moved.session.next_seq == 2
        ref = await alice_a.step(sid, 2)
        assert (await alice_b.step(sid, 2)).outputs.raw_data == ref.outputs.raw_data
        # Tampered with (state, seq, model version, the mac itself): refused.
        tampered = []
        for change in ("state", "seq", "mac", "strip"):
            t = pb.SessionSnapshot()
            t.CopyFrom(snap)
            if change == "state":
                h = bytearray(t.state["h"].raw_data)
                h[0] ^= 1
                t.state["h"].raw_data = bytes(h)
            elif change == "seq":
                t.next_seq, t.last_seq = t.next_seq + 2, t.last_seq + 2
            elif change == "mac":
                t.mac = bytes(32)
            else:
                t.ClearField("mac")
            tampered.append(t)
        for t in tampered:
            code, message = await alice_b.code(
                alice_b.stub.PutState(pb.PutStateRequest(snapshot=t), metadata=alice_b.md)
            )
            assert code == Code.INVALID_ARGUMENT and "snapshot.mac" in message, message
        # Another principal, or another deployment's key: refused too.
        code, _ = await bob_b.code(
            bob_b.stub.PutState(pb.PutStateRequest(snapshot=snap), metadata=bob_b.md)
        )
        assert code == Code.INVALID_ARGUMENT
        alice_c = As(cc, ALICE)
        code, _ = await alice_c.code(
            alice_c.stub.PutState(pb.PutStateRequest(snapshot=snap), metadata=alice_c.md)
        )
        assert code == Code.INVALID_ARGUMENT
    # The SDK carries the mac through Snapshot.to_bytes / from_bytes untouched.
    options = ClientOptions(target=a.address, retry=RetryPolicy(give_up_after_s=0))
    async with AsyncClient(options.with_token(ALICE)) as client:
        s = await client.session("tiny-gru")
        await s.step(X)
        data = (await s.snapshot()).to_bytes()
        restored = await client.restore(Snapshot.from_bytes(data))
        assert np.array_equal(await restored.step(X), await s.step(X))


async def test_sdk_sessions_are_private(start_server: Any) -> None:
    running = await start_server(auth_tokens=TOKENS)
    options = ClientOptions(target=running.address, retry=RetryPolicy(give_up_after_s=0))
    async with (
        AsyncClient(options.with_token(ALICE)) as alice,
        AsyncClient(options.with_token(BOB)) as bob,
    ):
        mine = await alice.session("tiny-gru")
        await mine.step(X)
        with pytest.raises(SessionLost):  # attach, or the first step, finds nothing
            theirs = await bob.attach(mine.id)
            await theirs.step(X)
        assert (await mine.step(X)).shape == (2, 2)


@pytest.mark.parametrize("channel", [{"principal_max_sessions": 3}], indirect=True)
async def test_principal_session_limit(channel: grpc.aio.Channel) -> None:
    alice, bob = As(channel, ALICE), As(channel, BOB)
    sids = [await alice.open() for _ in range(3)]
    for call in (
        alice.stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru"), metadata=alice.md),
        alice.stub.ForkSession(pb.ForkSessionRequest(session_id=sids[0]), metadata=alice.md),
        alice.stub.PutState(
            pb.PutStateRequest(snapshot=await alice.snapshot(sids[0])), metadata=alice.md
        ),
    ):
        code, message = await alice.code(call)
        assert code == Code.RESOURCE_EXHAUSTED and "principal_max_sessions" in message
    assert await bob.open()  # bob's share is his own
    await alice.stub.CloseSession(pb.CloseSessionRequest(session_id=sids[0]), metadata=alice.md)
    assert await alice.open()


@pytest.mark.parametrize("channel", [{"principal_open_rate": 5.0}], indirect=True)
async def test_principal_open_rate(channel: grpc.aio.Channel) -> None:
    alice, bob = As(channel, ALICE), As(channel, BOB)
    codes = [
        (
            await alice.code(
                alice.stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru"), metadata=alice.md)
            )
        )
        for _ in range(12)
    ]
    ok = sum(c == Code.OK for c, _ in codes)
    assert 5 <= ok <= 7, codes  # the burst (plus what refilled meanwhile)
    refused = [m for c, m in codes if c == Code.RESOURCE_EXHAUSTED]
    assert refused and "principal_open_rate" in refused[0]
    assert await bob.open()
    await asyncio.sleep(0.25)
    assert await alice.open()


@pytest.mark.parametrize("channel", [{"principal_max_streams": 2}], indirect=True)
async def test_principal_stream_limit(channel: grpc.aio.Channel) -> None:
    alice, bob = As(channel, ALICE), As(channel, BOB)
    sid = await alice.open()
    calls = [alice.stub.Stream(metadata=alice.md) for _ in range(2)]
    for i, call in enumerate(calls):
        await call.write(raw.stream_step(sid, 2 * i, X, i))
        assert (await call.read()).step.next_seq == 2 * i + 2
    third = alice.stub.Stream(metadata=alice.md)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await third.read()
    assert info.value.code() == Code.RESOURCE_EXHAUSTED
    assert "principal_max_streams" in (info.value.details() or "")
    bob_call = bob.stub.Stream(metadata=bob.md)  # bob's streams are his own
    bsid = await bob.open()
    await bob_call.write(raw.stream_step(bsid, 0, X, 1))
    assert (await bob_call.read()).step.next_seq == 2
    await calls[0].done_writing()
    while await calls[0].read() is not grpc.aio.EOF:
        pass
    await asyncio.sleep(0.1)
    again = alice.stub.Stream(metadata=alice.md)
    await again.write(raw.stream_step(sid, 4, X, 9))
    assert (await again.read()).step.next_seq == 6
    for call in (calls[1], bob_call, again):
        call.cancel()


@pytest.mark.parametrize("channel", [{"max_sessions": 20}], indirect=True)
async def test_eviction_takes_from_the_principal_over_its_share(
    channel: grpc.aio.Channel,
) -> None:
    alice, bob, carol = As(channel, ALICE), As(channel, BOB), As(channel, CAROL)
    bobs = [await bob.open() for _ in range(4)]
    carols = [await carol.open() for _ in range(4)]
    alices = [await alice.open() for _ in range(60)]  # far past capacity
    for sid in bobs + carols:  # everyone else's sessions are untouched
        await bob.code(bob.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bob.md))
    for who, sids in ((bob, bobs), (carol, carols)):
        for sid in sids:
            info = await who.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=who.md)
            assert info.session.session_id == sid
    # Alice lost her oldest ones and is told why.
    code, message = await alice.code(
        alice.stub.Step(
            pb.StepRequest(session_id=alices[0], inputs=to_tensor(X)), metadata=alice.md
        )
    )
    assert code == Code.NOT_FOUND and "evicted" in message and "capacity of 20" in message
    assert "held the most" in message
    assert (await alice.step(alices[-1], 0)).next_seq == 2


def test_sdk_error_names_the_limit(server_thread_factory: Any) -> None:
    from rnnserve.client import Client

    running = server_thread_factory(auth_tokens=TOKENS, principal_max_sessions=1)
    options = ClientOptions(target=running.address, retry=RetryPolicy(give_up_after_s=0))
    with Client(options.with_token(CAROL)) as client, client.session("tiny-gru"):
        with pytest.raises(RnnserveError) as info:
            client.session("tiny-gru")
        assert info.value.code == Code.RESOURCE_EXHAUSTED
        assert "principal_max_sessions" in info.value.message


async def test_ownership_survives_a_takeover_from_the_store(procs: Any) -> None:
    """With the Redis store, a session taken over by another replica is still its
    principal's alone."""
    redis = procs.redis()
    args = ["--auth-tokens", TOKENS]
    a, b = await asyncio.to_thread(procs.replicas, ["a", "b"], redis.url, args)
    async with (
        grpc.aio.insecure_channel(a.address) as ca,
        grpc.aio.insecure_channel(b.address) as cb,
    ):
        alice_a, alice_b, bob_b = As(ca, ALICE), As(cb, ALICE), As(cb, BOB)
        sid = await alice_a.open()
        await alice_a.step(sid, 0)
        await asyncio.to_thread(a.terminate, 30.0)  # drains: checkpoints every session
        code, _ = await bob_b.code(
            bob_b.stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=bob_b.md)
        )
        assert code == Code.NOT_FOUND
        code, _ = await bob_b.code(
            bob_b.stub.GetState(pb.GetStateRequest(session_id=sid), metadata=bob_b.md)
        )
        assert code == Code.NOT_FOUND
        assert (await alice_b.step(sid, 2)).next_seq == 4
