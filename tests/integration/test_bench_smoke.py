"""The load generator of ``rnnserve bench`` against a real server and against the echo floor.

Smoke tests only: they prove the generator drives real sessions without seq errors and reports
consistent counts and ordered percentiles. Speed is the benchmark's business, never asserted
(the one latency bound below is a floor a spinning echo cannot go under, not a speed target).
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from rnnserve.client.cli import main
from rnnserve.client.commands.bench import LoadConfig, LoadResult, run_load
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor, to_tensor

from tests.conftest import RunningServer
from tests.support.modelgen import Reference
from tests.support.proc_base import require_binary

BENCH = Path(__file__).resolve().parents[2] / "bench"
ECHO_SERVER = BENCH / "echo_server.py"


def _check(result: LoadResult, chunk: int, frame: int = 0) -> None:
    assert result.errors == {}
    assert result.messages > 0
    assert result.steps == result.messages * chunk * (frame or 1)
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


async def test_frames_apply_every_entry_on_the_real_server(server: RunningServer) -> None:
    # Three frames of four feature-model sessions in flight, then two of three token-model
    # sessions on one shared stream: every entry applied (the server checks each seq).
    config = LoadConfig(
        target=server.address, model="tiny-gru", sessions=12, frame=4, seconds=0.5, warmup=0.1
    )
    _check(await run_load(config), chunk=1, frame=4)
    config = LoadConfig(
        target=server.address,
        model="tiny-char",
        sessions=6,
        frame=3,
        streams=1,
        chunk=2,
        steps=6,
        warmup=0.1,
    )
    result = await run_load(config)
    _check(result, chunk=2, frame=3)
    assert result.steps == 6 * 6


def test_cli_prints_the_percentiles(
    server_thread: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--server", server_thread.address, "--model", "tiny-gru"]
    assert main([*argv, "--sessions", "2", "--seconds", "0.5", "--warmup", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "p50" in out and "p99" in out and "steps/s" in out


def test_cli_a_frame_must_divide_the_sessions(
    server_thread: RunningServer, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["bench", "--server", server_thread.address, "--model", "tiny-gru"]
    assert main([*argv, "--sessions", "6", "--frame", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "multiple of --frame" in err


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


@contextlib.contextmanager
def _echo(version_dir: Path, *extra: str) -> Iterator[str]:
    """bench/echo_server.py imitating the model in ``version_dir``, as its own process on a
    free port; its address."""
    argv = [sys.executable, str(ECHO_SERVER), "--model-dir", str(version_dir), *extra]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening on "), line
        yield line.split()[-1]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


@pytest.fixture(params=[0.0], ids=["plain"])
def echo_address(model_repo: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """The echo imitating tiny-char (spinning ``request.param`` µs per message)."""
    extra = ["--busy-us", str(request.param)] if request.param else []
    with _echo(model_repo / "tiny-char" / "1", *extra) as address:
        yield address


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


async def test_the_echo_answers_frames_of_the_real_size(echo_address: str) -> None:
    # Two frames of four sessions each, in flight at once, two steps per entry.
    config = LoadConfig(
        target=echo_address, model="tiny-char", sessions=8, frame=4, chunk=2, seconds=0.5
    )
    _check(await run_load(config), chunk=2, frame=4)


@pytest.mark.parametrize("model", ["tiny-char", "tiny-lstm"])
async def test_the_floor_runs_the_model_on_frames(model_repo: Path, model: str) -> None:
    # The frames benchmark's floor (--run-model) must do the model's real work: each
    # session's outputs equal the model run straight over its chunks, whatever its neighbours.
    ref = Reference(model_repo, (model,))
    manifest, _ = ref.models[model]
    rng = np.random.default_rng(7)
    ids = ["a", "b", "c"]
    frames = []
    for n, steps in ((3, 2), (2, 1), (3, 3)):  # "c" sits out the second frame
        shape = (n, steps) if manifest.input_kind == "tokens" else (n, steps, manifest.input_size)
        if manifest.input_kind == "tokens":
            x = rng.integers(0, manifest.input_size, size=shape, dtype=np.int64)
        else:
            x = rng.standard_normal(shape).astype(np.float32)
        frames.append((ids[:n], x))
    with _echo(model_repo / model / "1", "--run-model") as address:
        async with grpc.aio.insecure_channel(address) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            requests = [
                pb.StreamRequest(
                    request_id=i,
                    frame=pb.StepFrame(session_ids=sids, seqs=[0] * len(sids), inputs=to_tensor(x)),
                )
                for i, (sids, x) in enumerate(frames)
            ]
            replies = [r async for r in stub.Stream(iter(requests))]
    states = {sid: ref.zeros(model) for sid in ids}
    for (sids, x), reply in zip(frames, replies, strict=True):
        got = from_tensor(reply.frame.outputs)
        assert got.shape == (len(sids), x.shape[1], manifest.output_size)
        for j, sid in enumerate(sids):
            want, states[sid] = ref.run(model, x[j], states[sid])
            np.testing.assert_allclose(got[j], want, rtol=1e-5, atol=1e-5)


def _bench(script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, str(BENCH / script), *map(str, args)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=240)


def _section(doc: Path, name: str) -> str:
    text = doc.read_text()
    start, end = text.index(f"<!-- {name}:begin"), text.index(f"<!-- {name}:end -->")
    return text[start:end]


def test_ab_quick_run_writes_its_section(model_repo: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\n<!-- other:begin -->\nkept\n<!-- other:end -->\n")
    done = _bench(
        "ab.py", "--quick", "--before", "HEAD", "--models", model_repo, "--model", "tiny-char",
        "--sessions", "1", "--out", doc,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    section = _section(doc, "ab")
    assert "| 1 | " in section and "after / before" in section.lower()
    assert "kept" in doc.read_text()  # another script's section stays


def test_ab_names_an_unknown_commit(model_repo: Path, tmp_path: Path) -> None:
    done = _bench("ab.py", "--before", "no-such-commit", "--models", model_repo, "--model",
                  "tiny-char", "--out", tmp_path / "b.md")  # fmt: skip
    assert done.returncode == 2
    assert "no-such-commit" in done.stderr and not (tmp_path / "b.md").exists()


def test_instructions_quick_run_counts_both_trees(model_repo: Path, tmp_path: Path) -> None:
    require_binary("valgrind", "valgrind")
    doc = tmp_path / "benchmarks.md"
    done = _bench(
        "instructions.py", "--quick", "--before", "HEAD", "--models", model_repo,
        "--model", "tiny-gru", "--out", doc,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    section = _section(doc, "instructions")
    counts = [
        int(line.split("|")[2].replace(",", ""))
        for line in section.splitlines()
        if line.startswith(("| before (", "| after ("))
    ]
    # Real counts of a step (tens of thousands of instructions at least), one per tree.
    assert len(counts) == 2 and min(counts) > 10_000
    assert "after / before |" in section


def test_instructions_names_an_unknown_commit(model_repo: Path, tmp_path: Path) -> None:
    require_binary("valgrind", "valgrind")
    done = _bench("instructions.py", "--before", "no-such-commit", "--models", model_repo,
                  "--model", "tiny-gru", "--out", tmp_path / "b.md")  # fmt: skip
    assert done.returncode == 2
    assert "no-such-commit" in done.stderr and not (tmp_path / "b.md").exists()


def test_startup_quick_run_times_a_start(model_repo: Path, tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    done = _bench("startup.py", "--quick", "--models", model_repo, "--out", doc)
    assert done.returncode == 0, done.stderr
    section = _section(doc, "startup")
    assert "median of 3 runs" in section
    assert "load tiny-gru/1" in section and "imports" in section


def test_frames_quick_run_checks_both_targets_and_plots(tmp_path: Path) -> None:
    doc, png = tmp_path / "benchmarks.md", tmp_path / "img" / "frames.png"
    done = _bench(
        "frames.py", "--quick", "--hidden", "128", "--frames", "8,64", "--out", doc,
        "--plot", png,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    section = _section(doc, "frames")
    for model in ("GRU-128", "LSTM-128"):
        row = next(line for line in section.splitlines() if line.startswith(f"| {model} | "))
        assert row.count("PASS") + row.count("MISS") == 2  # both targets judged
        assert row.count("x (") == 3  # rnnserve and the floor over the echo, rnnserve / floor
        assert f"| {model} | floor | frames of 64 (2 in flight) | 128 |" in section
    assert "](img/frames.png)" in section
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
