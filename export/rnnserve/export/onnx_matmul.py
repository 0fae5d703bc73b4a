"""The "matmul" form: every cell as MatMul/Add/Sigmoid/Tanh/Mul inside an ONNX ``Scan`` over time.

Why it exists: ONNX Runtime's CUDA provider runs a recurrent node natively only with
``linear_before_reset=1``, the default activations and ``layout=0``; the notes' GRU and LSTM
(and the minimal GRU, which has no operator at all) would silently run on the CPU. Plain
element-wise operators run on any provider.

Layout: the first layer's input part ``x·Wxᵀ + bx`` is one MatMul over all ``T`` steps outside
the loop; the ``Scan`` carries one ``[B, H]`` state per layer and state name, reads that
projection and a ``[B]`` boolean mask per step, and emits the top layer's activation. The mask is
``t < sequence_lens[b]``: where it is false the state is carried unchanged (``Where``), so each
session ends holding the state of its own last valid step; outputs past a session's length are
computed but not meaningful, and the server ignores them.
"""

from __future__ import annotations

import numpy as np
from onnx import GraphProto, TensorProto, ValueInfoProto, helper
from rnnserve.export.model import RecurrentModel
from rnnserve.export.onnx_graph import (
    INPUT,
    SEQUENCE_LENS,
    STATE_IO,
    GraphBuilder,
    LayerWeights,
    layer_weights,
)


class _Step:
    """Adds one cell's single step to a Scan body, reading the layer's weights as constants."""

    def __init__(
        self, g: GraphBuilder, cell: str, lw: LayerWeights, layer: int, notes_output: bool
    ) -> None:
        self.g, self.cell, self.lw, self.h = g, cell, lw, lw.hidden
        self.notes_output = cell == "notes-lstm" and notes_output
        self.wxT = g.const(f"l{layer}_wxT", lw.wx.T.copy())
        self.bx = g.const(f"l{layer}_bx", lw.bx)
        self.bh = g.const(f"l{layer}_bh", lw.bh) if cell in ("gru", "lstm") else None
        if cell == "notes-gru":
            # Γu and Γr read c<t-1>; the proposal reads Γr ⊙ c<t-1>: two recurrent matrices.
            self.whT_ur = g.const(f"l{layer}_whT_ur", lw.wh[: 2 * self.h].T.copy())
            self.whT_c = g.const(f"l{layer}_whT_c", lw.wh[2 * self.h :].T.copy())
        else:
            self.whT = g.const(f"l{layer}_whT", lw.wh.T.copy())

    def project(self, x: str, g: GraphBuilder | None = None) -> str:
        """The input part of every gate, ``x·Wxᵀ + bx``, for any leading shape, added to ``g``
        (the Scan body by default; the outer graph for the first layer's whole sequence)."""
        g = g or self.g
        return g.op1("Add", [g.op1("MatMul", [x, self.wxT]), self.bx])

    def _split(self, v: str, parts: int) -> list[str]:
        return self.g.op("Split", [v, self.g.ints("split", [self.h] * parts)], parts, axis=-1)

    def _rec(self, state: str) -> str:
        hw = self.g.op1("MatMul", [state, self.whT])
        return self.g.op1("Add", [hw, self.bh]) if self.bh is not None else hw

    def _sig(self, v: str) -> str:
        return self.g.op1("Sigmoid", [v])

    def _tanh(self, v: str) -> str:
        return self.g.op1("Tanh", [v])

    def _add(self, a: str, b: str) -> str:
        return self.g.op1("Add", [a, b])

    def _mul(self, a: str, b: str) -> str:
        return self.g.op1("Mul", [a, b])

    def _blend(self, gate: str, new: str, old: str) -> str:
        """``gate ⊙ new + (1 − gate) ⊙ old``, as the notes' cells write it."""
        g = self.g
        one = g.const("one", np.array(1.0, np.float32))
        keep = g.op1("Mul", [g.op1("Sub", [one, gate]), old])
        return g.op1("Add", [g.op1("Mul", [gate, new]), keep])

    def __call__(self, xw: str, state: list[str]) -> tuple[str, list[str]]:
        """``(a<t>, new state)`` from the input part ``xw`` ``[B, G*H]`` and the old state."""
        g, cell = self.g, self.cell
        sig, tanh, add, mul = self._sig, self._tanh, self._add, self._mul
        if cell == "rnn":
            a = tanh(add(xw, self._rec(state[0])))
            return a, [a]
        if cell == "notes-mingru":
            (c_prev,) = state
            xu, xc = self._split(xw, 2)
            hu, hc = self._split(self._rec(c_prev), 2)
            c = self._blend(sig(add(xu, hu)), tanh(add(xc, hc)), c_prev)
            return c, [c]
        if cell == "notes-gru":
            (c_prev,) = state
            xu, xr, xc = self._split(xw, 3)
            hu, hr = self._split(g.op1("MatMul", [c_prev, self.whT_ur]), 2)
            gamma_r = sig(add(xr, hr))
            hc = g.op1("MatMul", [mul(gamma_r, c_prev), self.whT_c])
            c = self._blend(sig(add(xu, hu)), tanh(add(xc, hc)), c_prev)
            return c, [c]
        if cell == "gru":
            # PyTorch: n = tanh(x_n + r ⊙ (W_hn·h + b_hn)), h' = (h − n) ⊙ z + n.
            (h_prev,) = state
            xr, xz, xn = self._split(xw, 3)
            hr, hz, hn = self._split(self._rec(h_prev), 3)
            n = tanh(add(xn, mul(sig(add(xr, hr)), hn)))
            h = add(mul(g.op1("Sub", [h_prev, n]), sig(add(xz, hz))), n)
            return h, [h]
        a_prev, c_prev = state
        gates = self._split(add(xw, self._rec(a_prev)), 4)
        if cell == "notes-lstm":
            gu, gf, go, gc = gates
        else:  # PyTorch's nn.LSTM: i, f, g, o
            gu, gf, gc, go = gates
        c = add(mul(sig(gu), tanh(gc)), mul(sig(gf), c_prev))
        a = mul(sig(go), c if self.notes_output else tanh(c))
        return a, [a, c]


def _value(name: str, elem: int, shape: list[int | str | None]) -> ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def build_matmul(g: GraphBuilder, model: RecurrentModel, first: str) -> str:
    """Add the recurrent layers as one Scan; returns the top layer's ``[T, B, H]`` output."""
    spec = model.spec
    body = g.child()
    notes_output = spec.lstm_output == "notes"
    steps = [
        _Step(body, spec.cell, lw, layer, notes_output)
        for layer, lw in enumerate(layer_weights(model))
    ]
    # Outside the loop: the first layer's input part for all steps, and the [T, B] step mask.
    xw0 = steps[0].project(first, g)
    t_len = g.op1("Gather", [g.op1("Shape", [INPUT]), g.const("zero", np.array(0, np.int64))])
    t_idx = g.op1(
        "Range",
        [g.const("start", np.array(0, np.int64)), t_len, g.const("delta", np.array(1, np.int64))],
    )
    lens = g.op1("Cast", [SEQUENCE_LENS], to=TensorProto.INT64)
    mask = g.op1(
        "Less",
        [
            g.op1("Unsqueeze", [t_idx, g.ints("axes", [1])]),
            g.op1("Unsqueeze", [lens, g.ints("axes", [0])]),
        ],
    )
    # Initial Scan state: per layer, per state name, [B, H].
    inits, body_in, body_out = [], [], []
    for layer in range(spec.layers):
        for s in spec.state_names:
            index = g.const("layer", np.array(layer, np.int64))
            inits.append(g.op1("Gather", [STATE_IO[s][0], index], axis=0))
            body_in.append(body.name(f"{s}{layer}_prev"))
    # The body: read xw0_t and m_t, run every layer, keep the old state where m_t is false.
    xw_t, m_t = body.name("xw0_t"), body.name("mask_t")
    keep = body.op1("Unsqueeze", [m_t, body.ints("axes", [1])])
    n = len(spec.state_names)
    a = ""
    for layer, step in enumerate(steps):
        xw = xw_t if layer == 0 else step.project(a)
        old = body_in[layer * n : (layer + 1) * n]
        a, new = step(xw, old)
        for o, v in zip(old, new, strict=True):
            body_out.append(body.op1("Where", [keep, v, o]))
    a_out = body.op1("Identity", [a])
    h = spec.hidden_size
    graph: GraphProto = helper.make_graph(
        body.nodes,
        "step",
        [_value(v, TensorProto.FLOAT, [None, h]) for v in body_in]
        + [
            _value(xw_t, TensorProto.FLOAT, [None, len(steps[0].lw.gates) * h]),
            _value(m_t, TensorProto.BOOL, [None]),
        ],
        [_value(v, TensorProto.FLOAT, [None, h]) for v in [*body_out, a_out]],
    )
    outs = g.op("Scan", [*inits, xw0, mask], len(inits) + 1, body=graph, num_scan_inputs=2)
    for i, s in enumerate(spec.state_names):
        finals = [
            g.op1("Unsqueeze", [outs[layer * n + i], g.ints("axes", [0])])
            for layer in range(spec.layers)
        ]
        g.rename(g.op1("Concat", finals, axis=0), STATE_IO[s][1])
    return outs[-1]
