"""The user commands (models, generate, forecast) on a real server, and their one-line errors."""

from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rnnserve.client.cli import main

from tests.support.modelgen import CHAR_VOCABULARY, reference_run, write_model


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.fixture
def forecaster_server(
    model_repo: Path, server_thread_factory: Callable[..., Any]
) -> tuple[Any, Path]:
    """A server that also serves a one-feature forecaster, tiny-series/1."""
    path = write_model(model_repo, "tiny-series", input_size=1, output_size=1, seed=7)
    return server_thread_factory(), path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_models_prints_a_table(server_thread: Any, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = _run(capsys, "models", "--server", server_thread.address)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:3] == ["MODEL", "VERSION", "CELL"]
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(rows) == {"tiny-char", "tiny-gru", "tiny-lstm"}
    assert f"text, {len(CHAR_VOCABULARY)} symbols" in rows["tiny-char"]
    assert "h [2, 8], c [2, 8]" in rows["tiny-lstm"]


def test_commands_say_when_the_server_is_down(capsys: pytest.CaptureFixture[str]) -> None:
    down = f"127.0.0.1:{_free_port()}"
    for argv in (
        ["models"],
        ["generate", "--model", "tiny-char", "--prompt", "a", "--length", "3"],
    ):
        code, _, err = _run(capsys, *argv, "--server", down, "--timeout", "0.5")
        _assert_one_line_error(code, err, f"rnnserve {argv[0]}:", "cannot reach", down)


def test_generate_streams_text(
    server_thread: Any, model_repo: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["generate", "--server", server_thread.address, "--model", "tiny-char"]
    code, out, err = _run(capsys, *args, "--prompt", "abc", "--length", "40", "--seed", "1")
    assert code == 0, err
    text = out.rstrip("\n")
    assert text.startswith("abc") and len(text) == 43
    assert set(text) <= set(CHAR_VOCABULARY)
    code, again, _ = _run(capsys, *args, "--prompt", "abc", "--length", "40", "--seed", "1")
    assert again == out  # the seed makes it repeatable

    # Temperature 0 is greedy decoding: check it against the model run straight.
    code, out, err = _run(
        capsys, *args, "--prompt", "hello", "--length", "12", "--temperature", "0"
    )
    assert code == 0, err
    ids = [CHAR_VOCABULARY.index(c) for c in out.rstrip("\n")]
    logits, _ = reference_run(model_repo / "tiny-char" / "1", np.array(ids[:-1], np.int64))
    greedy = np.argmax(logits[len("hello") - 1 :], axis=1)
    assert ids[len("hello") :] == greedy.tolist()


def test_generate_errors_are_one_line(
    server_thread: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["generate", "--server", server_thread.address]
    code, _, err = _run(capsys, *base, "--model", "no-such-model", "--prompt", "a")
    _assert_one_line_error(code, err, "rnnserve generate:", "no-such-model")
    code, _, err = _run(capsys, *base, "--model", "tiny-gru", "--prompt", "a")
    _assert_one_line_error(code, err, "not a text model")
    code, out, err = _run(capsys, *base, "--model", "tiny-char", "--prompt", "XYZ")
    _assert_one_line_error(code, err, "'X' (position 0) is not in its vocabulary")
    assert out == ""
    # No prompt: refused, rather than a made-up first character and length + 1 of them.
    for prompt in ([], ["--prompt", ""]):
        code, out, err = _run(capsys, *base, "--model", "tiny-char", *prompt)
        _assert_one_line_error(code, err, "rnnserve generate: --prompt is empty")
        assert out == ""


def test_forecast_prints_predictions_against_truth(
    forecaster_server: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running, model_dir = forecaster_server
    values = np.sin(np.arange(150) / 7.0).astype(np.float32)
    csv_path = tmp_path / "series.csv"
    csv_path.write_text(
        "week,level\n" + "".join(f"{i},{v!r}\n" for i, v in enumerate(values.tolist()))
    )
    plot = tmp_path / "plot.png"
    code, out, err = _run(
        capsys,
        "forecast",
        "--server",
        running.address,
        "--model",
        "tiny-series",
        "--csv",
        str(csv_path),
        "--column",
        "level",
        "--plot",
        str(plot),
    )
    assert code == 0, err
    expected, _ = reference_run(model_dir, values[:, None])
    lines = out.strip().splitlines()
    assert lines[0].split() == ["row", "truth", "forecast", "error"]
    rows = [line.split() for line in lines[1:151]]
    assert [int(r[0]) for r in rows] == list(range(1, 151))
    printed = np.array([float(r[2]) for r in rows])
    assert np.max(np.abs(printed - expected[:, 0])) <= 1e-5 + 1e-5 * np.abs(expected[:, 0]).max()
    rmse = float(np.sqrt(np.mean((expected[:-1, 0] - values[1:]) ** 2)))
    assert f"149 one-step-ahead forecasts of level: RMSE {rmse:.4g}" in out
    if plot.exists():  # matplotlib is optional for the SDK; when present the plot is whole
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_forecast_errors_are_one_line(
    forecaster_server: tuple[Any, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    running, _ = forecaster_server
    good = tmp_path / "good.csv"
    good.write_text("t,v\n0,1.5\n1,2.5\n2,3.5\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("t,v\n0,1.5\n1,oops\n")
    base = ["forecast", "--server", running.address]
    cases = [
        (
            ["--model", "tiny-series", "--csv", str(tmp_path / "missing.csv"), "--column", "v"],
            "cannot read",
        ),
        (
            ["--model", "tiny-series", "--csv", str(good), "--column", "w"],
            "no column 'w'; its columns are: t, v",
        ),
        (
            ["--model", "tiny-series", "--csv", str(bad), "--column", "v"],
            "line 3: v is 'oops', not a number",
        ),
        (["--model", "nope", "--csv", str(good), "--column", "v"], "nope"),
        (["--model", "tiny-gru", "--csv", str(good), "--column", "v"], "one-feature forecaster"),
    ]
    for argv, fragment in cases:
        code, _, err = _run(capsys, *base, *argv)
        _assert_one_line_error(code, err, "rnnserve forecast:", fragment)


def test_forecast_plot_without_matplotlib_fails_before_streaming(
    forecaster_server: tuple[Any, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    running, _ = forecaster_server
    good = tmp_path / "good.csv"
    good.write_text("t,v\n0,1.5\n1,2.5\n2,3.5\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    argv = ["forecast", "--server", running.address, "--model", "tiny-series", "--csv", str(good)]
    code, out, err = _run(capsys, *argv, "--column", "v", "--plot", str(tmp_path / "p.png"))
    _assert_one_line_error(code, err, "--plot needs matplotlib", f"{sys.executable} -m pip install")
    assert out == ""  # said before any forecast was printed
    assert running.server.metrics.sessions_opened.labels("tiny-series/1")._value.get() == 0
