"""The model manifest: the one format that export writes and the server reads.

A model repository is a folder of ``<name>/<version>/`` directories, each holding
``model.onnx`` and ``manifest.json`` (and optionally ``golden.npz``, a stored input/output
sequence for the load-time self-check). The manifest says how to drive the ONNX graph as a
recurrent model: which input carries the steps, which inputs and outputs carry the memory cell,
and what the model is (cell kind, sizes, vocabulary, scaling, data set, metrics).

Graph layout the server relies on (time-major, as the ONNX RNN operators are):

- step input: ``[T, B, features]`` float32, or ``[T, B]`` int64 token ids;
- step output: ``[T, B, outputs]``;
- each state input/output: its per-session shape with the batch axis inserted at
  ``batch_axis`` (for ``h`` of a stacked GRU: ``[layers, B, hidden]``, batch_axis 1);
- optionally a ``sequence_lens`` int32 ``[B]`` input, so chunks of different lengths can share
  one batch (each session's state is then taken at its own last step).

Any recurrent ONNX model that follows this layout can be served, not only rnnserve's own.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

FORMAT = "rnnserve.manifest/1"
MANIFEST_FILE = "manifest.json"
MODEL_FILE = "model.onnx"
GOLDEN_FILE = "golden.npz"

InputKind = Literal["features", "tokens"]
OutputKind = Literal["regression", "logits"]


class ManifestError(ValueError):
    """A manifest is missing, malformed or does not describe a servable model."""


@dataclass(frozen=True)
class StateSpec:
    """One tensor of the memory cell.

    ``shape`` is the per-session shape (no batch axis), for example ``[layers, hidden]``.
    ``batch_axis`` is where the graph's state tensors carry the batch.
    """

    name: str
    input: str
    output: str
    shape: list[int]
    batch_axis: int = 1
    dtype: str = "float32"


@dataclass(frozen=True)
class Scaling:
    """Affine scaling of real-valued data: ``scaled = (raw - mean) / std`` per feature.

    Informational: rnnserve's exports bake the scaling into the graph, so clients send and
    receive values in the data's own units and the server applies nothing.
    """

    mean: list[float]
    std: list[float]


@dataclass(frozen=True)
class Manifest:
    """How to serve one model version. Written by export, read by the server."""

    name: str
    version: str
    cell: str
    input_kind: InputKind
    input_name: str
    input_size: int
    output_kind: OutputKind
    output_name: str
    output_size: int
    states: list[StateSpec]
    layers: int = 1
    hidden_size: int = 0
    sequence_lens: str | None = None
    vocabulary: list[str] | None = None
    input_scaling: Scaling | None = None
    output_scaling: Scaling | None = None
    opset: int = 0
    onnx_form: str = ""
    family: str = ""
    dataset: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    golden: str | None = None
    sha256: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def validate(self) -> None:
        """Raise ManifestError naming the first field that cannot be served."""
        if self.format != FORMAT:
            raise ManifestError(f"format is {self.format!r}, expected {FORMAT!r}")
        if not self.name or "/" in self.name:
            raise ManifestError(f"name {self.name!r} must be a non-empty folder name")
        if not self.version:
            raise ManifestError("version must not be empty")
        if self.input_kind not in ("features", "tokens"):
            raise ManifestError(f"input_kind {self.input_kind!r} must be 'features' or 'tokens'")
        if self.output_kind not in ("regression", "logits"):
            raise ManifestError(
                f"output_kind {self.output_kind!r} must be 'regression' or 'logits'"
            )
        if self.input_size < 1 or self.output_size < 1:
            raise ManifestError("input_size and output_size must be at least 1")
        if self.input_kind == "tokens":
            if not self.vocabulary:
                raise ManifestError("a token model needs its vocabulary")
            if len(self.vocabulary) != self.input_size:
                raise ManifestError(
                    f"vocabulary has {len(self.vocabulary)} entries, "
                    f"input_size is {self.input_size}"
                )
        if not self.states:
            raise ManifestError("a recurrent model needs at least one state tensor")
        names = set()
        for s in self.states:
            if s.name in names:
                raise ManifestError(f"state name {s.name!r} appears twice")
            names.add(s.name)
            if not s.shape or any(d < 1 for d in s.shape):
                raise ManifestError(f"state {s.name!r} shape {s.shape} must be positive")
            if not 0 <= s.batch_axis <= len(s.shape):
                raise ManifestError(f"state {s.name!r} batch_axis {s.batch_axis} out of range")
        for label, sc, n in (
            ("input_scaling", self.input_scaling, self.input_size),
            ("output_scaling", self.output_scaling, self.output_size),
        ):
            if sc is not None and (len(sc.mean) != n or len(sc.std) != n):
                raise ManifestError(f"{label} needs {n} means and {n} stds")

    def to_dict(self) -> dict[str, Any]:
        """The manifest as plain JSON-able data."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build and validate a manifest from parsed JSON; ManifestError says what is wrong."""
        if not isinstance(data, dict):
            raise ManifestError("manifest must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ManifestError(f"unknown manifest fields: {', '.join(unknown)}")
        try:
            fields = dict(data)
            fields["states"] = [StateSpec(**s) for s in data.get("states", [])]
            for key in ("input_scaling", "output_scaling"):
                if fields.get(key) is not None:
                    fields[key] = Scaling(**fields[key])
            manifest = cls(**fields)
        except TypeError as exc:
            raise ManifestError(f"malformed manifest: {exc}") from exc
        manifest.validate()
        return manifest

    def save(self, folder: Path) -> Path:
        """Write ``manifest.json`` into folder atomically (temporary file, then rename)."""
        self.validate()
        path = folder / MANIFEST_FILE
        write_atomic(path, (json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n").encode())
        return path


def load_manifest(folder: Path) -> Manifest:
    """Read ``<folder>/manifest.json``; ManifestError says what is missing or wrong."""
    path = folder / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ManifestError(f"{path} does not exist") from exc
    except json.JSONDecodeError as exc:
        raise ManifestError(f"{path} is not valid JSON: {exc}") from exc
    return Manifest.from_dict(data)


def write_atomic(path: Path, data: bytes) -> None:
    """Write a file whole or not at all: a temporary file in the same folder, then rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode an ordinary open() would (0666 less the
        # umask) so a server running as another user can read a model it did not write.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process umask (read by setting and restoring it: POSIX has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
