"""``rnnserve serve`` as a process: prints where it listens and how to try it, serves, and exits
cleanly on SIGTERM; bad settings give one line on stderr."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))


@pytest.mark.parametrize("loop", ["auto", "asyncio"])
def test_serve_prints_how_to_try_it_and_stops_on_sigterm(model_repo: Path, loop: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    env["RNNSERVE_METRICS_PORT"] = "0"
    proc = subprocess.Popen(
        [
            RNNSERVE,
            "serve",
            "--models",
            str(model_repo),
            "--port",
            "0",
            "--log-level",
            "warning",
            "--loop",
            loop,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        lines = []
        while not lines or not lines[-1].lstrip().startswith("grpcurl"):
            line = proc.stdout.readline()
            assert line, f"serve exited early: {proc.stderr.read()}"
            lines.append(line.rstrip("\n"))
        text = "\n".join(lines)
        port = int(re.search(r"listening on 127\.0\.0\.1:(\d+)", text).group(1))
        assert re.search(r"tiny-gru/1 +gru +3 features +on CPUExecutionProvider", text)
        assert ("with uvloop" in text) == (loop == "auto")  # uvloop is installed here
        assert f"rnnserve models --server 127.0.0.1:{port}" in text
        assert re.search(r"metrics +http://127\.0\.0\.1:\d+/metrics", text)
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "shutting down" in out and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_setting_is_one_line_on_stderr(tmp_path: Path):
    result = subprocess.run(
        [RNNSERVE, "serve", "--port", "99999"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rnnserve serve: setting port: Input should be less than or equal to 65535"
    ]


def test_uvloop_asked_for_but_missing_is_one_line_on_stderr():
    hide = (
        "import sys; sys.modules['uvloop'] = None\n"
        "from rnnserve.client.cli import main; raise SystemExit(main())"
    )
    result = subprocess.run(
        [sys.executable, "-c", hide, "serve", "--loop", "uvloop", "--metrics-port", "-1"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "rnnserve serve: setting loop: uvloop is not installed; install it (pip install uvloop) "
        "or use --loop asyncio"
    ]


def test_port_in_use_is_one_line_on_stderr(model_repo: Path):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [RNNSERVE, "serve", "--models", str(model_repo), "--port", str(port),
             "--metrics-port", "-1", "--log-level", "error"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert result.returncode == 1
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(f"rnnserve serve: cannot listen on 127.0.0.1:{port}")
    )
    assert "Traceback" not in result.stderr
