"""The parts every exported graph shares: a small graph builder, the weights, input and head.

Every graph is built node by node with ``onnx.helper`` from the model's weights rather than traced
by ``torch.onnx.export``. Why: the graph must carry ``sequence_lens`` into every recurrent node and
the state as ``[layers, B, hidden]`` inputs and outputs, the notes' cells need the native operators
reconfigured (a negated update gate, an ``Affine`` output activation) that no exporter emits, and
the MatMul form needs a ``Scan`` the exporters do not produce. Building by hand keeps one code
path for all six cell kinds and needs neither the TorchScript exporter (deprecated) nor the dynamo
one (seen to emit a wrong GRU and to freeze the time axis). Parity (parity.py) proves the result.

Graph layout (see rnnserve.manifest): ``x`` ``[T, B, F]`` float32 or ``[T, B]`` int64, ``h0``
(and ``c0``) ``[layers, B, hidden]``, ``sequence_lens`` int32 ``[B]``; outputs ``y`` ``[T, B, O]``,
``hn`` (and ``cn``). ``T`` and ``B`` are dynamic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from rnnserve.export.cells import NotesCell, NotesStack
from rnnserve.export.model import RecurrentModel
from torch import nn

INPUT = "x"
OUTPUT = "y"
SEQUENCE_LENS = "sequence_lens"
#: state name -> (graph input, graph output)
STATE_IO: dict[str, tuple[str, str]] = {"h": ("h0", "hn"), "c": ("c0", "cn")}


class ExportError(RuntimeError):
    """The model cannot be exported as asked, or its ONNX graph misses parity with PyTorch."""


@dataclass(frozen=True)
class LayerWeights:
    """One layer's weights in its own cell's gate order (float32 NumPy).

    ``wx`` ``[G*H, in]``, ``wh`` ``[G*H, H]``, ``bx`` and ``bh`` ``[G*H]`` (``bh`` is zero for the
    notes' cells, which have one bias per gate; PyTorch's cells have two).
    """

    gates: tuple[str, ...]
    wx: np.ndarray
    wh: np.ndarray
    bx: np.ndarray
    bh: np.ndarray

    @property
    def hidden(self) -> int:
        return int(self.wh.shape[1])

    def gate(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(wx, wh, bx, bh)`` of one gate."""
        i = self.gates.index(name)
        rows = slice(i * self.hidden, (i + 1) * self.hidden)
        return self.wx[rows], self.wh[rows], self.bx[rows], self.bh[rows]


def _np(t: Any) -> np.ndarray:
    return np.ascontiguousarray(t.detach().cpu().numpy().astype(np.float32))


def layer_weights(model: RecurrentModel) -> list[LayerWeights]:
    """Each layer's weights. PyTorch's gate orders: nn.GRU (r, z, n), nn.LSTM (i, f, g, o)."""
    rnn = model.rnn
    if isinstance(rnn, NotesStack):
        out = []
        for cell in rnn.cells:
            assert isinstance(cell, NotesCell)
            wx, wh, b = _np(cell.weight_x), _np(cell.weight_h), _np(cell.bias)
            out.append(LayerWeights(type(cell).GATES, wx, wh, b, np.zeros_like(b)))
        return out
    if isinstance(rnn, (nn.GRU, nn.LSTM)):
        if not rnn.bias or rnn.bidirectional or rnn.batch_first or rnn.proj_size:
            raise ExportError(
                "only unidirectional, time-major nn.GRU/nn.LSTM with biases and no projection "
                "can be exported; rebuild the model with rnnserve.export.model.build_model"
            )
        gates = ("r", "z", "n") if isinstance(rnn, nn.GRU) else ("i", "f", "g", "o")
        return [
            LayerWeights(
                gates,
                _np(getattr(rnn, f"weight_ih_l{k}")),
                _np(getattr(rnn, f"weight_hh_l{k}")),
                _np(getattr(rnn, f"bias_ih_l{k}")),
                _np(getattr(rnn, f"bias_hh_l{k}")),
            )
            for k in range(rnn.num_layers)
        ]
    raise ExportError(f"cannot export a recurrent module of type {type(rnn).__name__}")


class GraphBuilder:
    """Collects nodes and constants; names are unique across the model and its subgraphs.

    A subgraph builder (``child()``) puts its constants into the root graph's initializers, which
    a ``Scan`` body may read from the outer scope.
    """

    def __init__(self, root: GraphBuilder | None = None) -> None:
        self.root = root or self
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self._count = 0

    def child(self) -> GraphBuilder:
        return GraphBuilder(self.root)

    def name(self, hint: str) -> str:
        self.root._count += 1
        return f"{hint}_{self.root._count}"

    def const(self, hint: str, array: np.ndarray) -> str:
        name = self.name(hint)
        self.root.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def ints(self, hint: str, values: list[int]) -> str:
        return self.const(hint, np.asarray(values, dtype=np.int64))

    def op(self, op_type: str, inputs: list[str], outputs: int = 1, **attrs: Any) -> list[str]:
        """Add a node; returns its output names."""
        names = [self.name(op_type.lower()) for _ in range(outputs)]
        self.nodes.append(
            helper.make_node(op_type, inputs, names, name=self.name(f"n_{op_type}"), **attrs)
        )
        return names

    def op1(self, op_type: str, inputs: list[str], **attrs: Any) -> str:
        return self.op(op_type, inputs, 1, **attrs)[0]

    def rename(self, value: str, name: str) -> None:
        """Expose ``value`` under a fixed name (a graph output)."""
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.name("n_out")))


def encode(g: GraphBuilder, model: RecurrentModel) -> str:
    """The first layer's input ``[T, B, in]``: token embedding, or scaled features."""
    if model.embedding is not None:
        table = g.const("embedding", _np(model.embedding.weight))
        return g.op1("Gather", [table, INPUT], axis=0)
    scaling = model.input_scaling
    if scaling is None:
        return INPUT
    mean = g.const("input_mean", np.asarray(scaling.mean, np.float32))
    std = g.const("input_std", np.asarray(scaling.std, np.float32))
    return g.op1("Div", [g.op1("Sub", [INPUT, mean]), std])


def decode(g: GraphBuilder, model: RecurrentModel, top: str) -> None:
    """The head on the top layer's ``[T, B, H]`` output, de-scaled (plus ``x`` for a residual
    model), exposed as ``y``."""
    w = g.const("head_wT", _np(model.head.weight).T.copy())
    b = g.const("head_b", _np(model.head.bias))
    y = g.op1("Add", [g.op1("MatMul", [top, w]), b])
    scaling = model.output_scaling
    if model.spec.residual:
        factor = g.const("residual", np.asarray(model.spec.residual, np.float32))
        y = g.op1("Add", [INPUT, g.op1("Mul", [y, factor])])
    elif scaling is not None:
        std = g.const("output_std", np.asarray(scaling.std, np.float32))
        mean = g.const("output_mean", np.asarray(scaling.mean, np.float32))
        y = g.op1("Add", [g.op1("Mul", [y, std]), mean])
    g.rename(y, OUTPUT)


def graph_io(
    model: RecurrentModel,
) -> tuple[list[onnx.ValueInfoProto], list[onnx.ValueInfoProto]]:
    """Declared inputs and outputs, with the dynamic ``T`` and ``B`` axes."""
    spec = model.spec
    if spec.input_kind == "tokens":
        x = helper.make_tensor_value_info(INPUT, TensorProto.INT64, ["T", "B"])
    else:
        x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["T", "B", spec.input_size])
    state_shape: list[int | str] = [spec.layers, "B", spec.hidden_size]
    inputs = [x]
    outputs = [
        helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["T", "B", spec.output_size])
    ]
    for s in spec.state_names:
        i, o = STATE_IO[s]
        inputs.append(helper.make_tensor_value_info(i, TensorProto.FLOAT, state_shape))
        outputs.append(helper.make_tensor_value_info(o, TensorProto.FLOAT, state_shape))
    inputs.append(helper.make_tensor_value_info(SEQUENCE_LENS, TensorProto.INT32, ["B"]))
    return inputs, outputs


def finish(
    g: GraphBuilder, model: RecurrentModel, *, opset: int, metadata: dict[str, str], doc: str
) -> onnx.ModelProto:
    """Wrap the collected nodes into a checked model with the pinned opset and metadata."""
    inputs, outputs = graph_io(model)
    graph = helper.make_graph(g.nodes, "rnnserve", inputs, outputs, g.initializers)
    opsets = [helper.make_opsetid("", opset)]
    proto = helper.make_model(
        graph,
        opset_imports=opsets,
        ir_version=helper.find_min_ir_version_for(opsets),
        producer_name="rnnserve",
        doc_string=doc,
    )
    helper.set_model_props(proto, metadata)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the built ONNX graph is invalid: {exc}") from exc
    return proto
