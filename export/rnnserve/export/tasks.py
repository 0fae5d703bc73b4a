"""What is learned: the three training tasks, each a data set, a loss and validation metrics.

A task owns its data and knows how to turn it into training batches, how to score a batch, and
how to evaluate a model on the validation part. The training loop (train.py) is the same for all.
Every model is time-major (``[T, B, ...]``) and, for real-valued data, speaks the data's units:
the scaling is baked into the model, and losses are taken in scaled units.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rnnserve.export.cells import State
from rnnserve.export.datasets import (
    DataError,
    adding_batch,
    load_char_corpus,
    load_co2,
)
from rnnserve.export.model import RecurrentModel
from rnnserve.export.spec import ModelSpec
from rnnserve.manifest import Scaling
from torch import Tensor
from torch.nn import functional as F

TASKS = ("char", "forecast", "adding")
#: the adding problem counts a prediction within this distance of the target as correct
ADDING_TOLERANCE = 0.04
#: the adding problem's validation set is drawn from this seed, the same for every model
ADDING_VALID_SEED = 20_250_101


@dataclass(frozen=True)
class TaskOptions:
    """Task-specific settings, with the defaults used for the shipped models.

    ``bptt``: truncated back-propagation length (char) or window length (forecast), in steps.
    ``length``: the adding problem's sequence length (its lag). ``steps_per_epoch``: batches per
    epoch for the sampled tasks (forecast, adding); a char epoch is one pass over the text.
    ``residual``: forecast only, the model outputs this week's level plus a learned change, in
    units of the training weeks' typical weekly change (``ModelSpec.residual``).
    """

    batch_size: int = 64
    bptt: int = 100
    steps_per_epoch: int = 50
    length: int = 50
    embedding_dim: int = 32
    corpus: str | None = None
    corpus_limit: int | None = None
    valid_size: int = 1000
    residual: bool = False


Batch = tuple[Tensor, Tensor, bool]  # inputs, targets, whether the state carries over


class Task(ABC):
    """One task. Subclasses set the data facts in ``__init__`` (DataError on bad data)."""

    name: str
    #: the validation metric that picks the best epoch; lower is better
    metric: str
    vocabulary: list[str] | None = None
    input_scaling: Scaling | None = None
    output_scaling: Scaling | None = None
    facts: dict[str, Any]

    def __init__(self, options: TaskOptions) -> None:
        self.options = options

    @abstractmethod
    def spec(self, cell: str, hidden: int, layers: int, lstm_output: str = "tanh") -> ModelSpec:
        """The model architecture this task trains, for the given cell and sizes."""

    @staticmethod
    def _feature_spec(
        cell: str, hidden: int, layers: int, lstm_output: str, input_size: int, residual: float
    ) -> ModelSpec:
        """A validated spec of a real-valued model with one regression output per step."""
        spec = ModelSpec(
            cell=cell,
            input_kind="features",
            input_size=input_size,
            hidden_size=hidden,
            layers=layers,
            output_size=1,
            lstm_output=lstm_output,  # type: ignore[arg-type]
            residual=residual,
        )
        spec.validate()
        return spec

    @abstractmethod
    def batches(self, rng: np.random.Generator, device: torch.device) -> Iterator[Batch]:
        """One epoch of training batches, drawn from ``rng`` only (so a seed fixes them)."""

    @abstractmethod
    def loss(
        self, model: RecurrentModel, x: Tensor, y: Tensor, state: State | None
    ) -> tuple[Tensor, State]:
        """The training loss of one batch and the state at its end."""

    @abstractmethod
    def evaluate(self, model: RecurrentModel, device: torch.device) -> dict[str, float]:
        """Validation metrics (``self.metric`` among them), computed without gradients."""


class CharTask(Task):
    """Next-character prediction with truncated BPTT over parallel streams of the text.

    Each epoch cuts the training text into ``batch_size`` contiguous streams (from a random
    offset) and walks them in windows of ``bptt`` characters, carrying the memory cell from one
    window to the next but not its gradient. Metrics: cross-entropy in nats and bits per char.
    """

    name = "char"
    metric = "val_loss"

    def __init__(self, options: TaskOptions) -> None:
        super().__init__(options)
        path = Path(options.corpus) if options.corpus else None
        corpus = load_char_corpus(path, limit=options.corpus_limit)
        needed = options.batch_size * (options.bptt + 1) * 2
        if corpus.train.size < needed:
            raise DataError(
                f"the corpus's training part has {corpus.train.size} characters; batch size "
                f"{options.batch_size} x bptt {options.bptt} needs at least {needed}: "
                "use a longer text or smaller --batch-size / --bptt"
            )
        self.corpus = corpus
        self.vocabulary = corpus.vocabulary
        self.facts = corpus.facts

    def spec(self, cell: str, hidden: int, layers: int, lstm_output: str = "tanh") -> ModelSpec:
        v = len(self.corpus.vocabulary)
        spec = ModelSpec(
            cell=cell,
            input_kind="tokens",
            input_size=v,
            hidden_size=hidden,
            layers=layers,
            output_size=v,
            embedding_dim=self.options.embedding_dim,
            lstm_output=lstm_output,  # type: ignore[arg-type]
            residual=1.0 if self.options.residual else 0.0,
        )
        spec.validate()
        return spec

    def batches(self, rng: np.random.Generator, device: torch.device) -> Iterator[Batch]:
        b, t = self.options.batch_size, self.options.bptt
        offset = int(rng.integers(0, t))
        ids = self.corpus.train[offset:]
        per_stream = (ids.size - 1) // b
        streams = torch.from_numpy(ids[: per_stream * b + 1].copy())
        x_all = streams[:-1].view(b, per_stream).T
        y_all = streams[1:].view(b, per_stream).T
        for start in range(0, per_stream - t + 1, t):
            x = x_all[start : start + t].contiguous().to(device)
            y = y_all[start : start + t].contiguous().to(device)
            yield x, y, start > 0

    def loss(
        self, model: RecurrentModel, x: Tensor, y: Tensor, state: State | None
    ) -> tuple[Tensor, State]:
        logits, state = model(x, state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1)), state

    @torch.no_grad()
    def evaluate(self, model: RecurrentModel, device: torch.device) -> dict[str, float]:
        ids = self.corpus.valid
        streams = max(1, min(16, (ids.size - 1) // 64))
        per_stream = (ids.size - 1) // streams
        data = torch.from_numpy(ids[: per_stream * streams + 1].copy())
        x_all = data[:-1].view(streams, per_stream).T.to(device)
        y_all = data[1:].view(streams, per_stream).T.to(device)
        state: State | None = None
        total, count = 0.0, 0
        for start in range(0, per_stream, 256):
            x, y = x_all[start : start + 256], y_all[start : start + 256]
            logits, state = model(x, state)
            total += float(
                F.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
                )
            )
            count += y.numel()
        nats = total / count
        return {"val_loss": nats, "val_bpc": nats / math.log(2.0)}


class ForecastTask(Task):
    """One-step-ahead forecasting of the weekly Mauna Loa CO2 record, in ppm.

    Input at week t: the CO2 level of week t; target: the level of week t+1. Training draws
    windows of ``bptt`` weeks from the training years; the first quarter of each window only
    warms the memory cell up and is not scored. To teach the model that the seasonal shape does
    not depend on the level (validation levels lie above every training level), each window is
    shifted by a random constant number of ppm, inputs and targets alike.
    Validation runs the model over the whole record from a zero state and scores the
    validation weeks' forecasts: RMSE in ppm, next to the naive forecast "next = this week".
    """

    name = "forecast"
    metric = "val_rmse"
    #: random level shift of a training window, in units of the scaling's std
    SHIFT = (-1.0, 2.0)

    def __init__(self, options: TaskOptions) -> None:
        super().__init__(options)
        self.series = load_co2()
        scaling = Scaling(mean=[self.series.mean], std=[self.series.std])
        self.input_scaling = scaling
        self.output_scaling = scaling
        self.facts = self.series.facts
        if self.series.split <= options.bptt + 1:
            raise DataError(f"--bptt {options.bptt} is longer than the training series")
        #: the residual model's step: the root mean square weekly change of the training weeks
        self.change_scale = (
            float(np.sqrt(np.mean(np.diff(self.series.train.astype(np.float64)) ** 2)))
            if options.residual
            else 0.0
        )

    def spec(self, cell: str, hidden: int, layers: int, lstm_output: str = "tanh") -> ModelSpec:
        return self._feature_spec(
            cell, hidden, layers, lstm_output, input_size=1, residual=self.change_scale
        )

    def batches(self, rng: np.random.Generator, device: torch.device) -> Iterator[Batch]:
        b, w = self.options.batch_size, self.options.bptt
        train = self.series.train
        for _ in range(self.options.steps_per_epoch):
            starts = rng.integers(0, train.size - w, size=b)
            shift = rng.uniform(*self.SHIFT, size=b).astype(np.float32) * self.series.std
            idx = starts[None, :] + np.arange(w + 1)[:, None]
            window = train[idx] + shift[None, :]
            x = torch.from_numpy(window[:-1, :, None].copy()).to(device)
            y = torch.from_numpy(window[1:, :, None].copy()).to(device)
            yield x, y, False

    def loss(
        self, model: RecurrentModel, x: Tensor, y: Tensor, state: State | None
    ) -> tuple[Tensor, State]:
        pred, state = model(x, state)
        warm = x.shape[0] // 4
        scaled = (pred[warm:] - y[warm:]) / self.series.std
        return (scaled**2).mean(), state

    @torch.no_grad()
    def evaluate(self, model: RecurrentModel, device: torch.device) -> dict[str, float]:
        values, split = self.series.values, self.series.split
        x = torch.from_numpy(values[:-1, None, None].copy()).to(device)
        pred, _ = model(x)
        forecast = pred[:, 0, 0].double().cpu().numpy()[split - 1 :]
        truth = values[split:].astype(np.float64)
        naive = values[split - 1 : -1].astype(np.float64)
        rmse = float(np.sqrt(np.mean((forecast - truth) ** 2)))
        return {
            "val_rmse": rmse,
            "val_mae": float(np.mean(np.abs(forecast - truth))),
            "naive_rmse": float(np.sqrt(np.mean((naive - truth) ** 2))),
            "val_loss": (rmse / self.series.std) ** 2,
        }


class AddingTask(Task):
    """The adding problem at sequence length ``length``: read the sum out at the last step.

    Metrics on a fixed validation set (the same for every model): MSE, and accuracy, the share
    of sequences whose prediction is within ``ADDING_TOLERANCE`` of the target. Predicting the
    mean scores MSE 0.167 and accuracy about 0.07.
    """

    name = "adding"
    metric = "val_mse"

    def __init__(self, options: TaskOptions) -> None:
        super().__init__(options)
        if options.length < 2:
            raise DataError(f"--length must be at least 2, got {options.length}")
        self.valid = adding_batch(
            options.length, options.valid_size, np.random.default_rng(ADDING_VALID_SEED)
        )
        self.facts = {
            "name": f"adding-problem-T{options.length}",
            "source": "generated: the adding problem of Hochreiter & Schmidhuber (1997)",
            "licence": "generated data",
            "length": options.length,
            "valid_sequences": options.valid_size,
            "valid_seed": ADDING_VALID_SEED,
        }

    def spec(self, cell: str, hidden: int, layers: int, lstm_output: str = "tanh") -> ModelSpec:
        return self._feature_spec(
            cell, hidden, layers, lstm_output, input_size=2, residual=float(self.options.residual)
        )

    def batches(self, rng: np.random.Generator, device: torch.device) -> Iterator[Batch]:
        for _ in range(self.options.steps_per_epoch):
            x, y = adding_batch(self.options.length, self.options.batch_size, rng)
            yield torch.from_numpy(x).to(device), torch.from_numpy(y).to(device), False

    def loss(
        self, model: RecurrentModel, x: Tensor, y: Tensor, state: State | None
    ) -> tuple[Tensor, State]:
        pred, state = model(x, state)
        return F.mse_loss(pred[-1, :, 0], y), state

    @torch.no_grad()
    def evaluate(self, model: RecurrentModel, device: torch.device) -> dict[str, float]:
        x, y = (torch.from_numpy(a).to(device) for a in self.valid)
        pred, _ = model(x)
        err = pred[-1, :, 0] - y
        return {
            "val_mse": float((err**2).mean()),
            "val_accuracy": float((err.abs() < ADDING_TOLERANCE).float().mean()),
        }


def make_task(name: str, options: TaskOptions) -> Task:
    """The task called ``name``; DataError (a ValueError) when its data cannot be loaded."""
    classes: dict[str, type[Task]] = {
        "char": CharTask,
        "forecast": ForecastTask,
        "adding": AddingTask,
    }
    if name not in classes:
        raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return classes[name](options)
