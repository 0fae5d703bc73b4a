"""The lecture notes' recurrent cells, written from their equations (docs/models.md, CELLS.md).

Every cell keeps its weights in one layout that maps one-to-one onto the ONNX operators:

- ``weight_x``: ``[gates * hidden, input]``, the input part of every gate, stacked by gate;
- ``weight_h``: ``[gates * hidden, hidden]``, the recurrent part, stacked the same way;
- ``bias``: ``[gates * hidden]``, the notes' one bias per gate.

``GATES`` names the gate blocks in order. ``W·v`` below is ``v @ W.T`` on batches of row vectors.
A step maps ``x<t>`` ``[B, input]`` and the state (a tuple of ``[B, hidden]`` tensors) to the
activation ``a<t>`` ``[B, hidden]`` and the new state. ``input_projection`` computes the input
part of every gate at once, so a whole sequence spends one matrix product on its inputs and only
the recurrent part runs step by step.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

State = tuple[Tensor, ...]

#: Initial forget-gate bias of every LSTM built here (the notes' ``notes-lstm`` and PyTorch's
#: ``nn.LSTM`` inside ``RecurrentModel``). With the uniform ±1/sqrt(hidden) initialisation alone
#: the bias is near 0, so Γf starts near σ(0) = 0.5 and the memory cell halves every step until
#: training pushes Γf up; on the adding problem that left the notes' LSTM stuck at every lag
#: above 10 within the long-lag experiment's budget (docs/long-lag.md). A bias of +1 (Γf ≈ 0.73)
#: is the common remedy (Gers, Schmidhuber & Cummins 2000; Jozefowicz, Zaremba & Sutskever 2015).
#: An initialisation only: the equations are unchanged, and a trained checkpoint overrides it.
LSTM_FORGET_BIAS = 1.0


class NotesCell(nn.Module):
    """Base of the notes' cells: the shared weight layout and the single-step contract."""

    GATES: ClassVar[tuple[str, ...]] = ()
    STATE_NAMES: ClassVar[tuple[str, ...]] = ("h",)

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        if input_size < 1 or hidden_size < 1:
            raise ValueError(
                f"input_size ({input_size}) and hidden_size ({hidden_size}) must be at least 1"
            )
        self.input_size = input_size
        self.hidden_size = hidden_size
        g = len(self.GATES)
        self.weight_x = nn.Parameter(torch.empty(g * hidden_size, input_size))
        self.weight_h = nn.Parameter(torch.empty(g * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(g * hidden_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """PyTorch's own RNN initialisation: uniform in ±1/sqrt(hidden)."""
        bound = 1.0 / math.sqrt(self.hidden_size)
        for p in (self.weight_x, self.weight_h, self.bias):
            nn.init.uniform_(p, -bound, bound)

    def gate(self, name: str) -> slice:
        """Rows of ``weight_x`` / ``weight_h`` / ``bias`` that belong to one gate."""
        i = self.GATES.index(name)
        return slice(i * self.hidden_size, (i + 1) * self.hidden_size)

    def input_projection(self, x: Tensor) -> Tensor:
        """``b + W_x·x`` for every gate: ``[..., input]`` -> ``[..., gates * hidden]``."""
        return torch.nn.functional.linear(x, self.weight_x, self.bias)

    def recur(self, xw: Tensor, state: State) -> tuple[Tensor, State]:
        """One step from the input part ``xw`` ``[B, gates * hidden]`` and the previous state."""
        raise NotImplementedError

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One step: ``x<t>`` ``[B, input]``, state -> ``(a<t>, new state)``."""
        return self.recur(self.input_projection(x), state)

    def _split(self, v: Tensor) -> tuple[Tensor, ...]:
        return tuple(torch.split(v, self.hidden_size, dim=-1))


class RNNCell(NotesCell):
    """The plain RNN of the notes' motivation: ``a<t> = tanh(b + W_aa·a<t-1> + W_ax·x<t>)``."""

    GATES = ("a",)

    def recur(self, xw: Tensor, state: State) -> tuple[Tensor, State]:
        (a_prev,) = state
        a = torch.tanh(xw + a_prev @ self.weight_h.T)
        return a, (a,)


class MinimalGRUCell(NotesCell):
    """The minimal GRU: update gate only.

    ``c̃ = tanh(b_c + W_cc·c<t-1> + W_cx·x)``, ``Γu = σ(b_u + W_uc·c<t-1> + W_ux·x)``,
    ``c<t> = Γu ⊙ c̃ + (1 − Γu) ⊙ c<t-1>``, ``a<t> = c<t>``.
    """

    GATES = ("u", "c")

    def recur(self, xw: Tensor, state: State) -> tuple[Tensor, State]:
        (c_prev,) = state
        xu, xc = self._split(xw)
        hu, hc = self._split(c_prev @ self.weight_h.T)
        gamma_u = torch.sigmoid(xu + hu)
        c_tilde = torch.tanh(xc + hc)
        c = gamma_u * c_tilde + (1.0 - gamma_u) * c_prev
        return c, (c,)


class NotesGRUCell(NotesCell):
    """The notes' GRU: the relevance gate acts *before* the recurrent product.

    ``Γu = σ(b_u + W_uc·c<t-1> + W_ux·x)``, ``Γr = σ(b_r + W_rc·c<t-1> + W_rx·x)``,
    ``c̃ = tanh(b_c + W_cc·(Γr ⊙ c<t-1>) + W_cx·x)``, ``c<t> = Γu ⊙ c̃ + (1 − Γu) ⊙ c<t-1>``.
    """

    GATES = ("u", "r", "c")

    def recur(self, xw: Tensor, state: State) -> tuple[Tensor, State]:
        (c_prev,) = state
        xu, xr, xc = self._split(xw)
        h = self.hidden_size
        # Γu and Γr read c<t-1> directly; the proposal's recurrent part reads Γr ⊙ c<t-1>.
        hur = c_prev @ self.weight_h[: 2 * h].T
        gamma_u = torch.sigmoid(xu + hur[:, :h])
        gamma_r = torch.sigmoid(xr + hur[:, h:])
        c_tilde = torch.tanh(xc + (gamma_r * c_prev) @ self.weight_h[self.gate("c")].T)
        c = gamma_u * c_tilde + (1.0 - gamma_u) * c_prev
        return c, (c,)


class NotesLSTMCell(NotesCell):
    """The notes' LSTM: update, forget and output gates reading ``a<t-1>``.

    ``c<t> = Γu ⊙ c̃ + Γf ⊙ c<t-1>``; ``a<t> = Γo ⊙ c<t>`` (``output="notes"``, as the notes
    write it) or ``a<t> = Γo ⊙ tanh(c<t>)`` (``output="tanh"``, the common form). State: (a, c).
    """

    GATES = ("u", "f", "o", "c")
    STATE_NAMES = ("h", "c")

    def __init__(
        self, input_size: int, hidden_size: int, output: Literal["notes", "tanh"] = "notes"
    ) -> None:
        if output not in ("notes", "tanh"):
            raise ValueError(f"output must be 'notes' or 'tanh', got {output!r}")
        super().__init__(input_size, hidden_size)
        self.output = output

    def reset_parameters(self) -> None:
        """PyTorch's uniform initialisation, then the forget-gate bias at ``LSTM_FORGET_BIAS``."""
        super().reset_parameters()
        with torch.no_grad():
            self.bias[self.gate("f")].fill_(LSTM_FORGET_BIAS)

    def recur(self, xw: Tensor, state: State) -> tuple[Tensor, State]:
        a_prev, c_prev = state
        gu, gf, go, gc = self._split(xw + a_prev @ self.weight_h.T)
        gamma_u = torch.sigmoid(gu)
        gamma_f = torch.sigmoid(gf)
        gamma_o = torch.sigmoid(go)
        c = gamma_u * torch.tanh(gc) + gamma_f * c_prev
        a = gamma_o * (c if self.output == "notes" else torch.tanh(c))
        return a, (a, c)


def init_torch_lstm_forget_bias(lstm: nn.LSTM, value: float = LSTM_FORGET_BIAS) -> None:
    """Start every layer of PyTorch's ``nn.LSTM`` with forget-gate bias ``value``.

    ``nn.LSTM`` adds two biases, ``bias_ih_l{k}`` and ``bias_hh_l{k}``, each with its gates
    stacked i, f, g, o; the forget slice of ``bias_ih`` is set to ``value`` and that of
    ``bias_hh`` to 0, so their sum (what the gate sees) is exactly ``value``. No-op without biases.
    """
    if not lstm.bias:
        return
    h = lstm.hidden_size
    forget = slice(h, 2 * h)
    with torch.no_grad():
        for name, p in lstm.named_parameters():
            if name.startswith("bias_ih"):
                p[forget].fill_(value)
            elif name.startswith("bias_hh"):
                p[forget].zero_()


#: spec.cell -> the notes' cell class
NOTES_CELLS: dict[str, type[NotesCell]] = {
    "rnn": RNNCell,
    "notes-mingru": MinimalGRUCell,
    "notes-gru": NotesGRUCell,
    "notes-lstm": NotesLSTMCell,
}


class NotesStack(nn.Module):
    """Layers of one notes' cell kind; layer l reads layer l-1's activation (the notes' ``[l]``).

    State tensors are ``[layers, B, hidden]``, named by the cell's ``STATE_NAMES``.
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        layers: int,
        lstm_output: Literal["notes", "tanh"] = "notes",
    ) -> None:
        super().__init__()
        if cell not in NOTES_CELLS:
            raise ValueError(f"unknown notes cell {cell!r}; choose one of {', '.join(NOTES_CELLS)}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, got {layers}")
        cls = NOTES_CELLS[cell]
        cells: list[NotesCell] = []
        for layer in range(layers):
            size_in = input_size if layer == 0 else hidden_size
            if cls is NotesLSTMCell:
                cells.append(NotesLSTMCell(size_in, hidden_size, output=lstm_output))
            else:
                cells.append(cls(size_in, hidden_size))
        self.cells = nn.ModuleList(cells)
        self.kind = cell
        self.hidden_size = hidden_size
        self.layers = layers
        self.state_names = cls.STATE_NAMES

    def _layer(self, layer: int) -> NotesCell:
        cell = self.cells[layer]
        assert isinstance(cell, NotesCell)
        return cell

    def forward(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """Whole sequence, time-major: ``x`` ``[T, B, input]`` -> ``([T, B, hidden], state)``.

        Layer by layer: each layer's input part is one matrix product over all T steps.
        """
        finals: list[list[Tensor]] = [[] for _ in self.state_names]
        seq = x
        for layer in range(self.layers):
            cell = self._layer(layer)
            xw = cell.input_projection(seq)
            s: State = tuple(t[layer] for t in state)
            outs = []
            for t in range(xw.shape[0]):
                a, s = cell.recur(xw[t], s)
                outs.append(a)
            seq = torch.stack(outs) if outs else xw.new_zeros(0, xw.shape[1], self.hidden_size)
            for i, tensor in enumerate(s):
                finals[i].append(tensor)
        return seq, tuple(torch.stack(f) for f in finals)

    def step(self, x: Tensor, state: State) -> tuple[Tensor, State]:
        """One step through every layer: ``x`` ``[B, input]`` -> ``([B, hidden], state)``."""
        new: list[list[Tensor]] = [[] for _ in self.state_names]
        a = x
        for layer in range(self.layers):
            a, s = self._layer(layer).step(a, tuple(t[layer] for t in state))
            for i, tensor in enumerate(s):
                new[i].append(tensor)
        return a, tuple(torch.stack(f) for f in new)
