"""Loss-curve plots (matplotlib's Agg backend: no display needed), written atomically as PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure
from rnnserve.manifest import write_atomic

if TYPE_CHECKING:
    from rnnserve.export.train import EpochRecord


def save_figure(fig: Figure, path: Path) -> None:
    """Render ``fig`` to PNG bytes and write them whole (never a half-written image)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_atomic(path, buffer.getvalue())


def plot_loss_curve(history: Sequence[EpochRecord], path: Path, *, title: str) -> None:
    """Training loss per step (faint) and per epoch, with the validation loss per epoch.

    The x axis counts epochs; step losses are spread evenly inside their epoch. Validation uses
    the metric ``val_loss`` when the task reports one, else ``val_mse``.
    """
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    xs: list[float] = []
    ys: list[float] = []
    for rec in history:
        n = len(rec.step_losses)
        xs.extend(rec.epoch - 1 + (i + 1) / n for i in range(n))
        ys.extend(rec.step_losses)
    if ys:
        ax.plot(xs, ys, color="tab:blue", alpha=0.25, linewidth=0.8, label="train (per batch)")
    epochs = [rec.epoch for rec in history]
    ax.plot(epochs, [r.train_loss for r in history], "o-", color="tab:blue", label="train (epoch)")
    key = "val_loss" if history and "val_loss" in history[0].metrics else "val_mse"
    if history and key in history[0].metrics:
        ax.plot(
            epochs,
            [r.metrics[key] for r in history],
            "s-",
            color="tab:orange",
            label=f"validation ({key})",
        )
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if ys and min(ys) > 0 and max(ys) / min(ys) > 20:
        ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path)
