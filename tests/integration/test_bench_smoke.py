"""The load generator of ``rnnserve bench`` against a real server and against the echo floor.

Smoke tests only: they prove the generator drives real sessions without seq errors and reports
consistent counts and ordered percentiles. Speed is the benchmark's business, never asserted
(the one latency bound below is a floor a spinning echo cannot go under, not a speed target).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from rnnserve.client.cli import main
from rnnserve.client.commands.bench import LoadConfig, LoadResult, run_load

from tests.conftest import RunningServer

ECHO_SERVER = Path(__file__).resolve().parents[2] / "bench" / "echo_server.py"


def _check(result: LoadResult, chunk: int) -> None:
    assert result.errors == {}
    assert result.messages > 0
    assert result.steps == result.messages * chunk
    assert 0 < result.p50_us <= result.p90_us <= result.p99_us <= result.max_us
    assert result.window_s > 0
    assert result.steps_per_s == pytest.approx(result.steps / result.window_s)


async def test_one_stream_per_session_on_a_feature_model(server: RunningServer) -> None:
    config = LoadConfig(
        target=server.address, model="tiny-gru", sessions=4, seconds=1.0, warmup=0.2
    )
    _check(await run_load(config), chunk=1)


async def test_shared_streams_and_chunks_on_a_token_model(server: RunningServer) -> None:
    config = LoadConfig(
        target=server.address,
        model="tiny-char",
        sessions=6,
        streams=2,
        chunk=4,
        seconds=1.0,
        warmup=0.2,
    )
    _check(await run_load(config), chunk=4)


async def test_steps_mode_applies_exactly_the_asked_steps(server: RunningServer) -> None:
    config = LoadConfig(
        target=server.address, model="tiny-lstm", sessions=3, chunk=2, steps=10, warmup=0.1
    )
    result = await run_load(config)
    _check(result, chunk=2)
    assert result.steps == 3 * 10


def test_cli_prints_the_percentiles(
    server_thread: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--server", server_thread.address, "--model", "tiny-gru"]
    assert main([*argv, "--sessions", "2", "--seconds", "0.5", "--warmup", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out and "steps/s" in out


def test_cli_bad_input_is_one_line_and_non_zero(
    server_thread: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--server", server_thread.address]
    assert main([*argv, "--model", "tiny-gru", "--sessions", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--sessions" in err
    assert main([*argv, "--model", "no-such-model", "--seconds", "0.2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "NOT_FOUND" in err


@pytest.fixture(params=[0.0], ids=["plain"])
def echo_address(model_repo: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """bench/echo_server.py imitating tiny-char, as its own process on a free port (spinning
    ``request.param`` µs per message)."""
    argv = [sys.executable, str(ECHO_SERVER), "--model-dir", str(model_repo / "tiny-char" / "1")]
    if request.param:
        argv += ["--busy-us", str(request.param)]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


async def test_the_echo_floor_runs_the_same_client(echo_address: str) -> None:
    config = LoadConfig(target=echo_address, model="tiny-char", sessions=3, chunk=2, seconds=0.5)
    _check(await run_load(config), chunk=2)


@pytest.mark.parametrize("echo_address", [5000.0], ids=["busy-5ms"], indirect=True)
async def test_a_busy_echo_spins_before_each_reply(echo_address: str) -> None:
    # The stand-in for a model run: no reply can come back sooner than the spin.
    config = LoadConfig(target=echo_address, model="tiny-char", sessions=1, chunk=1, seconds=0.3)
    result = await run_load(config)
    _check(result, chunk=1)
    assert result.p50_us >= 5000


def test_a_negative_busy_time_is_one_line_on_stderr(model_repo: Path) -> None:
    argv = [sys.executable, str(ECHO_SERVER), "--model-dir", str(model_repo / "tiny-char" / "1")]
    done = subprocess.run([*argv, "--busy-us", "-1"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.strip() == "echo_server: --busy-us must be 0 or more, not -1"
