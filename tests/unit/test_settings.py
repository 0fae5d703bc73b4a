"""Settings: defaults < file < RNNSERVE_* environment < command-line flags; clear errors."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
from rnnserve.server import cli
from rnnserve.server.settings import Settings, SettingsError, load_settings


def test_every_setting_is_documented():
    for name, field in Settings.model_fields.items():
        assert field.description, f"setting {name} has no docstring"


def test_precedence_file_env_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    for key in list(__import__("os").environ):
        if key.startswith("RNNSERVE_"):
            monkeypatch.delenv(key)
    toml = tmp_path / "rnnserve.toml"
    toml.write_text('port = 1000\nmetrics_port = 1001\nsession_ttl_s = 5\nnan_policy = "pass"\n')
    monkeypatch.setenv("RNNSERVE_METRICS_PORT", "2001")
    monkeypatch.setenv("RNNSERVE_SESSION_TTL_S", "6")
    s = load_settings(toml, session_ttl_s=7.0, port=None)
    assert (s.port, s.metrics_port, s.session_ttl_s, s.nan_policy) == (1000, 2001, 7.0, "pass")
    as_json = tmp_path / "rnnserve.json"
    as_json.write_text(json.dumps({"max_sessions": 3, "self_check": False}))
    s = load_settings(as_json)
    assert s.max_sessions == 3 and s.self_check is False and s.metrics_port == 2001


@pytest.mark.parametrize(
    ("content", "suffix", "words"),
    [
        ("port = ", ".toml", "not valid TOML"),
        ("{", ".json", "not valid JSON"),
        ("bogus = 1\n", ".toml", "unknown settings bogus"),
        ('nan_policy = "maybe"\n', ".toml", "setting nan_policy"),
        ("port = 70000\n", ".toml", "setting port"),
        ("[1, 2]", ".json", "table of settings"),
    ],
)
def test_bad_files_say_what_to_fix(tmp_path: Path, content: str, suffix: str, words: str):
    path = tmp_path / f"s{suffix}"
    path.write_text(content)
    with pytest.raises(SettingsError, match=words):
        load_settings(path)


def test_missing_file():
    with pytest.raises(SettingsError, match="cannot read config file"):
        load_settings(Path("/nonexistent/rnnserve.toml"))


def test_bad_environment_value(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("RNNSERVE_MAX_BATCH_SIZE", "zero")
    with pytest.raises(SettingsError, match="max_batch_size"):
        load_settings()


def test_providers_list():
    assert Settings(providers="auto").provider_list() is None
    assert Settings(providers="CUDAExecutionProvider, CPUExecutionProvider").provider_list() == [
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]


def test_cli_has_a_flag_per_setting():
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(
        ["--port", "5", "--no-self-check", "--nan-policy", "pass", "--models", "/m",
         "--session-ttl-s", "2.5", "--log-level", "DEBUG"]
    )  # fmt: skip
    assert (args.port, args.self_check, args.nan_policy, args.models) == (
        5,
        False,
        "pass",
        Path("/m"),
    )
    assert args.session_ttl_s == 2.5 and args.max_sessions is None
    flags = {a.dest for a in parser._actions}
    assert set(Settings.model_fields) <= flags


def test_cli_bad_settings_exit_2(capsys: pytest.CaptureFixture[str]):
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    rc = cli.run(parser.parse_args(["--config", "/nonexistent.toml"]))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("rnnserve serve: ") and err.count("\n") == 1


def test_loop_setting_from_environment_and_flag(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("RNNSERVE_LOOP", raising=False)
    assert load_settings().loop == "auto"
    monkeypatch.setenv("RNNSERVE_LOOP", "asyncio")
    assert load_settings().loop == "asyncio"
    assert load_settings(loop="uvloop").loop == "uvloop"
    monkeypatch.setenv("RNNSERVE_LOOP", "trio")
    with pytest.raises(SettingsError, match="setting loop"):
        load_settings()
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    assert parser.parse_args(["--loop", "asyncio"]).loop == "asyncio"


def test_use_loop_installs_the_policy_asked_for(monkeypatch: pytest.MonkeyPatch):
    import asyncio
    import sys

    import uvloop

    try:
        assert cli.use_loop("asyncio") is False
        assert not isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
        assert cli.use_loop("uvloop") is True
        assert isinstance(asyncio.get_event_loop_policy(), uvloop.EventLoopPolicy)
        asyncio.set_event_loop_policy(None)
        monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
        assert cli.use_loop("auto") is False
        with pytest.raises(SettingsError, match="uvloop is not installed"):
            cli.use_loop("uvloop")
    finally:
        asyncio.set_event_loop_policy(None)


def test_tune_gc_raises_the_young_threshold_and_freezes_nothing():
    # Process-wide, so in a child interpreter: this test process keeps its own collector.
    code = (
        "import gc\n"
        "from rnnserve.server.cli import tune_gc\n"
        "before = gc.get_threshold()\n"
        "tune_gc(12345)\n"
        "after = gc.get_threshold()\n"
        "assert after == (12345, *before[1:]), after\n"
        "assert gc.get_freeze_count() == 0, gc.get_freeze_count()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
