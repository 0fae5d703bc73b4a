"""Fault injection against a real server: the engine raising mid-batch, a client that never
reads its replies, and many idle or silent connections."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support import raw
from tests.support.modelgen import reference_run

POISON = 99.0  # an input value that makes the injected engine fault fire


def _poisoned(x: np.ndarray) -> bool:
    return bool(np.any(x == POISON))


def _inject(model: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make ``model``'s engine raise for any run that carries a poisoned value; returns a list
    that counts the injected failures."""
    engine = model.engine
    run = engine.run
    fired: list[int] = []

    def failing_run(x: np.ndarray, states: Any, lengths: Any = None) -> Any:
        if _poisoned(x):
            fired.append(x.shape[1])
            raise RuntimeError("injected engine fault")
        return run(x, states, lengths)

    monkeypatch.setattr(engine, "run", failing_run)
    return fired


@pytest.mark.parametrize("inline_max_steps", [256, 0], ids=["on-loop", "worker-thread"])
async def test_engine_fault_mid_batch_fails_only_that_run(
    start_server: Any,
    model_repo: Path,
    monkeypatch: pytest.MonkeyPatch,
    inline_max_steps: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    running = await start_server(inline_max_steps=inline_max_steps)
    gru = next(m for m in running.server.repository.all() if m.manifest.name == "tiny-gru")
    fired = _inject(gru, monkeypatch)
    rng = np.random.default_rng(5)
    xs = rng.normal(size=(3, 4, 3)).astype(np.float32)  # three chunks of four steps
    bad = xs[0].copy()
    bad[2, 1] = POISON
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        grus = [await raw.open_session(stub, "tiny-gru") for _ in range(12)]
        lstms = [await raw.open_session(stub, "tiny-lstm") for _ in range(4)]

        async def first(sid: str, x: np.ndarray) -> grpc.StatusCode:
            try:
                await raw.step(stub, sid, 0, x)
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        # Every session's first chunk in one tick, so they batch; session 0's is poisoned.
        codes = await asyncio.gather(
            *[first(sid, bad if i == 0 else xs[0]) for i, sid in enumerate(grus)],
            *[first(sid, xs[0]) for sid in lstms],
        )
        assert fired, "the injected fault never fired"
        assert codes[0] == grpc.StatusCode.INTERNAL
        assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.INTERNAL}
        assert codes[12:] == [grpc.StatusCode.OK] * 4, "another model's sessions were hit"
        failed = {sid for sid, code in zip(grus, codes, strict=False) if code != grpc.StatusCode.OK}
        # Only the failing run's sessions failed: at most one batch's worth, not every chunk
        # that came after it.
        assert len(failed) == sum(fired) or len(failed) <= max(fired)
        for sid, code in zip(grus + lstms, codes, strict=True):
            info = await stub.GetSession(pb.GetSessionRequest(session_id=sid))
            assert info.session.next_seq == (0 if code != grpc.StatusCode.OK else 4), sid
        # The failed sessions were not advanced: resent cleanly, they continue exactly, and so
        # does everyone else.
        for sid in grus:
            start = 0 if sid in failed else 1
            for k in range(start, 3):
                await raw.step(stub, sid, 4 * k, xs[k])
            got = raw.outputs(await raw.step(stub, sid, 12, xs[2][:1]))
            expected, _ = reference_run(
                model_repo / "tiny-gru" / "1", np.concatenate([*xs, xs[2][:1]])
            )
            np.testing.assert_allclose(got, expected[12:], atol=1e-5)
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert "injected engine fault" in caplog.text  # logged with its traceback, not sent


async def test_client_that_never_reads(start_server: Any) -> None:
    """A stream whose client sends chunks and never reads a reply: the server stops reading
    it (the writer stalls), other clients are served as usual meanwhile (each of their steps
    within a second), health stays SERVING, and once the reader-less call is cancelled its
    sessions are free to use."""
    running = await start_server(max_stream_inflight=16)
    x = np.ones((64, 3), np.float32)
    async with (
        grpc.aio.insecure_channel(running.address) as greedy,
        grpc.aio.insecure_channel(running.address) as polite,
    ):
        gstub = pb_grpc.InferenceServiceStub(greedy)
        sids = [await raw.open_session(gstub, "tiny-gru") for _ in range(2)]
        call = gstub.Stream()
        sent = 0

        async def flood() -> None:
            nonlocal sent
            for i in range(100_000):
                await call.write(raw.stream_step(sids[i % 2], 64 * (i // 2), x, i))
                sent += 1

        writer = asyncio.ensure_future(flood())
        # The server stops reading once max_stream_inflight replies wait unsent and the
        # HTTP/2 windows are full: the writer stalls (measured with a separate client process:
        # at 11,856 chunks after 8 s, the server's RSS flat at 127 MiB for the next 16 s).
        deadline, last, still = time.monotonic() + 30, -1, 0.0
        while still < 2.0 and time.monotonic() < deadline:
            last = sent
            await asyncio.sleep(0.5)
            still = still + 0.5 if sent == last else 0.0
        assert still >= 2.0, f"the server kept reading a stream nobody reads ({sent} chunks)"
        pstub = pb_grpc.InferenceServiceStub(polite)
        sid = await raw.open_session(pstub, "tiny-lstm")
        for seq in range(50):
            await asyncio.wait_for(raw.step(pstub, sid, seq, np.ones((1, 3), np.float32)), 1.0)
        health = await health_pb2_grpc.HealthStub(polite).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert sent == last, "the stalled stream moved on while nobody read"
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, asyncio.InvalidStateError):
            await writer
        await asyncio.sleep(0.2)
        for s in sids:  # out of the cancelled call's hands, usable again
            info = await gstub.GetSession(pb.GetSessionRequest(session_id=s))
            await raw.step(gstub, s, info.session.next_seq, x[:1])


def _server_side_connections(port: int) -> int:
    """ESTABLISHED TCP connections whose local port is ``port`` (this machine's view)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                count += 1
    return count


async def test_idle_and_silent_connections_are_closed(start_server: Any) -> None:
    running = await start_server(max_connection_idle_s=1.0, handshake_timeout_s=1.0)
    silent = []
    for _ in range(300):  # connect, never say a word
        s = socket.create_connection(("127.0.0.1", running.port))
        silent.append(s)
    own = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    idle = [grpc.aio.insecure_channel(running.address, options=own) for _ in range(30)]
    for channel in idle:  # one call each, then nothing
        await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
    assert _server_side_connections(running.port) >= 330
    deadline = time.monotonic() + 15
    while _server_side_connections(running.port) > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
    assert _server_side_connections(running.port) == 0, "idle connections were kept open"
    for s in silent:
        s.settimeout(1)
        with contextlib.suppress(ConnectionResetError):
            while s.recv(4096):  # the server's HTTP/2 settings and GOAWAY, then its close
                pass
        s.close()
    # Closed idle channels reconnect on their next call; the server serves as before.
    reply = await pb_grpc.InferenceServiceStub(idle[0]).ListModels(pb.ListModelsRequest())
    assert reply.models
    for channel in idle:
        await channel.close()
