"""ONNX export: parity for every cell kind x form x input kind x depth, checked here again
independently of the export's own check, whole and in chunks with sequence_lens."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from rnnserve.export.model import RecurrentModel
from rnnserve.export.onnx_export import export_onnx
from rnnserve.export.parity import one_torch_thread
from rnnserve.manifest import Manifest

from tests.support.torch_models import VOCAB, tiny_model

#: cell, lstm_output: the notes' LSTM in both output forms
KINDS = [
    ("rnn", "tanh"),
    ("notes-mingru", "tanh"),
    ("notes-gru", "tanh"),
    ("notes-lstm", "notes"),
    ("notes-lstm", "tanh"),
    ("gru", "tanh"),
    ("lstm", "tanh"),
]


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    # Tiny models: PyTorch's thread pool only adds synchronisation on a shared 2-core machine.
    with one_torch_thread():
        yield


def per_session_reference(
    model: RecurrentModel, x: np.ndarray, state: tuple[np.ndarray, ...], lens: np.ndarray
) -> tuple[list[np.ndarray], tuple[np.ndarray, ...]]:
    """Each session alone through model.forward on its own valid steps (no masking at all)."""
    ys, finals = [], []
    with torch.no_grad():
        for b, n in enumerate(lens):
            y, s = model(
                torch.from_numpy(x[:n, b : b + 1]),
                tuple(torch.from_numpy(v[:, b : b + 1].copy()) for v in state),
            )
            ys.append(y[:, 0].numpy())
            finals.append(tuple(v[:, 0].numpy() for v in s))
    return ys, tuple(np.stack([f[i] for f in finals], axis=1) for i in range(len(state)))


def feeds(
    m: Manifest, x: np.ndarray, state: tuple[np.ndarray, ...], lens: np.ndarray
) -> dict[str, np.ndarray]:
    assert m.sequence_lens is not None
    out = {m.input_name: x, m.sequence_lens: lens.astype(np.int32)}
    out.update({s.input: v for s, v in zip(m.states, state, strict=True)})
    return out


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("kind", ["features", "tokens"])
@pytest.mark.parametrize("form", ["native", "matmul"])
@pytest.mark.parametrize(("cell", "lstm_output"), KINDS)
def test_export_parity(
    tmp_path: Path, cell: str, lstm_output: str, form: str, kind: str, layers: int
) -> None:
    model = tiny_model(cell, kind, layers, lstm_output)
    m = export_onnx(
        model,
        tmp_path,
        name="m",
        version="1",
        form=form,  # type: ignore[arg-type]
        vocabulary=VOCAB if kind == "tokens" else None,
    )
    assert m.parity["max_abs_diff"] <= 1e-5
    assert m.onnx_form == ("matmul" if cell == "notes-mingru" else form)
    folder = tmp_path / "m" / "1"
    sess = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])

    # A fresh sequence in two chunks, each with its own sequence_lens; ORT carries its state.
    rng = np.random.default_rng(11)
    batch, lengths = 5, (7, 4)
    if kind == "tokens":
        x = rng.integers(0, len(VOCAB), (sum(lengths), batch), dtype=np.int64)
    else:
        x = (rng.standard_normal((sum(lengths), batch, 3)) * [0.5, 2, 8] + [1, -2, 30]).astype(
            np.float32
        )
    state = tuple(rng.uniform(-1, 1, (layers, batch, 6)).astype(np.float32) for _ in m.states)
    ref_state = state
    start = 0
    for length in lengths:
        lens = rng.integers(1, length + 1, batch)
        lens[0] = length
        xc = x[start : start + length]
        y, *state_list = sess.run(None, feeds(m, xc, state, lens))
        state = tuple(state_list)
        ys_ref, ref_state = per_session_reference(model, xc, ref_state, lens)
        for b, n in enumerate(lens):
            # Outputs compared in the model's normalised units (de-scaled outputs near 30 carry
            # float32 rounding of ~2e-6 on their own).
            scale = np.asarray(m.output_scaling.std) if m.output_scaling else 1.0
            np.testing.assert_allclose(y[:n, b] / scale, ys_ref[b] / scale, rtol=0, atol=1e-5)
        for got, want in zip(state, ref_state, strict=True):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
        start += length


@pytest.mark.parametrize("form", ["native", "matmul"])
@pytest.mark.parametrize("cell", ["notes-gru", "gru", "notes-lstm"])
def test_residual_export_adds_the_input(tmp_path: Path, cell: str, form: str) -> None:
    model = tiny_model(cell, "features", 2, "notes", residual=0.7)
    m = export_onnx(model, tmp_path, name="m", version="1", form=form)  # type: ignore[arg-type]
    assert m.parity["max_abs_diff"] <= 1e-5
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((9, 4, 3)) * [0.5, 2, 8] + [1, -2, 30]).astype(np.float32)
    state = tuple(np.zeros((2, 4, 6), np.float32) for _ in m.states)
    lens = np.array([9, 9, 9, 9])
    sess = ort.InferenceSession(str(tmp_path / "m" / "1" / "model.onnx"))
    y = sess.run(None, feeds(m, x, state, lens))[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x))[0].numpy()
        np.testing.assert_allclose(y, want, rtol=0, atol=1e-5 * 8)
        # with a zero head, the graph's forecast is its input: "next = this", exactly
        model.head.weight.zero_()
        model.head.bias.zero_()
    export_onnx(model, tmp_path, name="zero", version="1", form=form)  # type: ignore[arg-type]
    sess = ort.InferenceSession(str(tmp_path / "zero" / "1" / "model.onnx"))
    np.testing.assert_array_equal(sess.run(None, feeds(m, x, state, lens))[0], x)


def test_native_nodes_are_configured_as_documented(tmp_path: Path) -> None:
    def nodes(cell: str, lstm_output: str = "tanh") -> list[onnx.NodeProto]:
        model = tiny_model(cell, "features", 2, lstm_output)
        export_onnx(model, tmp_path, name=f"{cell}-{lstm_output}", version="1")
        proto = onnx.load(str(tmp_path / f"{cell}-{lstm_output}" / "1" / "model.onnx"))
        return list(proto.graph.node)

    def attrs(node: onnx.NodeProto) -> dict[str, object]:
        return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

    gru = [n for n in nodes("notes-gru") if n.op_type == "GRU"]
    assert len(gru) == 2 and all(attrs(n)["linear_before_reset"] == 0 for n in gru)
    assert all(n.input[4] == "sequence_lens" for n in gru)
    std = [n for n in nodes("gru") if n.op_type == "GRU"]
    assert len(std) == 2 and all(attrs(n)["linear_before_reset"] == 1 for n in std)
    lstm = [n for n in nodes("notes-lstm", "notes") if n.op_type == "LSTM"]
    activations = attrs(lstm[0])["activations"]
    assert isinstance(activations, list)
    assert [a.decode() for a in activations] == ["Sigmoid", "Tanh", "Affine"]
    assert "activations" not in attrs(next(n for n in nodes("lstm") if n.op_type == "LSTM"))
    assert [n.op_type for n in nodes("rnn")].count("RNN") == 2
    mingru = nodes("notes-mingru")
    assert "Scan" in {n.op_type for n in mingru}
    assert not {"RNN", "GRU", "LSTM"} & {n.op_type for n in mingru}


def test_graph_axes_are_dynamic(tmp_path: Path) -> None:
    export_onnx(tiny_model("lstm", "tokens", 2), tmp_path, name="m", version="1", vocabulary=VOCAB)
    proto = onnx.load(str(tmp_path / "m" / "1" / "model.onnx"))

    def dims(v: onnx.ValueInfoProto) -> list[object]:
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    shapes = {v.name: dims(v) for v in [*proto.graph.input, *proto.graph.output]}
    assert shapes == {
        "x": ["T", "B"],
        "h0": [2, "B", 6],
        "c0": [2, "B", 6],
        "sequence_lens": ["B"],
        "y": ["T", "B", len(VOCAB)],
        "hn": [2, "B", 6],
        "cn": [2, "B", 6],
    }
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
