"""Typed model metadata: what a served model takes, returns and remembers."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
from rnnserve.v1 import rnnserve_pb2 as pb
from rnnserve.wire import TensorError, dtype_from_proto

InputKind = Literal["features", "tokens"]
OutputKind = Literal["regression", "logits"]

_INPUT_KINDS: dict[int, InputKind] = {
    pb.INPUT_KIND_FEATURES: "features",
    pb.INPUT_KIND_TOKENS: "tokens",
}
_OUTPUT_KINDS: dict[int, OutputKind] = {
    pb.OUTPUT_KIND_REGRESSION: "regression",
    pb.OUTPUT_KIND_LOGITS: "logits",
}


@dataclass(frozen=True)
class TensorInfo:
    """Name, element type and per-session shape of a tensor; -1 marks the time axis."""

    name: str
    dtype: np.dtype[np.generic]
    shape: tuple[int, ...]

    def describe(self, time: str = "T") -> str:
        """For messages: ``float32 [T, 3]``."""
        dims = ", ".join(time if d < 0 else str(d) for d in self.shape)
        return f"{self.dtype.name} [{dims}]"

    @classmethod
    def from_proto(cls, spec: pb.TensorSpec) -> TensorInfo:
        """Decode a ``TensorSpec``; ValueError when its dtype is unknown."""
        try:
            dtype = dtype_from_proto(spec.dtype)
        except TensorError as exc:
            raise ValueError(f"tensor {spec.name!r}: {exc}") from None
        return cls(spec.name, dtype, tuple(int(d) for d in spec.shape))


@dataclass(frozen=True)
class ModelInfo:
    """One served model version, as the server describes it.

    Feature models take float32 chunks ``[T, features]`` and token models int64 ids ``[T]``;
    both return ``[T, outputs]`` per chunk (logits over ``vocabulary`` for token models).
    """

    name: str
    version: str
    versions: tuple[str, ...]
    cell: str
    input_kind: InputKind
    output_kind: OutputKind
    input: TensorInfo
    output: TensorInfo
    states: tuple[TensorInfo, ...]
    vocabulary: tuple[str, ...]
    #: The longest chunk the server accepts; the SDK splits longer ones.
    max_chunk_length: int
    provider: str
    metadata: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_proto(cls, m: pb.ModelInfo) -> ModelInfo:
        """Decode a ``ModelInfo`` message; ValueError when the server sent something unusable."""
        if m.input_kind not in _INPUT_KINDS or m.output_kind not in _OUTPUT_KINDS:
            raise ValueError(f"model {m.name!r}: unknown input or output kind")
        return cls(
            name=m.name,
            version=m.version,
            versions=tuple(m.versions),
            cell=m.cell,
            input_kind=_INPUT_KINDS[m.input_kind],
            output_kind=_OUTPUT_KINDS[m.output_kind],
            input=TensorInfo.from_proto(m.input),
            output=TensorInfo.from_proto(m.output),
            states=tuple(TensorInfo.from_proto(s) for s in m.states),
            vocabulary=tuple(m.vocabulary),
            max_chunk_length=int(m.max_chunk_length),
            provider=m.provider,
            metadata=dict(m.metadata),
        )

    @property
    def is_tokens(self) -> bool:
        """Whether the model reads token ids (a text model)."""
        return self.input_kind == "tokens"

    @property
    def step_shape(self) -> tuple[int, ...]:
        """Shape of one step's input: ``(features,)`` for feature models, ``()`` for tokens."""
        return self.input.shape[1:]

    @property
    def output_size(self) -> int:
        """Outputs per step (the vocabulary size for a token model)."""
        return int(np.prod(self.output.shape[1:], dtype=np.int64))

    @cached_property
    def token_ids(self) -> dict[str, int]:
        """Symbol -> token id, for token models."""
        return {symbol: i for i, symbol in enumerate(self.vocabulary)}

    def decode_tokens(self, ids: object) -> str:
        """The text of token ids (``ids`` an int or a sequence of ints)."""
        arr = np.atleast_1d(np.asarray(ids, dtype=np.int64))
        return "".join(self.vocabulary[int(i)] for i in arr)
