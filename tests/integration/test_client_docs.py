"""The examples in docs/client.md and README.md run, against servers holding small models of the
same names; the README's grpcurl requests hold the bytes the text says, on the shipped models."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from google.protobuf import json_format
from rnnserve.client import Client
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.v1 import rnnserve_pb2_grpc as pb_grpc
from rnnserve.wire import from_tensor

from tests.support.modelgen import write_model

DOC = Path(__file__).resolve().parents[2] / "docs" / "client.md"
BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def _examples() -> list[str]:
    """The examples that talk to a local server (not the TLS options sketch)."""
    return [b for b in BLOCK.findall(DOC.read_text()) if "127.0.0.1:50051" in b]


@pytest.fixture
def doc_servers(model_repo: Path, server_thread_factory: Callable[..., Any]) -> tuple[Any, Any]:
    """Two servers with a char-gru (its vocabulary covers the docs' text) and a co2-gru."""
    text = "".join(_examples())
    vocabulary = sorted(set(text) - {"\n"})
    write_model(model_repo, "char-gru", input_kind="tokens", vocabulary=vocabulary, seed=3)
    write_model(model_repo, "co2-gru", input_size=1, output_size=1, seed=4)
    return server_thread_factory(), server_thread_factory()


def test_docs_have_the_promised_examples() -> None:
    examples = _examples()
    assert len(examples) == 5  # generation, forecaster stream, asyncio, multiplexing, snapshot
    assert all(len(e.strip().splitlines()) <= 16 for e in examples)


@pytest.mark.parametrize("index", range(5))
def test_docs_example_runs(
    index: int, doc_servers: tuple[Any, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    first, second = doc_servers
    code = _examples()[index]
    code = code.replace("127.0.0.1:50051", first.address)
    code = code.replace("127.0.0.1:50052", second.address)
    exec(compile(code, f"{DOC.name} example {index + 1}", "exec"), {"__name__": "__main__"})
    out = capsys.readouterr().out
    assert out.strip(), "every example prints its result"


README = DOC.parents[1] / "README.md"
SHIPPED = DOC.parents[1] / "models"


def _readme_examples() -> list[str]:
    return [b for b in BLOCK.findall(README.read_text()) if "127.0.0.1:50051" in b]


def test_readme_python_examples_run(
    model_repo: Path, server_thread_factory: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    examples = _readme_examples()
    assert len(examples) == 4  # text generation, a forecaster stream, asyncio, a gateway
    vocabulary = sorted(set("".join(examples)) - {"\n"})
    write_model(model_repo, "char-notes-gru", input_kind="tokens", vocabulary=vocabulary, seed=3)
    write_model(model_repo, "co2-notes-gru", input_size=1, output_size=1, seed=4)
    write_model(model_repo, "co2-gru", input_size=1, output_size=1, seed=5)
    running = server_thread_factory()
    for index, code in enumerate(examples):
        code = code.replace("127.0.0.1:50051", running.address)
        exec(compile(code, f"README.md example {index + 1}", "exec"), {"__name__": "__main__"})
        assert capsys.readouterr().out.strip(), "every example prints its result"


GRPCURL = re.compile(
    r"grpcurl -plaintext -d '(\{.*\})' 127\.0\.0\.1:50051 rnnserve\.v1\.InferenceService/(\w+)"
)


def test_readme_grpcurl_examples_are_right(
    tmp_path: Path, server_thread_factory: Callable[..., Any]
) -> None:
    """The README's grpcurl requests, parsed as grpcurl parses them (protobuf's JSON mapping),
    against the shipped char-gru and co2-gru: the bytes say what the text says they say."""
    text = README.read_text()
    calls = GRPCURL.findall(text)
    assert [method for _, method in calls] == ["OpenSession", "Step", "Step"]
    repo = tmp_path / "models"
    for name in ("char-gru", "co2-gru"):
        shutil.copytree(SHIPPED / name, repo / name)
    running = server_thread_factory(models=repo)

    vocabulary = json.loads((SHIPPED / "char-gru" / "1" / "manifest.json").read_text())[
        "vocabulary"
    ]
    ids = [vocabulary.index("I"), vocabulary.index("n")]
    assert f"has `I` at index {ids[0]} and `n` at {ids[1]}" in text
    inputs = {
        "char-gru": np.array(ids, np.int64),
        "co2-gru": np.array([[315.7], [317.4]], np.float32),
    }
    with grpc.insecure_channel(running.address) as channel, Client(running.address) as client:
        stub = pb_grpc.InferenceServiceStub(channel)
        for (body, _), model in zip(calls[1:], ("char-gru", "co2-gru"), strict=True):
            opened = json_format.Parse(
                calls[0][0].replace("char-gru", model), pb.OpenSessionRequest()
            )
            sid = stub.OpenSession(opened).session.session_id
            request = json_format.Parse(body.replace("SESSION_ID", sid), pb.StepRequest())
            raw = inputs[model].astype(inputs[model].dtype.newbyteorder("<")).tobytes()
            assert request.inputs.raw_data == raw
            assert f"`{raw.hex(' ')}`" in text  # the bytes as the text spells them out
            reply = stub.Step(request)
            assert reply.next_seq == 2
            with client.session(model) as s:  # the SDK on the same inputs: the same outputs
                np.testing.assert_array_equal(from_tensor(reply.outputs), s.step(inputs[model]))
            again = stub.Step(request)  # the same chunk again: the cached reply, not applied
            assert again.next_seq == 2 and again.outputs.raw_data == reply.outputs.raw_data
    one_liner = re.search(r"^    (python3 -c .*)$", text, re.MULTILINE).group(1)
    printed = subprocess.run(
        [sys.executable, "-c", one_liner.split("'")[1]], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert printed == base64.b64encode(inputs["char-gru"].astype("<i8").tobytes()).decode()
