"""What a new user stumbles on in the first hour (issue 12): a wrong ``--models`` path, a second
server on one machine, a health watch that held shutdown, a banner that listed models twice, a
tensor without a dtype. ``rnnserve serve`` runs as a real process where the exit status is the
point; the rest runs against the in-process server of tests/conftest.py."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc

from tests.support.modelgen import write_model
from tests.support.raw import step_error

RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))
Code = grpc.StatusCode


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}


def _serve_fails(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [RNNSERVE, "serve", "--port", "0", "--metrics-port", "0", *args],
        capture_output=True, text=True, timeout=60, env=_env(), cwd=cwd,
    )  # fmt: skip


def _one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("rnnserve serve: ")
    return lines[0]


def test_a_missing_model_folder_exits_2_naming_the_absolute_path(tmp_path: Path):
    # `rnnserve serve` started from another folder: the default `models` is not there.
    result = _serve_fails(cwd=tmp_path)
    assert result.returncode == 2
    line = _one_line(result)
    assert f"model repository {tmp_path.resolve() / 'models'} does not exist" in line
    assert "--models" in line and "--allow-empty" in line
    assert result.stdout == ""


def test_an_empty_or_broken_model_folder_exits_2(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = _serve_fails("--models", str(empty))
    assert result.returncode == 2
    assert f"model repository {empty} holds no model" in _one_line(result)

    # Every version fails to load (a manifest that is not JSON): the load error is logged and
    # the last line says why nothing is served.
    broken = tmp_path / "broken"
    folder = write_model(broken, "tiny-gru")
    (folder / "manifest.json").write_text("{")
    result = _serve_fails("--models", str(broken), "--log-level", "error")
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"rnnserve serve: none of the 1 model versions in {broken} loaded")
    assert "Traceback" not in result.stderr


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port something (not rnnserve) listens on."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


@pytest.mark.parametrize("which", ["--port", "--metrics-port"])
def test_a_port_in_use_fails_before_any_model_loads(model_repo: Path, busy_port: int, which: str):
    args = ["--models", str(model_repo), "--log-level", "debug", which, str(busy_port)]
    result = _serve_fails(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    what = "listen on" if which == "--port" else "serve metrics on"
    assert lines[-1].startswith(f"rnnserve serve: cannot {what} 127.0.0.1:{busy_port}: address")
    assert f"pick another with {which} N (0 for any free port" in lines[-1]
    if which == "--metrics-port":
        assert "-1 for none" in lines[-1]
    # At DEBUG every model load is logged: there was none.
    assert not any("serving tiny" in line for line in lines), result.stderr


def _banner(proc: subprocess.Popen[str]) -> list[str]:
    lines: list[str] = []
    assert proc.stdout is not None
    while not lines or not lines[-1].lstrip().startswith("grpcurl"):
        line = proc.stdout.readline()
        assert line, f"serve exited early: {proc.communicate()[1]}"
        lines.append(line.rstrip("\n"))
    return lines


def test_banner_is_one_block_and_a_health_watch_does_not_hold_shutdown(
    model_repo: Path, tmp_path: Path
):
    # Started from a folder where the models are not below it: no `../..` paths anywhere.
    proc = subprocess.Popen(
        [RNNSERVE, "serve", "--models", str(model_repo), "--port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path,
    )  # fmt: skip
    try:
        lines = _banner(proc)
        text = "\n".join(lines)
        assert ".." not in text
        port = int(re.search(r"gRPC +listening on 127\.0\.0\.1:(\d+)", text).group(1))
        assert re.search(r"metrics +http://127\.0\.0\.1:\d+/metrics", text)
        assert f"models   from {model_repo.resolve()}" in text
        for label in ("tiny-char/1", "tiny-gru/1", "tiny-lstm/1"):
            [row] = [line for line in lines if label in line]  # each model exactly once
            assert row.endswith("on CPUExecutionProvider")
        assert f"{RNNSERVE} models --server 127.0.0.1:{port}" in text
        assert f"grpcurl -plaintext 127.0.0.1:{port} rnnserve.v1.InferenceService/" in text

        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)  # default grace: 10 s
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert next(watch, None) is None  # and the watch ends (OK) at once
            _, err = proc.communicate(timeout=30)
            took = time.monotonic() - started
        assert proc.returncode == 0, err
        # Held by the watch, stop() took the whole grace period (10.0 s measured with grpcio's
        # health servicer; 0.01 s now); the margin is for a loaded machine.
        assert took < 8.0, f"shutdown with a health watch open took {took:.1f} s"
        # The models were listed once, in the banner; the log did not repeat them.
        assert "serving tiny" not in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_allow_empty_starts_and_serves_what_appears_later(tmp_path: Path):
    repo = tmp_path / "later"
    proc = subprocess.Popen(
        [RNNSERVE, "serve", "--models", str(repo), "--allow-empty", "--port", "0",
         "--metrics-port", "-1", "--reload-interval-s", "0.2"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
    )  # fmt: skip
    try:
        text = "\n".join(_banner(proc))
        assert f"models   none yet in {repo} (looked for again every 0.2 s)" in text
        assert "metrics  off" in text
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))
        write_model(repo, "tiny-gru")
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            deadline = time.monotonic() + 20
            while not stub.ListModels(pb.ListModelsRequest()).models:
                assert time.monotonic() < deadline, "the new model was never loaded"
                time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_stop_ends_health_watches_at_once(start_server):
    running = await start_server(shutdown_grace_s=10.0)
    async with grpc.aio.insecure_channel(running.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=name))
            for name in ("", "rnnserve.v1.InferenceService", "no-such-service")
        ]
        first = [(await w.read()).status for w in watches]
        serving, unknown = (
            health_pb2.HealthCheckResponse.SERVING,
            health_pb2.HealthCheckResponse.SERVICE_UNKNOWN,
        )
        assert first == [serving, serving, unknown]
        loop = asyncio.get_running_loop()
        started = loop.time()
        await running.server.stop(10.0)
        assert loop.time() - started < 5.0  # the grace period is 10 s
        for w in watches[:2]:
            assert (await w.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        for w in watches:
            assert await w.read() is grpc.aio.EOF
            assert await w.code() == Code.OK


async def test_a_tensor_without_dtype_is_told_what_the_model_takes(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        unset = pb.Tensor(shape=[2], raw_data=b"\0" * 16)  # dtype left at DTYPE_UNSPECIFIED
        for model, takes in (("tiny-char", "int64 [T]"), ("tiny-gru", "float32 [T, 3]")):
            sid = (await stub.OpenSession(pb.OpenSessionRequest(model=model))).session.session_id
            err = await step_error(stub, pb.StepRequest(session_id=sid, seq=0, inputs=unset))
            assert err.code() == Code.INVALID_ARGUMENT
            details = err.details() or ""
            assert "DTYPE_UNSPECIFIED" in details and f"{model}/1 takes {takes}" in details
            assert "float16" not in details  # no list of dtypes the model would refuse

        bad_state = {"h": pb.Tensor(shape=[2, 8], raw_data=b"\0" * 64)}
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.OpenSession(pb.OpenSessionRequest(model="tiny-gru", initial_state=bad_state))
        assert info.value.code() == Code.INVALID_ARGUMENT
        assert "tiny-gru/1 needs float32 [2, 8]" in (info.value.details() or "")


def test_banner_try_it_lines_follow_tls_and_tokens() -> None:
    # A pure function of the settings and the models: no server needed.
    from types import SimpleNamespace

    from rnnserve.server.cli import banner
    from rnnserve.server.settings import Settings

    def show(**settings: Any) -> str:
        s = Settings(models=Path("/srv/models"), metrics_port=-1, **settings)
        fake = SimpleNamespace(settings=s, metrics_port=0, repository=SimpleNamespace(all=list))
        return banner(fake, 50051, False)

    plain = show(host="::")
    assert "listening on [::]:50051 (every interface)" in plain
    assert "grpcurl -plaintext 127.0.0.1:50051 " in plain and "models --server" in plain
    secure = show(tls_cert=Path("/c.pem"), tls_key=Path("/k.pem"), auth_tokens="app:secret")
    assert "listening on 127.0.0.1:50051 with TLS" in secure
    assert "grpcurl -cacert CA.pem -H 'authorization: Bearer TOKEN' 127.0.0.1:50051" in secure
    assert "models --server" not in secure  # the CLI commands have no TLS or token flags
    assert "secret" not in secure
