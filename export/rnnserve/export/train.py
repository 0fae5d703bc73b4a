"""The training loop: Adam, gradient clipping, deterministic seeds, a checkpoint every epoch.

``fit`` trains a model on a task for a number of epochs; ``run_training`` wraps it with a run
folder (checkpoints, history, loss curve, summary) and ``--resume``.

Determinism: the weights are initialised after ``torch.manual_seed(seed)``, and epoch ``e``
draws its batches from ``numpy.random.default_rng([seed, e])`` alone. So an epoch's data does
not depend on what ran before it, and a run resumed from the checkpoint of epoch ``e`` (weights
and optimiser state) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rnnserve.export.cells import NotesLSTMCell, State, init_torch_lstm_forget_bias
from rnnserve.export.checkpoint import (
    CheckpointError,
    check_spec,
    read_checkpoint,
    save_checkpoint,
    scaling_to_dict,
)
from rnnserve.export.curves import plot_loss_curve
from rnnserve.export.model import RecurrentModel, build_model
from rnnserve.export.spec import ModelSpec
from rnnserve.export.tasks import Task, TaskOptions, make_task
from rnnserve.manifest import write_atomic
from torch import Tensor
from tqdm import tqdm

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
HISTORY = "history.json"
CURVE = "loss.png"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run; saved in every checkpoint."""

    task: str
    cell: str = "notes-gru"
    hidden: int = 128
    layers: int = 1
    epochs: int = 10
    seed: int = 0
    lr: float = 3e-3
    clip: float = 1.0
    lstm_output: str = "tanh"
    #: batches of linear learning-rate warm-up at the start of training: batch ``i`` (counted
    #: from 0 over the whole run) uses ``lr * min(1, (i + 1) / warmup)``; 0 for none
    warmup: int = 0
    #: the LSTMs' initial forget-gate bias; None keeps ``cells.LSTM_FORGET_BIAS`` (+1)
    forget_bias: float | None = None
    #: adds ``activation_penalty * mean(a²)`` of the top layer's activation at every step (what
    #: the head reads) to the loss it minimises; the reported loss leaves it out. It keeps an
    #: unbounded activation, the notes' LSTM output ``a = Γo ⊙ c``, from growing until its
    #: gates saturate and the memory cell runs away (docs/training.md, "The notes' LSTM")
    activation_penalty: float = 0.0
    #: "adam", or "sgd" (plain SGD: each step is lr times the clipped gradient, so ``clip``
    #: bounds how far one step moves the weights; Adam moves every weight by about lr whatever
    #: its gradient, which tipped the notes' LSTM output ``a = Γo ⊙ c`` into a runaway)
    optimizer: str = "adam"
    #: "cosine": the learning rate falls from lr to lr/10 along a half cosine over the epochs;
    #: "constant": lr throughout. A function of the epoch only, so resuming needs no state.
    schedule: str = "cosine"
    options: TaskOptions = field(default_factory=TaskOptions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        fields = dict(data)
        fields["options"] = TaskOptions(**fields.get("options", {}))
        return cls(**fields)


@dataclass
class EpochRecord:
    """One epoch's outcome: the mean training loss, validation metrics, wall seconds."""

    epoch: int
    train_loss: float
    metrics: dict[str, float]
    seconds: float
    step_losses: list[float] = field(default_factory=list)


def say(message: str) -> None:
    """Print a progress line at once, even when stdout is a file or a pipe."""
    print(message, flush=True)


def pick_device(name: str | None = None) -> torch.device:
    """``name`` when given, else the GPU when torch sees one, else the CPU."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def new_model(task: Task, config: TrainConfig) -> tuple[ModelSpec, RecurrentModel]:
    """The task's model for ``config``, initialised from ``config.seed``."""
    spec = task.spec(config.cell, config.hidden, config.layers, config.lstm_output)
    torch.manual_seed(config.seed)
    model = build_model(spec, input_scaling=task.input_scaling, output_scaling=task.output_scaling)
    if config.forget_bias is not None:
        set_forget_bias(model, config.forget_bias)
    return spec, model


def set_forget_bias(model: RecurrentModel, value: float) -> None:
    """Start every LSTM layer of ``model`` (the notes' or nn.LSTM) with forget-gate bias
    ``value``; other cells have no forget gate and are left alone."""
    for module in model.modules():
        if isinstance(module, NotesLSTMCell):
            with torch.no_grad():
                module.bias[module.gate("f")].fill_(value)
        elif isinstance(module, torch.nn.LSTM):
            init_torch_lstm_forget_bias(module, value)


def make_optimizer(config: TrainConfig, model: RecurrentModel) -> torch.optim.Optimizer:
    """The optimiser ``config.optimizer`` names, over every weight of ``model``."""
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr)
    if config.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=config.lr)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adam or sgd")


def learning_rate(config: TrainConfig, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (1-based) under ``config.schedule``."""
    if config.schedule == "constant" or config.epochs <= 1:
        return config.lr
    if config.schedule != "cosine":
        raise ValueError(f"unknown schedule {config.schedule!r}; choose cosine or constant")
    progress = (epoch - 1) / (config.epochs - 1)
    return config.lr * (0.1 + 0.45 * (1.0 + math.cos(math.pi * progress)))


def warmup_factor(config: TrainConfig, step: int) -> float:
    """The warm-up's share of the learning rate at batch ``step`` (0-based, whole run)."""
    return 1.0 if config.warmup <= 0 else min(1.0, (step + 1) / config.warmup)


def train_epoch(
    task: Task,
    model: RecurrentModel,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    epoch: int,
    device: torch.device,
    progress: bool,
    first_step: int = 0,
) -> list[float]:
    """One epoch of Adam steps with clipped gradients; returns each step's loss.

    ``first_step`` is the number of batches run before this epoch (for the warm-up).
    """
    rng = np.random.default_rng([config.seed, epoch])
    torch.manual_seed(config.seed * 100_003 + epoch)
    base_lr = learning_rate(config, epoch)
    model.train()
    state: State | None = None
    losses: list[float] = []
    seen: list[Tensor] = []
    hook = (
        model.head.register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        if config.activation_penalty
        else None
    )
    bar = tqdm(
        task.batches(rng, device),
        desc=f"epoch {epoch}/{config.epochs}",
        unit="batch",
        leave=False,
        disable=not progress,
        dynamic_ncols=True,
    )
    for x, y, carry in bar:
        # Truncated BPTT: the memory cell crosses into the next window, its gradient does not.
        prev = tuple(s.detach() for s in state) if carry and state is not None else None
        for group in optimizer.param_groups:
            group["lr"] = base_lr * warmup_factor(config, first_step + len(losses))
        seen.clear()
        loss, state = task.loss(model, x, y, prev)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {float(loss.detach())} at epoch {epoch}; lower --lr"
            )
        total = loss
        if seen:
            total = loss + config.activation_penalty * seen[0].pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        total.backward()  # type: ignore[no-untyped-call]
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    if hook is not None:
        hook.remove()
    return losses


def fit(
    task: Task,
    config: TrainConfig,
    *,
    device: torch.device | None = None,
    progress: bool = False,
    start: dict[str, Any] | None = None,
    on_epoch: Callable[[RecurrentModel, torch.optim.Optimizer, EpochRecord], None] | None = None,
) -> tuple[RecurrentModel, list[EpochRecord]]:
    """Train ``config.epochs`` epochs of ``task``; returns the final model and its history.

    ``start`` is a checkpoint dict to continue from (its epochs are not run again).
    ``on_epoch`` is called after each epoch's validation, with the model in eval mode.
    """
    device = device or pick_device()
    _spec, model = new_model(task, config)
    optimizer = make_optimizer(config, model)
    history: list[EpochRecord] = []
    first = 1
    if start is not None:
        model.load_state_dict(start["model"])
        model.to(device)
        optimizer.load_state_dict(start["optimizer"])
        torch.set_rng_state(start["rng"]["torch"])
        history = [EpochRecord(**h) for h in start.get("history", [])]
        first = int(start["epoch"]) + 1
    model.to(device)
    # Adam's state loaded on the CPU must follow the model onto its device.
    for st in optimizer.state.values():
        for k, v in st.items():
            if isinstance(v, torch.Tensor) and k != "step":
                st[k] = v.to(device)
    for epoch in range(first, config.epochs + 1):
        t0 = time.perf_counter()
        done = sum(len(h.step_losses) for h in history)
        losses = train_epoch(task, model, optimizer, config, epoch, device, progress, done)
        model.eval()
        metrics = task.evaluate(model, device)
        record = EpochRecord(
            epoch=epoch,
            train_loss=float(np.mean(losses)) if losses else math.nan,
            metrics=metrics,
            seconds=time.perf_counter() - t0,
            step_losses=losses,
        )
        history.append(record)
        if on_epoch is not None:
            on_epoch(model, optimizer, record)
    model.eval()
    return model.cpu(), history


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
