"""examples/node/rnnserve_example.js, run by Node.js against a real server: the contract works
from an app in another language (list, open, stream, retry, close), with outputs equal to the
model run straight.

Needs ``node`` and ``npm``; installs the example's locked dependencies with ``npm ci`` when
``examples/node/node_modules`` is missing. Skipped without Node.js unless ``REQUIRE_TOOLS=1``
(.ci/run sets it), which turns the skip into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.support.modelgen import CHAR_VOCABULARY, reference_run

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with the example's dependencies installed."""
    found, npm = shutil.which("node"), shutil.which("npm")
    if not (found and npm):
        if os.environ.get("REQUIRE_TOOLS") == "1":
            pytest.fail("REQUIRE_TOOLS=1 but node or npm is not on the PATH")
        pytest.skip("Node.js and npm are not installed")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=EXAMPLE, check=True, timeout=300,
        )  # fmt: skip
    return found


def _run(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [node, "rnnserve_example.js", *args],
        cwd=EXAMPLE, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_package_is_locked() -> None:
    package = json.loads((EXAMPLE / "package.json").read_text())
    lock = json.loads((EXAMPLE / "package-lock.json").read_text())
    for name, version in package["dependencies"].items():
        assert lock["packages"][f"node_modules/{name}"]["version"] == version


def test_node_example_on_a_text_model(node: str, server_thread: Any, model_repo: Path) -> None:
    text = "a bad cab. heap"
    result = _run(node, "--server", server_thread.address, "--model", "tiny-char",
                  "--text", text, "--chunk", "4")  # fmt: skip
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "3 models on" in out and "tiny-char/1  gru  tokens  on CPUExecutionProvider" in out
    predicted = re.findall(r'^step (\d+): likeliest next "(.)"$', out, re.MULTILINE)
    ids = np.array([CHAR_VOCABULARY.index(c) for c in text], np.int64)
    logits, _ = reference_run(model_repo / "tiny-char" / "1", ids)
    expected = [CHAR_VOCABULARY[i] for i in np.argmax(logits, axis=1)]
    assert predicted == [(str(i), c) for i, c in enumerate(expected)]
    # 15 steps in chunks of 4: the last chunk starts at seq 12; its retry is not applied again.
    assert "retry of seq 12: same outputs, next_seq 15 (applied once)" in out
    assert "seq 16: FAILED_PRECONDITION; the server expects seq 15" in out
    ended = server_thread.server.metrics.sessions_ended.labels("tiny-char/1", "closed")
    assert ended._value.get() == 1  # the example closed its session


def test_node_example_on_a_feature_model(node: str, server_thread: Any, model_repo: Path) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(5, 3)).astype(np.float32)
    values = ",".join(repr(float(v)) for v in x.ravel())
    result = _run(node, "--server", server_thread.address, "--model", "tiny-gru",
                  "--values", values, "--chunk", "2")  # fmt: skip
    assert result.returncode == 0, result.stderr
    rows = re.findall(r"^step \d+: output (.+)$", result.stdout, re.MULTILINE)
    got = np.array([[float(v) for v in row.split()] for row in rows])
    expected, _ = reference_run(model_repo / "tiny-gru" / "1", x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)  # printed to 6 digits
    assert "retry of seq 4: same outputs, next_seq 5 (applied once)" in result.stdout


def test_node_example_errors_are_one_line(node: str, server_thread: Any) -> None:
    result = _run(node, "--server", server_thread.address, "--model", "tiny-char", "--text", "XY")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        'rnnserve_example: "X" (position 0) is not in tiny-char\'s vocabulary'
    ]
    result = _run(node, "--server", server_thread.address, "--model", "no-such-model")
    assert result.returncode == 1
    assert "model no-such-model is not served" in result.stderr
    # An error about one chunk comes back in-band on the stream (StepError).
    result = _run(node, "--server", server_thread.address, "--model", "tiny-gru",
                  "--values", "1,2,3,4,nan,6")  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "rnnserve_example: chunk 1: inputs hold NaN or Inf at step 1; send finite values "
        "(or run the server with nan_policy=pass)"
    ]
