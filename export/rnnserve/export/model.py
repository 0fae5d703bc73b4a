"""A whole recurrent model: input (features or token embedding), stacked cells, a linear head.

Time-major everywhere, as the ONNX recurrent operators are: sequences are ``[T, B, ...]`` and
each state tensor is ``[layers, B, hidden]``, named by ``spec.state_names``. Data scaling, when
given, is part of the module (buffers), so the model and its ONNX export both take and return
values in the data's own units.
"""

from __future__ import annotations

from typing import Literal

import torch
from rnnserve.export.cells import NotesStack, State, init_torch_lstm_forget_bias
from rnnserve.export.spec import ModelSpec
from rnnserve.manifest import Scaling
from torch import Tensor, nn

Family = Literal["notes", "standard"]


class RecurrentModel(nn.Module):
    """``forward(x, state) -> (y, state)`` over a time-major sequence.

    - ``x``: ``[T, B, input_size]`` float32 (features) or ``[T, B]`` int64 token ids;
    - ``y``: ``[T, B, output_size]``: regression outputs in the data's units, or logits;
    - state: a tuple of ``[layers, B, hidden_size]`` tensors, ``spec.state_names`` in order.

    ``rnn`` is a ``NotesStack`` for the notes' cells, PyTorch's ``nn.GRU`` / ``nn.LSTM`` for the
    "standard" family; export reads the weights from it.
    """

    rnn: nn.Module
    _has_input_scaling: bool
    _has_output_scaling: bool

    def __init__(
        self,
        spec: ModelSpec,
        *,
        input_scaling: Scaling | None = None,
        output_scaling: Scaling | None = None,
    ) -> None:
        super().__init__()
        spec.validate()
        self.spec = spec
        if spec.input_kind == "tokens":
            if input_scaling is not None:
                raise ValueError("a token model takes no input_scaling (its inputs are ids)")
            self.embedding: nn.Embedding | None = nn.Embedding(spec.input_size, spec.embedding_dim)
            rnn_in = spec.embedding_dim
        else:
            self.embedding = None
            rnn_in = spec.input_size
        if spec.cell in ("gru", "lstm"):
            cls = nn.GRU if spec.cell == "gru" else nn.LSTM
            self.rnn = cls(rnn_in, spec.hidden_size, num_layers=spec.layers)
            if isinstance(self.rnn, nn.LSTM):
                # Forget-gate bias +1 at initialisation, as for the notes' LSTM (cells.py,
                # LSTM_FORGET_BIAS says why); the weights are otherwise PyTorch's own.
                init_torch_lstm_forget_bias(self.rnn)
        else:
            self.rnn = NotesStack(
                spec.cell, rnn_in, spec.hidden_size, spec.layers, lstm_output=spec.lstm_output
            )
        self.head = nn.Linear(spec.hidden_size, spec.output_size)
        self._add_scaling("input", input_scaling, spec.input_size)
        self._add_scaling("output", output_scaling, spec.output_size)

    def _add_scaling(self, which: str, scaling: Scaling | None, size: int) -> None:
        # Registered only when given, so a checkpoint saved with scaling does not load silently
        # into a model built without it (load_state_dict reports the unexpected buffers).
        setattr(self, f"_has_{which}_scaling", scaling is not None)
        if scaling is None:
            return
        if len(scaling.mean) != size or len(scaling.std) != size:
            raise ValueError(f"{which} scaling needs {size} means and {size} stds")
        if any(s <= 0 for s in scaling.std):
            raise ValueError(f"{which} scaling std must be positive, got {scaling.std}")
        self.register_buffer(f"{which}_mean", torch.tensor(scaling.mean, dtype=torch.float32))
        self.register_buffer(f"{which}_std", torch.tensor(scaling.std, dtype=torch.float32))

    def _scaling(self, which: str) -> Scaling | None:
        buffers = dict(self.named_buffers())
        mean, std = buffers.get(f"{which}_mean"), buffers.get(f"{which}_std")
        if mean is None or std is None:
            return None
        return Scaling(mean=[float(v) for v in mean], std=[float(v) for v in std])

    @property
    def input_scaling(self) -> Scaling | None:
        """The input scaling baked into the model, read back from its buffers."""
        return self._scaling("input")

    @property
    def output_scaling(self) -> Scaling | None:
        """The output scaling baked into the model, read back from its buffers."""
        return self._scaling("output")

    @property
    def family(self) -> Family:
        """ "standard" for PyTorch's own nn.GRU / nn.LSTM, "notes" for the notes' cells."""
        return "standard" if self.spec.cell in ("gru", "lstm") else "notes"

    def init_state(self, batch: int) -> State:
        """Zero memory cells for ``batch`` sessions: ``[layers, batch, hidden]`` each."""
        p = self.head.weight
        shape = (self.spec.layers, batch, self.spec.hidden_size)
        return tuple(p.new_zeros(shape) for _ in self.spec.state_names)

    def _check_state(self, state: State, batch: int) -> None:
        if len(state) != len(self.spec.state_names):
            raise ValueError(
                f"state needs {len(self.spec.state_names)} tensors "
                f"({', '.join(self.spec.state_names)}), got {len(state)}"
            )
        want = (self.spec.layers, batch, self.spec.hidden_size)
        for name, t in zip(self.spec.state_names, state, strict=True):
            if tuple(t.shape) != want:
                raise ValueError(f"state {name!r} has shape {tuple(t.shape)}, expected {want}")

    def encode(self, x: Tensor) -> Tensor:
        """What the first layer reads: scaled features or token embeddings, ``[..., rnn_in]``."""
        if self.embedding is not None:
            embedded: Tensor = self.embedding(x)
            return embedded
        if self._has_input_scaling:
            return (x - self.get_buffer("input_mean")) / self.get_buffer("input_std")
        return x

    def decode(self, a: Tensor, x: Tensor) -> Tensor:
        """The head on the top layer's activation, de-scaled to the data's units; with
        ``spec.residual``, ``x + residual · head(a)`` instead."""
        y: Tensor = self.head(a)
        if self.spec.residual:
            return x + y * self.spec.residual
        if self._has_output_scaling:
            y = y * self.get_buffer("output_std") + self.get_buffer("output_mean")
        return y

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        """Whole sequence: ``x`` ``[T, B, F]`` or ``[T, B]`` -> ``(y [T, B, O], state)``."""
        want_dims = 2 if self.embedding is not None else 3
        if x.dim() != want_dims:
            raise ValueError(f"x must have {want_dims} dims (time-major), got {tuple(x.shape)}")
        if state is None:
            state = self.init_state(x.shape[1])
        self._check_state(state, x.shape[1])
        seq = self.encode(x)
        if isinstance(self.rnn, NotesStack):
            out, new_state = self.rnn(seq, state)
        elif isinstance(self.rnn, nn.LSTM):
            out, (h, c) = self.rnn(seq, (state[0], state[1]))
            new_state = (h, c)
        else:
            out, h = self.rnn(seq, state[0])
            new_state = (h,)
        return self.decode(out, x), new_state

    def step(self, x_t: Tensor, state: State) -> tuple[Tensor, State]:
        """One step: ``x_t`` ``[B, F]`` or ``[B]`` -> ``(y_t [B, O], state)``."""
        self._check_state(state, x_t.shape[0])
        if isinstance(self.rnn, NotesStack):
            a, new_state = self.rnn.step(self.encode(x_t), state)
            return self.decode(a, x_t), new_state
        y, new_state = self.forward(x_t.unsqueeze(0), state)
        return y[0], new_state


def build_model(
    spec: ModelSpec,
    *,
    input_scaling: Scaling | None = None,
    output_scaling: Scaling | None = None,
) -> RecurrentModel:
    """A freshly initialised model for ``spec``; ValueError says which field to fix."""
    return RecurrentModel(spec, input_scaling=input_scaling, output_scaling=output_scaling)
