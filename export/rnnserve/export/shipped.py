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
from rnnserve.export.ensemble import pack_runs
from rnnserve.export.onnx_export import Form, export_onnx
from rnnserve.export.runs import BEST, CHECKPOINT, CURVE, RunResult, run_training
from rnnserve.export.tasks import CharTask, TaskOptions
from rnnserve.export.train import TrainConfig, say
from rnnserve.manifest import Manifest, write_atomic

_CHAR = TaskOptions(batch_size=64, bptt=100, embedding_dim=32)
#: the ensemble's members: shorter windows (the state still crosses them), so an epoch of the
#: same 64 streams takes twice the steps (103)
_CHAR_WIDE = TaskOptions(batch_size=64, bptt=50, embedding_dim=32)
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
    #: more char GRU runs, trained after ``config``'s and packed with it into one wider GRU
    #: whose logits are the runs' mean (ensemble.py); empty for a model of one run
    also: tuple[TrainConfig, ...] = ()

    @property
    def members(self) -> tuple[TrainConfig, ...]:
        """The runs this model is made of: ``config``, then ``also``."""
        return (self.config, *self.also)


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
        "char-gru-ensemble",
        # one run fits the training text closely (no dropout, best epoch 13 of 16), the other
        # generalises better (dropout 0.25, best epoch 32 of 40); their mean beats either and
        # the 9-gram baseline (docs/training.md, "The char models against the n-gram")
        TrainConfig("char", "gru", hidden=512, epochs=16, lr=2e-3, options=_CHAR_WIDE),
        "two 512-wide nn.GRUs on the KJV text packed into one 1024-wide GRU that outputs the "
        "mean of their logits: the char model that beats the 9-gram baseline",
        also=(
            TrainConfig(
                "char", "gru", hidden=512, epochs=40, lr=2e-3, dropout=0.25, options=_CHAR_WIDE
            ),
        ),
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
        member_dirs = [run_dir] if not recipe.also else member_folders(run_dir, recipe)
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)
        log(f"== {recipe.name}: {recipe.about}")
        runs = [
            run_training(
                config,
                folder,
                resume=resume and (folder / CHECKPOINT).exists(),
                device=device,
                progress=progress,
                log=log,
            )
            for config, folder in zip(recipe.members, member_dirs, strict=True)
        ]
        result = runs[0] if not recipe.also else _pack(recipe, run_dir, member_dirs, runs, log)
        manifest = export_run(run_dir, models_dir, recipe.name, recipe.version, recipe.form)
        if curves_dir is not None:
            for i, folder in enumerate(member_dirs):
                suffix = f"-member-{i + 1}" if recipe.also else ""
                curve = curves_dir / f"{recipe.name}{suffix}-loss.png"
                write_atomic(curve, (folder / CURVE).read_bytes())
        log(
            f"exported {models_dir / recipe.name / recipe.version} ({manifest.onnx_form} form, "
            "parity "
            f"max abs diff {manifest.parity.get('max_abs_diff', float('nan')):.1e})"
        )
        results.append((recipe, result, manifest))
    return results


def member_folders(run_dir: Path, recipe: Recipe) -> list[Path]:
    """Where each run of an ensemble recipe trains: ``run_dir/member-1``, ``member-2``, ..."""
    return [run_dir / f"member-{i + 1}" for i in range(len(recipe.members))]


def _pack(
    recipe: Recipe,
    run_dir: Path,
    member_dirs: list[Path],
    runs: list[RunResult],
    log: Callable[[str], None],
) -> RunResult:
    """Pack the members' best epochs into ``run_dir/best.pt``; the packed model's result."""
    metrics = pack_runs(member_dirs, CharTask(recipe.config.options), run_dir)
    spec = load_checkpoint(run_dir / BEST)[0].spec
    log(
        f"packed {len(runs)} runs into one {spec.cell} of {spec.hidden_size}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
    )
    return RunResult(
        out_dir=run_dir,
        spec=spec,
        history=[],
        best_epoch=max(r.best_epoch for r in runs),
        best_metrics=metrics,
        seconds=sum(r.seconds for r in runs),
        metric=runs[0].metric,
    )
