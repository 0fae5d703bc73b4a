"""A training run in a folder: checkpoints, best epoch, history, loss curve, ``--resume``.

``run_training`` wraps ``train.fit``: ``checkpoint.pt`` after every epoch, ``best.pt`` when the
validation metric improves (both written atomically), ``history.json`` and ``loss.png``; with
``resume`` it continues the run in the folder from its last checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from rnnserve.export.checkpoint import (
    CheckpointError,
    check_spec,
    read_checkpoint,
    save_checkpoint,
    scaling_to_dict,
)
from rnnserve.export.curves import plot_loss_curve
from rnnserve.export.model import RecurrentModel
from rnnserve.export.spec import ModelSpec
from rnnserve.export.tasks import make_task
from rnnserve.export.train import EpochRecord, TrainConfig, fit, pick_device, say
from rnnserve.manifest import write_atomic

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
HISTORY = "history.json"
CURVE = "loss.png"


@dataclass
class RunResult:
    """The outcome of ``run_training``: where things were written and the final numbers."""

    out_dir: Path
    spec: ModelSpec
    history: list[EpochRecord]
    best_epoch: int
    best_metrics: dict[str, float]
    seconds: float
    metric: str


def check_writable(folder: Path) -> None:
    """Create ``folder`` if needed and prove a file can be written there (OSError if not)."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=folder, prefix=".probe.")
    os.close(fd)
    Path(probe).unlink()


def run_training(
    config: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    device: torch.device | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> RunResult:
    """Train into ``out_dir``: ``checkpoint.pt`` every epoch, ``best.pt``, history, loss curve.

    Raises ValueError (DataError, CheckpointError) for bad settings or data, and OSError when
    ``out_dir`` cannot be written, before anything is written. With ``resume``, continues the
    run in ``out_dir`` from its last checkpoint, which must hold the same architecture.
    """
    log = log or say
    out_dir = Path(out_dir)
    task = make_task(config.task, config.options)
    spec = task.spec(config.cell, config.hidden, config.layers, config.lstm_output)
    start: dict[str, Any] | None = None
    existing = out_dir / CHECKPOINT
    if resume:
        start = read_checkpoint(existing)
        check_spec(ModelSpec.from_dict(start["spec"]), spec, existing)
        saved = TrainConfig.from_dict(start["config"])
        if replace(saved, epochs=config.epochs) != config:
            raise CheckpointError(
                f"{existing} was trained with other settings ({_diff(saved, config)}); "
                "resume with the same options (only --epochs may change)"
            )
    elif existing.exists():
        raise CheckpointError(
            f"{out_dir} already holds a run; pass --resume to continue it, or choose another --out"
        )
    check_writable(out_dir)
    device = device or pick_device()
    best: dict[str, Any] = {"epoch": 0, "value": math.inf, "metrics": {}}
    if start is not None:
        for h in start.get("history", []):
            if h["metrics"][task.metric] < best["value"]:
                best = {
                    "epoch": h["epoch"],
                    "value": h["metrics"][task.metric],
                    "metrics": h["metrics"],
                }
    log(
        f"training {spec.cell} on {task.name} ({task.facts.get('name', '')}): hidden "
        f"{spec.hidden_size}, {spec.layers} layer(s), {config.epochs} epochs, seed {config.seed}, "
        f"device {device}" + (f", resuming after epoch {start['epoch']}" if start else "")
    )
    t0 = time.perf_counter()
    history: list[EpochRecord] = [EpochRecord(**h) for h in (start or {}).get("history", [])]

    def on_epoch(model: RecurrentModel, optimizer: torch.optim.Optimizer, rec: EpochRecord) -> None:
        history.append(rec)
        payload = {
            "spec": spec.to_dict(),
            "config": config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "optimizer": _to_cpu(optimizer.state_dict()),
            "epoch": rec.epoch,
            "rng": {"torch": torch.get_rng_state(), "numpy_seed": [config.seed, rec.epoch + 1]},
            "vocabulary": task.vocabulary,
            "input_scaling": scaling_to_dict(task.input_scaling),
            "output_scaling": scaling_to_dict(task.output_scaling),
            "dataset": task.facts,
            "metrics": rec.metrics,
            "history": [asdict(h) for h in history],
        }
        save_checkpoint(out_dir / CHECKPOINT, payload)
        if rec.metrics[task.metric] < best["value"]:
            best.update(epoch=rec.epoch, value=rec.metrics[task.metric], metrics=rec.metrics)
            save_checkpoint(out_dir / BEST, payload)
        write_atomic(
            out_dir / HISTORY,
            json.dumps([asdict(h) for h in history], indent=1).encode(),
        )
        plot_loss_curve(history, out_dir / CURVE, title=f"{spec.cell} on {task.facts.get('name')}")
        shown = ", ".join(f"{k} {v:.4f}" for k, v in rec.metrics.items())
        log(
            f"epoch {rec.epoch}/{config.epochs}: train loss {rec.train_loss:.4f}, {shown} "
            f"({rec.seconds:.1f} s)"
        )

    fit(task, config, device=device, progress=progress, start=start, on_epoch=on_epoch)
    return RunResult(
        out_dir=out_dir,
        spec=spec,
        history=history,
        best_epoch=int(best["epoch"]),
        best_metrics=dict(best["metrics"]),
        seconds=time.perf_counter() - t0,
        metric=task.metric,
    )


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


def _diff(a: TrainConfig, b: TrainConfig) -> str:
    da, db = a.to_dict(), b.to_dict()
    da.update(da.pop("options"))
    db.update(db.pop("options"))
    return ", ".join(f"{k} {da[k]!r} vs {db[k]!r}" for k in da if da[k] != db.get(k))
