"""``rnnserve forecast``: stream a CSV column through a forecaster, predictions against truth.

A forecaster reads one value per step and predicts the next one (one-step-ahead, in the data's
own units), so the output at row ``t`` is compared with the value at row ``t + 1``.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import math
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

from ..client import Client
from ._common import CommandError, add_server_options, client_options, run_command

#: Values sent per message: long enough to amortise a round trip, short enough to show progress.
CHUNK = 64


def configure(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``rnnserve forecast``."""
    parser.add_argument("--model", required=True, help="a forecaster, e.g. co2-gru")
    parser.add_argument("--csv", required=True, type=Path, metavar="FILE", help="a CSV file")
    parser.add_argument("--column", required=True, help="the column of numbers to forecast")
    parser.add_argument("--plot", type=Path, metavar="PNG", help="also plot to this file")
    parser.add_argument("--version", default="", help="model version (default: the latest)")
    parser.add_argument(
        "--quiet", action="store_true", help="print only the summary, not every row"
    )
    add_server_options(parser)


def read_column(path: Path, column: str) -> npt.NDArray[np.float32]:
    """The numbers of one CSV column (with a header row); CommandError says what is wrong."""
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None:
                raise CommandError(f"{path} is empty")
            if column not in reader.fieldnames:
                names = ", ".join(reader.fieldnames)
                raise CommandError(f"{path} has no column {column!r}; its columns are: {names}")
            values = []
            for row in reader:
                raw = (row.get(column) or "").strip()
                try:
                    value = float(raw)
                except ValueError:
                    line = reader.line_num
                    raise CommandError(
                        f"{path} line {line}: {column} is {raw!r}, not a number"
                    ) from None
                if not math.isfinite(value):
                    raise CommandError(f"{path} line {reader.line_num}: {column} is {raw!r}")
                values.append(value)
    except OSError as exc:
        raise CommandError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CommandError(f"{path} is not a readable CSV file: {exc}") from None
    if len(values) < 2:
        raise CommandError(f"{path} has {len(values)} value(s) in {column}; need at least 2")
    return np.asarray(values, dtype=np.float32)


def save_plot(path: Path, truth: npt.NDArray[np.float32], pred: npt.NDArray[np.float32]) -> None:
    """Plot truth and one-step-ahead predictions to a PNG, written whole or not at all."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CommandError("--plot needs matplotlib: pip install matplotlib") from None
    fig, ax = plt.subplots(figsize=(10, 4))
    steps = np.arange(1, len(truth))
    ax.plot(steps, truth[1:], label="truth", linewidth=1)
    ax.plot(steps, pred[:-1], label="forecast (one step ahead)", linewidth=1)
    ax.set_xlabel("row")
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(suffix=".png", dir=path.parent if path.parent.exists() else None)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=120)
        os.replace(tmp, path)
    except OSError as exc:
        raise CommandError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)


def run(args: argparse.Namespace) -> int:
    """Stream the column, print each prediction beside the truth, then the RMSE."""

    def body() -> int:
        values = read_column(args.csv, args.column)
        if args.plot is not None and not args.plot.parent.is_dir():
            raise CommandError(f"cannot write {args.plot}: no folder {args.plot.parent}")
        if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
            # Said before the stream runs, not after: matplotlib is not a dependency of the SDK.
            raise CommandError(
                f"--plot needs matplotlib, which is not installed: {sys.executable} -m pip "
                "install matplotlib"
            )
        with Client(client_options(args)) as client:
            model = client.model(args.model, args.version)
            if model.is_tokens or model.step_shape != (1,):
                raise CommandError(
                    f"model {model.name} takes {model.input.describe()}; forecast streams one "
                    "column, so it needs a one-feature forecaster such as co2-gru"
                )

            def chunks() -> Iterator[npt.NDArray[np.float32]]:
                for start in range(0, len(values), CHUNK):
                    yield values[start : start + CHUNK]

            preds: list[npt.NDArray[np.float32]] = []
            done = 0
            if not args.quiet:
                print(f"{'row':>6}  {'truth':>12}  {'forecast':>12}  {'error':>10}")
            with client.session(model) as session:
                for out in session.stream(chunks()):
                    column = out[:, 0].astype(np.float32)
                    preds.append(column)
                    if not args.quiet:
                        _print_rows(values, column, done)
                    done += len(column)
        pred = np.concatenate(preds)
        err = pred[:-1] - values[1:]
        rmse = float(np.sqrt(np.mean(err.astype(np.float64) ** 2)))
        mae = float(np.mean(np.abs(err)))
        print(
            f"{len(err)} one-step-ahead forecasts of {args.column}: RMSE {rmse:.4g}, "
            f"MAE {mae:.4g}; next value after the last row: {pred[-1]:.6g}"
        )
        if args.plot is not None:
            save_plot(args.plot, values, pred)
            print(f"plot written to {args.plot}")
        return 0

    return run_command("forecast", body)


def _print_rows(values: npt.NDArray[np.float32], pred: npt.NDArray[np.generic], start: int) -> None:
    lines = []
    for i, p in enumerate(pred):
        t = start + i + 1  # the row this output predicts
        if t < len(values):
            lines.append(f"{t:>6}  {values[t]:>12.6g}  {p:>12.6g}  {p - values[t]:>10.4g}")
        else:
            lines.append(f"{t:>6}  {'-':>12}  {p:>12.6g}")
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
