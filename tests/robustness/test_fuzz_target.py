"""Runs the coverage-guided fuzz target (fuzz_target.py) for 10,000 inputs against a real
server, as CI does: it must end cleanly, having checked health and the bystander session's
outputs every 500 inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris", reason="atheris has wheels for Linux and macOS on x86_64 only")

TARGET = Path(__file__).with_name("fuzz_target.py")
RUNS = 10_000


def test_fuzz_target_runs_clean(tmp_path: Path) -> None:
    # A fixed seed keeps CI reproducible; a crash prints the input and saves it as crash-*.
    proc = subprocess.run(
        [
            sys.executable,
            str(TARGET),
            f"-runs={RUNS + 100}",
            "-seed=1",
            "-max_total_time=240",
            f"-artifact_prefix={tmp_path}/",
            str(tmp_path / "corpus"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert f"fuzz: {RUNS} runs, bystander checks {RUNS // 500}," in output, output[-3000:]
    assert "DONE" in output
