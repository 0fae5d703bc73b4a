"""Session expiry and eviction, hot reload, health, reflection and graceful shutdown."""

from __future__ import annotations

import asyncio
import gc
import shutil
import weakref

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support.modelgen import write_model
from tests.support.raw import open_session, outputs, state_bytes, step, step_error, stream_step

X = np.ones((1, 3), np.float32)


async def _until(predicate, timeout: float = 20.0) -> None:
    """Poll an async predicate until it holds (the server acts on its own clock)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await predicate():
        assert loop.time() < deadline, "condition never held"
        await asyncio.sleep(0.05)


async def test_idle_session_expires_and_says_so(start_server):
    running = await start_server(session_ttl_s=0.3)
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(running.address))
    idle = await open_session(stub, "tiny-gru")
    busy = await open_session(stub, "tiny-gru")
    seq = 0

    async def idle_gone() -> bool:
        nonlocal seq
        await step(stub, busy, seq, X)  # every call restarts the busy session's clock
        seq += 1
        return len(running.server.sessions) == 1

    await _until(idle_gone)
    err = await step_error(stub, stream_step(idle, 0, X, 0).step)
    assert err.code() == grpc.StatusCode.NOT_FOUND and "expired after 0.3 s idle" in err.details()
    assert (await step(stub, busy, seq, X)).next_seq == seq + 1


async def test_capacity_evicts_the_least_recently_used(start_server):
    running = await start_server(max_sessions=3)
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(running.address))
    a, b, c = [await open_session(stub, "tiny-gru") for _ in range(3)]
    await step(stub, a, 0, X)  # a is now the most recently used
    d = await open_session(stub, "tiny-lstm")
    with_err = await step_error(stub, stream_step(b, 0, X, 0).step)
    assert with_err.code() == grpc.StatusCode.NOT_FOUND
    assert "capacity of 3 sessions" in with_err.details()
    for sid, seq in ((a, 1), (c, 0), (d, 0)):
        await step(stub, sid, seq, X)
    ended = running.server.metrics.sessions_ended.labels("tiny-gru/1", "capacity")._value.get()
    assert ended == 1


async def test_hot_reload_new_version_and_broken_version(start_server, model_repo):
    running = await start_server(reload_interval_s=0.1)
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(running.address))
    old = await open_session(stub, "tiny-gru")
    await step(stub, old, 0, X)

    # A broken version (its manifest does not match its graph) is logged and skipped.
    broken = write_model(model_repo, "tiny-gru", "3", seed=9)
    shutil.copy(model_repo / "tiny-lstm" / "1" / "model.onnx", broken / "model.onnx")
    write_model(model_repo, "tiny-gru", "2", hidden=4, seed=11)

    async def has_v2() -> bool:
        info = (await stub.GetModel(pb.GetModelRequest(model="tiny-gru"))).model
        return info.version == "2"

    await _until(has_v2)
    info = (await stub.GetModel(pb.GetModelRequest(model="tiny-gru"))).model
    assert list(info.versions) == ["1", "2"] and info.states[0].shape == [2, 4]
    new = (await stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru"))).session
    assert new.version == "2"
    # The open session stays on version 1 and goes on.
    assert (await step(stub, old, 1, X)).next_seq == 2
    opened = await stub.GetSession(pb.GetSessionRequest(session_id=old))
    assert opened.session.version == "1"

    # Version 1 leaves the repository: no new sessions on it, the old one still works.
    v1 = weakref.ref(running.server.repository.resolve("tiny-gru", "1"))
    shutil.rmtree(model_repo / "tiny-gru" / "1")

    async def v1_gone() -> bool:
        info = (await stub.GetModel(pb.GetModelRequest(model="tiny-gru"))).model
        return list(info.versions) == ["2"]

    await _until(v1_gone)
    assert (await step(stub, old, 2, X)).next_seq == 3

    # Once its last session ends, the retired version (engine, state pool) is freed.
    await stub.CloseSession(pb.CloseSessionRequest(session_id=old))
    gc.collect()
    assert v1() is None


async def test_health_and_reflection(server):
    channel = grpc.aio.insecure_channel(server.address)
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "rnnserve.v1.InferenceService"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def ask():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        yield reflection_pb2.ServerReflectionRequest(
            file_containing_symbol="rnnserve.v1.InferenceService"
        )

    replies = [r async for r in refl.ServerReflectionInfo(ask())]
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"rnnserve.v1.InferenceService", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto
    await channel.close()


async def test_shutdown_ends_a_multiplexed_stream_with_unavailable(start_server):
    # A stream that named two sessions reads ahead on its own task; a shutdown stops that
    # reader and the idle stream ends at once with UNAVAILABLE, not after the grace period.
    running = await start_server(shutdown_grace_s=30.0)
    channel = grpc.aio.insecure_channel(running.address)
    stub = pb_grpc.InferenceServiceStub(channel)
    a, b = await open_session(stub, "tiny-gru"), await open_session(stub, "tiny-gru")
    stream = stub.Stream()
    await stream.write(stream_step(a, 0, X, 1))
    await stream.write(stream_step(b, 0, X, 2))
    assert {(await stream.read()).request_id for _ in range(2)} == {1, 2}
    loop = asyncio.get_running_loop()
    started = loop.time()
    await running.server.stop(30.0)
    assert loop.time() - started < 10.0
    try:
        msg = await stream.read()
        assert msg is grpc.aio.EOF
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    else:
        assert await stream.code() == grpc.StatusCode.UNAVAILABLE
    await channel.close()


async def test_graceful_shutdown(start_server):
    running = await start_server(shutdown_grace_s=5.0)
    channel = grpc.aio.insecure_channel(running.address)
    stub = pb_grpc.InferenceServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    sid = await open_session(stub, "tiny-gru")
    stream = stub.Stream()
    await stream.write(stream_step(sid, 0, X, 1))
    first = await stream.read()
    assert first.step.next_seq == 1
    watch = health.Watch(health_pb2.HealthCheckRequest(service=""))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
    # In flight when the stop begins: a long unary chunk.
    pending = asyncio.ensure_future(step(stub, sid, 1, np.ones((4000, 3), np.float32)))
    await asyncio.sleep(0.05)
    stopping = asyncio.ensure_future(running.server.stop(5.0))
    assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()  # as a load balancer does once it has seen NOT_SERVING
    reply = await pending
    assert reply.next_seq == 4001
    # The open stream ends with UNAVAILABLE rather than hanging until the grace runs out.
    try:
        while True:
            msg = await stream.read()
            if msg is grpc.aio.EOF:
                break
    except grpc.aio.AioRpcError as exc:
        assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
    else:
        assert await stream.code() == grpc.StatusCode.UNAVAILABLE
    await asyncio.wait_for(stopping, 30.0)
    await channel.close()


async def test_a_parked_session_steps_on_as_if_never_parked(start_server):
    # Sessions idle for park_after_s become rows of columns at the next sweep (once a second
    # here) and records again at their next call: the steps after it, a retry of the last
    # chunk and the state are what a session that never parked gets.
    running = await start_server(session_ttl_s=8.0, park_after_s=0.05)
    stub = pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(running.address))
    xs = np.random.default_rng(7).normal(size=(6, 3)).astype(np.float32)
    parked = await open_session(stub, "tiny-gru")
    first = await step(stub, parked, 0, xs[:3])
    whole = await open_session(stub, "tiny-gru")
    reference = outputs(await step(stub, whole, 0, xs))  # the six steps in one chunk

    async def both_parked() -> bool:
        return running.server.sessions.parked == 2

    await _until(both_parked)
    assert running.server.metrics.parked_sessions._value.get() == 2
    again = await step(stub, parked, 0, xs[:3])  # a retry of the last chunk: answered again
    assert again.next_seq == 3 and np.array_equal(outputs(again), outputs(first))
    assert running.server.sessions.parked == 1
    rest = await step(stub, parked, 3, xs[3:])
    assert rest.next_seq == 6
    np.testing.assert_allclose(outputs(rest), reference[3:], rtol=1e-5, atol=1e-6)
    assert await state_bytes(stub, parked) == await state_bytes(stub, whole)
    err = await step_error(stub, stream_step(parked, 9, xs[:1], 0).step)
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "expects seq 6" in err.details()
