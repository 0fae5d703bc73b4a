"""What export writes, the server reads: its Engine loads the folder and passes the self-check."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from rnnserve.export.onnx_export import export_onnx
from rnnserve.export.parity import one_torch_thread
from rnnserve.manifest import load_manifest
from rnnserve.server.engine import Engine
from rnnserve.server.golden import self_check
from rnnserve.server.settings import Settings

from tests.support.torch_models import VOCAB, tiny_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.mark.parametrize(
    ("cell", "kind", "form"),
    [
        ("notes-lstm", "tokens", "native"),
        ("notes-gru", "features", "matmul"),
        ("gru", "features", "native"),
        ("notes-mingru", "tokens", "native"),
    ],
)
def test_server_engine_loads_and_self_checks(
    tmp_path: Path, cell: str, kind: str, form: str
) -> None:
    model = tiny_model(cell, kind, 2, "notes")
    export_onnx(
        model,
        tmp_path,
        name="m",
        version="1",
        form=form,  # type: ignore[arg-type]
        vocabulary=VOCAB if kind == "tokens" else None,
    )
    folder = tmp_path / "m" / "1"
    manifest = load_manifest(folder)
    engine = Engine(folder, manifest, ["CPUExecutionProvider"])
    worst = self_check(engine, Settings().self_check_tolerance)
    assert worst is not None and worst <= 1e-4

    # A batch of two sessions with different chunk lengths, as the server's batcher sends it.
    rng = np.random.default_rng(5)
    if kind == "tokens":
        x = rng.integers(0, len(VOCAB), (6, 2), dtype=np.int64)
    else:
        x = (rng.standard_normal((6, 2, 3)) * [0.5, 2, 8] + [1, -2, 30]).astype(np.float32)
    states = {s.input: np.zeros((2, 2, 6), np.float32) for s in manifest.states}
    y, new = engine.run(x, states, np.array([6, 2], np.int32))
    with torch.no_grad():
        y_ref, s_ref = model(torch.from_numpy(x[:2, 1:2]))
    np.testing.assert_allclose(y[:2, 1:2], y_ref.numpy(), rtol=1e-5, atol=1e-5)
    for s, ref in zip(manifest.states, s_ref, strict=True):
        np.testing.assert_allclose(new[s.output][:, 1:2], ref.numpy(), rtol=0, atol=1e-5)
