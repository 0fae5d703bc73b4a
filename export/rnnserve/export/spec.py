"""What a model is, independent of its weights: the one description training and export share.

``ModelSpec`` is saved in every checkpoint, so a checkpoint of another architecture is
recognised before its weights are loaded.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

#: The cell families. "notes-*" are the lecture notes' cells (docs/models.md), written from their
#: equations; "gru" / "lstm" are PyTorch's own nn.GRU / nn.LSTM ("standard" family).
CellKind = Literal["rnn", "notes-mingru", "notes-gru", "notes-lstm", "gru", "lstm"]
CELL_KINDS: tuple[str, ...] = ("rnn", "notes-mingru", "notes-gru", "notes-lstm", "gru", "lstm")


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a recurrent model: cell, sizes, and how it reads and writes data.

    - ``input_kind="features"``: steps are float vectors of ``input_size`` features;
      ``input_kind="tokens"``: steps are token ids below ``input_size`` (the vocabulary size),
      read through an embedding of ``embedding_dim``.
    - ``output_size``: regression outputs per step, or logits over the vocabulary.
    - ``lstm_output``: for "notes-lstm" only, ``"notes"`` is the notes' ``a = Γo ⊙ c`` and
      ``"tanh"`` the common ``a = Γo ⊙ tanh(c)``.
    - ``residual``: 0 for none; else, for a features model with ``input_size == output_size``,
      the output is the step's input plus a learned change,
      ``y<t> = x<t> + residual · head(a<t>)``, in the data's units: a forecaster learns the
      change from this step rather than the level, and ``residual`` (the typical size of a
      change) keeps the head's outputs near 1. The output scaling is then not applied; it
      still gives the units in which outputs are compared (parity, the server's self-check).
    """

    cell: str
    input_kind: Literal["features", "tokens"]
    input_size: int
    hidden_size: int
    layers: int
    output_size: int
    embedding_dim: int = 0
    lstm_output: Literal["notes", "tanh"] = "tanh"
    residual: float = 0.0

    def validate(self) -> None:
        """Raise ValueError with a message that says which field to fix."""
        if self.cell not in CELL_KINDS:
            raise ValueError(
                f"unknown cell kind {self.cell!r}; choose one of {', '.join(CELL_KINDS)}"
            )
        for name in ("input_size", "hidden_size", "layers", "output_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.input_kind == "tokens" and self.embedding_dim < 1:
            raise ValueError("a token model needs embedding_dim >= 1")
        if self.lstm_output not in ("notes", "tanh"):
            raise ValueError("lstm_output must be 'notes' or 'tanh'")
        if self.residual < 0:
            raise ValueError(f"residual must be 0 (none) or positive, got {self.residual}")
        if self.residual and (self.input_kind != "features" or self.input_size != self.output_size):
            raise ValueError(
                "residual needs a features model with as many outputs as inputs, got "
                f"{self.input_kind} {self.input_size} -> {self.output_size}"
            )

    @property
    def state_names(self) -> tuple[str, ...]:
        """The memory cell's tensors, each [layers, batch, hidden]: h, and c for an LSTM."""
        return ("h", "c") if self.cell in ("lstm", "notes-lstm") else ("h",)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        spec = cls(**data)
        spec.validate()
        return spec
