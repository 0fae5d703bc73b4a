"""Small recurrent test models built with onnx.helper alone (no torch), and a reference run.

The models follow ``rnnserve.manifest`` exactly, time-major, as rnnserve's export writes them:

- step input ``x``: float32 ``[T, B, input_size]``, or int64 token ids ``[T, B]`` read through
  a Gather embedding;
- ``h0`` (and ``c0`` for an LSTM): float32 ``[layers, B, hidden]``; outputs ``hn`` (and ``cn``);
- ``sequence_lens``: int32 ``[B]``, so chunks of different lengths share a batch;
- output ``y``: ``[T, B, output_size]`` from a MatMul head on the last layer.

Each layer is one native ONNX ``GRU`` (``linear_before_reset=1``, the form ONNX Runtime's CUDA
provider runs natively) or ``LSTM`` node with random weights. ``golden.npz`` holds one session's
sequence at batch 1, keyed like the real export's (``rnnserve.export.parity.make_golden``):
by the graph's own names ``x``, ``h0``[, ``c0``], ``sequence_lens``, ``y``, ``hn``[, ``cn``].
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from rnnserve.manifest import GOLDEN_FILE, MODEL_FILE, Manifest, StateSpec, load_manifest

#: Opset of the generated graphs; old enough for any onnxruntime the project supports.
OPSET = 17
#: The tiny-char model's symbols (20 of them).
CHAR_VOCABULARY = list(" abcdefghijklmnopqr.")
#: Length of the golden sequence stored with each model.
GOLDEN_STEPS = 12


def _build_graph(
    *,
    cell: str,
    input_kind: str,
    input_size: int,
    embedding: int,
    hidden: int,
    layers: int,
    output_size: int,
    rng: np.random.Generator,
    with_lens: bool,
) -> onnx.ModelProto:
    gates = 3 if cell == "gru" else 4
    scale = 1.0 / np.sqrt(hidden)

    def rand(*shape: int) -> np.ndarray:
        return rng.uniform(-scale, scale, size=shape).astype(np.float32)

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def const(name: str, value: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(value, name))
        return name

    if input_kind == "tokens":
        x_in = helper.make_tensor_value_info("x", TensorProto.INT64, ["T", "B"])
        emb = const("embedding", rng.normal(0.0, 1.0, (input_size, embedding)).astype(np.float32))
        nodes.append(helper.make_node("Gather", [emb, "x"], ["x_emb"], axis=0))
        layer_in, layer_in_size = "x_emb", embedding
    else:
        x_in = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "B", input_size])
        layer_in, layer_in_size = "x", input_size

    state_names = ["h"] if cell == "gru" else ["h", "c"]
    inputs = [x_in]
    for s in state_names:
        inputs.append(
            helper.make_tensor_value_info(f"{s}0", TensorProto.FLOAT, [layers, "B", hidden])
        )
    lens = "sequence_lens" if with_lens else ""
    if with_lens:
        inputs.append(helper.make_tensor_value_info("sequence_lens", TensorProto.INT32, ["B"]))

    axes0 = const("axes0", np.array([0], dtype=np.int64))
    axes1 = const("axes1", np.array([1], dtype=np.int64))
    last: dict[str, list[str]] = {s: [] for s in state_names}
    for layer in range(layers):
        start = const(f"start{layer}", np.array([layer], dtype=np.int64))
        end = const(f"end{layer}", np.array([layer + 1], dtype=np.int64))
        init = []
        for s in state_names:
            nodes.append(
                helper.make_node("Slice", [f"{s}0", start, end, axes0], [f"{s}0_l{layer}"])
            )
            init.append(f"{s}0_l{layer}")
        w = const(f"W{layer}", rand(1, gates * hidden, layer_in_size))
        r = const(f"R{layer}", rand(1, gates * hidden, hidden))
        b = const(f"B{layer}", rand(1, 2 * gates * hidden))
        outs = [f"Y{layer}"] + [f"{s}n_l{layer}" for s in state_names]
        if cell == "gru":
            nodes.append(
                helper.make_node(
                    "GRU",
                    [layer_in, w, r, b, lens, init[0]],
                    outs,
                    hidden_size=hidden,
                    linear_before_reset=1,
                    name=f"gru{layer}",
                )
            )
        else:
            nodes.append(
                helper.make_node(
                    "LSTM",
                    [layer_in, w, r, b, lens, init[0], init[1]],
                    outs,
                    hidden_size=hidden,
                    name=f"lstm{layer}",
                )
            )
        for s in state_names:
            last[s].append(f"{s}n_l{layer}")
        # Y is [T, num_directions=1, B, hidden]; the next layer wants [T, B, hidden].
        nodes.append(helper.make_node("Squeeze", [f"Y{layer}", axes1], [f"Y{layer}_sq"]))
        layer_in, layer_in_size = f"Y{layer}_sq", hidden

    outputs = []
    for s in state_names:
        nodes.append(helper.make_node("Concat", last[s], [f"{s}n"], axis=0))
        outputs.append(
            helper.make_tensor_value_info(f"{s}n", TensorProto.FLOAT, [layers, "B", hidden])
        )
    head_w = const("head_w", rand(hidden, output_size))
    head_b = const("head_b", rand(output_size))
    nodes.append(helper.make_node("MatMul", [layer_in, head_w], ["head"]))
    nodes.append(helper.make_node("Add", ["head", head_b], ["y"]))
    y_out = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "B", output_size])
    graph = helper.make_graph(nodes, f"{cell}_test", inputs, [y_out, *outputs], inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="rnnserve-tests"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def write_model(
    root: Path,
    name: str,
    version: str = "1",
    *,
    cell: Literal["gru", "lstm"] = "gru",
    input_kind: Literal["features", "tokens"] = "features",
    input_size: int = 3,
    hidden: int = 8,
    layers: int = 2,
    output_size: int = 2,
    seed: int = 0,
    vocabulary: list[str] | None = None,
    sequence_lens: bool = True,
) -> Path:
    """Write ``<root>/<name>/<version>/`` (model.onnx, manifest.json, golden.npz); its path.

    The folder appears whole (built in a temporary folder beside it, then renamed), so a server
    polling the repository never sees half a model. Token models take their ``input_size`` from
    the vocabulary (default ``CHAR_VOCABULARY``) and output logits over it. With
    ``sequence_lens=False`` the graph has no ``sequence_lens`` input (chunks of one length only).
    """
    if input_kind == "tokens":
        vocabulary = list(vocabulary or CHAR_VOCABULARY)
        input_size = output_size = len(vocabulary)
    rng = np.random.default_rng(seed)
    model = _build_graph(
        cell=cell,
        input_kind=input_kind,
        input_size=input_size,
        embedding=4,
        hidden=hidden,
        layers=layers,
        output_size=output_size,
        rng=rng,
        with_lens=sequence_lens,
    )
    states = [
        StateSpec(name=s, input=f"{s}0", output=f"{s}n", shape=[layers, hidden])
        for s in (["h"] if cell == "gru" else ["h", "c"])
    ]
    data = model.SerializeToString()
    manifest = Manifest(
        name=name,
        version=version,
        cell=cell,
        input_kind=input_kind,
        input_name="x",
        input_size=input_size,
        output_kind="logits" if input_kind == "tokens" else "regression",
        output_name="y",
        output_size=output_size,
        states=states,
        layers=layers,
        hidden_size=hidden,
        sequence_lens="sequence_lens" if sequence_lens else None,
        vocabulary=vocabulary if input_kind == "tokens" else None,
        opset=OPSET,
        onnx_form="native",
        family="test",
        golden=GOLDEN_FILE,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    final = root / name / version
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{version}."))
    try:
        (tmp / MODEL_FILE).write_bytes(data)
        manifest.save(tmp)
        if input_kind == "tokens":
            golden_in: np.ndarray = rng.integers(0, input_size, GOLDEN_STEPS).astype(np.int64)
        else:
            golden_in = rng.normal(0.0, 1.0, (GOLDEN_STEPS, input_size)).astype(np.float32)
        state_in = {
            s.name: rng.normal(0.0, 0.5, s.shape).astype(np.float32) for s in manifest.states
        }
        out, state_out = reference_run(tmp, golden_in, state_in)
        arrays = {"x": np.expand_dims(golden_in, 1), "y": np.expand_dims(out, 1)}
        if sequence_lens:
            arrays["sequence_lens"] = np.array([GOLDEN_STEPS], dtype=np.int32)
        for spec in manifest.states:
            arrays[spec.input] = np.expand_dims(state_in[spec.name], spec.batch_axis)
            arrays[spec.output] = np.expand_dims(state_out[spec.name], spec.batch_axis)
        np.savez(tmp / GOLDEN_FILE, allow_pickle=False, **arrays)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def make_repo(root: Path) -> Path:
    """Write the standard test repository into root: tiny-gru/1, tiny-lstm/1, tiny-char/1."""
    root.mkdir(parents=True, exist_ok=True)
    write_model(root, "tiny-gru", cell="gru", seed=1)
    write_model(root, "tiny-lstm", cell="lstm", seed=2)
    write_model(root, "tiny-char", cell="gru", input_kind="tokens", hidden=16, seed=3)
    return root


def reference_run(
    model_dir: Path,
    inputs: np.ndarray,
    state: dict[str, np.ndarray] | None = None,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Run one session's whole sequence through onnxruntime at batch 1, straight.

    ``inputs`` is ``[T, features]`` float32 or ``[T]`` int64 token ids; ``state`` maps each
    state name to its per-session shape (zeros when None). Returns outputs ``[T, outputs]``
    and the state after the last step, each of its per-session shape.
    """
    manifest = load_manifest(model_dir)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(
        str(model_dir / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
    )
    feed: dict[str, np.ndarray] = {manifest.input_name: np.expand_dims(inputs, 1)}
    for s in manifest.states:
        value = (state or {}).get(s.name)
        per = np.zeros(s.shape, np.float32) if value is None else np.asarray(value, np.float32)
        feed[s.input] = np.expand_dims(per, s.batch_axis)
    if manifest.sequence_lens:
        feed[manifest.sequence_lens] = np.array([inputs.shape[0]], dtype=np.int32)
    names = [manifest.output_name, *(s.output for s in manifest.states)]
    results = sess.run(names, feed)
    outputs = np.asarray(results[0])[:, 0]
    new_state = {
        s.name: np.take(np.asarray(r), 0, axis=s.batch_axis)
        for s, r in zip(manifest.states, results[1:], strict=True)
    }
    return outputs, new_state


class Reference:
    """Models of a repository run straight, at batch 1, from a given state: reference_run
    with its onnxruntime sessions kept, for tests that run many chunks."""

    def __init__(self, repo: Path, names: tuple[str, ...] = ("tiny-gru", "tiny-lstm")) -> None:
        self.models: dict[str, tuple[Manifest, ort.InferenceSession]] = {}
        for name in names:
            folder = repo / name / "1"
            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            sess = ort.InferenceSession(
                str(folder / MODEL_FILE), opts, providers=["CPUExecutionProvider"]
            )
            self.models[name] = (load_manifest(folder), sess)

    def zeros(self, model: str) -> dict[str, np.ndarray]:
        manifest, _ = self.models[model]
        return {s.name: np.zeros(s.shape, np.float32) for s in manifest.states}

    def run(
        self, model: str, x: np.ndarray, state: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        m, sess = self.models[model]
        feed = {m.input_name: x[:, None]}
        for s in m.states:
            feed[s.input] = np.expand_dims(state[s.name], s.batch_axis)
        if m.sequence_lens:
            feed[m.sequence_lens] = np.array([x.shape[0]], dtype=np.int32)
        results = sess.run([m.output_name, *(s.output for s in m.states)], feed)
        new = {
            s.name: np.take(r, 0, axis=s.batch_axis)
            for s, r in zip(m.states, results[1:], strict=True)
        }
        return np.asarray(results[0])[:, 0], new
