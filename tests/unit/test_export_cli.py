"""``rnnserve export``: a checkpoint in, a model version out; bad input is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from rnnserve.client.cli import main
from rnnserve.export.checkpoint import save_checkpoint
from rnnserve.export.parity import one_torch_thread
from rnnserve.manifest import load_manifest

from tests.support.torch_models import VOCAB, tiny_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def write_checkpoint(path: Path, *, cell: str = "notes-gru", **overrides: object) -> Path:
    model = tiny_model(cell, "tokens", 2)
    payload: dict[str, object] = {
        "spec": model.spec.to_dict(),
        "model": model.state_dict(),
        "epoch": 3,
        "vocabulary": VOCAB,
        "dataset": {"name": "tiny"},
        "metrics": {"valid_bits_per_char": 2.5},
    }
    payload.update(overrides)
    save_checkpoint(path, payload)
    return path


def export(tmp_path: Path, checkpoint: Path, *extra: str) -> int:
    args = ["export", str(checkpoint), "--out", str(tmp_path / "models"), "--name", "char"]
    return main([*args, "--version", "1", *extra])


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> None:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("rnnserve export: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err


def test_export_writes_a_model_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "char.pt")
    assert export(tmp_path, ckpt, "--form", "matmul") == 0
    out = capsys.readouterr().out
    assert "exported notes-gru x2" in out and "matmul form" in out
    m = load_manifest(tmp_path / "models" / "char" / "1")
    assert (m.cell, m.onnx_form, m.vocabulary) == ("notes-gru", "matmul", VOCAB)
    assert m.metrics == {"valid_bits_per_char": 2.5} and m.dataset == {"name": "tiny"}
    assert m.parity["max_abs_diff"] <= 1e-5


def test_missing_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert export(tmp_path, tmp_path / "nope.pt") == 2
    one_line_error(capsys, "does not exist")
    assert not (tmp_path / "models").exists()


def test_not_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00garbage\n" * 10)
    assert export(tmp_path, junk) == 2
    one_line_error(capsys, "not a readable rnnserve checkpoint")


def test_unknown_cell_kind(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_model("gru", "tokens", 2).spec.to_dict() | {"cell": "transformer"}
    ckpt = write_checkpoint(tmp_path / "c.pt", spec=spec)
    assert export(tmp_path, ckpt) == 2
    one_line_error(capsys, "unknown cell kind 'transformer'")
    assert not (tmp_path / "models").exists()


def test_weights_of_another_architecture(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lstm_weights = tiny_model("lstm", "tokens", 2).state_dict()
    ckpt = write_checkpoint(tmp_path / "c.pt", cell="gru", model=lstm_weights)
    assert export(tmp_path, ckpt) == 2
    one_line_error(capsys, "weights do not fit")
    assert not (tmp_path / "models").exists()


def test_mismatched_sizes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    spec = tiny_model("gru", "tokens", 2).spec.to_dict() | {"hidden_size": 9}
    ckpt = write_checkpoint(tmp_path / "c.pt", cell="gru", spec=spec)
    assert export(tmp_path, ckpt) == 2
    one_line_error(capsys, "weights do not fit")


def test_existing_version(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "c.pt")
    assert export(tmp_path, ckpt) == 0
    capsys.readouterr()
    assert export(tmp_path, ckpt) == 2
    one_line_error(capsys, "already exists; choose a new version")


def test_unwritable_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = write_checkpoint(tmp_path / "c.pt")
    (tmp_path / "models").write_text("a file where the repository should be")
    assert export(tmp_path, ckpt) == 2
    one_line_error(capsys, "choose a writable output folder")


def test_real_process_exit_code(tmp_path: Path) -> None:
    """The installed entry point: exit status 2 and one line on stderr, no traceback."""
    code = "import sys; from rnnserve.client.cli import main; sys.exit(main())"
    args = ["export", str(tmp_path / "nope.pt"), "--out", str(tmp_path), "--name", "a"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args, "--version", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "does not exist" in proc.stderr, proc.stderr


def test_checkpoint_scaling_reaches_the_manifest(tmp_path: Path) -> None:
    model = tiny_model("lstm", "features", 1)
    ckpt = tmp_path / "f.pt"
    save_checkpoint(
        ckpt,
        {
            "spec": model.spec.to_dict(),
            "model": model.state_dict(),
            "epoch": 1,
            "input_scaling": {"mean": [1.0, -2.0, 30.0], "std": [0.5, 2.0, 8.0]},
            "output_scaling": {"mean": [3.0, -1.0], "std": [2.0, 0.25]},
        },
    )
    out = tmp_path / "models"
    args = [str(ckpt), "--out", str(out), "--name", "f", "--version", "1"]
    assert main(["export", *args]) == 0
    m = load_manifest(out / "f" / "1")
    assert m.output_scaling is not None and m.output_scaling.std == [2.0, 0.25]
    assert torch.equal(model.get_buffer("output_std"), torch.tensor([2.0, 0.25]))
