"""The models the frames benchmark measures: GRU and LSTM at hidden 128 and 512.

Hidden 128 are the shipped ``char-gru`` and ``char-lstm`` (copied, so a model retrained in the
shared repository during a run is not hot-reloaded into it). Other sizes are bench-only models
of the same architecture (the shipped spec with another ``hidden_size``: token ids through an
embedding, one native ONNX GRU/LSTM layer, a MatMul head), random weights (seeded), exported
with ``rnnserve.export`` (torch, the ``train`` extra) through its parity check. Random weights
cost the same to run as trained ones: the graph and the shapes are what the time depends on.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from rnnserve.manifest import Manifest, load_manifest

#: The shipped model of each cell, whose spec the other sizes copy.
SHIPPED = {"gru": "char-gru", "lstm": "char-lstm"}


@dataclass(frozen=True)
class BenchModel:
    """One model in the benchmark's repository."""

    name: str
    cell: str
    hidden: int
    version_dir: Path
    #: Where it comes from, for the report.
    origin: str

    @property
    def label(self) -> str:
        return f"{self.cell.upper()}-{self.hidden}"


def latest_version(folder: Path) -> Path:
    """The highest version folder (by number) of a model folder that holds a manifest."""
    versions = [v for v in folder.iterdir() if (v / "manifest.json").is_file()]
    if not versions:
        raise FileNotFoundError(f"{folder} holds no version with a manifest.json")
    return max(versions, key=lambda v: (len(v.name), v.name))


def _export(source: Manifest, hidden: int, root: Path, name: str, seed: int) -> Path:
    """Export the shipped spec at ``hidden`` with random weights as ``root/name/1``."""
    import torch
    from rnnserve.export.model import build_model
    from rnnserve.export.onnx_export import export_onnx
    from rnnserve.export.spec import ModelSpec

    spec = dict(source.extra["spec"])
    spec["hidden_size"] = hidden
    torch.manual_seed(seed)
    model = build_model(ModelSpec.from_dict(spec)).eval()
    export_onnx(
        model,
        root,
        name=name,
        version="1",
        form="native",
        vocabulary=source.vocabulary,
        dataset={"name": "none (random weights, a benchmark model)"},
    )
    return root / name / "1"


def build_repository(
    root: Path,
    shipped: Path,
    cells: tuple[str, ...] = ("gru", "lstm"),
    hiddens: tuple[int, ...] = (128, 512),
) -> list[BenchModel]:
    """Write the benchmark's model repository into ``root``; its models, in (hidden, cell)
    order. FileNotFoundError when a shipped model is missing."""
    out: list[BenchModel] = []
    for hidden in hiddens:
        for cell in cells:
            base = shipped / SHIPPED[cell]
            source_dir = latest_version(base)
            source = load_manifest(source_dir)
            if source.hidden_size == hidden:
                target = root / source.name / source_dir.name
                shutil.copytree(source_dir, target)
                origin = f"shipped `{source.name}` version {source.version}"
                out.append(BenchModel(source.name, cell, hidden, target, origin))
                continue
            name = f"{source.name}-h{hidden}"
            target = _export(source, hidden, root, name, seed=hidden)
            origin = (
                f"`{name}`: the spec of `{source.name}` at hidden {hidden}, random weights "
                "(bench/models.py)"
            )
            out.append(BenchModel(name, cell, hidden, target, origin))
    return out
