"""The training loop: Adam, gradient clipping, deterministic seeds, a checkpoint every epoch.

``fit`` trains a model on a task for a number of epochs; ``runs.run_training`` wraps it with a
run folder (checkpoints, history, loss curve, summary) and ``--resume``.

Determinism: the weights are initialised after ``torch.manual_seed(seed)``, and epoch ``e``
draws its batches from ``numpy.random.default_rng([seed, e])`` alone. So an epoch's data does
not depend on what ran before it, and a run resumed from the checkpoint of epoch ``e`` (weights
and optimiser state) continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from rnnserve.export.cells import NotesLSTMCell, State, init_torch_lstm_forget_bias
from rnnserve.export.model import RecurrentModel, build_model
from rnnserve.export.spec import ModelSpec
from rnnserve.export.tasks import Task, TaskOptions
from torch import Tensor
from tqdm import tqdm


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
    #: in training only, zeroes this share of the embedding's outputs and of the top layer's
    #: activation before the head (scaling the rest up); the model and its export are unchanged
    dropout: float = 0.0
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
    hooks = [hook] if hook is not None else []
    if config.dropout:
        hooks += _dropout_hooks(model, config.dropout)
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
    for h in hooks:
        h.remove()
    return losses


def _dropout_hooks(model: RecurrentModel, p: float) -> list[torch.utils.hooks.RemovableHandle]:
    """Dropout on what the first layer reads (the embedding's output) and on what the head
    reads, as hooks that live for one epoch of training."""

    def on_head(_m: torch.nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        return (torch.nn.functional.dropout(args[0], p, training=True), *args[1:])

    hooks = [model.head.register_forward_pre_hook(on_head)]
    if model.embedding is not None:
        hooks.append(
            model.embedding.register_forward_hook(
                lambda _m, _args, out: torch.nn.functional.dropout(out, p, training=True)
            )
        )
    return hooks


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
