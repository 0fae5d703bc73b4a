"""The shipped models: how each one in ``models/`` is trained, and ``train all`` that rebuilds them.

Each recipe is a ``TrainConfig`` plus a model name, version and ONNX form; ``train_all``
trains every recipe from scratch into ``runs/<name>/``, exports its best epoch to
``models/<name>/<version>/`` (replacing an older export of that version only once the new one
has passed its parity check), and copies the loss curve to ``docs/img/<name>-loss.png``.
A recipe whose training or exported graph changes what the model computes gets a new version,
so a client pinned to the old one is refused instead of served something else.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rnnserve.export.checkpoint import load_checkpoint
from rnnserve.export.onnx_export import Form, export_onnx
from rnnserve.export.runs import BEST, CURVE, RunResult, run_training
from rnnserve.export.tasks import TaskOptions
from rnnserve.export.train import TrainConfig, say
from rnnserve.manifest import Manifest, write_atomic

_CHAR = TaskOptions(batch_size=64, bptt=100, embedding_dim=32)
_CO2 = TaskOptions(batch_size=32, bptt=156, steps_per_epoch=40, residual=True)


@dataclass(frozen=True)
class Recipe:
    """One shipped model: its folder name under ``models/`` and how it is trained."""

    name: str
    config: TrainConfig
    about: str
    version: str = "1"
    #: "native" (one ONNX recurrent node per layer) or "matmul" (a Scan; runs on every provider)
    form: Form = "native"


RECIPES: tuple[Recipe, ...] = (
    Recipe(
        "char-notes-gru",
        TrainConfig("char", "notes-gru", hidden=128, epochs=8, lr=3e-3, options=_CHAR),
        "the notes' GRU (relevance gate before the recurrent product) on the KJV text",
    ),
    Recipe(
        "char-notes-lstm",
        TrainConfig(
            "char",
            "notes-lstm",
            hidden=128,
            epochs=8,
            # Adam diverged on this cell at every step size tried; SGD with the gradient
            # clipped to norm 1 trained it here (docs/training.md, "The notes' LSTM")
            optimizer="sgd",
            lr=1.0,
            clip=1.0,
            lstm_output="notes",
            options=_CHAR,
        ),
        "the notes' LSTM as the notes write it (update, forget, output gates; a = Γo ⊙ c) on "
        "the KJV text",
        version="2",
        # ONNX Runtime's CUDA LSTM kernel has no Affine (identity) output activation; the Scan
        # form runs on every provider.
        form="matmul",
    ),
    Recipe(
        "char-notes-lstm-tanh",
        TrainConfig("char", "notes-lstm", hidden=128, epochs=8, lr=3e-3, options=_CHAR),
        "the notes' LSTM with the common output a = Γo ⊙ tanh(c) on the KJV text",
    ),
    Recipe(
        "char-gru",
        TrainConfig("char", "gru", hidden=128, epochs=8, lr=3e-3, options=_CHAR),
        "PyTorch's nn.GRU on the KJV text",
    ),
    Recipe(
        "char-lstm",
        TrainConfig("char", "lstm", hidden=128, epochs=8, lr=3e-3, options=_CHAR),
        "PyTorch's nn.LSTM on the KJV text",
    ),
    Recipe(
        "co2-notes-gru",
        TrainConfig("forecast", "notes-gru", hidden=32, epochs=10, lr=3e-3, options=_CO2),
        "the notes' GRU forecasting next week's Mauna Loa CO2 in ppm (this week's level plus a "
        "learned change)",
        version="2",
    ),
    Recipe(
        "co2-gru",
        TrainConfig("forecast", "gru", hidden=32, epochs=10, lr=3e-3, options=_CO2),
        "PyTorch's nn.GRU forecasting next week's Mauna Loa CO2 in ppm (this week's level plus "
        "a learned change)",
        version="2",
    ),
)


def recipe_names() -> list[str]:
    return [r.name for r in RECIPES]


def export_run(
    run_dir: Path, models_dir: Path, name: str, version: str = "1", form: Form = "native"
) -> Manifest:
    """Export ``run_dir/best.pt`` as ``models_dir/name/version``, replacing an older export.

    The new version is exported (and parity-checked) into a staging folder first, so a failure
    leaves the old export in place.
    """
    model, info = load_checkpoint(run_dir / BEST)
    models_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=models_dir, prefix=f".{name}.staging."))
    try:
        vocabulary = info["vocabulary"]
        metrics = dict(info["metrics"])
        metrics["epoch"] = info["epoch"]
        manifest = export_onnx(
            model,
            staging,
            name=name,
            version=version,
            form=form,
            vocabulary=list(vocabulary) if vocabulary is not None else None,
            dataset=info["dataset"],
            metrics=metrics,
        )
        target = models_dir / name / version
        target.parent.mkdir(parents=True, exist_ok=True)
        old = staging / "old"
        if target.exists():
            target.rename(old)
        (staging / name / version).rename(target)
        return manifest
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train_all(
    runs_dir: Path,
    models_dir: Path,
    *,
    curves_dir: Path | None,
    names: list[str] | None = None,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] = say,
) -> list[tuple[Recipe, RunResult, Manifest]]:
    """Train and export every shipped model (or those in ``names``), each from scratch.

    A model's old run folder is removed first unless ``resume`` is set, in which case an
    interrupted ``train all`` continues each run from its last checkpoint.
    """
    chosen = [r for r in RECIPES if names is None or r.name in names]
    unknown = sorted(set(names or []) - {r.name for r in RECIPES})
    if unknown:
        raise ValueError(
            f"unknown shipped model(s) {', '.join(unknown)}; "
            f"choose from {', '.join(recipe_names())}"
        )
    results = []
    for recipe in chosen:
        run_dir = runs_dir / recipe.name
        has_run = (run_dir / "checkpoint.pt").exists()
        if has_run and not resume:
            shutil.rmtree(run_dir)
        log(f"== {recipe.name}: {recipe.about}")
        result = run_training(
            recipe.config,
            run_dir,
            resume=resume and has_run,
            device=device,
            progress=progress,
            log=log,
        )
        manifest = export_run(run_dir, models_dir, recipe.name, recipe.version, recipe.form)
        if curves_dir is not None:
            write_atomic(curves_dir / f"{recipe.name}-loss.png", (run_dir / CURVE).read_bytes())
        log(
            f"exported {models_dir / recipe.name / recipe.version} ({manifest.onnx_form} form, "
            "parity "
            f"max abs diff {manifest.parity.get('max_abs_diff', float('nan')):.1e})"
        )
        results.append((recipe, result, manifest))
    return results
