"""The examples in docs/client.md run, against servers holding small models of the same names."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

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
