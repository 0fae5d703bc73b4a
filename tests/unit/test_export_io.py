"""What export writes (manifest, metadata_props, golden sequence) and what it refuses to write."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rnnserve.export.onnx_export import (
    ExportError,
    build_onnx,
    export_onnx,
    metadata_of,
)
from rnnserve.export.parity import check_parity, one_torch_thread
from rnnserve.manifest import load_manifest

from tests.support.torch_models import VOCAB, tiny_model


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


def test_manifest_and_metadata_round_trip(tmp_path: Path) -> None:
    model = tiny_model("notes-lstm", "features", 2, "notes")
    m = export_onnx(
        model,
        tmp_path,
        name="co2",
        version="3",
        form="matmul",
        dataset={"name": "mauna-loa", "licence": "public domain"},
        metrics={"valid_rmse": 0.42},
    )
    folder = tmp_path / "co2" / "3"
    assert sorted(p.name for p in folder.iterdir()) == ["golden.npz", "manifest.json", "model.onnx"]
    assert sorted(p.name for p in (tmp_path / "co2").iterdir()) == ["3"]  # no temp folder left
    assert load_manifest(folder) == m
    assert m.sha256 == hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
    assert (m.cell, m.family, m.onnx_form, m.layers, m.hidden_size) == (
        "notes-lstm",
        "notes",
        "matmul",
        2,
        6,
    )
    assert (m.input_kind, m.input_size, m.output_kind, m.output_size) == (
        "features",
        3,
        "regression",
        2,
    )
    assert [(s.name, s.input, s.output, s.shape, s.batch_axis) for s in m.states] == [
        ("h", "h0", "hn", [2, 6], 1),
        ("c", "c0", "cn", [2, 6], 1),
    ]
    assert m.sequence_lens == "sequence_lens" and m.golden == "golden.npz" and m.opset == 17
    assert m.input_scaling is not None and m.input_scaling.mean == [1.0, -2.0, 30.0]
    assert m.metrics == {"valid_rmse": 0.42} and m.dataset["name"] == "mauna-loa"
    assert m.extra["lstm_output"] == "notes"

    props = {p.key: p.value for p in onnx.load(str(folder / "model.onnx")).metadata_props}
    assert props == metadata_of(m)
    data = m.to_dict()
    assert set(props) == set(data) - {"parity", "sha256", "golden"}
    for key, value in props.items():
        assert json.loads(value) == data[key], key


def test_token_model_records_its_vocabulary(tmp_path: Path) -> None:
    m = export_onnx(
        tiny_model("gru", "tokens", 1), tmp_path, name="kjv", version="1", vocabulary=VOCAB
    )
    assert (m.output_kind, m.family, m.vocabulary) == ("logits", "standard", VOCAB)
    assert m.input_scaling is None and m.output_scaling is None
    assert load_manifest(tmp_path / "kjv" / "1").vocabulary == VOCAB


def test_golden_sequence_reproduces(tmp_path: Path) -> None:
    model = tiny_model("notes-gru", "tokens", 2)
    m = export_onnx(model, tmp_path, name="g", version="1", vocabulary=VOCAB)
    folder = tmp_path / "g" / "1"
    golden = dict(np.load(folder / "golden.npz", allow_pickle=False))
    assert sorted(golden) == ["h0", "hn", "sequence_lens", "x", "y"]
    assert golden["x"].shape == (16, 1) and golden["h0"].shape == (2, 1, 6)
    with torch.no_grad():
        y, (h,) = model(torch.from_numpy(golden["x"]), (torch.from_numpy(golden["h0"]),))
    np.testing.assert_array_equal(golden["y"], y.numpy())  # PyTorch's outputs
    np.testing.assert_array_equal(golden["hn"], h.numpy())
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(["y", "hn"], {k: golden[k] for k in ("x", "h0", "sequence_lens")})
    np.testing.assert_allclose(got[0], golden["y"], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got[1], golden["hn"], rtol=0, atol=1e-5)
    assert m.parity["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("opset", [14, 21])
def test_other_opsets_export(tmp_path: Path, opset: int) -> None:
    for form in ("native", "matmul"):
        m = export_onnx(
            tiny_model("notes-gru", "features", 1),
            tmp_path,
            name=form,
            version="1",
            form=form,
            opset=opset,
        )
        assert m.opset == opset


def test_a_diverged_model_is_refused_and_nothing_written(tmp_path: Path) -> None:
    model = tiny_model("gru", "features", 1)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"parity check failed.*missed by inf"):
        export_onnx(model, tmp_path / "models", name="m", version="1")
    assert not (tmp_path / "models").exists()


def test_a_perturbed_graph_fails_parity_by_its_size() -> None:
    model = tiny_model("notes-lstm", "tokens", 2, "notes")
    proto = build_onnx(model, form="native", opset=17, metadata={})
    check_parity(model, proto.SerializeToString())  # the untouched graph passes
    bias = next(t for t in proto.graph.initializer if t.name.startswith("head_b"))
    values = onnx.numpy_helper.to_array(bias).copy()
    values[0] += 1e-3
    bias.CopyFrom(onnx.numpy_helper.from_array(values, bias.name))
    with pytest.raises(ExportError, match=r"differs from PyTorch by 0\.001"):
        check_parity(model, proto.SerializeToString())


def test_bad_tolerance_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="tolerance must be"):
        export_onnx(tiny_model("rnn", "features", 1), tmp_path, name="m", version="1", tolerance=-1)
    assert not (tmp_path / "m").exists()


def test_existing_version_is_kept(tmp_path: Path) -> None:
    model = tiny_model("rnn", "features", 1)
    first = export_onnx(model, tmp_path, name="m", version="1")
    with pytest.raises(ExportError, match="already exists; choose a new version"):
        export_onnx(tiny_model("gru", "features", 1), tmp_path, name="m", version="1")
    assert load_manifest(tmp_path / "m" / "1") == first


def test_unwritable_output_folder_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ExportError, match="choose a writable output folder"):
        export_onnx(tiny_model("rnn", "features", 1), blocker / "models", name="m", version="1")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "a/b"}, "plain folder name"),
        ({"version": ".hidden"}, "plain folder name"),
        ({"form": "onnxscript"}, "form must be"),
        ({"opset": 9}, "opset 9 is not supported"),
        ({"vocabulary": ["a"]}, "a feature model takes no vocabulary"),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    args = {"name": "m", "version": "1", **kwargs}
    with pytest.raises(ExportError, match=message):
        export_onnx(tiny_model("gru", "features", 1), tmp_path, **args)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("vocabulary", "got"), [(None, "got none"), (["a", "b"], "got 2 entries")])
def test_token_model_needs_its_vocabulary(
    tmp_path: Path, vocabulary: list[str] | None, got: str
) -> None:
    with pytest.raises(ExportError, match=f"needs its vocabulary of 7 entries, {got}"):
        export_onnx(
            tiny_model("lstm", "tokens", 1), tmp_path, name="m", version="1", vocabulary=vocabulary
        )
    assert list(tmp_path.iterdir()) == []
