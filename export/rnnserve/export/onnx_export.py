"""Export a RecurrentModel to a served model version: ``<out>/<name>/<version>/``.

The folder holds ``model.onnx``, ``manifest.json`` and ``golden.npz``. Nothing is written until
the graph has passed the parity check (parity.py); the folder is built beside its final place and
renamed into it, so a model version exists whole or not at all.

Forms: ``"native"`` uses one ONNX RNN/GRU/LSTM node per layer (onnx_native.py), ``"matmul"`` a
Scan of element-wise operators (onnx_matmul.py). The minimal GRU has no native operator; asking
for its native form gives the MatMul form, and the manifest's ``onnx_form`` says so.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx
from rnnserve.export.model import RecurrentModel
from rnnserve.export.onnx_graph import (
    INPUT,
    OUTPUT,
    SEQUENCE_LENS,
    STATE_IO,
    ExportError,
    GraphBuilder,
    decode,
    encode,
    finish,
)
from rnnserve.export.onnx_matmul import build_matmul
from rnnserve.export.onnx_native import build_native, has_native
from rnnserve.export.parity import check_parity, make_golden
from rnnserve.manifest import GOLDEN_FILE, MODEL_FILE, Manifest, ManifestError, StateSpec

__all__ = ["DEFAULT_OPSET", "ExportError", "build_onnx", "export_onnx", "metadata_of"]

#: The pinned opset. 14 is the first with the RNN operators' ``layout`` attribute; the graphs
#: use nothing newer than opset 13's Split/Squeeze/Unsqueeze-with-input forms.
DEFAULT_OPSET = 17
SUPPORTED_OPSETS = range(14, 22)
#: manifest fields that depend on the written file and so are not in its metadata_props
_NOT_IN_METADATA = ("parity", "sha256", "golden")

Form = Literal["native", "matmul"]


def resolve_form(cell: str, form: str) -> Form:
    """The form actually built: ``native`` falls back to ``matmul`` where no operator is exact."""
    if form not in ("native", "matmul"):
        raise ExportError(f"form must be 'native' or 'matmul', got {form!r}")
    return "native" if form == "native" and has_native(cell) else "matmul"


def build_onnx(
    model: RecurrentModel, *, form: Form, opset: int, metadata: dict[str, str]
) -> onnx.ModelProto:
    """The ONNX graph of ``model`` (CPU, eval mode) in the given form, not yet checked."""
    g = GraphBuilder()
    first = encode(g, model)
    top = build_native(g, model, first) if form == "native" else build_matmul(g, model, first)
    decode(g, model, top)
    doc = f"rnnserve {model.spec.cell} x{model.spec.layers}, {form} form"
    return finish(g, model, opset=opset, metadata=metadata, doc=doc)


def metadata_of(manifest: Manifest) -> dict[str, str]:
    """The ``metadata_props`` of a model: every manifest field but the file-dependent ones,
    each value JSON-encoded (so ``json.loads`` gives back the manifest's value)."""
    data = manifest.to_dict()
    return {k: json.dumps(v, sort_keys=True) for k, v in data.items() if k not in _NOT_IN_METADATA}


def _check_folder_name(label: str, value: str) -> None:
    if not value or value in (".", "..") or "/" in value or "\\" in value or value.startswith("."):
        raise ExportError(
            f"{label} {value!r} must be a plain folder name (no '/', not starting with '.')"
        )


def _manifest(
    model: RecurrentModel,
    *,
    name: str,
    version: str,
    form: Form,
    requested_form: str,
    vocabulary: list[str] | None,
    dataset: dict[str, Any] | None,
    metrics: dict[str, Any] | None,
    opset: int,
) -> Manifest:
    spec = model.spec
    tokens = spec.input_kind == "tokens"
    if tokens and (vocabulary is None or len(vocabulary) != spec.input_size):
        got = "none" if vocabulary is None else f"{len(vocabulary)} entries"
        raise ExportError(
            f"a token model needs its vocabulary of {spec.input_size} entries, got {got}"
        )
    if not tokens and vocabulary is not None:
        raise ExportError("a feature model takes no vocabulary")
    states = [
        StateSpec(
            name=s,
            input=STATE_IO[s][0],
            output=STATE_IO[s][1],
            shape=[spec.layers, spec.hidden_size],
            batch_axis=1,
        )
        for s in spec.state_names
    ]
    extra: dict[str, Any] = {"spec": spec.to_dict(), "requested_form": requested_form}
    if spec.cell == "notes-lstm":
        extra["lstm_output"] = spec.lstm_output
    manifest = Manifest(
        name=name,
        version=version,
        cell=spec.cell,
        input_kind=spec.input_kind,
        input_name=INPUT,
        input_size=spec.input_size,
        output_kind="logits" if tokens else "regression",
        output_name=OUTPUT,
        output_size=spec.output_size,
        states=states,
        layers=spec.layers,
        hidden_size=spec.hidden_size,
        sequence_lens=SEQUENCE_LENS,
        vocabulary=list(vocabulary) if vocabulary is not None else None,
        input_scaling=model.input_scaling,
        output_scaling=model.output_scaling,
        opset=opset,
        onnx_form=form,
        family=model.family,
        dataset=dict(dataset or {}),
        metrics=dict(metrics or {}),
        extra=extra,
    )
    try:
        manifest.validate()
    except ManifestError as exc:
        raise ExportError(f"the model cannot be described by a manifest: {exc}") from exc
    return manifest


def _write_version(target: Path, files: dict[str, bytes], manifest: Manifest) -> None:
    """Build the version folder beside ``target`` and rename it into place."""
    parent = target.parent
    # The topmost folder this call creates, removed again if the write fails.
    created = next((p for p in reversed([parent, *parent.parents]) if not p.exists()), None)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=parent, prefix=f".{target.name}.", suffix=".tmp"))
    except OSError as exc:
        raise ExportError(
            f"cannot write into {parent}: {exc.strerror or exc}; "
            "choose a writable output folder (--out)"
        ) from exc
    try:
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        manifest.save(tmp)
        if target.exists():
            raise ExportError(f"{target} already exists; choose a new version")
        # mkdtemp makes 0700 folders; a model repository is read by other users (the server).
        os.chmod(tmp, 0o755)
        os.rename(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if isinstance(exc, OSError):
            raise ExportError(f"cannot write {target}: {exc.strerror or exc}") from exc
        raise


def export_onnx(
    model: RecurrentModel,
    out_dir: Path,
    *,
    name: str,
    version: str,
    form: Form = "native",
    vocabulary: list[str] | None = None,
    dataset: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    opset: int = DEFAULT_OPSET,
    tolerance: float = 1e-5,
) -> Manifest:
    """Export ``model`` as ``out_dir/name/version/`` and return its manifest.

    Raises ExportError, having written nothing, when the arguments are wrong, the version exists,
    the folder is not writable, or ONNX Runtime misses PyTorch by more than ``tolerance`` (fp32
    max abs difference; see parity.py for the units).
    """
    _check_folder_name("name", name)
    _check_folder_name("version", version)
    if opset not in SUPPORTED_OPSETS:
        raise ExportError(
            f"opset {opset} is not supported; choose {SUPPORTED_OPSETS.start}.."
            f"{SUPPORTED_OPSETS.stop - 1} (default {DEFAULT_OPSET})"
        )
    target = Path(out_dir) / name / version
    if target.exists():
        raise ExportError(f"{target} already exists; choose a new version")
    built = resolve_form(model.spec.cell, form)
    # A private CPU float32 copy: the caller's model (maybe on a GPU, maybe training) is untouched.
    ref = copy.deepcopy(model).cpu().float().eval()
    manifest = _manifest(
        ref,
        name=name,
        version=version,
        form=built,
        requested_form=form,
        vocabulary=vocabulary,
        dataset=dataset,
        metrics=metrics,
        opset=opset,
    )
    proto = build_onnx(ref, form=built, opset=opset, metadata=metadata_of(manifest))
    data = proto.SerializeToString()
    report = check_parity(ref, data, tolerance=tolerance)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **make_golden(ref))
    manifest = replace(
        manifest,
        parity=report.to_dict(),
        golden=GOLDEN_FILE,
        sha256=hashlib.sha256(data).hexdigest(),
    )
    _write_version(target, {MODEL_FILE: data, GOLDEN_FILE: buf.getvalue()}, manifest)
    return manifest
