"""Training checkpoints: written whole or not at all, and refused when they describe another model.

A checkpoint is one ``torch.save`` file holding plain data only (tensors, numbers, strings,
lists, dicts), so it loads with ``weights_only=True`` and never runs code from the file:

- ``format``: ``CHECKPOINT_FORMAT``;
- ``spec``: ``ModelSpec.to_dict()``, checked before any weight is loaded;
- ``model`` / ``optimizer``: the state dicts;
- ``epoch``: epochs completed; ``config``: the training settings; ``history``: per-epoch metrics;
- ``rng``: torch's and NumPy's generator states at the end of that epoch;
- ``vocabulary``, ``input_scaling``, ``output_scaling``: what a client needs to speak to the model;
- ``dataset``: the data set's facts (source, licence, split); ``metrics``: the epoch's
  validation metrics.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

import torch
from rnnserve.export.model import RecurrentModel, build_model
from rnnserve.export.spec import ModelSpec
from rnnserve.manifest import Scaling, write_atomic

CHECKPOINT_FORMAT = "rnnserve.checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or of another architecture; the message says why."""


def scaling_to_dict(scaling: Scaling | None) -> dict[str, list[float]] | None:
    return None if scaling is None else {"mean": list(scaling.mean), "std": list(scaling.std)}


def scaling_from_dict(data: dict[str, list[float]] | None) -> Scaling | None:
    return None if data is None else Scaling(mean=list(data["mean"]), std=list(data["std"]))


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Serialise ``payload`` (see the module docstring) and write it atomically to ``path``."""
    missing = {"spec", "model", "epoch"} - set(payload)
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(sorted(missing))}")
    buffer = io.BytesIO()
    torch.save({"format": CHECKPOINT_FORMAT, **payload}, buffer)
    write_atomic(path, buffer.getvalue())


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The raw checkpoint dict; CheckpointError when the file is missing or not a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; train a model first")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable rnnserve checkpoint ({first})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not an rnnserve checkpoint ({CHECKPOINT_FORMAT})")
    return data


def describe(spec: ModelSpec) -> str:
    """A short human name for an architecture, for error messages and summaries."""
    return (
        f"{spec.cell} ({spec.input_kind}, input {spec.input_size}, hidden {spec.hidden_size}, "
        f"{spec.layers} layer{'s' if spec.layers != 1 else ''}, output {spec.output_size})"
    )


def check_spec(found: ModelSpec, expect: ModelSpec, path: Path) -> None:
    """Raise CheckpointError naming every field in which ``found`` differs from ``expect``."""
    a, b = found.to_dict(), expect.to_dict()
    diff = [f"{k} {a[k]!r} (wanted {b[k]!r})" for k in a if a[k] != b.get(k)]
    if diff:
        raise CheckpointError(
            f"{path} holds another architecture, a {describe(found)}: {'; '.join(diff)}; "
            "pass matching options or another checkpoint"
        )


def load_checkpoint(
    path: Path, expect: ModelSpec | None = None
) -> tuple[RecurrentModel, dict[str, Any]]:
    """Rebuild the model a checkpoint holds, on the CPU, in eval mode.

    With ``expect``, a checkpoint of any other architecture is refused (CheckpointError) before
    its weights are read. Returns the model and a dict of its facts: ``spec`` (ModelSpec),
    ``vocabulary`` (list of characters or None), ``input_scaling`` / ``output_scaling``
    (Scaling or None), ``dataset``, ``metrics``, ``epoch``, ``config``, ``history``.
    """
    path = Path(path)
    data = read_checkpoint(path)
    try:
        spec = ModelSpec.from_dict(dict(data["spec"]))
    except (TypeError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path} has an invalid model spec: {exc}") from None
    if expect is not None:
        check_spec(spec, expect, path)
    input_scaling = scaling_from_dict(data.get("input_scaling"))
    output_scaling = scaling_from_dict(data.get("output_scaling"))
    model = build_model(spec, input_scaling=input_scaling, output_scaling=output_scaling)
    try:
        model.load_state_dict(data["model"])
    except (RuntimeError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"{path}: weights do not fit {describe(spec)} ({first})") from None
    model.eval()
    info: dict[str, Any] = {
        "spec": spec,
        "vocabulary": data.get("vocabulary"),
        "input_scaling": input_scaling,
        "output_scaling": output_scaling,
        "dataset": dict(data.get("dataset") or {}),
        "metrics": dict(data.get("metrics") or {}),
        "epoch": int(data["epoch"]),
        "config": dict(data.get("config") or {}),
        "history": list(data.get("history") or []),
    }
    return model, info
