"""``rnnserve probe`` (the image's HEALTHCHECK): exit 0 only while the server is SERVING, one
line on stderr otherwise, 2 for bad settings."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

from grpc_health.v1 import health_pb2
from rnnserve.server import probe

RNNSERVE = str(Path(sys.executable).with_name("rnnserve"))


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RNNSERVE_")}
    return subprocess.run(
        [RNNSERVE, "probe", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        timeout=60,
    )


def _args(server: str | None, service: str = probe.DEFAULT_SERVICE) -> argparse.Namespace:
    return argparse.Namespace(
        server=server, service=service, timeout=2.0, tls_ca=None, tls_server_name=None
    )


async def test_serving_exits_0_from_the_flag_and_from_the_settings_port(start_server):
    running = await start_server()
    by_flag, by_env = await asyncio.gather(
        asyncio.to_thread(_cli, "--server", running.address),
        asyncio.to_thread(_cli, RNNSERVE_PORT=str(running.port)),
    )
    assert (by_flag.returncode, by_flag.stderr) == (0, "")
    assert (by_env.returncode, by_env.stderr) == (0, "")


async def test_not_serving_unknown_service_and_nothing_listening_exit_1(start_server, capsys):
    running = await start_server()
    await running.server.health.set(
        probe.DEFAULT_SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING
    )
    assert await asyncio.to_thread(probe.run, _args(running.address)) == 1
    assert "is NOT_SERVING" in capsys.readouterr().err
    assert await asyncio.to_thread(probe.run, _args(running.address, "nope")) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
    await running.server.stop(0)
    assert await asyncio.to_thread(probe.run, _args(running.address)) == 1
    err = capsys.readouterr().err
    assert "UNAVAILABLE" in err and err.count("\n") == 1


def test_bad_settings_and_flags_exit_2_with_one_line():
    bad_port = _cli(RNNSERVE_PORT="fifty")
    assert bad_port.returncode == 2
    assert bad_port.stderr.startswith("rnnserve probe: setting port")
    assert "Traceback" not in bad_port.stderr
    any_port = _cli(RNNSERVE_PORT="0")
    assert any_port.returncode == 2 and "--server" in any_port.stderr
    missing_ca = _cli("--server", "127.0.0.1:1", "--tls-ca", "/nonexistent/ca.pem")
    assert missing_ca.returncode == 2 and "cannot read /nonexistent/ca.pem" in missing_ca.stderr
