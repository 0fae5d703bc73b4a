"""``rnnserve train char|forecast|adding|all``: train a model, or rebuild every shipped model.

    rnnserve train char --cell notes-gru --hidden 128 --epochs 8 --out runs/char
    rnnserve train forecast --cell gru --out runs/co2 [--resume]
    rnnserve train adding --length 50 --cell rnn --out runs/adding
    rnnserve train adding --experiment            (the long-lag experiment -> docs/long-lag.md)
    rnnserve train char --baselines               (the n-gram baseline on the same split)
    rnnserve train forecast --baselines           (naive, seasonal naive, AR, SARIMA)
    rnnserve train all --out runs --models models (train + export every shipped model)

Bad input (unknown cell kind, impossible sizes, a missing or empty corpus, a checkpoint of
another architecture, an unwritable output folder) is one line on stderr and exit code 2,
before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from rnnserve.export.cli_train_options import DEFAULTS, NOTES_LSTM_DEFAULTS, configure

EXIT_BAD_INPUT = 2

__all__ = ["NOTES_LSTM_DEFAULTS", "build_config", "configure", "run"]


class BadInput(ValueError):
    """A command-line value that cannot work; the message says what to pass instead."""


def _fail(message: str) -> int:
    print(f"rnnserve train: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _ints(text: str, what: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"--{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise BadInput(f"--{what} is empty")
    return values


def build_config(args: argparse.Namespace) -> Any:
    """The TrainConfig the arguments describe; BadInput names the option to fix."""
    from rnnserve.export.spec import CELL_KINDS
    from rnnserve.export.tasks import TASKS, TaskOptions
    from rnnserve.export.train import TrainConfig

    if args.task not in TASKS:
        raise BadInput(f"unknown task {args.task!r}; choose one of {', '.join(TASKS)} or all")
    if args.cell not in CELL_KINDS:
        raise BadInput(f"unknown cell kind {args.cell!r}; choose one of {', '.join(CELL_KINDS)}")
    if args.schedule not in ("cosine", "constant"):
        raise BadInput(f"--schedule must be cosine or constant, got {args.schedule!r}")
    if args.lstm_output not in ("tanh", "notes"):
        raise BadInput(f"--lstm-output must be tanh or notes, got {args.lstm_output!r}")
    d = dict(DEFAULTS[args.task])
    if args.cell == "notes-lstm" and args.lstm_output == "notes":
        d.update(NOTES_LSTM_DEFAULTS)

    def pick(name: str, value: Any) -> Any:
        return d.get(name) if value is None else value

    config = TrainConfig(
        task=args.task,
        cell=args.cell,
        hidden=pick("hidden", args.hidden),
        layers=args.layers,
        epochs=pick("epochs", args.epochs),
        seed=args.seed,
        lr=pick("lr", args.lr),
        clip=pick("clip", args.clip),
        lstm_output=args.lstm_output,
        warmup=pick("warmup", args.warmup) or 0,
        optimizer=pick("optimizer", args.optimizer) or "adam",
        forget_bias=pick("forget_bias", args.forget_bias),
        activation_penalty=pick("activation_penalty", args.activation_penalty) or 0.0,
        schedule=args.schedule,
        dropout=args.dropout,
        options=TaskOptions(
            batch_size=pick("batch_size", args.batch_size),
            bptt=pick("bptt", args.bptt) or 100,
            steps_per_epoch=pick("steps", args.steps) or 50,
            length=pick("length", args.length) or 50,
            embedding_dim=args.embedding,
            corpus=args.corpus,
            corpus_limit=args.corpus_limit,
            residual=args.residual,
        ),
    )
    for name, value in (
        ("--hidden", config.hidden),
        ("--layers", config.layers),
        ("--epochs", config.epochs),
        ("--batch-size", config.options.batch_size),
        ("--bptt", config.options.bptt),
        ("--steps", config.options.steps_per_epoch),
        ("--embedding", config.options.embedding_dim),
    ):
        if value < 1:
            raise BadInput(f"{name} must be at least 1, got {value}")
    if config.optimizer not in ("adam", "sgd"):
        raise BadInput(f"--optimizer must be adam or sgd, got {config.optimizer!r}")
    if config.activation_penalty < 0:
        raise BadInput(f"--activation-penalty must be 0 or more, got {config.activation_penalty}")
    if not 0.0 <= config.dropout < 1.0:
        raise BadInput(f"--dropout must be at least 0 and below 1, got {config.dropout}")
    if config.warmup < 0:
        raise BadInput(f"--warmup must be 0 or more, got {config.warmup}")
    if config.options.residual and config.task != "forecast":
        raise BadInput("--residual goes with the forecast task")
    if not config.lr > 0 or not config.clip > 0:
        raise BadInput("--lr and --clip must be positive")
    if config.options.corpus_limit is not None and config.options.corpus_limit < 1:
        raise BadInput("--corpus-limit must be at least 1")
    return config


def _summary(result: Any) -> str:
    best = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items())
    last = result.history[-1] if result.history else None
    lines = [
        f"done in {result.seconds:.0f} s: {result.spec.cell}, hidden {result.spec.hidden_size}, "
        f"{sum(1 for _ in result.history)} epochs",
        f"best epoch {result.best_epoch} by {result.metric}: {best}",
    ]
    if last is not None:
        lines.append(f"last epoch {last.epoch}: train loss {last.train_loss:.4f}")
    lines.append(f"files: {result.out_dir}/checkpoint.pt (last), best.pt, history.json, loss.png")
    return "\n".join(lines)


def _run_one(args: argparse.Namespace) -> int:
    from rnnserve.export.runs import run_training
    from rnnserve.export.train import pick_device

    config = build_config(args)
    out = args.out or Path("runs") / f"{config.task}-{config.cell}"
    result = run_training(
        config,
        out,
        resume=args.resume,
        device=pick_device(args.device),
        progress=not args.quiet,
    )
    print(_summary(result))
    return 0


def _run_all(args: argparse.Namespace) -> int:
    from rnnserve.export.model import build_model
    from rnnserve.export.shipped import train_all
    from rnnserve.export.train import pick_device

    names = [n.strip() for n in args.only.split(",")] if args.only else None
    results = train_all(
        args.out or Path("runs"),
        args.models,
        curves_dir=args.curves,
        names=names,
        resume=args.resume,
        device=pick_device(args.device),
        progress=not args.quiet,
    )
    print(f"\n{'model':<18} {'cell':<11} {'params':>8} {'best':>4} {'seconds':>7}  best metrics")
    for recipe, result, _ in results:
        params = sum(p.numel() for p in build_model(result.spec).parameters())
        shown = ", ".join(f"{k} {v:.4f}" for k, v in result.best_metrics.items())
        print(
            f"{recipe.name:<18} {recipe.config.cell:<11} {params:>8} "
            f"{result.best_epoch:>4} {result.seconds:>7.0f}  {shown}"
        )
    print(f"models written to {args.models}/<name>/<version>; runs in {args.out or 'runs'}")
    return 0


def _run_experiment(args: argparse.Namespace) -> int:
    from rnnserve.export.experiments import ExperimentConfig, run_experiment

    base = ExperimentConfig()
    config = replace(
        base,
        lags=tuple(_ints(args.lags, "lags")),
        seeds=tuple(_ints(args.seeds, "seeds")),
        cells=tuple(c.strip() for c in args.cells.split(",") if c.strip()),
        steps=args.steps or base.steps,
    )
    run_experiment(config, args.docs, progress=not args.quiet)
    return 0


def _run_baselines(args: argparse.Namespace) -> int:
    from rnnserve.export.baselines import char_baselines, forecast_baselines
    from rnnserve.export.tasks import CharTask, ForecastTask

    config = build_config(args)
    if config.task == "char":
        task = CharTask(config.options)
        result = char_baselines(task.corpus)
        print(
            f"uniform over {len(task.corpus.vocabulary)} characters: "
            f"{result['uniform_bpc']:.3f} bits/char"
        )
        print("order  held-out tail of training  validation   (interpolated Kneser-Ney n-gram)")
        for n, bpc in result["valid_bpc"].items():
            mark = "  <- chosen on the held-out tail" if n == result["chosen_order"] else ""
            print(f"{n:>5}  {result['held_out_bpc'][n]:>25.3f}  {bpc:>10.3f}{mark}")
        return 0
    if config.task == "forecast":
        series = ForecastTask(config.options).series
        result = forecast_baselines(series)
        print(
            f"one-step-ahead forecasts of the {series.values.size - series.split} validation "
            "weeks, ppm"
        )
        for name, scores in result.items():
            print(f"{name:<22} RMSE {scores['rmse']:.3f}  MAE {scores['mae']:.3f}")
        sarima = result["sarima"]
        print(
            f"sarima: {sarima['order']}, parameters {sarima['params']} fitted on the training "
            f"weeks in {sarima['seconds']:.0f} s"
        )
        return 0
    raise BadInput("--baselines goes with the char or forecast task")


def run(args: argparse.Namespace) -> int:
    """Train as asked; 0 on success, 2 on bad input (one line on stderr, nothing written)."""
    import torch
    from rnnserve.export.checkpoint import CheckpointError
    from rnnserve.export.datasets import DataError
    from rnnserve.export.onnx_export import ExportError

    try:
        if args.threads < 1:
            raise BadInput(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        if args.task == "all":
            return _run_all(args)
        if args.baselines:
            return _run_baselines(args)
        if args.experiment:
            if args.task != "adding":
                raise BadInput(
                    "--experiment goes with the adding task: rnnserve train adding --experiment"
                )
            return _run_experiment(args)
        return _run_one(args)
    except (BadInput, DataError, CheckpointError, ExportError, FloatingPointError) as exc:
        return _fail(str(exc))
    except ValueError as exc:
        return _fail(str(exc))
    except OSError as exc:
        where = f" {exc.filename}" if exc.filename else ""
        return _fail(f"cannot write{where}: {exc.strerror or exc}; choose a writable --out folder")
