"""The "native" form: one ONNX ``RNN`` / ``GRU`` / ``LSTM`` node per layer, where that is exact.

ONNX gate orders (weights ``W`` ``[1, G*H, in]``, ``R`` ``[1, G*H, H]``, bias ``[1, 2*G*H]`` =
``Wb`` then ``Rb``): ``GRU`` z, r, h; ``LSTM`` i, o, f, c. The mappings, each exact:

- plain RNN -> ``RNN`` (tanh): ``H = tanh(W·x + R·H + Wb + Rb)``.
- notes' GRU -> ``GRU`` with ``linear_before_reset=0`` (the relevance gate multiplies the state
  *before* ``Rh``). ONNX blends ``H = (1 − z) ⊙ h + z ⊙ H_prev`` while the notes write
  ``c = Γu ⊙ c̃ + (1 − Γu) ⊙ c_prev``, so ``z = 1 − Γu = σ(−(…))``: the update gate's weights and
  bias go in negated.
- nn.GRU (r, z, n) -> ``GRU`` with ``linear_before_reset=1``: z←z, r←r, h←n; ``Rbh`` inside the
  reset product, exactly as PyTorch's ``r ⊙ (W_hn·h + b_hn)``.
- notes' LSTM (u, f, o, c) -> ``LSTM``: i←Γu, o←Γo, f←Γf, c←c̃, no peepholes; the output
  activation (the third of f, g, h) is ``Affine(alpha=1, beta=0)``, the identity, for the notes'
  ``a = Γo ⊙ c``, and the default ``Tanh`` for ``a = Γo ⊙ tanh(c)``.
- nn.LSTM (i, f, g, o) -> ``LSTM``: i←i, o←o, f←f, c←g.
- minimal GRU: no ONNX operator has a single update gate, so it has no native form; export uses
  the MatMul form (onnx_matmul.py) for it and records ``onnx_form = "matmul"``.

Layers are chained by squeezing each node's ``Y`` ``[T, 1, B, H]`` to ``[T, B, H]``. Each node
gets ``sequence_lens``: past its own length a session's ``Y`` is zero and its ``Y_h``/``Y_c``
hold the state of its last valid step, which is what the server keeps.
"""

from __future__ import annotations

import numpy as np
from rnnserve.export.model import RecurrentModel
from rnnserve.export.onnx_graph import (
    SEQUENCE_LENS,
    STATE_IO,
    ExportError,
    GraphBuilder,
    LayerWeights,
    layer_weights,
)

#: cell -> (ONNX operator, ONNX gate order as (own gate, negate?) pairs)
_MAPPING: dict[str, tuple[str, tuple[tuple[str, bool], ...]]] = {
    "rnn": ("RNN", (("a", False),)),
    "notes-gru": ("GRU", (("u", True), ("r", False), ("c", False))),
    "gru": ("GRU", (("z", False), ("r", False), ("n", False))),
    "notes-lstm": ("LSTM", (("u", False), ("o", False), ("f", False), ("c", False))),
    "lstm": ("LSTM", (("i", False), ("o", False), ("f", False), ("g", False))),
}


def has_native(cell: str) -> bool:
    """Whether an exact native ONNX operator exists for this cell kind."""
    return cell in _MAPPING


def _onnx_weights(lw: LayerWeights, order: tuple[tuple[str, bool], ...]) -> tuple[np.ndarray, ...]:
    """``W``, ``R``, ``B`` in ONNX's gate order, with an initial direction axis of 1."""
    parts = [lw.gate(name) for name, _ in order]
    signs = [np.float32(-1.0 if neg else 1.0) for _, neg in order]
    w = np.concatenate([s * p[0] for s, p in zip(signs, parts, strict=True)])[None]
    r = np.concatenate([s * p[1] for s, p in zip(signs, parts, strict=True)])[None]
    wb = np.concatenate([s * p[2] for s, p in zip(signs, parts, strict=True)])
    rb = np.concatenate([s * p[3] for s, p in zip(signs, parts, strict=True)])
    return w, r, np.concatenate([wb, rb])[None]


def build_native(g: GraphBuilder, model: RecurrentModel, first: str) -> str:
    """Add the recurrent layers; returns the top layer's ``[T, B, H]`` output."""
    spec = model.spec
    if spec.cell not in _MAPPING:
        raise ExportError(f"cell {spec.cell!r} has no native ONNX operator; use form='matmul'")
    op_type, order = _MAPPING[spec.cell]
    attrs: dict[str, object] = {"hidden_size": spec.hidden_size}
    if op_type == "GRU":
        attrs["linear_before_reset"] = 1 if spec.cell == "gru" else 0
    if spec.cell == "notes-lstm" and spec.lstm_output == "notes":
        # f, g, h = Sigmoid, Tanh, identity; alpha/beta go to the activations that take them.
        attrs["activations"] = ["Sigmoid", "Tanh", "Affine"]
        attrs["activation_alpha"] = [1.0]
        attrs["activation_beta"] = [0.0]
    finals: dict[str, list[str]] = {s: [] for s in spec.state_names}
    seq = first
    for layer, lw in enumerate(layer_weights(model)):
        w, r, b = (
            g.const(f"l{layer}_{k}", a)
            for k, a in zip("WRB", _onnx_weights(lw, order), strict=True)
        )
        index = g.ints("layer", [layer])
        inits = [g.op1("Gather", [STATE_IO[s][0], index], axis=0) for s in spec.state_names]
        # Inputs X, W, R, B, sequence_lens, initial_h[, initial_c]; outputs Y, Y_h[, Y_c].
        outs = g.op(op_type, [seq, w, r, b, SEQUENCE_LENS, *inits], 1 + len(inits), **attrs)
        seq = g.op1("Squeeze", [outs[0], g.ints("axes", [1])])
        for s, final in zip(spec.state_names, outs[1:], strict=True):
            finals[s].append(final)
    for s in spec.state_names:
        g.rename(g.op1("Concat", finals[s], axis=0), STATE_IO[s][1])
    return seq
