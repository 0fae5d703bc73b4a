"""Bearer tokens: every call but a health check needs a configured token, through the SDK and
raw stubs; tokens come from a file or the environment; the start-up warnings about exposure."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.client import AsyncClient, Client, ClientOptions, RetryPolicy, RnnserveError
from rnnserve.server.app import RnnServer, ServerStartError
from rnnserve.server.auth import load_tokens
from rnnserve.server.settings import Settings
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support import raw

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-fedcba9876543210"
TOKENS = f"alice:{ALICE},bob:{BOB}"
X = np.ones((2, 3), np.float32)


def _md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


async def _every_rpc(stub: pb_grpc.InferenceServiceStub, md: Any) -> list[grpc.StatusCode]:
    """The status of each rnnserve.v1 RPC sent with metadata ``md`` (the calls themselves are
    well formed; only the token decides)."""

    async def one_chunk() -> AsyncIterator[pb.StreamRequest]:
        yield raw.stream_step("x", 0, X, 1)

    calls = [
        stub.ListModels(pb.ListModelsRequest(), metadata=md),
        stub.GetModel(pb.GetModelRequest(model="tiny-gru"), metadata=md),
        stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru"), metadata=md),
        stub.GetSession(pb.GetSessionRequest(session_id="x"), metadata=md),
        stub.Step(pb.StepRequest(session_id="x"), metadata=md),
        stub.CloseSession(pb.CloseSessionRequest(session_id="x"), metadata=md),
        stub.ResetSession(pb.ResetSessionRequest(session_id="x"), metadata=md),
        stub.ForkSession(pb.ForkSessionRequest(session_id="x"), metadata=md),
        stub.GetState(pb.GetStateRequest(session_id="x"), metadata=md),
        stub.PutState(pb.PutStateRequest(), metadata=md),
    ]
    codes = []
    for call in calls:
        try:
            await call
            codes.append(grpc.StatusCode.OK)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
    try:
        async for _ in stub.Stream(one_chunk(), metadata=md):
            pass
        codes.append(grpc.StatusCode.OK)
    except grpc.aio.AioRpcError as exc:
        codes.append(exc.code())
    return codes


async def test_every_rpc_needs_a_known_token(start_server: Any) -> None:
    running = await start_server(auth_tokens=TOKENS)
    async with grpc.aio.insecure_channel(running.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        for md in ((), _md("not-a-token-of-this-server"), (("authorization", ALICE),)):
            assert set(await _every_rpc(stub, md)) == {grpc.StatusCode.UNAUTHENTICATED}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.ListModels(pb.ListModelsRequest())
        assert "authorization: Bearer" in (info.value.details() or "")
        codes = await _every_rpc(stub, _md(ALICE))
        assert grpc.StatusCode.UNAUTHENTICATED not in codes
        assert codes[:3] == [grpc.StatusCode.OK] * 3
        # Probes need no token.
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_refusals_are_counted_in_metrics(start_server: Any) -> None:
    running = await start_server(auth_tokens=TOKENS)
    async with grpc.aio.insecure_channel(running.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.InferenceServiceStub(channel).ListModels(pb.ListModelsRequest())
    errors = running.server.registry.get_sample_value(
        "rnnserve_errors_total",
        {"method": "ListModels", "code": "UNAUTHENTICATED", "protocol": "rnnserve.v1"},
    )
    assert errors == 1


async def test_async_sdk_with_token(start_server: Any) -> None:
    running = await start_server(auth_tokens=TOKENS)
    options = ClientOptions(target=running.address, retry=RetryPolicy(give_up_after_s=0))
    async with (
        AsyncClient(options.with_token(BOB)) as client,
        await client.session("tiny-gru") as s,
    ):
        assert (await s.step(X)).shape == (2, 2)
        assert (await s.step(X[0])).shape == (2,)
    async with AsyncClient(options) as client:
        with pytest.raises(RnnserveError) as info:
            await client.models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_sync_sdk_with_token_from_a_file(server_thread_factory: Any, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# principal:token\nalice:{ALICE}   # the first tenant\n\nbob:{BOB}\n")
    running = server_thread_factory(auth_tokens_file=tokens)
    options = ClientOptions(target=running.address, retry=RetryPolicy(give_up_after_s=0))
    with Client(options.with_token(ALICE)) as client, client.session("tiny-lstm") as s:
        assert s.step(X).shape == (2, 2)
        with s.fork() as child:
            assert child.step(X).shape == (2, 2)
    with Client(options.with_token("wrong-token-0123456789")) as client:
        with pytest.raises(RnnserveError) as info:
            client.models()
        assert info.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_tokens_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RNNSERVE_AUTH_TOKENS", TOKENS)
    assert sorted(load_tokens(Settings()).values()) == ["alice", "bob"]


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ("alice", "expected principal:token"),
        ("alice:short", "at least 16 characters"),
        (f"al ice:{ALICE}", "expected principal:token"),
        (f"alice:{ALICE},bob:{ALICE}", "already given to another principal"),
    ],
)
async def test_bad_tokens_stop_the_start(model_repo: Path, tokens: str, message: str) -> None:
    server = RnnServer(Settings(port=0, metrics_port=-1, models=model_repo, auth_tokens=tokens))
    with pytest.raises(ServerStartError, match=message):
        await server.start()
    await server.stop(0)
    assert ALICE not in message


async def test_missing_token_file_stops_the_start(model_repo: Path, tmp_path: Path) -> None:
    settings = Settings(
        port=0, metrics_port=-1, models=model_repo, auth_tokens_file=tmp_path / "none"
    )
    server = RnnServer(settings)
    with pytest.raises(ServerStartError, match="cannot read token file"):
        await server.start()
    await server.stop(0)


async def test_loud_warning_beyond_loopback(
    start_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="rnnserve.server"):
        await start_server(host="0.0.0.0", metrics_host="0.0.0.0")
    text = caplog.text
    assert "WITHOUT authentication" in text
    assert "metrics endpoint" in text and "without authentication" in text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnnserve.server"):
        await start_server(host="0.0.0.0", auth_tokens=TOKENS)
    assert "WITHOUT authentication" not in caplog.text
    assert "clear text" in caplog.text  # tokens without TLS
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="rnnserve.server"):
        await start_server()  # loopback: no token needed, nothing to warn about
    assert "SECURITY" not in caplog.text
